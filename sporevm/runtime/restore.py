"""Recreate a Machine from a VmState and a RAM source (docs/vm-state.md, "Restore order").

A fresh Machine is built on the same board (same RAM size, vCPU count, devices
in the same slots), its RAM is filled by the caller's ``ram_loader`` (``eager_ram``
before the VM exists, ``map_local``, or the lazy pager), and then the state is
written through the backend protocol (``sporevm.spore.backend``) in the order
KVM needs (each backend call keeps the order inside its part):

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

import os
from collections.abc import Callable, Sequence

from sporevm.errors import clear_frames
from sporevm.runtime import dirty
from sporevm.spore.backend import MachineBackend, VirtioTransport
from sporevm.spore.backing import open_local
from sporevm.spore.chunks import ChunkStore, MemoryIndex, materialize
from sporevm.spore.vmstate import VmState, VmStateError
from sporevm.store import Store
from sporevm.vmm.board import Board, BoardConfig, BoardWiring, build_board
from sporevm.vmm.devices.virtio import VirtioMmio, VirtioStateError
from sporevm.vmm.machine import Machine
from sporevm.vmm.memory import GuestMemory

RamLoader = Callable[[GuestMemory], None]


def eager_ram(index: MemoryIndex, chunks: ChunkStore, size: int) -> GuestMemory:
    """Guest RAM read from every chunk of ``index`` and verified there, before any VM
    exists (docs/restore.md, eager); it becomes a machine's through ``memory=``.

    Private anonymous memory (huge pages asked for), two chunks at a time. On any
    failure the RAM is dropped and the failure raised as it was.
    """
    ram = GuestMemory(size)
    try:
        with ram.view(0, size, writable=True) as whole:
            materialize(index, chunks, whole, out_is_zero=True, workers=min(2, os.cpu_count() or 1))
    except BaseException as exc:
        # The frames of the error's traceback hold slices of this RAM (the chunk being
        # read into it); clearing them lets close() unmap it now, not at exit.
        clear_frames(exc)
        ram.close()
        raise
    return ram


def map_local(mem: GuestMemory, index: MemoryIndex, chunks: ChunkStore, store: Store) -> None:
    """Back ``mem`` by the verified memfile of ``index``, MAP_PRIVATE (a RamLoader body;
    the file itself: ``sporevm.spore.backing``)."""
    fd = open_local(index, chunks, store)
    try:
        mem.map_file_private(fd)
    finally:
        os.close(fd)  # the mapping holds the file


def restore_machine(
    state: VmState,
    machine: Machine,
    ram_loader: RamLoader,
    *,
    attach: Callable[[Machine], Sequence[VirtioMmio]] | None = None,
) -> Machine:
    """``machine`` (freshly created for the state's RAM size and vCPU count, never run)
    carrying ``state``; ``attach`` wires the board's devices (returning the virtio
    transports in slot order) before any state is applied. On failure the machine is
    closed."""
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
    wiring: BoardWiring,
    *,
    memory_index: MemoryIndex | None = None,
    memory: GuestMemory | None = None,
) -> Board:
    """``build_board(cfg, wiring, memory=memory)`` with ``state`` applied: the spore
    microVM, resumed.

    ``memory_index`` is the index ``ram_loader`` loaded RAM from (eagerly or not: what
    counts is that RAM reads as exactly those chunks); with ``wiring.dirty_log`` the
    first snapshot of the restored VM then hashes only chunks written after the restore
    (sporevm.runtime.dirty). Without it that snapshot hashes all of RAM.
    """
    board = build_board(cfg, wiring, memory=memory)
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
    machine.check_state(state)
    if len(state.virtio) != len(transports):
        raise VmStateError(
            f"state has {len(state.virtio)} virtio devices, the board {len(transports)}"
        )
    ram_loader(machine.ram)
    # The loaded RAM *is* the snapshot: only writes after this point are dirty. Both logs
    # are cleared here, before any state is set, so KVM's own writes while the state goes
    # in (KVM_SET_MSRS of the kvmclock wall-clock MSR writes guest memory) still count.
    dirty.reset(machine)
    write_state(machine, transports, state)


def write_state(
    machine: MachineBackend, transports: Sequence[VirtioTransport], state: VmState
) -> None:
    """Everything but RAM, through the backend protocol, in the order above."""
    machine.apply_vm(state.vm)
    machine.apply_vcpus(state.vcpus)
    machine.serial.restore(state.serial)
    for i, (t, ts) in enumerate(zip(transports, state.virtio, strict=True)):
        try:
            t.restore(ts)
        except VirtioStateError as e:
            raise VmStateError(f"devices.virtio[{i}]: {e}") from None
    machine.apply_clock(state.vm.clock)
