"""Memory chunks: ids, zero elision, dirty-only snapshots, a store that verifies every read."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sporevm.runtime.dirty import dirty_chunks
from sporevm.spore.chunks import (
    CHUNK,
    ChunkError,
    ChunkStore,
    MemoryIndex,
    chunk_id,
    is_zero,
    materialize,
    snapshot_memory,
)
from sporevm.store import Store
from sporevm.vmm.memory import PAGE, GuestMemory
from tests.conftest import immutable


@pytest.fixture
def cs(tmp_path: Path) -> ChunkStore:
    return ChunkStore(Store(tmp_path / "store"))


def ram_of(chunks: int) -> bytearray:
    return bytearray(chunks * CHUNK)


def test_chunk_id_is_blake3() -> None:
    assert chunk_id(b"abc") == "blake3:" + blake3.blake3(b"abc").hexdigest()


def test_is_zero() -> None:
    buf = bytearray(CHUNK)
    assert is_zero(buf)
    assert is_zero(memoryview(buf)[:100])
    assert is_zero(b"")
    for pos in (0, 1, 256 * 1024 - 1, 256 * 1024, CHUNK - 1):
        buf[pos] = 1
        assert not is_zero(buf)
        assert not is_zero(memoryview(buf).toreadonly())
        buf[pos] = 0


def test_put_get_roundtrip_and_idempotent(cs: ChunkStore) -> None:
    data = os.urandom(1000)
    cid = cs.put(data)
    assert cid == chunk_id(data)
    assert cs.put(data) == cid
    assert cs.has(cid)
    assert cs.get(cid) == data
    assert cs.get(cid, size=1000) == data
    assert cs.path(cid) == cs.store.root / "chunks" / "blake3" / cid[len("blake3:") :]
    assert not list((cs.store.root / "tmp").iterdir())  # no staging left behind


def test_put_refuses_wrong_expected_id(cs: ChunkStore) -> None:
    with pytest.raises(ChunkError, match="hashes to"):
        cs.put(b"x", expect=chunk_id(b"y"))
    assert not cs.has(chunk_id(b"x"))
    with pytest.raises(ChunkError, match="not a chunk id"):
        cs.put(b"x", expect="sha256:" + "0" * 64)


def test_put_repairs_a_corrupt_entry(cs: ChunkStore) -> None:
    cid = cs.put(b"hello")
    cs.path(cid).write_bytes(b"hellp")
    assert cs.put(b"hello") == cid
    assert cs.get(cid) == b"hello"


def test_bad_ids_rejected(cs: ChunkStore) -> None:
    for bad in ("blake3:" + "A" * 64, "blake3:" + "0" * 63, "0" * 64, "blake3:../../x"):
        with pytest.raises(ChunkError, match="not a chunk id"):
            cs.path(bad)


def test_missing_chunk(cs: ChunkStore) -> None:
    cid = chunk_id(b"absent")
    assert not cs.has(cid)
    with pytest.raises(ChunkError, match="not in the store"):
        cs.get(cid)


def test_corrupt_chunk_detected_and_evicted(cs: ChunkStore) -> None:
    data = os.urandom(CHUNK)
    cid = cs.put(data)
    raw = bytearray(data)
    raw[12345] ^= 1
    cs.path(cid).write_bytes(raw)
    with pytest.raises(ChunkError, match="corrupt.*evicted"):
        cs.get(cid)
    assert not cs.path(cid).exists()
    assert not cs.has(cid)


def test_corrupt_chunk_that_cannot_be_evicted_is_still_reported(cs: ChunkStore) -> None:
    """An entry that cannot be removed (immutable here; a read-only store, an I/O error)
    is reported as corrupt, saying what to do, by every reader (issue 11: eviction's
    PermissionError replaced the report and killed the lazy pager)."""
    data = os.urandom(CHUNK)
    cid = cs.put(data)
    path = cs.path(cid)
    os.chmod(path, 0o644)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with immutable([path]):
        for read in (
            lambda: cs.get(cid),
            lambda: cs.read_into(cid, memoryview(bytearray(CHUNK))),
            lambda: materialize(MemoryIndex(CHUNK, (cid,)), cs, memoryview(bytearray(CHUNK))),
        ):
            with pytest.raises(
                ChunkError,
                match=r"corrupt\) and could not be evicted "
                r"\(Operation not permitted\); delete that file",
            ) as info:
                read()
            assert str(path) in str(info.value) and "pull or unpack" in str(info.value)
        with pytest.raises(ChunkError, match="cannot publish"):
            cs.put(data)  # the repair cannot replace it either, and says so
        assert path.exists()
    assert cs.put(data) == cid and cs.get(cid) == data  # writable again: repaired


def test_truncated_chunk_is_corrupt_for_read_into(cs: ChunkStore) -> None:
    data = os.urandom(CHUNK)
    cid = cs.put(data)
    os.chmod(cs.path(cid), 0o644)
    cs.path(cid).write_bytes(data[: CHUNK // 2])
    with pytest.raises(ChunkError, match="corrupt.*evicted"):
        cs.read_into(cid, memoryview(bytearray(CHUNK)))
    assert not cs.has(cid)


def test_wrong_size_rejected_but_kept(cs: ChunkStore) -> None:
    cid = cs.put(b"small")
    with pytest.raises(ChunkError, match="expected 2097152"):
        cs.get(cid, size=CHUNK)
    assert cs.has(cid)  # intact: a wrong expectation must not destroy good content


def test_symlinked_entry_rejected(cs: ChunkStore, tmp_path: Path) -> None:
    data = b"target bytes"
    target = tmp_path / "elsewhere"
    target.write_bytes(data)
    cid = chunk_id(data)
    cs.path(cid).symlink_to(target)
    assert not cs.has(cid)
    with pytest.raises(ChunkError, match="symlink"):
        cs.get(cid)
    assert target.read_bytes() == data  # the link was removed, never followed
    assert not cs.path(cid).is_symlink()


def test_non_regular_entries_rejected(cs: ChunkStore) -> None:
    cid = chunk_id(b"dir")
    cs.path(cid).mkdir()
    assert not cs.has(cid)
    with pytest.raises(ChunkError, match="not a regular file"):
        cs.get(cid)
    with pytest.raises(ChunkError, match="cannot publish"):
        cs.put(b"dir")
    fifo = chunk_id(b"fifo")
    os.mkfifo(cs.path(fifo))
    with pytest.raises(ChunkError, match="not a regular file"):
        cs.get(fifo)  # and does not block on open


def test_snapshot_elides_zero_chunks(cs: ChunkStore) -> None:
    ram = ram_of(4)
    ram[CHUNK + 5] = 7
    ram[3 * CHUNK :] = os.urandom(CHUNK)
    idx = snapshot_memory(memoryview(ram), cs)
    assert idx.chunk_size == CHUNK and idx.memory_size == len(ram)
    assert idx.chunks[0] is None and idx.chunks[2] is None
    assert idx.chunks[1] == chunk_id(ram[CHUNK : 2 * CHUNK])
    assert idx.chunks[3] == chunk_id(ram[3 * CHUNK :])
    assert len(list(cs.root.iterdir())) == 2
    out = bytearray(len(ram))
    materialize(idx, cs, memoryview(out))
    assert out == ram


def test_snapshot_dirty_only_keeps_ids(cs: ChunkStore) -> None:
    ram = ram_of(4)
    for c in range(4):
        ram[c * CHUNK] = c + 1
    first = snapshot_memory(memoryview(ram), cs)
    ram[2 * CHUNK + 100] = 0xAA  # the guest writes chunk 2 ...
    ram[0] = 0  # ... and chunk 0, but the dirty set only names 2
    second = snapshot_memory(memoryview(ram), cs, first, {2})
    assert second.chunks[0] == first.chunks[0]  # not re-read: not dirty
    assert second.chunks[1] == first.chunks[1] and second.chunks[3] == first.chunks[3]
    assert second.chunks[2] == chunk_id(ram[2 * CHUNK : 3 * CHUNK]) != first.chunks[2]
    third = snapshot_memory(memoryview(ram), cs, second, {0})
    assert third.chunks[0] is None  # chunk 0 became zero


def test_snapshot_rehashes_kept_chunks_missing_from_store(cs: ChunkStore) -> None:
    ram = ram_of(2)
    ram[1] = 1
    ram[CHUNK + 1] = 2
    first = snapshot_memory(memoryview(ram), cs)
    assert first.chunks[0] is not None
    cs.path(first.chunks[0]).unlink()
    second = snapshot_memory(memoryview(ram), cs, first, set())
    assert second == first and cs.has(first.chunks[0])


def test_snapshot_rejects_mismatched_previous(cs: ChunkStore) -> None:
    with pytest.raises(ChunkError, match="previous memory index"):
        snapshot_memory(memoryview(ram_of(2)), cs, MemoryIndex(CHUNK, (None,)), set())
    with pytest.raises(ChunkError, match="out of range"):
        snapshot_memory(memoryview(ram_of(1)), cs, MemoryIndex(CHUNK, (None,)), {1})
    with pytest.raises(ChunkError, match="multiple of"):
        snapshot_memory(memoryview(bytearray(CHUNK + PAGE)), cs)


def test_snapshot_of_guest_memory(cs: ChunkStore) -> None:
    mem = GuestMemory(2 * CHUNK)
    try:
        mem.write(CHUNK + 10, b"guest")
        idx = snapshot_memory(mem.view(0, mem.size), cs)
        assert idx.chunks[0] is None
        assert cs.get(idx.chunks[1] or "")[10:15] == b"guest"
        # the VMM's own write is seen by dirty tracking even with an empty KVM log
        mem.vmm_dirty[:] = bytes(len(mem.vmm_dirty))
        mem.write(5, b"vmm")
        log = bytes(2 * CHUNK // PAGE // 8)
        dirty = dirty_chunks(log, mem.vmm_dirty, mem.size)
        assert dirty == {0}
        idx2 = snapshot_memory(mem.view(0, mem.size), cs, idx, dirty)
        assert idx2.chunks[0] is not None and idx2.chunks[1] == idx.chunks[1]
    finally:
        mem.close()


def test_dirty_chunks_from_kvm_bitmap_and_vmm() -> None:
    size = 4 * CHUNK
    pages = size // PAGE
    log = bytearray(pages // 8)
    vmm = bytearray(pages)
    assert dirty_chunks(bytes(log), vmm, size) == set()
    log[0] = 0x01  # page 0 -> chunk 0 (bit 0 of byte 0 is page 0: little-endian)
    page = 3 * 512 + 511  # last page of chunk 3
    log[page // 8] |= 1 << (page % 8)
    vmm[512] = 1  # first page of chunk 1
    assert dirty_chunks(bytes(log), vmm, size) == {0, 1, 3}
    # KVM rounds its bitmap up to 64-bit words; extra bytes are allowed
    assert dirty_chunks(bytes(log) + bytes(8), vmm, size) == {0, 1, 3}


def test_dirty_chunks_rejects_short_maps() -> None:
    size = 2 * CHUNK
    with pytest.raises(ChunkError, match="dirty log covers"):
        dirty_chunks(bytes(10), bytearray(size // PAGE), size)
    with pytest.raises(ChunkError, match="VMM dirty map"):
        dirty_chunks(bytes(size // PAGE // 8), bytearray(5), size)
    with pytest.raises(ChunkError, match="multiple of"):
        dirty_chunks(b"", bytearray(), PAGE)


def test_materialize_verifies(cs: ChunkStore) -> None:
    ram = ram_of(1)
    ram[0] = 1
    idx = snapshot_memory(memoryview(ram), cs)
    assert idx.chunks[0] is not None
    cs.path(idx.chunks[0]).write_bytes(bytes(CHUNK))
    with pytest.raises(ChunkError, match="corrupt"):
        materialize(idx, cs, memoryview(bytearray(CHUNK)))
    with pytest.raises(ChunkError, match="target is"):
        materialize(idx, cs, memoryview(bytearray(PAGE)))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_materialize_with_workers_writes_every_chunk_and_fails_on_any(
    cs: ChunkStore, workers: int
) -> None:
    ram = ram_of(5)
    for c in (0, 1, 3, 4):
        ram[c * CHUNK + 7] = c + 1
    idx = snapshot_memory(memoryview(ram), cs)
    out = bytearray(b"\xee" * len(ram))
    materialize(idx, cs, memoryview(out), workers=workers)
    assert out == ram  # the zero chunk (2) was zeroed, the rest copied
    bad = idx.chunks[4]
    assert bad is not None
    cs.path(bad).write_bytes(bytes(CHUNK))
    with pytest.raises(ChunkError, match="corrupt"):
        materialize(idx, cs, memoryview(bytearray(len(ram))), workers=workers)


def test_read_into_verifies_in_place_and_leaves_nothing_unverified(cs: ChunkStore) -> None:
    data = os.urandom(CHUNK)
    cid = cs.put(data)
    out = bytearray(CHUNK)
    cs.read_into(cid, memoryview(out))
    assert out == data
    raw = bytearray(data)
    raw[CHUNK - 1] ^= 0x80
    cs.path(cid).write_bytes(raw)
    out = bytearray(b"\xff" * CHUNK)
    with pytest.raises(ChunkError, match="corrupt.*evicted"):
        cs.read_into(cid, memoryview(out))
    assert out == bytes(CHUNK)  # the bad bytes do not stay where guest RAM would be
    assert not cs.has(cid)
    short = cs.put(b"short")
    with pytest.raises(ChunkError, match=f"expected {CHUNK}"):
        cs.read_into(short, memoryview(bytearray(CHUNK)))
    assert cs.has(short)  # intact: a wrong expectation must not destroy good content
    with pytest.raises(ChunkError, match="not in the store"):
        cs.read_into("blake3:" + "0" * 64, memoryview(bytearray(CHUNK)))


_writes = st.lists(
    st.tuples(st.integers(0, 3 * CHUNK - 1), st.binary(min_size=1, max_size=64)), max_size=12
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=_writes, second=_writes)
def test_snapshot_reassembles_ram(
    cs: ChunkStore, first: list[tuple[int, bytes]], second: list[tuple[int, bytes]]
) -> None:
    size = 3 * CHUNK
    ram = bytearray(size)
    vmm = bytearray(size // PAGE)

    def apply(writes: list[tuple[int, bytes]]) -> None:
        for off, data in writes:
            data = data[: size - off]
            ram[off : off + len(data)] = data
            for p in range(off // PAGE, (off + len(data) - 1) // PAGE + 1):
                vmm[p] = 1

    apply(first)
    idx = snapshot_memory(memoryview(ram), cs)
    out = bytearray(size)
    materialize(idx, cs, memoryview(out), out_is_zero=True)
    assert out == ram
    vmm[:] = bytes(len(vmm))
    apply(second)
    dirty = dirty_chunks(bytes(size // PAGE // 8), vmm, size)
    idx2 = snapshot_memory(memoryview(ram), cs, idx, dirty)
    assert idx2 == snapshot_memory(memoryview(ram), cs)  # incremental == full
    materialize(idx2, cs, memoryview(out))
    assert out == ram
