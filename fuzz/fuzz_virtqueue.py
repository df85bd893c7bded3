"""Fuzz virtqueues and the virtio devices behind them with hostile guest memory.

Input layout (see ``encode``): device choice and flags, per-queue size,
ring addresses and start indices, bytes the host sends on the console (or,
for virtio-net, cut into frames, or read as a length-prefixed frame stream), then
the guest RAM image. The transport is programmed through its MMIO registers
as a driver would, then every queue is kicked a few times. No exception may
escape the transport: guest-caused errors must end as a status byte, a
dropped request or DEVICE_NEEDS_RESET.
"""

import os
import struct
import sys

import atheris

with atheris.instrument_imports():
    from sporevm.spore import blocktable
    from sporevm.vmm.devices.virtio import mmio, net
    from sporevm.vmm.devices.virtio.blk import BlkDevice
    from sporevm.vmm.devices.virtio.console import ConsoleDevice
    from sporevm.vmm.devices.virtio.device import F_INDIRECT_DESC, F_VERSION_1, VirtioDevice
    from sporevm.vmm.devices.virtio.net import NetDevice
    from sporevm.vmm.devices.virtio.rng import RngDevice
    from sporevm.vmm.memory import GuestMemory

RAM = 64 * 1024
DISK = 32 * 1024
_HEAD = struct.Struct("<BBB")
_QUEUE = struct.Struct("<BIIIHH")
_QUEUES = (1, 2, 1, 2)  # blk, console, rng, net

_disk_fd = os.memfd_create("fuzz-disk")
_null_fd = os.open(os.devnull, os.O_WRONLY)  # the net channel: takes every write
MAC = bytes.fromhex("525400000001")
os.write(_disk_fd, bytes(range(256)) * (DISK // 256))
_mem = GuestMemory(RAM)
# The disk's block table with block 3's digest spoiled: with flag 0x40 the blk device
# checks blocks on first read, and every read touching block 3 must fail.
_TABLE = bytearray(blocktable.hash_image(_disk_fd, 4096).table)
_TABLE[blocktable.HEADER_SIZE + 3 * 32] ^= 1


def _drop(_line: str) -> None:
    """Reports of bad blocks: the fuzzer checks only that nothing escapes."""


class _Irq:
    def __init__(self) -> None:
        self.level = False

    def set_level(self, high: bool) -> None:
        self.level = high


def encode(
    device: int,
    flags: int,
    kicks: int,
    queues: list[tuple[int, int, int, int, int, int]],
    host_data: bytes,
    ram: bytes,
) -> bytes:
    """Build one input; used to write the seed corpus."""
    out = _HEAD.pack(device, flags, kicks)
    out += b"".join(_QUEUE.pack(*q) for q in queues)
    return out + struct.pack("<H", len(host_data)) + host_data + ram


def _make_device(device: int, out: list[bytes], flags: int) -> "VirtioDevice":
    if device == 0:
        table = None
        if flags & 0x40:
            table = blocktable.BlockTable.from_table(
                bytes(_TABLE), block_size=4096, image_size=DISK
            )
        return BlkDevice(_disk_fd, DISK, serial=b"fuzz", table=table, on_bad_block=_drop)
    if device == 1:
        return ConsoleDevice(out.append, host_buffer=4096)
    if device == 3:
        return NetDevice(_null_fd, MAC, mtu=1000, rx_backlog=8)
    return RngDevice()


def _frames(data: bytes, flags: int) -> list[bytes]:
    """Host frames for the net device: the channel's framing, or fixed cuts."""
    if flags & 8:
        try:
            return net.FrameSplitter().feed(data)
        except net.FrameError:
            return []
    step = 14 + (flags >> 4) * 67  # 14..1019 bytes: runts, fits, oversize for mtu 1000
    return [data[i : i + step] for i in range(0, len(data), step)]


def _w32(t: "mmio.VirtioMmio", off: int, value: int) -> None:
    t.write(off, (value & 0xFFFF_FFFF).to_bytes(4, "little"))


def _register_ops(t: "mmio.VirtioMmio", ops: bytes) -> None:
    """Arbitrary register reads/writes of any width: the register file must shrug them off."""
    for j in range(0, len(ops) - 5, 6):
        off, value = struct.unpack_from("<HI", ops, j)
        size = (1, 2, 4, 8)[off >> 14]
        off &= 0x1FFF
        if value & 1:
            assert len(t.read(off, size)) == size
        else:
            t.write(off, value.to_bytes(8, "little")[:size])


def TestOneInput(data: bytes) -> None:
    if len(data) < _HEAD.size:
        return
    device, flags, kicks = _HEAD.unpack_from(data)
    device %= 4
    pos = _HEAD.size
    queues = []
    for _ in range(_QUEUES[device]):
        if len(data) < pos + _QUEUE.size:
            return
        queues.append(_QUEUE.unpack_from(data, pos))
        pos += _QUEUE.size
    if len(data) < pos + 2:
        return
    (n,) = struct.unpack_from("<H", data, pos)
    host_data = data[pos + 2 : pos + 2 + n]
    ram = data[pos + 2 + n : pos + 2 + n + RAM]
    _mem.write(0, ram.ljust(RAM, b"\0"))

    out: list[bytes] = []
    dev = _make_device(device, out, flags)
    t = mmio.VirtioMmio(dev, _mem, _Irq())

    features = F_VERSION_1 | (F_INDIRECT_DESC if flags & 1 else 0)
    _w32(t, mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
    _w32(t, mmio.REG_DRIVER_FEATURES_SEL, 0)
    _w32(t, mmio.REG_DRIVER_FEATURES, features)
    _w32(t, mmio.REG_DRIVER_FEATURES_SEL, 1)
    _w32(t, mmio.REG_DRIVER_FEATURES, features >> 32)
    _w32(t, mmio.REG_STATUS, 0xB)
    for i, (size_log, desc, avail, used, last_avail, used_idx) in enumerate(queues):
        _w32(t, mmio.REG_QUEUE_SEL, i)
        _w32(t, mmio.REG_QUEUE_NUM, 1 << (size_log % 10))  # 512 is over the max: refused
        for reg, addr in (
            (mmio.REG_QUEUE_DESC_LOW, desc),
            (mmio.REG_QUEUE_DRIVER_LOW, avail),
            (mmio.REG_QUEUE_DEVICE_LOW, used),
        ):
            _w32(t, reg, addr)
        _w32(t, mmio.REG_QUEUE_READY, 1)
        t.queues[i].last_avail_idx = last_avail
        t.queues[i].used_idx = used_idx
    _w32(t, mmio.REG_STATUS, 0xF)

    if isinstance(dev, ConsoleDevice):
        if flags & 2:
            dev.pause_output()
        accepted = dev.send(host_data)
        assert 0 <= accepted <= len(host_data)
    if isinstance(dev, NetDevice):
        for f in _frames(host_data, flags):
            dev.receive(f)
        assert dev.rx_pending <= 8
    for k in range(1 + kicks % 4):
        if flags & 4:
            _register_ops(t, host_data[k * 48 : (k + 1) * 48])
        for i in range(len(queues)):
            _w32(t, mmio.REG_QUEUE_NOTIFY, i)
        _w32(t, mmio.REG_INTERRUPT_ACK, t.read(mmio.REG_INTERRUPT_STATUS, 4)[0])
        if isinstance(dev, ConsoleDevice) and k == 1:
            dev.resume_output()
        if isinstance(dev, NetDevice) and flags & 2:
            dev.flush()
            assert dev.tx_pending <= net.TX_BACKLOG
    if isinstance(dev, ConsoleDevice):
        assert dev.pending <= 4096
    # Whatever happened, the snapshot must be valid input to restore.
    state = t.state()
    t2 = mmio.VirtioMmio(_make_device(device, [], flags), _mem, _Irq())
    t2.restore(state)
    assert t2.state() == state


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
