/* A minimal virtio-mmio v2 driver for the probe guest (polling, split rings).
 *
 * Devices are found the way Linux finds them on the spore board: from the
 * virtio_mmio.device=4K@BASE:IRQ entries on the kernel command line. Each
 * queue has VQ_SIZE descriptors in one static page; requests are synchronous
 * (one chain in flight per queue, always built from descriptor 0 up), which is
 * all the probe tests need.
 */
#ifndef PROBE_VIRTIO_H
#define PROBE_VIRTIO_H
#include "probe.h"

#define VIRTIO_ID_BLK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4

/* virtio-mmio v2 registers (virtio 1.2 section 4.2.2) */
#define VMMIO_MAGIC 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_VENDOR_ID 0x00c
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC_LOW 0x080
#define VMMIO_QUEUE_DESC_HIGH 0x084
#define VMMIO_QUEUE_DRIVER_LOW 0x090
#define VMMIO_QUEUE_DRIVER_HIGH 0x094
#define VMMIO_QUEUE_DEVICE_LOW 0x0a0
#define VMMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VMMIO_CONFIG 0x100

#define VIRTIO_MAGIC 0x74726976u
#define ST_ACKNOWLEDGE 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 0x40
#define INT_VRING 1
#define INT_CONFIG 2

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

#define VQ_SIZE 16
#define VQ_MAX 2
#define VDEV_MAX 4

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct vq {
    struct vring_desc *desc;   /* VQ_SIZE entries */
    volatile u16 *avail;       /* flags, idx, ring[VQ_SIZE], used_event */
    volatile u32 *used;        /* flags|idx<<16, then {id, len} pairs */
    u16 avail_idx, last_used;
};

struct vdev {
    u64 base;
    u32 irq;
    u32 id;
    u32 slot;
    int nq;
    u64 features; /* what the device offered */
    struct vq q[VQ_MAX];
};

struct vbuf {
    void *addr;
    u32 len;
    int writable;
};

static inline u32 vreg(const struct vdev *d, u32 off) { return mmio_r32(d->base + off); }
static inline void vreg_w(const struct vdev *d, u32 off, u32 v) { mmio_w32(d->base + off, v); }
static inline void vbarrier(void) { __asm__ volatile("mfence" ::: "memory"); }

/* Find the first device with this id among the cmdline's virtio_mmio.device= entries.
 * Returns 0 and fills d (base, irq, id, slot), or a non-zero code. */
int virtio_find(u32 id, struct vdev *d);
/* Reset, ACKNOWLEDGE|DRIVER, negotiate VERSION_1 plus `want` (low 32 feature bits, masked
 * by the offer), set up nq queues of VQ_SIZE, DRIVER_OK. 0 or a failure code. */
int virtio_start(struct vdev *d, int nq, u32 want);
/* Put the chain b[0..n) at descriptors 0..n-1 of queue qi into the avail ring and kick. */
void vq_post(struct vdev *d, int qi, const struct vbuf *b, int n);
/* Publish descriptor `head` (already written by the caller) and kick. */
void vq_kick_head(struct vdev *d, int qi, u16 head);
/* Wait (bounded spin) for a used element; 0 and *len on success, -1 on timeout. */
int vq_poll(struct vdev *d, int qi, u32 *len, u64 spins);
/* Acknowledge a used-buffer interrupt: InterruptStatus must have bit 0, and reads 0 after
 * the ACK. 0 or a failure code. */
int virtio_ack_used(struct vdev *d);
/* post + poll + ack: a synchronous request. 0 and *len, or a failure code. */
int vq_run(struct vdev *d, int qi, const struct vbuf *b, int n, u32 *len);

/* Console helpers (queue 0 receiveq, queue 1 transmitq). */
int cons_write(struct vdev *d, const void *buf, u32 len);
/* Post the receive buffer (once, before waiting). */
void cons_rx_post(struct vdev *d);
/* Wait for received bytes; copies at most max into out, reposts the buffer. Returns the
 * byte count, or -1 on timeout. */
int cons_read(struct vdev *d, u8 *out, u32 max, u64 spins);

#endif
