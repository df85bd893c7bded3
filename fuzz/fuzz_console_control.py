"""Fuzz the virtio-console MULTIPORT control queues with a hostile driver.

The input is a program for the guest driver: each op byte picks posting
control receive buffers (any size), sending a control message (raw bytes of
any length, a handshake message, or a header with fuzzed id, event and value), posting
port 0 receive buffers, host sends, a device reset with a fresh bring-up, or a
snapshot restored into a new device that carries on. Nothing may raise out of
the transport, the device must never need a reset (control messages are
refused and counted, not fatal), the control backlog and host buffer stay
bounded, host bytes reach the guest only once it opened the port, and every
snapshot round-trips exactly.
"""

import struct
import sys

import atheris

with atheris.instrument_imports():
    from sporevm.vmm.devices.virtio import console, mmio
    from sporevm.vmm.devices.virtio.console import ConsoleDevice
    from sporevm.vmm.devices.virtio.device import F_VERSION_1
    from sporevm.vmm.devices.virtio.queue import DESC_F_WRITE
    from sporevm.vmm.memory import GuestMemory

RAM = 256 * 1024
QSIZE = 16
RING = 0x1000  # queue i's rings at RING + i * 0x1000: desc, avail, used
BUF = 0x8000  # buffers, bump-allocated per run
HOST_BUFFER = 256
MAX_OPS = 200
HANDSHAKE = [
    struct.pack("<IHH", 0xFFFF_FFFF, console.DEVICE_READY, 1),
    struct.pack("<IHH", 0, console.PORT_READY, 1),
    struct.pack("<IHH", 0, console.PORT_OPEN, 1),
    struct.pack("<IHH", 0, console.PORT_OPEN, 0),
]

_mem = GuestMemory(RAM)


class _Irq:
    def set_level(self, high: bool) -> None:
        pass


class _Driver:
    """A split-ring driver for the four console queues, laid out in _mem."""

    def __init__(self, t: "mmio.VirtioMmio") -> None:
        self.t = t
        self.next_buf = BUF
        self.avail = [0] * 4
        self.used_seen = [0] * 4
        self.desc = [0] * 4

    def w32(self, off: int, value: int) -> None:
        self.t.write(off, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def bring_up(self, features: int) -> None:
        _mem.write(RING, bytes(4 * 0x1000))
        self.avail, self.used_seen, self.desc = [0] * 4, [0] * 4, [0] * 4
        self.w32(mmio.REG_STATUS, 0)
        self.w32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        for sel in (0, 1):
            self.w32(mmio.REG_DRIVER_FEATURES_SEL, sel)
            self.w32(mmio.REG_DRIVER_FEATURES, features >> (32 * sel))
        self.w32(mmio.REG_STATUS, 0xB)
        for q in range(4):
            base = RING + q * 0x1000
            self.w32(mmio.REG_QUEUE_SEL, q)
            self.w32(mmio.REG_QUEUE_NUM, QSIZE)
            for reg, addr in (
                (mmio.REG_QUEUE_DESC_LOW, base),
                (mmio.REG_QUEUE_DRIVER_LOW, base + 0x400),
                (mmio.REG_QUEUE_DEVICE_LOW, base + 0x800),
            ):
                self.w32(reg, addr)
                self.w32(reg + 4, 0)
            self.w32(mmio.REG_QUEUE_READY, 1)
        self.w32(mmio.REG_STATUS, 0xF)

    def alloc(self, size: int) -> int:
        if self.next_buf + size > RAM:
            self.next_buf = BUF  # reuse: stale contents are fine for a hostile driver
        addr = self.next_buf
        self.next_buf += max(size, 1)
        return addr

    def add(self, q: int, addr: int, length: int, writable: bool) -> None:
        base = RING + q * 0x1000
        if (self.avail[q] - _mem.read_u16(base + 0x800 + 2)) & 0xFFFF >= QSIZE:
            return  # the ring is full: a driver posts no more than it holds
        d = self.desc[q]
        self.desc[q] = (d + 1) % QSIZE
        flags = DESC_F_WRITE if writable else 0
        _mem.write(base + 16 * d, struct.pack("<QIHH", addr, length, flags, 0))
        _mem.write_u16(base + 0x400 + 4 + 2 * (self.avail[q] % QSIZE), d)
        self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        _mem.write_u16(base + 0x400 + 2, self.avail[q])

    def used(self, q: int) -> list[tuple[int, int]]:
        base = RING + q * 0x1000 + 0x800
        idx = _mem.read_u16(base + 2)
        out = []
        while self.used_seen[q] != idx:
            slot = base + 4 + 8 * (self.used_seen[q] % QSIZE)
            out.append(struct.unpack("<II", _mem.read(slot, 8)))
            self.used_seen[q] = (self.used_seen[q] + 1) & 0xFFFF
        return out

    def kick(self, q: int) -> None:
        self.w32(mmio.REG_QUEUE_NOTIFY, q)


def _check(t: "mmio.VirtioMmio", dev: "ConsoleDevice") -> None:
    assert not t.needs_reset_pending, t.error
    assert dev.control_pending <= console.MAX_CONTROL_PENDING
    assert dev.pending <= HOST_BUFFER


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    multiport = fdp.ConsumeBool()
    features = F_VERSION_1 | (console.F_MULTIPORT if multiport else 0)
    dev = ConsoleDevice(host_buffer=HOST_BUFFER)
    t = mmio.VirtioMmio(dev, _mem, _Irq())
    drv = _Driver(t)
    drv.bring_up(features)
    for _ in range(MAX_OPS):
        if fdp.remaining_bytes() == 0:
            break
        op = fdp.ConsumeIntInRange(0, 7)
        if op == 0:  # control receive buffers of any size
            for _ in range(fdp.ConsumeIntInRange(1, 4)):
                size = fdp.ConsumeIntInRange(0, 64)
                drv.add(console.CTRL_RX_QUEUE, drv.alloc(size), size, fdp.ConsumeBool())
            drv.kick(console.CTRL_RX_QUEUE)
        elif op in (1, 2):  # a control message: raw bytes, or a header with fuzzed fields
            kind = fdp.ConsumeIntInRange(0, 4)
            if op == 1:
                msg = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
            elif kind < 4:  # what a well-behaved driver sends, in any order
                msg = HANDSHAKE[kind]
            else:
                msg = struct.pack(
                    "<IHH",
                    fdp.PickValueInList([0, 1, 0xFFFF_FFFF, fdp.ConsumeInt(4) & 0xFFFF_FFFF]),
                    fdp.ConsumeIntInRange(0, 9),
                    fdp.PickValueInList([0, 1, 2, 0xFFFF]),
                )
            addr = drv.alloc(len(msg))
            _mem.write(addr, msg)
            drv.add(console.CTRL_TX_QUEUE, addr, len(msg), fdp.ConsumeBool())
            drv.kick(console.CTRL_TX_QUEUE)
            assert all(n == 0 for _, n in drv.used(console.CTRL_TX_QUEUE))
        elif op == 3:  # port 0 receive buffers
            was_open = dev.port_open
            drv.used(console.RX_QUEUE)  # forget deliveries from before
            for _ in range(fdp.ConsumeIntInRange(1, 4)):
                size = fdp.ConsumeIntInRange(1, 128)
                drv.add(console.RX_QUEUE, drv.alloc(size), size, True)
            drv.kick(console.RX_QUEUE)
            got = drv.used(console.RX_QUEUE)
            assert was_open or not got, "host bytes reached a port the guest has not opened"
        elif op == 4:
            n = fdp.ConsumeIntInRange(0, 300)
            assert dev.send(bytes(n)) <= n
        elif op == 5:  # a fresh driver, as after a reset
            drv.bring_up(features)
            assert dev.control_pending == 0 and not dev.state()["device_ready"]
        elif op == 6:  # snapshot, restore into a new device, carry on with it
            state = t.state()
            dev = ConsoleDevice(host_buffer=HOST_BUFFER)
            t2 = mmio.VirtioMmio(dev, _mem, _Irq())
            t2.restore(state)
            assert t2.state() == state, "snapshot does not round-trip"
            t = drv.t = t2
        else:  # kick every queue
            for q in range(4):
                drv.kick(q)
        _check(t, dev)
    # Whatever happened, the snapshot must be valid input to restore.
    state = t.state()
    t3 = mmio.VirtioMmio(ConsoleDevice(host_buffer=HOST_BUFFER), _mem, _Irq())
    t3.restore(state)
    assert t3.state() == state


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
