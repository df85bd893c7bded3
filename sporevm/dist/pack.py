"""``spore pack``: spores -> a bundle directory; ``spore unpack``: a bundle directory -> a spore.

Pack reads every object through the chunk store (so each is re-hashed on the
way out) and the rootfs from the store (BLAKE3 re-checked while it is cut into
segments), lays objects out parent-first (``chunkpack.plan``), writes the
bundle into a temporary sibling directory, checks what it wrote with the same
code a pull uses, and renames it into place. Same spores in, byte-identical
bundle and digest out.

Unpack is a pull from the local directory: it shares every check and the
order of trust with ``spore pull`` (sporevm/dist/pull.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

from sporevm.atomic import fsync_dir, replace_dir
from sporevm.dist import bundle, chunkpack, rootfs_artifact
from sporevm.dist.docjson import PIECE_MAX, BundleError
from sporevm.dist.pull import PullResult, pull
from sporevm.dist.transport_file import FileSource
from sporevm.dist.uri import BundleURI
from sporevm.spore import manifest
from sporevm.spore.chunks import ChunkStore
from sporevm.spore.sporedir import MANIFEST, read_spore
from sporevm.store import Store

_READ = 1 << 20


@dataclass(frozen=True)
class PackResult:
    path: Path
    digest: str
    parent: str
    children: tuple[str, ...]
    packs: int
    objects: int
    bytes: int  # packs + segments + metadata


def _children(children_dir: Path) -> list[Path]:
    if not children_dir.is_dir():
        raise BundleError(f"--children {children_dir}: not a directory")
    found = sorted(p for p in children_dir.iterdir() if (p / MANIFEST).is_file())
    if not found:
        raise BundleError(
            f"--children {children_dir}: holds no spore directories "
            f"(subdirectories with {MANIFEST})"
        )
    return found


class _Writer:
    """Files of the bundle being written, with their sizes and sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.total = 0

    def open(self, name: str) -> tuple[Path, int]:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return path, fd

    def write_all(self, fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self.total += len(data)

    def small(self, name: str, data: bytes) -> None:
        _, fd = self.open(name)
        try:
            self.write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_packs(
    w: _Writer, layout: list[list[tuple[str, int]]], chunks: ChunkStore
) -> chunkpack.ChunkpackIndex:
    packs: list[chunkpack.Pack] = []
    objects: dict[str, chunkpack.Placement] = {}
    for i, contents in enumerate(layout):
        name = chunkpack.pack_name(i)
        _, fd = w.open(name)
        h = hashlib.sha256()
        offset = 0
        try:
            for cid, size in contents:
                data = chunks.get(cid, size=size)  # re-hashed: a rotten store entry stops here
                h.update(data)
                w.write_all(fd, data)
                objects[cid] = chunkpack.Placement(i, offset, size)
                offset += size
            os.fsync(fd)
        finally:
            os.close(fd)
        packs.append(chunkpack.Pack(name, offset, "sha256:" + h.hexdigest()))
    return chunkpack.ChunkpackIndex(tuple(packs), objects)


def _write_rootfs(
    w: _Writer, images: list[tuple[str, int]], store: Store, limit: int
) -> rootfs_artifact.RootfsIndex:
    out: list[rootfs_artifact.RootfsImage] = []
    n = 0
    for digest, size in images:
        src = store.rootfs_path(digest)
        try:
            fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise BundleError(
                f"rootfs {digest} is not usable in the store {store.root} "
                f"({exc.strerror}); rebuild the spore"
            ) from None
        whole = blake3.blake3(max_threads=blake3.blake3.AUTO)
        segments: list[rootfs_artifact.Segment] = []
        try:
            if not stat.S_ISREG(os.fstat(fin).st_mode) or os.fstat(fin).st_size != size:
                raise BundleError(f"rootfs {digest}: store entry is not a {size}-byte file")
            done = 0
            while done < size:
                name = rootfs_artifact.segment_name(n)
                _, fd = w.open(name)
                h = hashlib.sha256()
                seg = 0
                try:
                    while seg < min(limit, size - done):
                        block = os.read(fin, min(_READ, limit - seg, size - done - seg))
                        if not block:
                            raise BundleError(f"rootfs {digest}: store entry shrank while read")
                        h.update(block)
                        whole.update(block)
                        w.write_all(fd, block)
                        seg += len(block)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                segments.append(rootfs_artifact.Segment(name, seg, "sha256:" + h.hexdigest()))
                done += seg
                n += 1
        finally:
            os.close(fin)
        if "blake3:" + whole.hexdigest() != digest:
            raise BundleError(
                f"rootfs {digest}: store entry does not match its digest "
                "(corrupt); rebuild the spore"
            )
        out.append(rootfs_artifact.RootfsImage(digest, size, tuple(segments)))
    return rootfs_artifact.RootfsIndex(tuple(out))


def pack(
    parent: str,
    children_dir: Path | None,
    out: Path,
    store: Store,
    *,
    pack_limit: int = PIECE_MAX,
    segment_limit: int = PIECE_MAX,
) -> PackResult:
    """Write the bundle of ``parent`` (and the spores in ``children_dir``) to ``out``."""
    if not 1 <= segment_limit <= PIECE_MAX:
        raise BundleError(f"segment size limit {segment_limit} must be 1..{PIECE_MAX}")
    with store.lock():  # shared: a prune waits until every object has been read
        return _pack(parent, children_dir, out, store, pack_limit, segment_limit)


def _pack(
    parent: str,
    children_dir: Path | None,
    out: Path,
    store: Store,
    pack_limit: int,
    segment_limit: int,
) -> PackResult:
    pid, pm, pdata = read_spore(parent)
    kids: dict[str, tuple[manifest.Manifest, bytes]] = {}
    for path in _children(children_dir) if children_dir is not None else []:
        cid, cm, cdata = read_spore(str(path))
        if cid == pid or cid in kids:
            raise BundleError(
                f"{path}: manifest {cid} is already in the bundle (same spore twice?)"
            )
        kids[cid] = (cm, cdata)
    if len(kids) > bundle.MAX_CHILDREN:
        raise BundleError(f"--children: {len(kids)} spores, at most {bundle.MAX_CHILDREN}")
    doc = bundle.BundleDoc(pid, tuple(sorted(kids)))
    every = {pid: (pm, pdata), **kids}
    groups = [list(bundle.objects_of(every[m][0], m).items()) for m in doc.manifest_ids()]
    images = sorted({(m.rootfs.digest, m.rootfs.size) for m, _ in every.values()})
    chunks = ChunkStore(store)
    for m, _ in every.values():
        manifest.verify_chunks(m, chunks, rehash=False)  # a missing chunk fails before writing
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        w = _Writer(tmp)
        index = _write_packs(w, chunkpack.plan(groups, pack_limit), chunks)
        rindex = _write_rootfs(w, images, store, segment_limit)
        files = [
            (bundle.NAME, bundle.encode(doc)),
            (chunkpack.NAME, chunkpack.encode(index)),
            (rootfs_artifact.NAME, rootfs_artifact.encode(rindex)),
        ]
        files += sorted((bundle.manifest_name(m), every[m][1]) for m in doc.manifest_ids())
        for name, data in files:
            w.small(name, data)
        meta = bundle.assemble(files)  # what a pull will check, checked before publishing
        for sub in ("manifests", "packs", "rootfs", "."):
            if (tmp / sub).is_dir():
                fsync_dir(tmp / sub)
        replace_dir(tmp, out, bundle.BUNDLE_DIR)  # never a moment without a whole bundle
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackResult(
        out, meta.digest, pid, doc.children, len(index.packs), len(index.objects), w.total
    )


def unpack(
    bundle_text: str,
    out: Path,
    store: Store,
    *,
    child: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> PullResult:
    """Materialize one spore of a local bundle (``DIR`` or ``DIR@sha256:<digest>``)."""
    base, sep, pin = bundle_text.rpartition("@")
    path, want = (base, pin) if sep and pin.startswith("sha256:") else (bundle_text, None)
    root = Path(path).absolute()
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory (expected {bundle.NAME} inside)")
    source = FileSource(BundleURI("file", path=str(root)))
    source.pinned_bundle_digest = want
    return pull(source, store, out, child=child, require_pin=False, progress=progress)
