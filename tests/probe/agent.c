/* The guest side of the agent protocol (docs/agent-protocol.md), minimally, over the
 * virtio console: READY, then HELLO -> ACK, EXEC -> STARTED + STDOUT("probe-exec:<argv0>")
 * + EXIT(code 7) (no process runs: this tests the transport and the framing), SHUTDOWN ->
 * DONE and the test ends. Anything else is answered with ERROR unknown type. */
#include "virtio.h"

#define AG_VERSION 1
#define AG_HELLO 0x01
#define AG_EXEC 0x02
#define AG_SHUTDOWN 0x07
#define AG_READY 0x81
#define AG_ACK 0x82
#define AG_STARTED 0x83
#define AG_STDOUT 0x84
#define AG_EXIT 0x86
#define AG_ERROR 0x87
#define AG_DONE 0x89
#define AG_CAPS ((1u << AG_HELLO) | (1u << AG_EXEC) | (1u << AG_SHUTDOWN))
#define AG_EXIT_CODE 7

static const char agent_version[] = "probe-1";
static u8 out[1024];
static u32 out_len;
static u8 in[2048];
static u32 in_len;

static void w8(u8 v) { out[out_len++] = v; }
static void w16(u16 v) { w8((u8)v); w8((u8)(v >> 8)); }
static void w32(u32 v) { w16((u16)v); w16((u16)(v >> 16)); }
static void w64(u64 v) { w32((u32)v); w32((u32)(v >> 32)); }
static void wbytes(const void *p, u32 n) { memcpy(out + out_len, p, n); out_len += n; }
static void wstr(const char *s, u32 n) { w32(n); wbytes(s, n); }

static void frame_begin(u8 type, u32 stream) {
    out_len = 0;
    wbytes("SPAG", 4);
    w8(AG_VERSION);
    w8(type);
    w16(0);
    w32(stream);
    w32(0); /* length, patched by frame_send */
}

static int frame_send(struct vdev *d) {
    u32 len = out_len - 16;
    out[12] = (u8)len; out[13] = (u8)(len >> 8); out[14] = (u8)(len >> 16); out[15] = (u8)(len >> 24);
    return cons_write(d, out, out_len);
}

static u32 r32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }
static u64 r64(const u8 *p) { return r32(p) | (u64)r32(p + 4) << 32; }

/* EXEC payload: u8 flags, u32 timeout, u8 mode, str cwd, list argv, list env. Finds argv[0]. */
static int exec_argv0(const u8 *p, u32 n, const u8 **arg, u32 *arg_len) {
    u32 off = 6;
    if (n < off + 4) return -1;
    u32 cwd = r32(p + off);
    off += 4;
    if (cwd > n - off) return -1;
    off += cwd;
    if (n - off < 8 || r32(p + off) == 0) return -1; /* argv count, then argv[0]'s length */
    u32 len = r32(p + off + 4);
    off += 8;
    if (len > n - off || len > 200) return -1;
    *arg = p + off;
    *arg_len = len;
    return 0;
}

static int handle(struct vdev *d, u8 type, u32 stream, const u8 *p, u32 n, int *execs) {
    int r;
    if (type == AG_HELLO && n == 12) {
        frame_begin(AG_ACK, stream);
        w64(r64(p));
        wstr(agent_version, sizeof(agent_version) - 1);
        w64(AG_CAPS);
        return frame_send(d);
    }
    if (type == AG_EXEC) {
        const u8 *arg;
        u32 alen;
        if (exec_argv0(p, n, &arg, &alen)) {
            frame_begin(AG_ERROR, stream);
            w16(3); /* bad payload */
            w32(0);
            wstr("bad EXEC payload", 16);
            return frame_send(d);
        }
        frame_begin(AG_STARTED, stream);
        w32(2);
        if ((r = frame_send(d))) return r;
        frame_begin(AG_STDOUT, stream);
        wbytes("probe-exec:", 11);
        wbytes(arg, alen);
        if ((r = frame_send(d))) return r;
        frame_begin(AG_EXIT, stream);
        w8(0); /* not signaled */
        w8(0); /* not timed out */
        w32(AG_EXIT_CODE);
        w64(0);
        w64(0);
        w64(0);
        (*execs)++;
        return frame_send(d);
    }
    if (type == AG_SHUTDOWN) {
        frame_begin(AG_DONE, stream);
        if ((r = frame_send(d))) return r;
        return -1; /* done */
    }
    frame_begin(AG_ERROR, stream);
    w16(2); /* unknown type */
    w32(0);
    wstr("probe agent: unsupported", 24);
    return frame_send(d);
}

PROBE_TEST(virtio_agent) {
    struct vdev d;
    int r = virtio_find(VIRTIO_ID_CONSOLE, &d);
    if (r) return 0x100 + r;
    if ((r = virtio_start(&d, 2, 0))) return 0x100 + r;
    cons_rx_post(&d);
    frame_begin(AG_READY, 0);
    w32(AG_VERSION);
    wstr(agent_version, sizeof(agent_version) - 1);
    w64(AG_CAPS);
    w32(1);  /* pid */
    w64(0);  /* boottime ns: the probe keeps no clock */
    w32(1);  /* CPUs online */
    if ((r = frame_send(&d))) return 0x200 + r;
    int execs = 0;
    in_len = 0;
    for (;;) {
        int got = cons_read(&d, in + in_len, sizeof(in) - in_len, 40000000);
        if (got < 0) return 0x300;
        in_len += (u32)got;
        while (in_len >= 16) {
            if (r32(in) != 0x47415053u || in[4] != AG_VERSION || in[6] || in[7]) return 0x301;
            u32 len = r32(in + 12);
            if (len > sizeof(in) - 16) return 0x302; /* the probe only takes small frames */
            if (in_len < 16 + len) break;
            r = handle(&d, in[5], r32(in + 8), in + 16, len, &execs);
            if (r == -1) return execs ? 0 : 0x303;
            if (r) return 0x400 + r;
            u32 used = 16 + len;
            for (u32 i = used; i < in_len; i++) in[i - used] = in[i];
            in_len -= used;
        }
        if (in_len == sizeof(in)) return 0x304;
    }
}
