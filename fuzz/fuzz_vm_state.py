"""Fuzz decoding spore VM state objects (spore-vmstate/v1, sporevm/spore/vmstate.py).

VM state comes from spores, which may come from untrusted peers. Only
VmStateError may escape ``decode``; an accepted input must be canonical, so
re-encoding it gives back exactly the input bytes. The decoded virtio entries
are also restored into scratch blk/console/rng transports, which may refuse them
only with VirtioStateError (a SporeError the restore turns into VmStateError).
"""

import os
import sys

import atheris

with atheris.instrument_imports():
    from sporevm.spore import vmstate
    from sporevm.spore.vmstate import VmStateError
    from sporevm.vmm.devices.serial import Serial
    from sporevm.vmm.devices.virtio import mmio
    from sporevm.vmm.devices.virtio.blk import BlkDevice
    from sporevm.vmm.devices.virtio.console import ConsoleDevice
    from sporevm.vmm.devices.virtio.rng import RngDevice
    from sporevm.vmm.devices.virtio.state import VirtioStateError
    from sporevm.vmm.memory import GuestMemory

MAX_INPUT = 1 << 20  # real states are ~12 KiB per vCPU; the decoder's own cap is larger
DISK = 32 * 1024

_disk_fd = os.memfd_create("fuzz-disk")
os.ftruncate(_disk_fd, DISK)
_mem = GuestMemory(64 * 1024)


class _Irq:
    def set_level(self, high: bool) -> None:
        pass


def TestOneInput(data: bytes) -> None:
    if len(data) > MAX_INPUT:
        return
    try:
        state = vmstate.decode(data)
    except VmStateError:
        return
    assert vmstate.encode(state) == data, "accepted state is not canonical"
    # The serial part is applied without KVM (the device's own restore): a restored UART
    # must answer every register and give back the state it was given.
    uart = Serial(_Irq(), lambda _b: None)
    uart.restore(state.serial)
    assert uart.state() == state.serial
    for off in range(8):
        assert len(uart.read(off, 1)) == 1
    devices = (BlkDevice(_disk_fd, DISK, serial=b"fuzz"), ConsoleDevice(), RngDevice())
    for entry, dev in zip(state.virtio, devices, strict=False):  # extra entries: shape only
        t = mmio.VirtioMmio(dev, _mem, _Irq())
        try:
            t.restore(entry)
        except VirtioStateError:
            continue


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
