"""Pull orchestration over the real file:// transport (no VM): order of trust, tampering,
truncation and resume, the node cache, child pulls that fetch only what differs, and
concurrent pulls of one bundle."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sporevm.dist import bundle, chunkpack
from sporevm.dist.chunk_cache import ChunkCache
from sporevm.dist.pack import pack
from sporevm.dist.pull import PullResult, pull
from sporevm.dist.push import push
from sporevm.dist.transport_file import FileSink, FileSource
from sporevm.dist.transports import open_sink, open_source
from sporevm.dist.uri import BundleURI, parse_pull_uri, parse_push_uri
from sporevm.errors import DistError, SporeError
from sporevm.spore import manifest as mf
from sporevm.spore.chunks import CHUNK, MAX_OBJECT, ChunkStore
from sporevm.spore.sporedir import read_spore
from sporevm.store import Store
from tests.test_bundle import SEG, Spores, make_spores


@dataclass(frozen=True)
class Pushed:
    spores: Spores
    root: Path  # the pushed bundle directory (the "remote")
    ref: str  # file:///…@sha256:…
    digest: str
    metadata: list[tuple[str, bytes]]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    tmp = tmp_path_factory.mktemp("pull")
    s = make_spores(tmp)
    local = tmp / "local.bundle"
    pack(str(s.parent), s.children, local, s.store, pack_limit=MAX_OBJECT, segment_limit=SEG)
    remote = tmp / "remote.bundle"
    res = push(local, open_sink(parse_push_uri(f"file://{remote}")))
    assert res.reference == f"file://{remote}@{res.digest}"
    files, digest = bundle.read_metadata(lambda n, lim: (remote / n).read_bytes())
    assert digest == res.digest
    return Pushed(s, remote, res.reference, res.digest, files)


def source(ref: str) -> FileSource:
    src = open_source(parse_pull_uri(ref))
    assert isinstance(src, FileSource)
    return src


def do_pull(ref: str, store: Store, out: Path, child: str | None = None) -> PullResult:
    return pull(source(ref), store, out, child=child)


def metadata_bytes(p: Pushed) -> int:
    return sum(len(d) for _, d in p.metadata)


@pytest.fixture
def copy(pushed: Pushed, tmp_path: Path) -> Iterator[Pushed]:
    """A private copy of the pushed bundle a test may damage."""
    root = tmp_path / "copy.bundle"
    for f in pushed.root.rglob("*"):
        if f.is_file():
            dest = root / f.relative_to(pushed.root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    yield Pushed(
        pushed.spores, root, f"file://{root}@{pushed.digest}", pushed.digest, pushed.metadata
    )


def assert_nothing_published(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_pull_parent_and_restore_view(pushed: Pushed, tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    res = do_pull(pushed.ref, store, tmp_path / "p.spore")
    assert res.manifest_id == pushed.spores.parent_id and res.cached == 0
    mid, m, _ = read_spore(str(tmp_path / "p.spore"))
    assert mid == pushed.spores.parent_id
    mf.verify_chunks(m, ChunkStore(store), rehash=True)
    assert ChunkCache(store).has_rootfs(m.rootfs.digest, m.rootfs.size)
    # parent pack + 3 segments + metadata: the children's packs were not fetched
    idx = chunkpack.decode(dict(pushed.metadata)[chunkpack.NAME])
    assert res.packs_fetched == 1
    assert res.bytes_received == metadata_bytes(pushed) + idx.packs[0].size + m.rootfs.size
    assert not list((store.root / "tmp").iterdir())


def test_child_after_parent_fetches_only_what_differs(pushed: Pushed, tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    do_pull(pushed.ref, store, tmp_path / "p.spore")
    child = pushed.spores.child_ids[0]
    res = do_pull(pushed.ref, store, tmp_path / "c.spore", child=child)
    # metadata plus exactly one 2 MiB chunk (the child's private pack); rootfs cached
    assert res.bytes_received == metadata_bytes(pushed) + CHUNK
    # 2 shared chunks + state + the rootfs block table, and the child's own chunk
    assert (res.objects, res.cached, res.packs_fetched) == (5, 4, 1)
    assert read_spore(str(tmp_path / "c.spore"))[0] == child


def test_unpinned_and_mismatched_pins_refused(pushed: Pushed, tmp_path: Path) -> None:
    with pytest.raises(SporeError, match="not pinned"):
        parse_pull_uri(f"file://{pushed.root}")
    src = FileSource(BundleURI("file", path=str(pushed.root)))
    with pytest.raises(SporeError, match="not pinned"):
        pull(src, Store(tmp_path / "s"), tmp_path / "x")
    with pytest.raises(SporeError, match="pinned"):
        do_pull(f"file://{pushed.root}@sha256:{'0' * 64}", Store(tmp_path / "s"), tmp_path / "x")
    assert_nothing_published(tmp_path, tmp_path / "x")


def test_every_metadata_byte_flipped_fails_before_any_pack(copy: Pushed, tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    out = tmp_path / "x.spore"
    tried = 0
    for name, data in copy.metadata:
        path = copy.root / name
        for i in range(len(data)):
            path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
            src = source(copy.ref)
            with pytest.raises(SporeError) as err:
                pull(src, store, out)
            assert "\n" not in str(err.value)
            assert src.bytes_received <= metadata_bytes(copy)  # no pack was fetched
            tried += 1
        path.write_bytes(data)
    assert tried == metadata_bytes(copy)
    assert_nothing_published(tmp_path, out)
    cas = store.root / "chunks" / "blake3"
    assert not cas.exists() or not list(cas.iterdir())


def _users(p: Pushed) -> dict[int, str | None]:
    """pack number -> a manifest (None: the parent) whose pull needs it."""
    idx = chunkpack.decode(dict(p.metadata)[chunkpack.NAME])
    out: dict[int, str | None] = {0: None}
    for child, own in p.spores.private.items():
        out[idx.objects[own].pack] = child
    return out


def test_flipped_pack_and_segment_bytes_fail(copy: Pushed, tmp_path: Path) -> None:
    idx = chunkpack.decode(dict(copy.metadata)[chunkpack.NAME])
    users = _users(copy)
    cases: list[tuple[str, int, str | None]] = []
    for i, pk in enumerate(idx.packs):
        offsets = {0, pk.size - 1} | {pl.offset + pl.size // 2 for _, pl in idx.contents(i)}
        cases += [(pk.name, off, users[i]) for off in sorted(offsets)]
    for seg in sorted((copy.root / "rootfs").iterdir()):
        size = seg.stat().st_size
        cases += [(f"rootfs/{seg.name}", off, None) for off in (0, size // 2, size - 1)]
    for n, (name, off, child) in enumerate(cases):
        path = copy.root / name
        original = path.read_bytes()
        path.write_bytes(original[:off] + bytes([original[off] ^ 0x80]) + original[off + 1 :])
        out = tmp_path / f"x{n}.spore"
        with pytest.raises(SporeError, match="sha256|does not match") as err:
            do_pull(copy.ref, Store(tmp_path / f"s{n}"), out, child=child)
        assert "\n" not in str(err.value)
        assert_nothing_published(tmp_path, out)
        path.write_bytes(original)


def test_truncated_pack_fails_then_resumes(copy: Pushed, tmp_path: Path) -> None:
    pk = copy.root / "packs" / "000000.pack"
    original = pk.read_bytes()
    pk.write_bytes(original[:-1000])
    store = Store(tmp_path / "s")
    with pytest.raises(SporeError):
        do_pull(copy.ref, store, tmp_path / "x.spore")
    assert_nothing_published(tmp_path, tmp_path / "x.spore")
    pk.write_bytes(original)
    do_pull(copy.ref, store, tmp_path / "x.spore")


class BreakingSource(FileSource):
    """Serves only the first ``cut`` bytes of one file, then the connection 'breaks'."""

    def __init__(self, uri: BundleURI, name: str, cut: int) -> None:
        super().__init__(uri)
        self.name, self.cut = name, cut

    def _open(
        self, name: str, start: int, size: int | None, what: str
    ) -> tuple[int, Iterator[bytes]]:
        got, blocks = super()._open(name, start, size, what)
        if name != self.name:
            return got, blocks

        def broken() -> Iterator[bytes]:
            pos = got
            for block in blocks:
                room = self.cut - pos
                if room <= 0:
                    break
                yield block[:room]
                pos += len(block[:room])
            raise DistError(f"{what}: connection reset (test)")

        return got, broken()


def test_interrupted_pull_resumes_without_refetching(pushed: Pushed, tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    out = tmp_path / "x.spore"
    idx = chunkpack.decode(dict(pushed.metadata)[chunkpack.NAME])
    size = idx.packs[0].size
    breaking = BreakingSource(parse_pull_uri(pushed.ref), "packs/000000.pack", size // 2)
    with pytest.raises(SporeError, match="connection reset"):
        pull(breaking, store, out)
    assert_nothing_published(tmp_path, out)
    # the verified-so-far half stays in the staging directory; the retry asks for the rest
    res = do_pull(pushed.ref, store, out)
    _, m, _ = read_spore(str(out))
    assert res.bytes_received == metadata_bytes(pushed) + (size - size // 2) + m.rootfs.size


def test_corrupt_symlinked_and_odd_cache_entries_are_refetched(
    pushed: Pushed, tmp_path: Path
) -> None:
    store = Store(tmp_path / "s")
    do_pull(pushed.ref, store, tmp_path / "a.spore")
    _, m, _ = read_spore(str(tmp_path / "a.spore"))
    chunks = ChunkStore(store)
    a, b, c = m.memory.stored()
    bait = tmp_path / "bait"
    bait.write_bytes(b"not a chunk")
    pa = chunks.path(a)
    data = pa.read_bytes()
    pa.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])  # rot
    chunks.path(b).unlink()
    chunks.path(b).symlink_to(bait)  # planted symlink
    chunks.path(c).unlink()
    chunks.path(c).mkdir()  # not a regular file
    rootfs = store.rootfs_path(m.rootfs.digest)
    rootfs.write_bytes(b"\0" * m.rootfs.size)  # rotten image
    res = do_pull(pushed.ref, store, tmp_path / "b.spore")
    assert res.cached == 2  # only the state object and the rootfs block table survived
    mf.verify_chunks(m, chunks, rehash=True)
    assert bait.read_bytes() == b"not a chunk"  # the link was removed, never written through
    assert ChunkCache(store).has_rootfs(m.rootfs.digest, m.rootfs.size)


def test_two_pulls_at_once(pushed: Pushed, tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    results: dict[int, PullResult | BaseException] = {}

    def run(i: int) -> None:
        try:
            results[i] = do_pull(
                pushed.ref, store, tmp_path / f"{i}.spore", child=pushed.spores.child_ids[0]
            )
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert isinstance(results[i], PullResult), results[i]
        assert read_spore(str(tmp_path / f"{i}.spore"))[0] == pushed.spores.child_ids[0]
    _, m, _ = read_spore(str(tmp_path / "0.spore"))
    mf.verify_chunks(m, ChunkStore(store), rehash=True)
    assert not list((store.root / "tmp").iterdir())
    # between them the two pulls fetched each pack at most once
    fetched = sum(r.packs_fetched for r in results.values() if isinstance(r, PullResult))
    assert fetched == 2


def test_two_processes_pull_at_once(pushed: Pushed, tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "SPORE_HOME": str(tmp_path / "s")}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sporevm.cli",
                "pull",
                pushed.ref,
                "--out",
                str(tmp_path / f"{i}.spore"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for i in range(2):
        assert read_spore(str(tmp_path / f"{i}.spore"))[0] == pushed.spores.parent_id
    _, m, _ = read_spore(str(tmp_path / "0.spore"))
    mf.verify_chunks(m, ChunkStore(Store(tmp_path / "s")), rehash=True)


def test_push_checks_the_local_bundle(pushed: Pushed, tmp_path: Path) -> None:
    local = tmp_path / "local"
    s = pushed.spores
    pack(str(s.parent), None, local, s.store, pack_limit=MAX_OBJECT, segment_limit=SEG)
    pk = local / "packs" / "000000.pack"
    data = pk.read_bytes()
    pk.write_bytes(data[:5] + bytes([data[5] ^ 1]) + data[6:])
    dest = tmp_path / "dest"
    with pytest.raises(SporeError, match="pack it again"):
        push(local, FileSink(parse_push_uri(f"file://{dest}")))
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")]
