/* Probe tests for the virtio devices (tests/test_probe_virtio.py attaches them). */
#include "virtio.h"

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_F_RO (1u << 5)
#define BLK_F_BLK_SIZE (1u << 6)
#define BLK_MAX_SECTORS 128 /* the probe reads the whole disk: keep it at most 64 KiB */
#define BLK_CHUNK 8192

struct blk_hdr {
    u32 type, reserved;
    u64 sector;
};

static u8 disk[BLK_MAX_SECTORS * 512] __attribute__((aligned(4096)));
static struct blk_hdr hdr;
static u8 blk_status;

/* One request: header, data (split in two descriptors when long enough), status. */
static int blk_req(struct vdev *d, u32 type, u64 sector, void *data, u32 len, int writable,
                   u32 *used) {
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    blk_status = 0xff;
    struct vbuf b[4];
    int n = 0;
    b[n++] = (struct vbuf){&hdr, sizeof(hdr), 0};
    if (len >= 1024) {
        b[n++] = (struct vbuf){data, len / 2, writable};
        b[n++] = (struct vbuf){(u8 *)data + len / 2, len - len / 2, writable};
    } else if (len) {
        b[n++] = (struct vbuf){data, len, writable};
    }
    b[n++] = (struct vbuf){&blk_status, 1, 1};
    int r = vq_run(d, 0, b, n, used);
    return r ? r : 0;
}

static u64 checksum(const u8 *p, u64 n) {
    u64 h = 0xcbf29ce484222325UL;
    for (u64 i = 0; i + 8 <= n; i += 8) h = (h ^ *(const u64 *)(p + i)) * 0x100000001b3UL;
    return h;
}

/* Reads the whole disk and prints its checksum; GET_ID; FLUSH; a write and an
 * out-of-range read must fail with IOERR. */
PROBE_TEST(virtio_blk) {
    struct vdev d;
    int r = virtio_find(VIRTIO_ID_BLK, &d);
    if (r) return 0x100 + r;
    r = virtio_start(&d, 1, BLK_F_RO | BLK_F_BLK_SIZE);
    if (r) return 0x100 + r;
    if (!(d.features & BLK_F_RO)) return 0x201;
    u64 cap = mmio_r64(d.base + VMMIO_CONFIG);
    if (cap == 0 || cap > BLK_MAX_SECTORS) return 0x202;
    if (mmio_r32(d.base + VMMIO_CONFIG + 20) != 512) return 0x203; /* blk_size */
    u32 used;
    for (u64 s = 0; s < cap; s += BLK_CHUNK / 512) {
        u32 len = (cap - s) * 512 < BLK_CHUNK ? (u32)((cap - s) * 512) : BLK_CHUNK;
        if ((r = blk_req(&d, BLK_T_IN, s, disk + s * 512, len, 1, &used))) return 0x300 + r;
        if (blk_status != BLK_S_OK) return 0x204;
        if (used != len + 1) return 0x205;
    }
    puts_("probe: blk capacity ");
    puthex(cap);
    puts_(" sum ");
    puthex(checksum(disk, cap * 512));
    puts_("\n");

    static char id[21];
    memset(id, 0, sizeof(id));
    if ((r = blk_req(&d, BLK_T_GET_ID, 0, id, 20, 1, &used))) return 0x300 + r;
    if (blk_status != BLK_S_OK || used != 21) return 0x206;
    puts_("probe: blk id ");
    puts_(id);
    puts_("\n");

    if ((r = blk_req(&d, BLK_T_FLUSH, 0, 0, 0, 0, &used))) return 0x300 + r;
    if (blk_status != BLK_S_OK || used != 1) return 0x207;

    /* A write to the read-only disk: IOERR, and the data must not land anywhere. */
    memset(disk, 0x5a, 512);
    if ((r = blk_req(&d, BLK_T_OUT, 0, disk, 512, 0, &used))) return 0x300 + r;
    if (blk_status != BLK_S_IOERR || used != 1) return 0x208;
    /* Out of range: the sector after the last one, and a read straddling the end. */
    if ((r = blk_req(&d, BLK_T_IN, cap, disk, 512, 1, &used))) return 0x300 + r;
    if (blk_status != BLK_S_IOERR || used != 1) return 0x209;
    if ((r = blk_req(&d, BLK_T_IN, cap - 1, disk, 1024, 1, &used))) return 0x300 + r;
    if (blk_status != BLK_S_IOERR) return 0x20a;
    /* The device still serves good requests after the failed ones. */
    if ((r = blk_req(&d, BLK_T_IN, 0, disk, 512, 1, &used))) return 0x300 + r;
    if (blk_status != BLK_S_OK || used != 513) return 0x20b;
    puts_("probe: blk sector0 ");
    puthex(checksum(disk, 512));
    puts_("\n");
    return 0;
}

static u8 rng_buf[64];

static int rng_read(struct vdev *d) {
    memset(rng_buf, 0, sizeof(rng_buf));
    struct vbuf b = {rng_buf, sizeof(rng_buf), 1};
    u32 used = 0;
    int r = vq_run(d, 0, &b, 1, &used);
    if (r) return r;
    if (used != sizeof(rng_buf)) return 0x50;
    u8 any = 0;
    for (u32 i = 0; i < sizeof(rng_buf); i++) any |= rng_buf[i];
    return any ? 0 : 0x51;
}

PROBE_TEST(virtio_rng) {
    struct vdev d;
    int r = virtio_find(VIRTIO_ID_RNG, &d);
    if (r) return 0x100 + r;
    if ((r = virtio_start(&d, 1, 0))) return 0x100 + r;
    if ((r = rng_read(&d))) return 0x200 + r;
    u8 first[8];
    memcpy(first, rng_buf, 8);
    if ((r = rng_read(&d))) return 0x300 + r;
    u8 diff = 0;
    for (int i = 0; i < 8; i++) diff |= first[i] ^ rng_buf[i];
    return diff ? 0 : 0x400;
}

/* Transmit a greeting, receive one line from the host, send it back as "echo:<line>". */
PROBE_TEST(virtio_console) {
    static const char hello[] = "probe-console: hello\n";
    static u8 line[128];
    struct vdev d;
    int r = virtio_find(VIRTIO_ID_CONSOLE, &d);
    if (r) return 0x100 + r;
    if ((r = virtio_start(&d, 2, 0))) return 0x100 + r;
    if (mmio_r32(d.base + VMMIO_CONFIG + 4) != 1) return 0x201; /* max_nr_ports */
    cons_rx_post(&d);
    if ((r = cons_write(&d, hello, sizeof(hello) - 1))) return 0x300 + r;
    memcpy(line, "echo:", 5);
    u32 n = 5;
    while (n == 5 || line[n - 1] != '\n') {
        int got = cons_read(&d, line + n, sizeof(line) - n, 20000000);
        if (got < 0) return 0x202;
        n += (u32)got;
        if (n == sizeof(line)) return 0x203;
    }
    if ((r = cons_write(&d, line, n))) return 0x400 + r;
    return 0;
}

/* A descriptor loop must put the device into DEVICE_NEEDS_RESET (the VMM keeps running);
 * while it is there, kicks are ignored; after a reset it works again. Checkpoints on the
 * test port (offset 8) let the host look at the transport at each step. */
PROBE_TEST(virtio_hostile) {
    struct vdev d;
    int r = virtio_find(VIRTIO_ID_RNG, &d);
    if (r) return 0x100 + r;
    if ((r = virtio_start(&d, 1, 0))) return 0x100 + r;
    if ((r = rng_read(&d))) return 0x200 + r;
    struct vq *q = &d.q[0];
    q->desc[0] = (struct vring_desc){(u64)rng_buf, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1};
    q->desc[1] = (struct vring_desc){(u64)rng_buf + 16, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0};
    vq_kick_head(&d, 0, 0);
    /* The kick may be handled on the VMM's device thread (ioeventfd): wait for it. */
    u32 st = vreg(&d, VMMIO_STATUS);
    for (u32 spins = 100000; !(st & ST_NEEDS_RESET) && spins; spins--) st = vreg(&d, VMMIO_STATUS);
    outl(PROBE_TEST_PORT + 8, 1);
    if (!(st & ST_NEEDS_RESET)) return 0x301;
    if (!(st & ST_DRIVER_OK)) return 0x302;
    u32 isr = vreg(&d, VMMIO_INTERRUPT_STATUS);
    if (!(isr & INT_CONFIG)) return 0x303;
    vreg_w(&d, VMMIO_INTERRUPT_ACK, isr);
    if (vreg(&d, VMMIO_INTERRUPT_STATUS) != 0) return 0x304;
    /* Stopped: a well-formed request is not served. */
    struct vbuf b = {rng_buf, sizeof(rng_buf), 1};
    vq_post(&d, 0, &b, 1);
    if (vq_poll(&d, 0, 0, 1000) != -1) return 0x305;
    outl(PROBE_TEST_PORT + 8, 2);
    /* Reset and start over. */
    if ((r = virtio_start(&d, 1, 0))) return 0x400 + r;
    if ((r = rng_read(&d))) return 0x500 + r;
    outl(PROBE_TEST_PORT + 8, 3);
    return 0;
}
