/* Payload codec and the outgoing frame queue. The host is trusted more than
 * the guest, but its bytes are still checked: every read is bounded by the
 * payload length and a failed read poisons the reader instead of returning
 * garbage. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

void rd_init(struct rd *r, const uint8_t *p, uint32_t len)
{
    r->p = p;
    r->len = len;
    r->pos = 0;
    r->bad = 0;
}

static const uint8_t *take(struct rd *r, uint32_t n)
{
    if (r->bad || n > r->len - r->pos) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t *q = r->p + r->pos;
    r->pos += n;
    return q;
}

static uint64_t le(const uint8_t *q, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | q[i];
    return v;
}

uint8_t rd_u8(struct rd *r)
{
    const uint8_t *q = take(r, 1);
    return q ? q[0] : 0;
}

uint16_t rd_u16(struct rd *r)
{
    const uint8_t *q = take(r, 2);
    return q ? (uint16_t)le(q, 2) : 0;
}

uint32_t rd_u32(struct rd *r)
{
    const uint8_t *q = take(r, 4);
    return q ? (uint32_t)le(q, 4) : 0;
}

int64_t rd_i64(struct rd *r)
{
    const uint8_t *q = take(r, 8);
    return q ? (int64_t)le(q, 8) : 0;
}

const uint8_t *rd_bytes(struct rd *r, uint32_t limit, uint32_t *n)
{
    uint32_t l = rd_u32(r);
    if (r->bad || l > limit) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t *q = take(r, l);
    *n = q ? l : 0;
    return q;
}

char *rd_str(struct rd *r, uint32_t limit)
{
    uint32_t n = 0;
    const uint8_t *q = rd_bytes(r, limit, &n);
    if (!q || memchr(q, 0, n)) {
        r->bad = 1;
        return NULL;
    }
    char *s = malloc((size_t)n + 1);
    if (!s) {
        r->bad = 1;
        return NULL;
    }
    memcpy(s, q, n);
    s[n] = 0;
    return s;
}

void strv_free(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

char **rd_strv(struct rd *r, uint32_t *count)
{
    uint32_t n = rd_u32(r);
    /* each entry needs at least its 4-byte length: bound the allocation */
    if (r->bad || n > (r->len - r->pos) / 4) {
        r->bad = 1;
        return NULL;
    }
    char **v = calloc((size_t)n + 1, sizeof(char *));
    if (!v) {
        r->bad = 1;
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++) {
        v[i] = rd_str(r, MAX_PAYLOAD);
        if (!v[i]) {
            strv_free(v);
            return NULL;
        }
    }
    *count = n;
    return v;
}

int rd_end(struct rd *r)
{
    return (r->bad || r->pos != r->len) ? -1 : 0;
}

void wr_init(struct wr *w)
{
    w->len = 0;
    w->bad = 0;
}

static void put(struct wr *w, const void *p, uint32_t n)
{
    if (w->bad || n > MAX_PAYLOAD - w->len) {
        w->bad = 1;
        return;
    }
    memcpy(w->buf + w->len, p, n);
    w->len += n;
}

static void put_le(struct wr *w, uint64_t v, int n)
{
    uint8_t b[8];
    for (int i = 0; i < n; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    put(w, b, (uint32_t)n);
}

void wr_u8(struct wr *w, uint8_t v) { put_le(w, v, 1); }
void wr_u16(struct wr *w, uint16_t v) { put_le(w, v, 2); }
void wr_u32(struct wr *w, uint32_t v) { put_le(w, v, 4); }
void wr_u64(struct wr *w, uint64_t v) { put_le(w, v, 8); }

void wr_bytes(struct wr *w, const void *p, uint32_t n)
{
    wr_u32(w, n);
    put(w, p, n);
}

/* ---- outgoing queue ----
 * One contiguous buffer; the loop stops reading child pipes well before it is
 * full, so only control frames can push it past OUT_SOFT, and OUT_CAP leaves
 * room for them. If it ever would overflow, we block until the host reads.
 * Bytes obuf[ohead, olen) are queued: a write takes what it can (up to 32 KiB
 * on a virtio port) and only advances ohead, so streaming never memmoves the
 * whole queue per write; out_frame compacts when it needs room at the end. */
#define OUT_CAP (2u << 20)

static uint8_t *obuf;
static size_t olen, ohead;
static int ofd = -1;

void out_init(int fd)
{
    ofd = fd;
    if (!obuf)
        obuf = malloc(OUT_CAP);
    if (!obuf) {
        logmsg("out of memory for the output queue");
        _exit(1);
    }
    olen = ohead = 0;
}

size_t out_pending(void) { return olen - ohead; }

int out_flush(int blocking)
{
    while (olen > ohead) {
        ssize_t n = write(ofd, obuf + ohead, olen - ohead);
        if (n > 0) {
            ohead += (size_t)n;
            if (ohead == olen)
                olen = ohead = 0;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!blocking)
                return 0;
            struct pollfd p = {.fd = ofd, .events = POLLOUT};
            if (poll(&p, 1, 1000) < 0 && errno != EINTR)
                return -1;
            continue;
        }
        olen = ohead = 0; /* channel broken: drop what cannot be delivered, never spin on it */
        return -1;
    }
    return 0;
}

void out_frame(uint8_t type, uint32_t stream, const void *payload, uint32_t len)
{
    if (len > MAX_PAYLOAD)
        len = MAX_PAYLOAD; /* never happens: callers bound their payloads */
    if (OUT_CAP - olen < HDR_SIZE + (size_t)len && ohead) {
        memmove(obuf, obuf + ohead, olen - ohead);
        olen -= ohead;
        ohead = 0;
    }
    if (OUT_CAP - olen < HDR_SIZE + (size_t)len) {
        if (out_flush(1) < 0) {
            olen = ohead = 0; /* channel gone: nothing can be delivered any more */
            return;
        }
    }
    uint8_t *h = obuf + olen;
    memcpy(h, "SPAG", 4);
    h[4] = PROTO_VERSION;
    h[5] = type;
    h[6] = h[7] = 0;
    for (int i = 0; i < 4; i++) {
        h[8 + i] = (uint8_t)(stream >> (8 * i));
        h[12 + i] = (uint8_t)(len >> (8 * i));
    }
    if (len)
        memcpy(h + HDR_SIZE, payload, len);
    olen += HDR_SIZE + (size_t)len;
}

void send_error(uint32_t stream, uint16_t code, int err, const char *fmt, ...)
{
    char msg[MAX_ERRMSG];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    static struct wr w;
    wr_init(&w);
    wr_u16(&w, code);
    wr_u32(&w, (uint32_t)err);
    wr_bytes(&w, msg, (uint32_t)n);
    out_frame(T_ERROR, stream, w.buf, w.len);
}

void send_done(uint32_t stream) { out_frame(T_DONE, stream, NULL, 0); }

uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void logmsg(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t ignored = write(2, "spore-init: ", 12);
    ignored = write(2, buf, (size_t)n);
    (void)ignored;
}
