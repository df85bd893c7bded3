"""Restore strategies (docs/restore.md) on real KVM with the counting probe guest.

The probe is paused mid-way through LOOP outs, its RAM chunked into a store and its
state captured; each strategy then resumes it in a fresh Machine and the count must
continue exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from sporevm.errors import SporeError
from sporevm.runtime.capture import capture
from sporevm.runtime.lazy import LazyPager, start_pager
from sporevm.runtime.monitor import _blake3_fd
from sporevm.runtime.monitor_config import MonitorConfig
from sporevm.runtime.protocol import RestoreStrategy
from sporevm.runtime.restore import RamLoader, eager_ram, map_local, restore_machine
from sporevm.spore import vmstate
from sporevm.spore.backing import ensure_memfile, memfile_path
from sporevm.spore.chunks import CHUNK, ChunkError, ChunkStore, MemoryIndex
from sporevm.spore.chunks import snapshot_memory as chunk_ram
from sporevm.spore.vmstate import VmState
from sporevm.store import Store
from sporevm.vmm.machine import Machine, StopReason
from sporevm.vmm.memory import GuestMemory
from tests.conftest import immutable
from tests.probe_build import TestPort as ProbePort  # aliased: pytest collects Test*
from tests.test_capture_restore import LOOP, RAM, REPO, attach_probe_devices, paused_pioloop, soon

needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)


class Paused:
    """One paused counting probe, chunked into a store: the spore every test restores."""

    def __init__(self, root: Path) -> None:
        for attempt in range(3):  # a busy host can let the loop finish before the pause
            try:
                vm, self.k = paused_pioloop()
                break
            except AssertionError:
                if attempt == 2:
                    raise
        with vm:
            self.state: VmState = vmstate.decode(vmstate.encode(capture(vm.machine)))
            self.store = Store(root)
            self.chunks = ChunkStore(self.store)
            ram = vm.machine.ram
            self.index: MemoryIndex = chunk_ram(ram.view(0, ram.size), self.chunks)
            self.ram = vm.machine.ram.read(0, RAM)

    def restore(self, loader: RamLoader | None) -> tuple[Machine, ProbePort]:
        """``loader`` None: eager as the monitor does it, into RAM filled and verified
        before the VM exists (private anonymous memory, two chunks at a time)."""
        port = ProbePort()
        memory = eager_ram(self.index, self.chunks, RAM) if loader is None else None
        m = restore_machine(
            self.state,
            Machine(RAM, 1, strict_io=True, memory=memory),
            loader or (lambda mem: None),
            attach=lambda m: attach_probe_devices(m, port),
        )
        return m, port


@pytest.fixture(scope="module")
def spore(tmp_path_factory: pytest.TempPathFactory) -> Paused:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    return Paused(tmp_path_factory.mktemp("store"))


def loaders(s: Paused, pagers: list[LazyPager]) -> dict[str, RamLoader | None]:
    return {
        "eager": None,  # the RAM is prepared before the machine: Paused.restore
        "local": lambda mem: map_local(mem, s.index, s.chunks, s.store),
        "lazy": lambda mem: pagers.append(start_pager(mem, s.index, s.chunks)),
    }


@needs_kvm
@pytest.mark.parametrize("strategy", ["eager", "local", "lazy"])
def test_counter_continues_exactly(spore: Paused, strategy: str) -> None:
    pagers: list[LazyPager] = []
    m, port = spore.restore(loaders(spore, pagers)[strategy])
    with m:
        r = m.run(soon())
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), r
        assert port.loop == list(range(spore.k, LOOP))  # nothing lost, nothing repeated
        if strategy == "lazy":
            (p,) = pagers
            # Really lazy: the guest faulted chunks in, and most of RAM was never read.
            assert p.faults > 0 and 0 < p.missing < len(spore.index.chunks), (p.faults, p.missing)
            assert p.error is None
        if strategy == "local":
            assert m.ram.backing == "file"
        if strategy == "eager":
            assert m.ram.backing == "anonymous"


@needs_kvm
def test_lazy_vmm_access_is_served_without_the_pager(spore: Paused) -> None:
    """The VMM's own (GIL-holding) reads populate in-thread: no deadlock, right bytes."""
    pagers: list[LazyPager] = []
    m, _ = spore.restore(loaders(spore, pagers)["lazy"])
    with m:
        (p,) = pagers
        last = len(spore.index.chunks) - 1
        assert not p.present[last]
        assert m.ram.read(last * CHUNK, CHUNK) == spore.ram[last * CHUNK :]
        assert p.present[last] and p.faults == 0
        assert m.ram.read(0, RAM) == spore.ram  # everything, e.g. for a snapshot
        assert p.missing == 0


@needs_kvm
def test_local_restores_share_the_file_and_diverge_on_write(spore: Paused) -> None:
    path = ensure_memfile(spore.index, spore.chunks, spore.store)
    assert path == memfile_path(spore.index, spore.store) and path.stat().st_size == RAM
    before = path.read_bytes()
    assert before == spore.ram
    a, port_a = spore.restore(loaders(spore, [])["local"])
    b, _ = spore.restore(loaders(spore, [])["local"])
    with a, b:
        maps = Path("/proc/self/maps").read_text()
        assert maps.count(str(path)) >= 2  # two VMs, one file
        assert a.run(soon()).reason is StopReason.POWEROFF  # the guest writes its stack…
        a.ram.write(0x1000, b"written by the VMM")  # …and so does the VMM
        ram_a, ram_b = a.ram.read(0, RAM), b.ram.read(0, RAM)
        assert ram_a != spore.ram and ram_a[0x1000:0x1012] == b"written by the VMM"
        assert ram_b == spore.ram  # B still sees the clean pages
        assert port_a.loop == list(range(spore.k, LOOP))
    assert path.read_bytes() == before  # MAP_PRIVATE: nothing reached the file
    assert ensure_memfile(spore.index, spore.chunks, spore.store) == path  # reused


@needs_kvm
def test_local_refuses_a_corrupt_memfile(spore: Paused, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    chunks = ChunkStore(store)
    for cid in spore.index.stored():
        chunks.put(spore.chunks.get(cid))
    path = ensure_memfile(spore.index, chunks, store)
    bad = next(c for c, cid in enumerate(spore.index.chunks) if cid)
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(bad * CHUNK + 100)
        fh.write(b"\xff")
    with pytest.raises(ChunkError, match=f"chunk {bad} does not match"):
        map_local(GuestMemory(RAM), spore.index, chunks, store)
    assert not path.exists()  # removed; the next restore rebuilds it from chunks
    mem = GuestMemory(RAM)
    try:
        map_local(mem, spore.index, chunks, store)
        assert mem.read(0, RAM) == spore.ram
    finally:
        mem.close()


def corrupt_child(root: str, evictable: bool) -> None:
    """Child process: lazily restore a spore whose stored chunks are all corrupt (and,
    unless ``evictable``, immutable: the pager cannot evict them, issue 11).

    A vCPU parked in a userfaultfd fault does not leave KVM_RUN on a signal on this
    host (kvm_pvm), so failing closed means ending the process, as the monitor does.
    """
    s = Paused(Path(root))
    paths = [s.chunks.path(cid) for cid in s.index.stored()]
    for path in paths:
        os.chmod(path, 0o644)
        data = bytearray(path.read_bytes())
        data[123] ^= 0xFF
        path.write_bytes(bytes(data))  # every stored chunk: the first fault hits one
    if not evictable and subprocess.run(["chattr", "+i", *map(str, paths)]).returncode:
        os._exit(4)  # the parent skips; it also clears the flag whatever happens
    port = ProbePort()
    pagers: list[LazyPager] = []

    def fail_closed(exc: BaseException) -> None:
        p = pagers[0]
        present = [c for c, cid in enumerate(s.index.chunks) if cid and p.present[c]]
        doc = {
            "error": str(exc),
            "loop": len(port.loop),
            "present": present,
            "stored": s.index.stored(),
            "left": sum(path.exists() for path in paths),
        }
        print(json.dumps(doc), flush=True)
        os._exit(3)

    def load(mem: GuestMemory) -> None:
        pagers.append(start_pager(mem, s.index, s.chunks, on_error=fail_closed))

    m = restore_machine(
        s.state,
        Machine(RAM, 1, strict_io=True),
        load,
        attach=lambda m: attach_probe_devices(m, port),
    )
    m.run(soon(10))
    print(json.dumps({"error": None, "loop": len(port.loop)}), flush=True)
    os._exit(0)


@needs_kvm
@pytest.mark.parametrize("evictable", [True, False], ids=["evicted", "immutable"])
def test_lazy_fails_closed_on_a_corrupt_chunk(tmp_path: Path, evictable: bool) -> None:
    """Whatever the fill fails on, the pager calls on_error at once (it used to die on
    the PermissionError of evicting an immutable entry, leaving the vCPU parked)."""
    try:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.test_restore_strategies",
                "corrupt",
                str(tmp_path),
                "evictable" if evictable else "immutable",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        subprocess.run(["chattr", "-R", "-i", str(tmp_path)], capture_output=True)
    if p.returncode == 4:
        pytest.skip("chattr +i does not work here")
    assert p.returncode == 3, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    msg = res["error"]
    assert "failed verification" in msg and "does not match its id" in msg, msg
    assert any(cid in msg for cid in res["stored"]), msg  # names the chunk
    assert res["loop"] == 0  # the guest never ran on unverified bytes
    assert res["present"] == []  # and no stored chunk was mapped in
    if evictable:
        assert res["left"] == len(res["stored"]) - 1  # the one faulted on was evicted
    else:
        assert "could not be evicted (Operation not permitted)" in msg, msg
        assert res["left"] == len(res["stored"])


@needs_kvm
@pytest.mark.parametrize("evictable", [True, False], ids=["evicted", "immutable"])
def test_eager_corrupt_chunk_raises_the_chunk_error(
    spore: Paused, tmp_path: Path, evictable: bool
) -> None:
    """The monitor's eager fill fails with the ChunkError naming the chunk, not with a
    BufferError from dropping RAM that the error's traceback still views (issue 11)."""
    store = Store(tmp_path / "store")
    chunks = ChunkStore(store)
    for cid in spore.index.stored():
        chunks.put(spore.chunks.get(cid))
    bad = spore.index.stored()[-1]
    path = chunks.path(bad)
    data = bytearray(path.read_bytes())
    data[CHUNK // 2] ^= 1
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with immutable([] if evictable else [path]):
        with pytest.raises(ChunkError, match=f"chunk {bad}: .*does not match its id") as info:
            eager_ram(spore.index, chunks, RAM)
    assert path.exists() is not evictable
    if not evictable:
        assert "could not be evicted" in str(info.value)
    # The healthy chunks still restore (and the RAM of the failed fill was dropped).
    path.unlink(missing_ok=True)
    chunks.put(spore.chunks.get(bad))
    eager_ram(spore.index, chunks, RAM).close()


def _wire(**over: object) -> bytes:
    doc: dict[str, object] = dict(
        kernel="/k",
        initrd="/i",
        rootfs="/r",
        cmdline="",
        memory=RAM,
        vcpus=1,
        agent_fd=3,
        serial_log="/s",
        timeout=None,
        store="",
        restore=None,
        ram="eager",
        restore_id=None,
        kernel_digest=None,
        initrd_digest=None,
    )
    return json.dumps({**doc, **over}).encode()


RESTORE = dict(
    restore="/m.json",
    restore_id="blake3:" + "a" * 64,
    kernel_digest="blake3:" + "b" * 64,
    initrd_digest="blake3:" + "c" * 64,
)


def test_monitor_config_validates_ram() -> None:
    good = MonitorConfig.decode(_wire(**RESTORE, ram="lazy"))
    assert good.vm.restore is not None and good.vm.restore.ram is RestoreStrategy.LAZY
    assert MonitorConfig.decode(good.encode()) == good
    bad = good.encode().replace(b'"lazy"', b'"mmap"')
    with pytest.raises(SporeError, match="ram must be one of eager, lazy, local"):
        MonitorConfig.decode(bad)


if __name__ == "__main__":
    if sys.argv[1:2] == ["corrupt"]:
        corrupt_child(sys.argv[2], sys.argv[3] == "evictable")


def test_monitor_config_restore_id_goes_with_restore() -> None:
    ok = MonitorConfig.decode(_wire(**RESTORE))
    assert ok.vm.restore is not None and ok.vm.restore.manifest_id == RESTORE["restore_id"]
    assert MonitorConfig.decode(ok.encode()) == ok
    for bad in (
        _wire(**{**RESTORE, "restore_id": None}),
        _wire(restore_id=RESTORE["restore_id"]),
        _wire(**{**RESTORE, "restore_id": "blake3:" + "A" * 64}),
    ):
        with pytest.raises(SporeError, match="restore_id"):
            MonitorConfig.decode(bad)


@pytest.mark.parametrize("field", ["kernel_digest", "initrd_digest"])
def test_monitor_config_platform_digests_go_with_restore(field: str) -> None:
    """A restoring monitor takes the kernel and initrd digests the caller verified (it
    never reads the two files); a booting one must not be handed any."""
    ok = MonitorConfig.decode(_wire(**RESTORE))
    assert getattr(ok.vm.restore, field) == RESTORE[field]
    for bad in (
        _wire(**{**RESTORE, field: None}),
        _wire(**{**RESTORE, field: "blake3:" + "B" * 64}),
        _wire(**{field: RESTORE[field]}),
    ):
        with pytest.raises(SporeError, match=field):
            MonitorConfig.decode(bad)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, (1 << 20) + 7])
def test_rootfs_digest_is_blake3_of_the_fd(tmp_path: Path, size: int) -> None:
    """The monitor verifies the rootfs through the fd the VM will read (mapped, hashed on
    every core): its digest and size are exactly BLAKE3 of the bytes."""
    data = os.urandom(size)
    path = tmp_path / "rootfs"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _blake3_fd(fd) == ("blake3:" + blake3.blake3(data).hexdigest(), size)
    finally:
        os.close(fd)
