"""Sealed, verified RAM images (sporevm/runtime/ramimage.py; docs/restore.md).

What must hold: an image holds exactly the index's bytes, every stored chunk verified
on the way in; once sealed nothing can change it (write, truncate, hole punch, a
writable shared mapping, unsealing); a cache hit reads no chunk; a corrupt chunk
leaves nothing cached; the budget evicts least recently used; the monitor's check and
the handler's offer refuse anything else; and a real probe VM resumes from one.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sporevm.runtime import ramimage
from sporevm.runtime.monitor_config import MonitorConfig, RamImageWiring, Restore, VmConfig
from sporevm.runtime.protocol import ProtocolError, RestoreStrategy
from sporevm.runtime.ramimage import RamImageCache, RamImageError, check_sealed
from sporevm.spore.chunks import CHUNK, ChunkError, ChunkStore, MemoryIndex
from sporevm.store import Store
from sporevm.vmm.machine import StopReason
from sporevm.vmm.memory import GuestMemory
from tests.test_capture_restore import LOOP, RAM, soon
from tests.test_restore_strategies import Paused, needs_kvm

SIZE = 6 * CHUNK


def make_index(chunks: ChunkStore, seed: int) -> tuple[MemoryIndex, bytes]:
    """Six chunks: two stored ones (one of them twice) and zero chunks between."""
    a = bytes([seed]) * CHUNK
    b = bytes(range(256)) * (CHUNK // 256)
    ids = (chunks.put(a), None, chunks.put(b), None, chunks.put(a), None)
    ram = a + bytes(CHUNK) + b + bytes(CHUNK) + a + bytes(CHUNK)
    return MemoryIndex(CHUNK, ids), ram


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(Store(tmp_path / "store"))


@contextlib.contextmanager
def image_of(cache: RamImageCache, index: MemoryIndex, chunks: ChunkStore) -> Iterator[int]:
    img = cache.image(index, chunks, index.memory_size)
    try:
        yield img.fd
    finally:
        os.close(img.fd)


def read_all(fd: int, size: int) -> bytes:
    return os.pread(fd, size, 0)


def corrupt(chunks: ChunkStore, cid: str) -> None:
    path = chunks.path(cid)
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.write(b"\xff")


def test_image_holds_the_index_and_its_zero_chunks_are_holes(store: ChunkStore) -> None:
    index, ram = make_index(store, 7)
    cache = RamImageCache(1 << 30)
    img = cache.image(index, store, SIZE)
    try:
        assert not img.hit and img.index == ramimage.image_id(index)
        assert read_all(img.fd, SIZE) == ram
        assert ramimage.resident(img.fd) == 3 * CHUNK  # the three zero chunks cost nothing
        check_sealed(img.fd, SIZE)
    finally:
        os.close(img.fd)
    assert cache.stats() == (1, 3 * CHUNK)


def test_a_sealed_image_cannot_change(store: ChunkStore) -> None:
    index, ram = make_index(store, 9)
    with image_of(RamImageCache(1 << 30), index, store) as fd:
        for attempt in (
            lambda: os.pwrite(fd, b"x", 0),
            lambda: os.ftruncate(fd, SIZE - 4096),
            lambda: os.ftruncate(fd, SIZE + 4096),
            lambda: mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
            lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0),  # F_SEAL_SEAL: no seal change
        ):
            with pytest.raises(PermissionError):
                attempt()
        # A hole punch (fallocate PUNCH_HOLE|KEEP_SIZE), and a writable reopen through /proc.
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.fallocate(fd, 0x02 | 0x01, ctypes.c_long(0), ctypes.c_long(CHUNK)) == -1
        with pytest.raises(PermissionError), open(f"/proc/self/fd/{fd}", "r+b") as fh:
            fh.write(b"x")
            fh.flush()
        # A private mapping's writes stay private (what a VM does).
        with mmap.mmap(fd, SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[0:4] = b"gues"
        assert read_all(fd, SIZE) == ram


def test_a_hit_reads_no_chunk(store: ChunkStore) -> None:
    index, ram = make_index(store, 3)
    cache = RamImageCache(1 << 30)
    with image_of(cache, index, store):
        pass
    assert index.chunks[0] is not None
    corrupt(store, index.chunks[0])
    img = cache.image(index, store, SIZE)
    try:
        assert img.hit and read_all(img.fd, SIZE) == ram  # what was verified, not the disk
    finally:
        os.close(img.fd)
    # Without that image, the corrupt chunk is caught and nothing is kept.
    fresh = RamImageCache(1 << 30)
    with pytest.raises(ChunkError, match=index.chunks[0]):
        fresh.image(index, store, SIZE)
    assert fresh.stats() == (0, 0)


def test_budget_keeps_the_most_recent(store: ChunkStore) -> None:
    indexes = [make_index(store, seed)[0] for seed in (1, 2, 3)]
    cache = RamImageCache(7 * CHUNK)  # room for two images of 3 chunks each
    for index in indexes:
        with image_of(cache, index, store):
            pass
    assert cache.stats() == (2, 6 * CHUNK)
    assert cache.image(indexes[2], store, SIZE).hit
    assert not cache.image(indexes[0], store, SIZE).hit  # the oldest went first
    small = RamImageCache(CHUNK)  # an image over the budget is used, never kept
    img = small.image(indexes[1], store, SIZE)
    os.close(img.fd)
    assert small.stats() == (0, 0)


def memfd(size: int, seals: int) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize(
    "make",
    [
        lambda p: memfd(SIZE, 0),
        lambda p: memfd(SIZE, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL),
        lambda p: memfd(SIZE - CHUNK, ramimage.SEALS),
        lambda p: os.open(p, os.O_RDWR | os.O_CREAT, 0o600),
        lambda p: os.open("/dev/zero", os.O_RDONLY),
    ],
    ids=["unsealed", "writable", "wrong-size", "a-file", "a-device"],
)
def test_check_sealed_refuses(tmp_path: Path, make: object) -> None:
    fd = make(tmp_path / "f")  # type: ignore[operator]
    try:
        with pytest.raises(RamImageError, match="RAM image fd"):
            check_sealed(fd, SIZE)
    finally:
        os.close(fd)


# -- the handler's offer to its server ----------------------------------------------------------


@given(st.binary(min_size=32, max_size=32), st.integers(1, (3 << 30) // CHUNK))
def test_offer_round_trips(digest: bytes, chunks: int) -> None:
    iid = "blake3:" + digest.hex()
    assert ramimage.decode_offer(ramimage.encode_offer(iid, chunks * CHUNK)) == (
        iid,
        chunks * CHUNK,
    )


@pytest.mark.parametrize(
    "msg",
    [
        b"",
        b"ram",
        b"ram blake3:" + b"a" * 64,
        b"ram blake3:" + b"A" * 64 + b" 2097152",
        b"ram sha256:" + b"a" * 64 + b" 2097152",
        b"ram blake3:" + b"a" * 64 + b" 02097152",
        b"ram blake3:" + b"a" * 64 + b" 2097153",  # not whole chunks
        b"ram blake3:" + b"a" * 64 + b" " + str(4 << 30).encode(),  # over 3 GiB
        b"ram blake3:" + b"a" * 64 + b" 2097152\n",
        b"ram  blake3:" + b"a" * 64 + b" 2097152",
        b"ram blake3:" + b"a" * 64 + b" 2097152" + b" " * 100,
    ],
)
def test_offer_refuses(msg: bytes) -> None:
    with pytest.raises(RamImageError):
        ramimage.decode_offer(msg)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_receive_offer_keeps_sealed_images_and_closes_the_rest(store: ChunkStore) -> None:
    index, ram = make_index(store, 5)
    iid = ramimage.image_id(index)
    server = RamImageCache(1 << 30)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        before = open_fds()
        sealed = ramimage.fill(index, store, SIZE)
        unsealed = memfd(SIZE, 0)
        for msg, fds in (
            (ramimage.encode_offer(iid, SIZE), [unsealed]),  # not sealed
            (b"ram nonsense", [sealed]),  # malformed
            (ramimage.encode_offer(iid, SIZE), [sealed, sealed]),  # two descriptors
            (ramimage.encode_offer(iid, SIZE), []),  # none
        ):
            socket.send_fds(theirs, [msg], fds)
            said = ramimage.receive_offer(ours, server)
            assert said is not None and said.startswith("dropped an offer"), said
        assert server.stats() == (0, 0)
        socket.send_fds(theirs, [ramimage.encode_offer(iid, SIZE)], [sealed])
        assert (ramimage.receive_offer(ours, server) or "").startswith("kept RAM image")
        for fd in (sealed, unsealed):
            os.close(fd)
        assert open_fds() == before | set(server.fds())  # nothing else stayed open
        img = server.image(index, store, SIZE)
        assert img.hit and read_all(img.fd, SIZE) == ram
        os.close(img.fd)
        theirs.close()
        assert ramimage.receive_offer(ours, server) is None  # end of stream
    server.close()


# -- the monitor's config ---------------------------------------------------------------------


def config(ram: RestoreStrategy, image: RamImageWiring | None, restore: bool = True) -> bytes:
    r = Restore(Path("/m"), "blake3:" + "a" * 64, "blake3:" + "b" * 64, "blake3:" + "c" * 64, ram)
    vm = VmConfig(Path("/k"), Path("/i"), Path("/r"), "", 8 << 20, restore=r if restore else None)
    return MonitorConfig(vm, 3, Path("/s"), None, image).encode()


def test_monitor_config_carries_the_image() -> None:
    image = RamImageWiring(5, "blake3:" + "d" * 64)
    got = MonitorConfig.decode(config(RestoreStrategy.EAGER, image))
    assert got.ram_image == image
    assert MonitorConfig.decode(config(RestoreStrategy.EAGER, None)).ram_image is None


@pytest.mark.parametrize(
    ("ram", "image", "restore", "match"),
    [
        (RestoreStrategy.LOCAL, RamImageWiring(5, "blake3:" + "d" * 64), True, "eager"),
        (RestoreStrategy.LAZY, RamImageWiring(5, "blake3:" + "d" * 64), True, "eager"),
        (RestoreStrategy.EAGER, RamImageWiring(5, "blake3:" + "d" * 64), False, "eager"),
        (RestoreStrategy.EAGER, RamImageWiring(3, "blake3:" + "d" * 64), True, "differ"),
        (RestoreStrategy.EAGER, RamImageWiring(2, "blake3:" + "d" * 64), True, "integer"),
        (RestoreStrategy.EAGER, RamImageWiring(5, "sha256:" + "d" * 64), True, "blake3"),
    ],
)
def test_monitor_config_refuses_a_bad_image(
    ram: RestoreStrategy, image: RamImageWiring, restore: bool, match: str
) -> None:
    with pytest.raises(ProtocolError, match=match):
        MonitorConfig.decode(config(ram, image, restore))


def test_monitor_config_wants_both_image_fields() -> None:
    line = config(RestoreStrategy.EAGER, RamImageWiring(5, "blake3:" + "d" * 64))
    with pytest.raises(ProtocolError, match="both set or both null"):
        MonitorConfig.decode(line.replace(b'"ram_image_fd": 5', b'"ram_image_fd": null'))


# -- a real VM resumed from one ----------------------------------------------------------------


@pytest.fixture(scope="module")
def spore(tmp_path_factory: pytest.TempPathFactory) -> Paused:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    return Paused(tmp_path_factory.mktemp("store"))


@needs_kvm
def test_probe_resumes_from_a_sealed_image_twice(spore: Paused) -> None:
    cache = RamImageCache(1 << 30)
    for hit in (False, True):
        img = cache.image(spore.index, spore.chunks, RAM)
        assert img.hit is hit

        def load(mem: GuestMemory, fd: int = img.fd) -> None:
            mem.map_file_private(fd)

        try:
            m, port = spore.restore(load)
        finally:
            os.close(img.fd)
        with m:
            assert m.ram.backing == "file"
            r = m.run(soon())
            assert (r.reason, r.status) == (StopReason.POWEROFF, 0), r
            assert port.loop == list(range(spore.k, LOOP))  # nothing lost, nothing repeated
    cache.close()
