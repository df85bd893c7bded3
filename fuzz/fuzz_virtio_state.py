"""Fuzz restoring virtio device snapshots (transport, queues, device fields).

Snapshot state comes from spores, which may come from untrusted peers. The
input is JSON restored into a blk, console (multiport and legacy), rng and net
transport. Only VirtioStateError may escape; an accepted state must round-trip
exactly, and kicking every queue afterwards must not raise either.
"""

import json
import os
import sys

import atheris

with atheris.instrument_imports():
    from sporevm.vmm.devices.virtio import mmio
    from sporevm.vmm.devices.virtio.blk import BlkDevice
    from sporevm.vmm.devices.virtio.console import ConsoleDevice
    from sporevm.vmm.devices.virtio.device import VirtioDevice
    from sporevm.vmm.devices.virtio.net import NetDevice
    from sporevm.vmm.devices.virtio.rng import RngDevice
    from sporevm.vmm.devices.virtio.state import VirtioStateError
    from sporevm.vmm.memory import GuestMemory

RAM = 64 * 1024
DISK = 32 * 1024
MAX_INPUT = 1 << 20

_disk_fd = os.memfd_create("fuzz-disk")
os.ftruncate(_disk_fd, DISK)
_null_fd = os.open(os.devnull, os.O_WRONLY)
_mem = GuestMemory(RAM)


class _Irq:
    def set_level(self, high: bool) -> None:
        pass


def _devices() -> list[VirtioDevice]:
    return [
        BlkDevice(_disk_fd, DISK, serial=b"fuzz"),
        ConsoleDevice(),
        ConsoleDevice(legacy=True),  # restoring spore-board/1 spores
        RngDevice(),
        NetDevice(_null_fd, bytes.fromhex("525400000001"), mtu=1500),
    ]


def TestOneInput(data: bytes) -> None:
    if len(data) > MAX_INPUT:
        return
    try:
        state = json.loads(data)
    except (ValueError, RecursionError):
        return
    for dev in _devices():
        t = mmio.VirtioMmio(dev, _mem, _Irq())
        try:
            t.restore(state)
        except VirtioStateError:
            assert t.status == 0 and not any(q.ready for q in t.queues)
            continue
        assert t.state() == state, "accepted state does not round-trip"
        for i in range(len(t.queues)):
            t.notify_queue(i)
        if isinstance(dev, ConsoleDevice):
            dev.send(b"x")
        if isinstance(dev, NetDevice):
            dev.receive(bytes(60))
            dev.flush()


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
