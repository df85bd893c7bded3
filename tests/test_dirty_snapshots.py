"""Dirty-only snapshots (sporevm/spore/dirty.py) on real KVM with the probe guest.

Every test compares the incremental index with a fresh full hash of RAM: a chunk
that kept a stale id is a failure, however few chunks were hashed.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from sporevm.runtime import dirty
from sporevm.runtime.capture import capture
from sporevm.runtime.restore import restore_machine
from sporevm.spore.chunks import CHUNK, ChunkStore, MemoryIndex, materialize, snapshot_memory
from sporevm.spore.vmstate import VmState
from sporevm.store import Store
from sporevm.vmm.devices.virtio import BlkDevice, RngDevice, VirtioMmio
from sporevm.vmm.machine import Machine, StopReason
from sporevm.vmm.memory import PAGE
from tests.probe_build import PROBE_TEST_PORT, PROBE_TEST_PORT_LEN, ProbeVm
from tests.test_probe_virtio import attach, cmdline

pytestmark = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)
RAM = 32 << 20


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def fresh(m: Machine, cs: ChunkStore) -> MemoryIndex:
    return snapshot_memory(m.ram.view(0, m.ram.size), cs)  # every chunk read and hashed


def assert_exact(m: Machine, cs: ChunkStore, index: MemoryIndex) -> None:
    """No stale chunk id, and the index reassembles to RAM byte for byte."""
    full = fresh(m, cs)
    stale = [c for c, (a, b) in enumerate(zip(index.chunks, full.chunks, strict=True)) if a != b]
    assert not stale, f"stale chunk ids: {stale}"
    out = bytearray(m.ram.size)
    materialize(index, cs, memoryview(out), out_is_zero=True)
    assert out == m.ram.read(0, m.ram.size)


def test_guest_writes_rehash_only_their_chunks(store: Store) -> None:
    cs = ChunkStore(store)
    first = 8 * CHUNK - 2 * PAGE  # 4 pages straddling chunks 7 and 8
    with ProbeVm("dirty", f"probe.dirty={first:#x},4", dirty_log=True) as vm:
        m = vm.machine
        state = capture(m)
        i0, h0 = dirty.snapshot(m, state, cs)
        assert h0 == RAM // CHUNK  # nothing to compare with yet: everything
        r = m.run(soon())
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), vm.output
        previous, todo = dirty.plan(m, state, cs)
        assert previous == i0 and todo is not None
        i1 = snapshot_memory(m.ram.view(0, m.ram.size), cs, previous, todo)
        dirty.set_base(m, i1)
        changed = {c for c in range(len(i0.chunks)) if i0.chunks[c] != i1.chunks[c]}
        print(f"\nhashed chunks {sorted(todo)}, changed {sorted(changed)}")
        assert {7, 8} <= changed <= todo
        # The written pages, plus at most the probe's own stack/data chunk and page tables.
        assert len(todo) <= 4
        assert_exact(m, cs, i1)
        # Nothing happened since: the next snapshot hashes nothing and changes nothing.
        i2, h2 = dirty.snapshot(m, state, cs)
        assert (i2, h2) == (i1, 0)


def test_vmm_writes_through_virtio_are_caught(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cs = ChunkStore(store)
    data = random.Random(7).randbytes(64 * 1024)
    (tmp_path / "disk").write_bytes(data)
    fd = os.open(tmp_path / "disk", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ProbeVm("virtio_blk", cmdline(2), dirty_log=True) as vm:
            m = vm.machine
            attach(vm, 0, RngDevice())
            attach(vm, 1, BlkDevice(fd, len(data)))
            state = capture(m)
            i0, _ = dirty.snapshot(m, state, cs)
            before = m.ram.read(0, RAM)
            r = m.run(soon())
            assert (r.reason, r.status) == (StopReason.POWEROFF, 0), vm.output
            assert "probe: virtio_blk ok" in vm.output

            logs: list[bytes] = []
            real = m.get_dirty_log

            def spy() -> bytes:
                logs.append(real())
                return logs[-1]

            monkeypatch.setattr(m, "get_dirty_log", spy)
            vmm = bytes(m.ram.vmm_dirty)
            i1, _ = dirty.snapshot(m, state, cs)
            assert_exact(m, cs, i1)
            # Every page that changed is in KVM's log or the VMM's own record, and the VMM
            # wrote the disk's bytes (blk's preadv into the probe's buffer): its record is
            # what a snapshot needs where KVM does not log a VMM's writes (kvm_pvm). On
            # hardware KVM the probe's own writes to that buffer are logged too.
            after = m.ram.read(0, RAM)
            (log,) = logs
            changed = [
                p
                for p in range(RAM // PAGE)
                if before[p * PAGE : (p + 1) * PAGE] != after[p * PAGE : (p + 1) * PAGE]
            ]
            unrecorded = [p for p in changed if not vmm[p] and not log[p // 8] >> (p % 8) & 1]
            assert changed and unrecorded == [], unrecorded
            vmm_changed = [p for p in changed if vmm[p]]
            assert len(vmm_changed) >= len(data) // PAGE, vmm_changed

            # VMM writes into chunks the guest never touches, both paths devices use.
            m.ram.write(10 * CHUNK + 123, b"used ring")
            view = m.ram.view(11 * CHUNK - 100, 200, writable=True)  # straddles 10 | 11
            os.preadv(fd, [view], 0)
            view.release()
            previous, todo = dirty.plan(m, state, cs)
            assert previous == i1 and todo == {10, 11}
            i2 = snapshot_memory(m.ram.view(0, m.ram.size), cs, previous, todo)
            assert_exact(m, cs, i2)
            assert [c for c in range(len(i2.chunks)) if i2.chunks[c] != i1.chunks[c]] == [10, 11]
    finally:
        os.close(fd)


# --- the property: random guest (and VMM) writes between snapshots ---------------------------

STUB = 16 * CHUNK - PAGE  # the last page of chunk 15 (RAM's last chunk)
LO, HI = 2 << 20, 30 << 20  # random writes stay clear of the boot page tables and the stub


class StopPort:
    """The test port: any write pauses the machine (the stub's "done")."""

    def __init__(self) -> None:
        self.machine: Machine | None = None

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        assert self.machine is not None
        self.machine.pause()


def stub_code() -> bytes:
    port = PROBE_TEST_PORT + 8
    # rep stosb; mov dx, port; out dx, eax; jmp $
    return b"\xf3\xaa\x66\xba" + port.to_bytes(2, "little") + b"\xef\xeb\xfe"


def guest_fill(m: Machine, gpa: int, length: int, value: int) -> None:
    """Make the guest itself write ``value`` to [gpa, gpa+length) (rep stosb in the stub)."""
    v = m.vcpus[0]
    regs = v.get_regs()
    regs.rip, regs.rdi, regs.rcx, regs.rax, regs.rflags = STUB, gpa, length, value, 0x2
    v.set_regs(regs)
    r = m.run(soon())
    assert r.reason is StopReason.PAUSED, r
    assert m.ram.read(gpa, length) == bytes([value]) * length


def random_epoch(rng: random.Random, m: Machine) -> None:
    for _ in range(rng.randint(0, 6)):
        if rng.random() < 0.3:
            gpa = rng.randrange(LO // CHUNK, HI // CHUNK) * CHUNK - rng.randint(1, 64)
        else:
            gpa = rng.randrange(LO, HI - 3 * PAGE)
        length = rng.choice([1, 8, rng.randint(1, 3 * PAGE)])
        if rng.random() < 0.75:
            guest_fill(m, gpa, length, rng.randint(0, 255))
        else:
            m.ram.write(gpa, rng.randbytes(length))


@pytest.mark.parametrize("seed", range(4))
def test_random_writes_never_leave_a_stale_chunk(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    cs = ChunkStore(store)
    port = StopPort()
    vm = ProbeVm("loop", port_device=port, dirty_log=True)
    m = vm.machine
    port.machine = m
    m.ram.write(STUB, stub_code())
    hashed_total = 0
    try:
        for epoch in range(8):
            if epoch == 4:
                m = restored(m, capture(m), cs, port)  # the restored index is the base
            random_epoch(rng, m)
            state: VmState = capture(m)
            index, hashed = dirty.snapshot(m, state, cs)
            assert_exact(m, cs, index)
            if epoch:
                hashed_total += hashed
            if epoch == 4:  # the first snapshot after the restore is incremental too
                assert hashed < RAM // CHUNK, hashed
        assert hashed_total < 7 * (RAM // CHUNK) // 2  # it really was incremental
    finally:
        m.close()


def restored(m: Machine, state: VmState, cs: ChunkStore, port: StopPort) -> Machine:
    index = dirty.base(m)
    assert index is not None
    m.close()

    def devices(new: Machine) -> list[VirtioMmio]:
        new.add_pio(PROBE_TEST_PORT, PROBE_TEST_PORT_LEN, port)
        return []

    new = restore_machine(
        state,
        Machine(RAM, 1, strict_io=True, dirty_log=True),
        lambda mem: materialize(index, cs, mem.view(0, mem.size, writable=True), out_is_zero=True),
        attach=devices,
    )
    assert new.dirty_log_armed  # by the restore itself, so later writes are logged
    dirty.set_base(new, index)
    port.machine = new
    return new


def test_kvm_own_writes_are_caught(store: Store) -> None:
    """kvmclock, wall clock and steal time pages: KVM writes them, not the guest's code.
    (On this host KVM logs all three; their chunks are re-hashed regardless.)"""
    cs = ChunkStore(store)
    gpa_time, gpa_wall, gpa_steal = 9 * CHUNK + 64, 11 * CHUNK + 128, 13 * CHUNK
    port = StopPort()
    with ProbeVm("loop", port_device=port, dirty_log=True) as vm:
        m = vm.machine
        port.machine = m
        m.ram.write(STUB, stub_code())
        guest_fill(m, 3 * CHUNK, 16, 7)  # the stub is the guest's entry point
        i0, _ = dirty.snapshot(m, capture(m), cs)
        m.vcpus[0].set_msrs(
            {0x4B564D01: gpa_time | 1, 0x4B564D00: gpa_wall, 0x4B564D03: gpa_steal | 1}
        )
        guest_fill(m, 3 * CHUNK, 16, 8)
        state = capture(m)
        assert dirty.pv_chunks(state, RAM) == {9, 11, 13}
        previous, todo = dirty.plan(m, state, cs)
        assert previous == i0 and todo is not None and {3, 9, 11, 13} <= todo
        index = snapshot_memory(m.ram.view(0, m.ram.size), cs, previous, todo)
        assert_exact(m, cs, index)
        assert all(index.chunks[c] != i0.chunks[c] for c in (3, 9, 11, 13))
