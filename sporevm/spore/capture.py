"""Capture the state of a paused Machine into a VmState (docs/vm-state.md).

Pause protocol. The caller stops the guest first: ``machine.pause()`` from any
thread makes the running ``machine.run()`` return ``StopReason.PAUSED`` (a
DEADLINE or HALTED stop is just as still). A stop sets ``immediate_exit`` on
every vCPU and kicks it, and each vCPU re-enters KVM_RUN once so KVM
completes the pending PIO/MMIO instruction without running guest code: once
run() has returned, no vCPU is inside KVM_RUN, RIP is past the last device
access, and that access has reached its device. Devices are quiesced by the
same fact: virtio requests are handled synchronously inside the MMIO exit, so
none is in flight. Host-side producers (``ConsoleDevice.send``,
``Serial.feed``) may still run on other threads; each device's state is read
under that device's lock, so it is consistent, but bytes sent after capture
are not in it — stop the agent session's writer before capturing if that
matters.

``capture`` holds the machine's run lock while it reads, so a run() started
on another thread during the capture fails instead of racing it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from sporevm.spore.vmstate import (
    OWNED_MSRS,
    IoapicState,
    PicState,
    SerialState,
    VcpuState,
    VmState,
    VmStateError,
    VmWideState,
)
from sporevm.vmm import kvm
from sporevm.vmm.cpu import Vcpu
from sporevm.vmm.devices.serial import Serial
from sporevm.vmm.devices.virtio import VirtioMmio
from sporevm.vmm.kvm import KvmIrqchip
from sporevm.vmm.machine import Machine


def owned_msrs(machine: Machine, vcpu: Vcpu) -> list[int]:
    """The OWNED_MSRS this host lists and this vCPU can read, ascending."""
    listed = set(machine.msr_index_list)
    return vcpu.readable_msrs(sorted(i for i in OWNED_MSRS if i in listed))


def capture(machine: Machine, transports: Sequence[VirtioMmio] = ()) -> VmState:
    """Everything but guest RAM of a paused machine; ``transports`` in board slot order."""
    # Private on purpose: Machine has no public "is running" and holding the run lock is
    # what makes the capture atomic against a concurrent run().
    lock = machine._running
    if not lock.acquire(blocking=False):
        raise VmStateError("capture needs a paused machine: run() is in progress")
    try:
        if machine._terminal is not None:
            raise VmStateError(
                f"machine already stopped ({machine._terminal.reason.value}): nothing to capture"
            )
        msr_ids = owned_msrs(machine, machine.vcpus[0]) if machine.vcpus else []
        return VmState(
            vcpus=[_vcpu(v, msr_ids) for v in machine.vcpus],
            vm=_vm(machine),
            serial=serial_state(machine.serial),
            virtio=[t.state() for t in transports],
        )
    finally:
        lock.release()


def _vcpu(v: Vcpu, msr_ids: list[int]) -> VcpuState:
    return VcpuState(
        regs=v.get_regs(),
        sregs=v.get_sregs(),
        fpu=v.get_fpu(),
        xsave=v.get_xsave(),
        xcrs=v.get_xcrs(),
        msrs=v.get_msrs(msr_ids),
        lapic=v.get_lapic(),
        events=v.get_events(),
        mp_state=v.get_mp_state(),
    )


def _vm(machine: Machine) -> VmWideState:
    def chip(chip_id: int, size: int) -> bytes:
        c = machine.get_irqchip(chip_id)
        # Read the union raw: the c_char field accessor would stop at the first NUL byte.
        return ctypes.string_at(ctypes.addressof(c) + KvmIrqchip.chip.offset, size)

    pic, ioapic = ctypes.sizeof(PicState), ctypes.sizeof(IoapicState)
    return VmWideState(
        pic_master=PicState.from_buffer_copy(chip(kvm.KVM_IRQCHIP_PIC_MASTER, pic)),
        pic_slave=PicState.from_buffer_copy(chip(kvm.KVM_IRQCHIP_PIC_SLAVE, pic)),
        ioapic=IoapicState.from_buffer_copy(chip(kvm.KVM_IRQCHIP_IOAPIC, ioapic)),
        pit2=machine.get_pit2(),
        clock=machine.get_clock(),
    )


def serial_state(s: Serial) -> SerialState:
    # Serial has no state() of its own yet; its registers are read under its lock here.
    with s._lock:
        return SerialState(
            ier=s.ier,
            lcr=s.lcr,
            mcr=s.mcr,
            scr=s.scr,
            fcr=s.fcr,
            divisor=s.divisor,
            rx=bytes(s._rx),
            thre_pending=s._thre_pending,
        )
