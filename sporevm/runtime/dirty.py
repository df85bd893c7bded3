"""Which memory chunks changed since the previous snapshot of one VM session.

docs/spore-format.md, "Dirty tracking", is the contract; in short:

* **Guest writes** are in KVM's dirty log (``BoardWiring(dirty_log=True)``; the
  machine turns ``KVM_MEM_LOG_DIRTY_PAGES`` on at its first ``get_dirty_log``,
  which answers every page dirty: the first snapshot, or ``reset`` right after a
  restore, so a restored VM's first snapshot is incremental). The
  classic ``KVM_GET_DIRTY_LOG`` (we never enable ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``)
  returns the bitmap *and* clears it, write-protecting the pages again, in one
  ioctl: reading it ends one epoch and starts the next.
* **VMM writes** (virtio used rings, blk reads into guest buffers, console
  delivery, the RAM loader) go through ``GuestMemory.write`` /
  ``view(writable=True)``, which mark ``vmm_dirty``; KVM never sees them.
* **KVM's own writes** (kvmclock, wall clock, steal time, PV EOI, async PF)
  are written through ``kvm_write_guest*`` / pfn caches that mark the page in
  the dirty log on current kernels — but a missed one would be a stale chunk
  forever, so the chunks holding every page a paravirtual MSR points at (read
  from the captured vCPU state) are always re-hashed too. It costs one chunk
  per such page, and these MSRs are 0 unless the guest enabled them.

The previous index of a machine is remembered here (keyed weakly by the
Machine): a snapshot's index, or the index a restore loaded RAM from
(``set_base``). It is consumed before anything is read, so a snapshot that
fails half-way leaves no base and the next one hashes everything.

All of it assumes the caller holds the VM still: no vCPU in ``KVM_RUN`` and
every device lock held (host threads such as the console pump write RAM only
under their device's lock), from ``take`` until RAM has been read.
"""

from __future__ import annotations

import weakref

from sporevm.spore.chunks import CHUNK, ChunkError, ChunkStore, MemoryIndex, snapshot_memory
from sporevm.spore.vmstate import VmState
from sporevm.vmm.machine import Machine
from sporevm.vmm.memory import PAGE

PAGES_PER_CHUNK = CHUNK // PAGE

# MSRs whose value names guest memory that KVM itself writes.
PV_MEMORY_MSRS: dict[int, str] = {
    0x11: "KVM_WALL_CLOCK",  # pvclock_wall_clock, written on WRMSR (and on host SET_MSRS)
    0x12: "KVM_SYSTEM_TIME",  # pvclock_vcpu_time_info, rewritten on clock updates
    0x4B564D00: "KVM_WALL_CLOCK_NEW",
    0x4B564D01: "KVM_SYSTEM_TIME_NEW",
    0x4B564D02: "KVM_ASYNC_PF_EN",  # kvm_vcpu_pv_apf_data (64 B)
    0x4B564D03: "KVM_STEAL_TIME",  # kvm_steal_time (64 B), incl. the preempted flag
    0x4B564D04: "KVM_PV_EOI_EN",  # the PV EOI byte
}
# Every structure above is at most 64 bytes; flag bits live in the low 6 bits. Covering
# [value & ~63, +128) covers the structure wherever it starts, whatever the flags say.
_PV_SPAN = 128

_bases: weakref.WeakKeyDictionary[Machine, MemoryIndex] = weakref.WeakKeyDictionary()


def dirty_chunks(kvm_dirty_bitmap: bytes, vmm_dirty: bytearray, ram_size: int) -> set[int]:
    """Chunks touched since the last snapshot, by the guest (KVM's log) or by the VMM.

    ``kvm_dirty_bitmap`` is KVM_GET_DIRTY_LOG's little-endian bitmap (bit n of the
    stream = page n); ``vmm_dirty`` is GuestMemory.vmm_dirty, one byte per page.
    """
    if ram_size <= 0 or ram_size % CHUNK:
        raise ChunkError(f"guest RAM size {ram_size} is not a positive multiple of {CHUNK}")
    pages = ram_size // PAGE
    if len(kvm_dirty_bitmap) < (pages + 7) // 8:
        raise ChunkError(
            f"dirty log covers {len(kvm_dirty_bitmap) * 8} pages, guest RAM has {pages}"
        )
    if len(vmm_dirty) != pages:
        raise ChunkError(f"VMM dirty map covers {len(vmm_dirty)} pages, guest RAM has {pages}")
    per = PAGES_PER_CHUNK // 8  # bitmap bytes per chunk (512 pages = 64 bytes)
    out: set[int] = set()
    for c in range(pages // PAGES_PER_CHUNK):
        if kvm_dirty_bitmap[c * per : (c + 1) * per].strip(b"\0") or any(
            vmm_dirty[c * PAGES_PER_CHUNK : (c + 1) * PAGES_PER_CHUNK]
        ):
            out.add(c)
    return out


def pv_chunks(state: VmState, ram_size: int) -> set[int]:
    """Chunks holding memory a paravirtual MSR of any vCPU points at (KVM writes there)."""
    out: set[int] = set()
    for vs in state.vcpus:
        for msr in PV_MEMORY_MSRS:
            value = vs.msrs.get(msr, 0)
            if not value:
                continue
            start = value & ~63
            for gpa in (start, start + _PV_SPAN - 1):
                if 0 <= gpa < ram_size:
                    out.add(gpa // CHUNK)
    return out


def reset(machine: Machine) -> None:
    """Forget every write so far: RAM now equals a known index (after a restore's load)."""
    if machine.dirty_log:
        machine.get_dirty_log()  # KVM_GET_DIRTY_LOG clears what it returns
    mem = machine.ram
    mem.vmm_dirty = bytearray(len(mem.vmm_dirty))
    _bases.pop(machine, None)


def set_base(machine: Machine, index: MemoryIndex | None) -> None:
    """RAM equals ``index`` as of the last ``reset``/snapshot (None: unknown, hash all)."""
    if index is None:
        _bases.pop(machine, None)
    else:
        _bases[machine] = index


def base(machine: Machine) -> MemoryIndex | None:
    return _bases.get(machine)


def take(machine: Machine) -> set[int] | None:
    """Chunks written since the last take/reset, clearing both logs; None when the
    machine has no KVM dirty log (nothing can be trusted: hash everything)."""
    mem = machine.ram
    # Swap rather than copy-then-clear: a mark made after this line lands in the new map.
    vmm, mem.vmm_dirty = mem.vmm_dirty, bytearray(len(mem.vmm_dirty))
    if not machine.dirty_log:
        return None
    return dirty_chunks(machine.get_dirty_log(), vmm, mem.size)


def plan(
    machine: Machine, state: VmState, store: ChunkStore
) -> tuple[MemoryIndex | None, set[int] | None]:
    """``(previous, dirty)`` for ``snapshot_memory`` of the paused machine, ending the
    epoch (both logs cleared, the base consumed). ``(None, None)``: hash everything.
    Call ``set_base(machine, index)`` with the index it produced to start the next one.
    ``state`` is this same pause's capture (for ``pv_chunks``)."""
    count = machine.ram.size // CHUNK
    previous = _bases.pop(machine, None)  # consumed first: a failure later leaves none
    dirty = take(machine)
    if previous is None or dirty is None or len(previous.chunks) != count:
        return None, None
    todo = dirty | pv_chunks(state, machine.ram.size)
    # snapshot_memory re-hashes chunks the store lost as well; count them in.
    todo |= {c for c, cid in enumerate(previous.chunks) if cid and not store.has(cid)}
    return previous, todo


def snapshot(machine: Machine, state: VmState, store: ChunkStore) -> tuple[MemoryIndex, int]:
    """Index (and publish) the paused machine's RAM, hashing only what changed since the
    previous snapshot or restore of this machine; returns the index and how many chunks
    were read and hashed."""
    previous, todo = plan(machine, state, store)
    index = snapshot_memory(machine.ram.view(0, machine.ram.size), store, previous, todo)
    set_base(machine, index)
    return index, len(index.chunks) if todo is None else len(todo)
