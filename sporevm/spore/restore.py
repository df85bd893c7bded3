"""Recreate a Machine from a VmState and a RAM source (docs/vm-state.md, "Restore order").

A fresh Machine is built on the same board (same RAM size, vCPU count, devices
in the same slots), its RAM is filled by the caller's ``ram_loader`` (an eager
copy today; memory chunks supply it later), and then the state is written in
the order KVM needs:

1. RAM first: nothing below reads guest memory, but a restored vCPU or device
   must never see the fresh VM's boot-time contents.
2. irqchip (PIC master, PIC slave, IOAPIC), then PIT2: VM-wide devices before
   any vCPU, so LAPIC/IOAPIC routing exists when vCPU interrupt state lands.
3. per vCPU: sregs before regs (sregs sets the mode — CR0/CR4/EFER — that
   RIP/RFLAGS are interpreted in, and APIC_BASE); FPU, XCRs, then XSAVE (XCR0
   first so every component XSAVE carries is enabled; XSAVE last as it
   supersedes the legacy FPU image); MSRs (APIC_BASE before the LAPIC
   registers, TSC before the clock); the LAPIC page; TSC_DEADLINE only after
   the LAPIC (KVM drops it unless the LAPIC timer is already in deadline mode);
   MP state; vCPU events last (pending exceptions/NMIs/interrupt shadow apply
   to the state set above).
4. devices: serial and virtio transports, after the irqchip so the interrupt
   lines they hold high are re-asserted into the restored irqchip.
5. KVM clock last, with flags 0: the guest's kvmclock resumes at exactly its
   captured value (time stands still while the spore sleeps and never goes
   backwards); KVM_CLOCK_REALTIME is deliberately not passed, which would jump
   it forward by the host wall time since capture. The agent sets the wall
   clock on resume.
"""

from __future__ import annotations

import ctypes
import os
import traceback
from collections.abc import Callable, Sequence

from sporevm.spore import dirty
from sporevm.spore.chunks import ChunkStore, MemoryIndex, materialize
from sporevm.spore.vmstate import (
    MSR_TSC_DEADLINE,
    SerialState,
    VcpuState,
    VmState,
    VmStateError,
)
from sporevm.vmm import kvm
from sporevm.vmm.board import Board, BoardConfig, build_board
from sporevm.vmm.cpu import Vcpu
from sporevm.vmm.devices.serial import Serial
from sporevm.vmm.devices.virtio import VirtioMmio, VirtioStateError
from sporevm.vmm.kvm import KvmClockData, KvmError, KvmIrqchip
from sporevm.vmm.machine import Machine
from sporevm.vmm.memory import GuestMemory

RamLoader = Callable[[GuestMemory], None]


def eager_ram(index: MemoryIndex, chunks: ChunkStore, size: int) -> GuestMemory:
    """Guest RAM read from every chunk of ``index`` and verified there, before any VM
    exists (docs/restore.md, eager); it becomes a machine's through ``memory=``.

    Private anonymous memory (huge pages asked for), two chunks at a time. On any
    failure the RAM is dropped and the failure raised as it was.
    """
    ram = GuestMemory(size, anonymous=True)
    try:
        with ram.view(0, size, writable=True) as whole:
            materialize(index, chunks, whole, out_is_zero=True,
                        workers=min(2, os.cpu_count() or 1))
    except BaseException as exc:
        # The frames of the error's traceback hold slices of this RAM (the chunk being
        # read into it); clearing them lets close() unmap it now, not at exit.
        _clear_frames(exc)
        ram.close()
        raise
    return ram


def _clear_frames(exc: BaseException) -> None:
    """Drop the locals of the finished frames in ``exc``'s tracebacks (and its causes')."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # skips frames still running
        todo += [e.__cause__, e.__context__]


def restore_machine(
    state: VmState,
    memory_bytes: int,
    vcpus: int,
    ram_loader: RamLoader,
    *,
    attach: Callable[[Machine], Sequence[VirtioMmio]] | None = None,
    **machine_kwargs: object,
) -> Machine:
    """A fresh Machine carrying ``state``; ``attach`` wires the board's devices (returning
    the virtio transports in slot order) before any state is applied."""
    machine = Machine(memory_bytes, vcpus, **machine_kwargs)  # type: ignore[arg-type]
    try:
        transports = attach(machine) if attach is not None else ()
        apply_state(machine, transports, state, ram_loader)
        return machine
    except BaseException:
        machine.close()
        raise


def restore_board(
    state: VmState,
    cfg: BoardConfig,
    ram_loader: RamLoader,
    *,
    memory_index: MemoryIndex | None = None,
    **kw: object,
) -> Board:
    """``build_board(cfg, **kw)`` with ``state`` applied: the spore microVM, resumed.

    ``memory_index`` is the index ``ram_loader`` loaded RAM from (eagerly or not: what
    counts is that RAM reads as exactly those chunks); with ``dirty_log=True`` the
    first snapshot of the restored VM then hashes only chunks written after the restore
    (sporevm.spore.dirty). Without it that snapshot hashes all of RAM.
    """
    board = build_board(cfg, **kw)  # type: ignore[arg-type]
    try:
        apply_state(board.machine, board.transports, state, ram_loader)
        dirty.set_base(board.machine, memory_index)
        return board
    except BaseException:
        board.machine.close()
        raise


def apply_state(
    machine: Machine, transports: Sequence[VirtioMmio], state: VmState, ram_loader: RamLoader
) -> None:
    """Write ``state`` into a freshly created, never-run machine (order: module docstring)."""
    if len(state.vcpus) != len(machine.vcpus):
        raise VmStateError(f"state has {len(state.vcpus)} vCPUs, the machine {len(machine.vcpus)}")
    if len(state.virtio) != len(transports):
        raise VmStateError(
            f"state has {len(state.virtio)} virtio devices, the board {len(transports)}"
        )
    listed = set(machine.msr_index_list)
    for i, vs in enumerate(state.vcpus):
        missing = sorted(set(vs.msrs) - listed)
        if missing:
            raise VmStateError(
                f"vcpus[{i}]: this host's KVM does not list MSR {missing[0]:#x}; "
                "the spore needs a host of the same class"
            )
    ram_loader(machine.ram)
    # The loaded RAM *is* the snapshot: only writes after this point are dirty. Both logs
    # are cleared here, before any state is set, so KVM's own writes while the state goes
    # in (KVM_SET_MSRS of the kvmclock wall-clock MSR writes guest memory) still count.
    dirty.reset(machine)

    _step("irqchip", lambda: _irqchip(machine, state))
    _step("PIT", lambda: machine.set_pit2(state.vm.pit2))
    for i, (v, s) in enumerate(zip(machine.vcpus, state.vcpus, strict=True)):
        _vcpu(i, v, s)
    _step("serial", lambda: restore_serial(machine.serial, state.serial))
    for i, (t, ts) in enumerate(zip(transports, state.virtio, strict=True)):
        try:
            t.restore(ts)
        except VirtioStateError as e:
            raise VmStateError(f"devices.virtio[{i}]: {e}") from None
    clock = KvmClockData()
    clock.clock = state.vm.clock.clock  # flags 0: no KVM_CLOCK_REALTIME jump (docstring)
    _step("KVM clock", lambda: machine.set_clock(clock))


def _step(what: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except (OSError, KvmError) as e:
        raise VmStateError(f"restoring {what}: KVM refused the state ({e})") from None


def _irqchip(machine: Machine, state: VmState) -> None:
    for chip_id, payload in (
        (kvm.KVM_IRQCHIP_PIC_MASTER, state.vm.pic_master),
        (kvm.KVM_IRQCHIP_PIC_SLAVE, state.vm.pic_slave),
        (kvm.KVM_IRQCHIP_IOAPIC, state.vm.ioapic),
    ):
        c = KvmIrqchip()
        c.chip_id = chip_id
        ctypes.memmove(
            ctypes.addressof(c) + KvmIrqchip.chip.offset,
            ctypes.addressof(payload),
            ctypes.sizeof(payload),
        )
        machine.set_irqchip(c)


def _vcpu(i: int, v: Vcpu, s: VcpuState) -> None:
    w = f"vcpus[{i}]"
    _step(f"{w}.sregs", lambda: v.set_sregs(s.sregs))
    _step(f"{w}.regs", lambda: v.set_regs(s.regs))
    _step(f"{w}.fpu", lambda: v.set_fpu(s.fpu))
    _step(f"{w}.xcrs", lambda: v.set_xcrs(s.xcrs))
    _step(f"{w}.xsave", lambda: v.set_xsave(s.xsave))
    early = {k: val for k, val in s.msrs.items() if k != MSR_TSC_DEADLINE}
    _step(f"{w}.msrs", lambda: v.set_msrs(early))
    _step(f"{w}.lapic", lambda: v.set_lapic(s.lapic))
    if MSR_TSC_DEADLINE in s.msrs:
        deadline = {MSR_TSC_DEADLINE: s.msrs[MSR_TSC_DEADLINE]}
        _step(f"{w}.msrs (TSC_DEADLINE)", lambda: v.set_msrs(deadline))
    _step(f"{w}.mp_state", lambda: v.set_mp_state(s.mp_state))
    _step(f"{w}.events", lambda: v.set_events(s.events))


def restore_serial(serial: Serial, s: SerialState) -> None:
    # Serial has no restore() of its own yet; vmstate validated every value's range.
    with serial._lock:
        serial.ier, serial.lcr, serial.mcr, serial.scr = s.ier, s.lcr, s.mcr, s.scr
        serial.fcr, serial.divisor, serial._thre_pending = s.fcr, s.divisor, s.thre_pending
        serial._rx.clear()
        serial._rx.extend(s.rx)
        # Force the line to the level the registers imply (the irqchip state holds it too;
        # raising it again keeps KVM's per-source line state in step).
        serial._irq_high = False
        serial._update_irq()
