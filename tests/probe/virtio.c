/* The probe's virtio-mmio v2 driver: discovery, negotiation, split queues, polling. */
#include "virtio.h"

static u8 vq_pages[VDEV_MAX][VQ_MAX][4096] __attribute__((aligned(4096)));
static u8 cons_rxbuf[256] __attribute__((aligned(16)));
static u8 cons_txbuf[4096] __attribute__((aligned(16)));

static const char *probe_cmdline(void) {
    return (const char *)(u64)*(u32 *)(probe_boot_params + 0x228);
}

static int starts_with(const char *s, const char *p) {
    while (*p)
        if (*s++ != *p++) return 0;
    return 1;
}

int virtio_find(u32 id, struct vdev *d) {
    static const char key[] = "virtio_mmio.device=";
    const char *s = probe_cmdline();
    u32 slot = 0;
    while (*s) {
        if (starts_with(s, key)) {
            const char *p = s + sizeof(key) - 1, *end;
            u64 size = parse_num(p, &end);
            if (*end == 'K') { size <<= 10; end++; }
            if (*end != '@' || size != 4096) return 1;
            u64 base = parse_num(end + 1, &end);
            if (*end != ':') return 2;
            u32 irq = (u32)parse_num(end + 1, 0);
            if (slot >= VDEV_MAX) return 3;
            if (mmio_r32(base + VMMIO_MAGIC) != VIRTIO_MAGIC) return 4;
            if (mmio_r32(base + VMMIO_VERSION) != 2) return 5;
            if (mmio_r32(base + VMMIO_DEVICE_ID) == id) {
                memset(d, 0, sizeof(*d));
                d->base = base;
                d->irq = irq;
                d->id = id;
                d->slot = slot;
                return 0;
            }
            slot++;
        }
        while (*s && *s != ' ') s++;
        while (*s == ' ') s++;
    }
    return 6; /* no such device declared */
}

int virtio_start(struct vdev *d, int nq, u32 want) {
    if (nq < 1 || nq > VQ_MAX) return 0x10;
    vreg_w(d, VMMIO_STATUS, 0);
    if (vreg(d, VMMIO_STATUS) != 0) return 0x11;
    vreg_w(d, VMMIO_STATUS, ST_ACKNOWLEDGE);
    vreg_w(d, VMMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
    vreg_w(d, VMMIO_DEVICE_FEATURES_SEL, 0);
    u32 lo = vreg(d, VMMIO_DEVICE_FEATURES);
    vreg_w(d, VMMIO_DEVICE_FEATURES_SEL, 1);
    u32 hi = vreg(d, VMMIO_DEVICE_FEATURES);
    d->features = (u64)hi << 32 | lo;
    if (!(hi & 1)) return 0x12; /* VIRTIO_F_VERSION_1 */
    vreg_w(d, VMMIO_DRIVER_FEATURES_SEL, 0);
    vreg_w(d, VMMIO_DRIVER_FEATURES, lo & want);
    vreg_w(d, VMMIO_DRIVER_FEATURES_SEL, 1);
    vreg_w(d, VMMIO_DRIVER_FEATURES, 1);
    vreg_w(d, VMMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    if (!(vreg(d, VMMIO_STATUS) & ST_FEATURES_OK)) return 0x13;
    for (int i = 0; i < nq; i++) {
        struct vq *q = &d->q[i];
        u8 *page = vq_pages[d->slot][i];
        vreg_w(d, VMMIO_QUEUE_SEL, (u32)i);
        if (vreg(d, VMMIO_QUEUE_NUM_MAX) < VQ_SIZE) return 0x14;
        if (vreg(d, VMMIO_QUEUE_READY) != 0) return 0x15;
        memset(page, 0, 4096);
        q->desc = (struct vring_desc *)page;
        q->avail = (volatile u16 *)(page + 256);
        q->used = (volatile u32 *)(page + 512);
        q->avail_idx = q->last_used = 0;
        vreg_w(d, VMMIO_QUEUE_NUM, VQ_SIZE);
        vreg_w(d, VMMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
        vreg_w(d, VMMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
        vreg_w(d, VMMIO_QUEUE_DRIVER_LOW, (u32)(u64)q->avail);
        vreg_w(d, VMMIO_QUEUE_DRIVER_HIGH, (u32)((u64)q->avail >> 32));
        vreg_w(d, VMMIO_QUEUE_DEVICE_LOW, (u32)(u64)q->used);
        vreg_w(d, VMMIO_QUEUE_DEVICE_HIGH, (u32)((u64)q->used >> 32));
        vreg_w(d, VMMIO_QUEUE_READY, 1);
        if (vreg(d, VMMIO_QUEUE_READY) != 1) return 0x16;
    }
    d->nq = nq;
    vreg_w(d, VMMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    if (vreg(d, VMMIO_STATUS) != (ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK))
        return 0x17;
    return 0;
}

void vq_kick_head(struct vdev *d, int qi, u16 head) {
    struct vq *q = &d->q[qi];
    q->avail[2 + q->avail_idx % VQ_SIZE] = head;
    vbarrier();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    vbarrier();
    vreg_w(d, VMMIO_QUEUE_NOTIFY, (u32)qi);
}

void vq_post(struct vdev *d, int qi, const struct vbuf *b, int n) {
    struct vq *q = &d->q[qi];
    for (int i = 0; i < n; i++) {
        q->desc[i].addr = (u64)b[i].addr;
        q->desc[i].len = b[i].len;
        q->desc[i].flags = (u16)((b[i].writable ? VRING_DESC_F_WRITE : 0) |
                                 (i + 1 < n ? VRING_DESC_F_NEXT : 0));
        q->desc[i].next = (u16)(i + 1 < n ? i + 1 : 0);
    }
    vq_kick_head(d, qi, 0);
}

static u64 rdtsc_now(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

int vq_poll(struct vdev *d, int qi, u32 *len, u64 spins) {
    struct vq *q = &d->q[qi];
    volatile u16 *used_idx = (volatile u16 *)q->used + 1;
    /* Bounded in TSC cycles, not loop turns: the device may answer from the VMM's own
       thread (ioeventfd), whose latency does not shrink when the guest spins faster. */
    u64 start = rdtsc_now(), limit = spins * 4096;
    while (*used_idx == q->last_used) {
        if (rdtsc_now() - start > limit) return -1;
        __asm__ volatile("pause");
    }
    vbarrier();
    u32 slot = q->last_used % VQ_SIZE;
    u32 id = q->used[1 + 2 * slot];
    if (len) *len = q->used[2 + 2 * slot];
    q->last_used++;
    return id == 0 ? 0 : -2; /* every chain the probe posts starts at descriptor 0 */
}

static int ack_used(struct vdev *d, int strict) {
    u32 isr = vreg(d, VMMIO_INTERRUPT_STATUS);
    if (!(isr & INT_VRING)) return 0x20;
    vreg_w(d, VMMIO_INTERRUPT_ACK, isr);
    /* A device fed from another host thread (console) may raise it again at once. */
    if (strict && vreg(d, VMMIO_INTERRUPT_STATUS) != 0) return 0x21;
    return 0;
}

int virtio_ack_used(struct vdev *d) { return ack_used(d, 1); }

int vq_run(struct vdev *d, int qi, const struct vbuf *b, int n, u32 *len) {
    vq_post(d, qi, b, n);
    int r = vq_poll(d, qi, len, 1000000);
    if (r) return 0x30 - r; /* 0x31 timeout, 0x32 wrong id */
    return ack_used(d, d->id != VIRTIO_ID_CONSOLE);
}

int cons_write(struct vdev *d, const void *buf, u32 len) {
    if (len > sizeof(cons_txbuf)) return 0x40;
    memcpy(cons_txbuf, buf, len);
    struct vbuf b = {cons_txbuf, len, 0};
    u32 used = 0xffffffff;
    int r = vq_run(d, 1, &b, 1, &used);
    if (r) return r;
    return used == 0 ? 0 : 0x41;
}

void cons_rx_post(struct vdev *d) {
    struct vbuf b = {cons_rxbuf, sizeof(cons_rxbuf), 1};
    vq_post(d, 0, &b, 1);
}

int cons_read(struct vdev *d, u8 *out, u32 max, u64 spins) {
    u32 len = 0;
    if (vq_poll(d, 0, &len, spins)) return -1;
    if (len > sizeof(cons_rxbuf) || len > max) return -1;
    memcpy(out, cons_rxbuf, len);
    ack_used(d, 0);
    cons_rx_post(d);
    return (int)len;
}
