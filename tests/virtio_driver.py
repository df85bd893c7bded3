"""A minimal virtio driver for tests: plays the guest against real GuestMemory.

It programs a VirtioMmio transport through ``read``/``write`` exactly as a
guest's MMIO accesses would, and lays out split rings and descriptors in
guest RAM by hand, so tests can build both well-formed and hostile requests.
"""

from __future__ import annotations

import struct

from sporevm.vmm.devices.virtio import mmio
from sporevm.vmm.devices.virtio.device import VirtioDevice
from sporevm.vmm.devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from sporevm.vmm.memory import GuestMemory

RAM = 1 << 20  # 1 MiB of guest RAM is plenty for every ring and buffer here


class RecordingIrq:
    """A real IrqLine: remembers the level and every change."""

    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []

    def set_level(self, high: bool) -> None:
        self.level = high
        self.changes.append(high)


class Allocator:
    """Bump allocator over guest RAM, starting above page 0."""

    def __init__(self, mem: GuestMemory, start: int = 0x1000) -> None:
        self.mem = mem
        self.next = start

    def __call__(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) // align * align
        self.next = addr + size
        assert self.next <= self.mem.size, "test allocator ran out of guest RAM"
        return addr

    def buf(self, data: bytes) -> int:
        addr = self(len(data))
        self.mem.write(addr, data)
        return addr


Buf = tuple[int, int, bool]  # (addr, length, device-writable)


class DriverQueue:
    """Driver side of one split ring; descriptors are handed out round-robin."""

    def __init__(self, mem: GuestMemory, alloc: Allocator, size: int) -> None:
        self.mem, self.size = mem, size
        self.desc = alloc(16 * size, 16)
        self.avail = alloc(6 + 2 * size, 2)
        self.used = alloc(6 + 8 * size, 4)
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, bufs: list[Buf]) -> int:
        """Chain ``bufs`` through the main table; publish; return the head index."""
        idxs = [(self.next_desc + k) % self.size for k in range(len(bufs))]
        self.next_desc = (self.next_desc + len(bufs)) % self.size
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.write_desc(self.desc, idxs[k], addr, length, flags, 0 if last else idxs[k + 1])
        self.publish(idxs[0])
        return idxs[0]

    def add_indirect(self, bufs: list[Buf], alloc: Allocator) -> int:
        table = alloc(16 * len(bufs), 16)
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.write_desc(table, k, addr, length, flags, 0 if last else k + 1)
        head = self.next_desc
        self.next_desc = (self.next_desc + 1) % self.size
        self.write_desc(self.desc, head, table, 16 * len(bufs), DESC_F_INDIRECT, 0)
        self.publish(head)
        return head

    def publish(self, head: int, *, idx_step: int = 1) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + idx_step) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written length) for every used element the device added since last time."""
        idx = self.mem.read_u16(self.used + 2)
        out = []
        while self.used_seen != idx:
            slot = self.used + 4 + 8 * (self.used_seen % self.size)
            head, length = struct.unpack("<II", self.mem.read(slot, 8))
            out.append((head, length))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class Driver:
    def __init__(self, transport: mmio.VirtioMmio, mem: GuestMemory) -> None:
        self.t = transport
        self.mem = mem
        self.alloc = Allocator(mem)
        self.queues: dict[int, DriverQueue] = {}

    def r32(self, off: int) -> int:
        return int.from_bytes(self.t.read(off, 4), "little")

    def w32(self, off: int, value: int) -> None:
        self.t.write(off, value.to_bytes(4, "little"))

    @property
    def status(self) -> int:
        return self.r32(mmio.REG_STATUS)

    def device_features(self) -> int:
        self.w32(mmio.REG_DEVICE_FEATURES_SEL, 0)
        lo = self.r32(mmio.REG_DEVICE_FEATURES)
        self.w32(mmio.REG_DEVICE_FEATURES_SEL, 1)
        return lo | self.r32(mmio.REG_DEVICE_FEATURES) << 32

    def negotiate(self, features: int | None = None) -> bool:
        """ACK, DRIVER, write features (default: all offered), FEATURES_OK; True if accepted."""
        self.w32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE)
        self.w32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        if features is None:
            features = self.device_features()
        for sel in (0, 1):
            self.w32(mmio.REG_DRIVER_FEATURES_SEL, sel)
            self.w32(mmio.REG_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.w32(mmio.REG_STATUS, self.status | mmio.STATUS_FEATURES_OK)
        return bool(self.status & mmio.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        self.w32(mmio.REG_QUEUE_SEL, index)
        if size is None:
            size = self.r32(mmio.REG_QUEUE_NUM_MAX)
        q = DriverQueue(self.mem, self.alloc, size)
        self.w32(mmio.REG_QUEUE_NUM, size)
        for reg, addr in (
            (mmio.REG_QUEUE_DESC_LOW, q.desc),
            (mmio.REG_QUEUE_DRIVER_LOW, q.avail),
            (mmio.REG_QUEUE_DEVICE_LOW, q.used),
        ):
            self.w32(reg, addr & 0xFFFF_FFFF)
            self.w32(reg + 4, addr >> 32)
        self.w32(mmio.REG_QUEUE_READY, 1)
        self.queues[index] = q
        return q

    def driver_ok(self) -> None:
        self.w32(mmio.REG_STATUS, self.status | mmio.STATUS_DRIVER_OK)

    def bring_up(self, nqueues: int, features: int | None = None) -> list[DriverQueue]:
        assert self.negotiate(features)
        qs = [self.setup_queue(i) for i in range(nqueues)]
        self.driver_ok()
        assert self.status & mmio.STATUS_DRIVER_OK
        return qs

    def kick(self, index: int) -> None:
        self.w32(mmio.REG_QUEUE_NOTIFY, index)

    def ack_all(self) -> int:
        isr = self.r32(mmio.REG_INTERRUPT_STATUS)
        self.w32(mmio.REG_INTERRUPT_ACK, isr)
        return isr


def make(device: VirtioDevice, ram: int = RAM) -> tuple[mmio.VirtioMmio, Driver, RecordingIrq]:
    """A transport around ``device`` on fresh guest RAM, plus a driver and its IRQ line."""
    mem = GuestMemory(ram)
    irq = RecordingIrq()
    t = mmio.VirtioMmio(device, mem, irq, base=0xD000_0000)
    return t, Driver(t, mem), irq
