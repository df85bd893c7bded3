"""``spore pull``: a pinned bundle from any transport -> one spore on this node.

Order of trust (docs/bundle.md):

1. read ``bundle.json`` (bounded), parse it, read the other metadata files it
   names (bounded); hash them into the bundle digest and compare with the pin
   *before* anything else is parsed or any pack is fetched;
2. parse and cross-check the metadata; select the parent or one child;
3. skip every object the node cache already holds (re-hashed on the hit);
4. fetch only the packs holding missing objects into ``tmp/pull-<digest>/``
   (a partial pack resumes; an installed object is never fetched again), check
   each pack's sha256, install each object only if it hashes to its id;
5. the same for the rootfs segments, assembled and BLAKE3-checked;
6. write the spore directory in a temp dir and rename it into place
   (``sporedir.write_spore``, which records it as a root of the store): a failed
   or interrupted pull leaves no output directory.

Two pulls of the same bundle share the staging directory under per-file
locks, so neither downloads what the other already installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from sporevm.dist import bundle, chunkpack, rootfs_artifact
from sporevm.dist.chunk_cache import ChunkCache
from sporevm.dist.docjson import BundleError
from sporevm.dist.transports import Source
from sporevm.spore import manifest
from sporevm.spore.sporedir import write_spore
from sporevm.store import Store

_READ = 1 << 20


@dataclass(frozen=True)
class PullResult:
    out: Path
    digest: str
    manifest_id: str
    objects: int  # objects the spore needs
    cached: int  # of which the node cache already held
    packs_fetched: int
    bytes_received: int  # over the wire, metadata included


@contextlib.contextmanager
def _locked(path: Path, how: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _staging(store: Store, digest: str) -> Iterator[Path]:
    """``tmp/pull-<digest>/``, shared by concurrent pulls; removed by the last one out.

    Every pull holds ``.lock`` shared; the one that can take it exclusively at the
    end removes the directory. A pull that locked a directory which was removed
    meanwhile (its ``.lock`` is no longer the one on disk) starts over.
    """
    d = store.root / "tmp" / f"pull-{digest.removeprefix('sha256:')}"
    while True:
        d.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            st, now = os.fstat(fd), os.lstat(d / ".lock")
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield d
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another pull still works here; it cleans up
        shutil.rmtree(d, ignore_errors=True)
    finally:
        os.close(fd)  # on failure the directory stays: the next attempt resumes from it


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """A read-only view of a whole file (no copy; an empty file is an empty view)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                yield view
            finally:
                view.release()


def _sha256_of(view: memoryview | bytes) -> str:
    h = hashlib.sha256()
    for off in range(0, len(view), _READ):
        h.update(view[off : off + _READ])
    return "sha256:" + h.hexdigest()


class _Puller:
    def __init__(
        self,
        source: Source,
        store: Store,
        meta: bundle.Metadata,
        staging: Path,
        progress: Callable[[str], None],
    ) -> None:
        self.source, self.store, self.meta = source, store, meta
        self.staging, self.say = staging, progress
        self.cache = ChunkCache(store)
        self.packs_fetched = 0

    def objects(self, missing: dict[str, int]) -> None:
        packs = sorted({self.meta.chunkpack.objects[c].pack for c in missing})
        for i in packs:
            self._pack(i, missing)

    def _pack(self, i: int, missing: dict[str, int]) -> None:
        pack = self.meta.chunkpack.packs[i]
        with _locked(self.staging / f"pack-{i:06d}.lock", fcntl.LOCK_EX):
            # Re-checked under the lock: a concurrent pull may have installed them.
            todo = [
                (c, pl)
                for c, pl in self.meta.chunkpack.contents(i)
                if c in missing and not self.cache.has(c, pl.size)
            ]
            if not todo:
                return
            dest = self.staging / f"{i:06d}.pack"
            self.say(f"fetch {pack.name} ({pack.size} B, {len(todo)} object(s) needed)")
            self.source.fetch(pack.name, dest, pack.size, pack.sha256)
            self.packs_fetched += 1
            with _mapped(dest) as view:
                # The transport verified it; we re-check what we are about to read.
                if len(view) != pack.size or _sha256_of(view) != pack.sha256:
                    dest.unlink(missing_ok=True)
                    raise BundleError(
                        f"{pack.name}: content does not match the sha256 in "
                        f"the bundle's {chunkpack.NAME}"
                    )
                for cid, pl in todo:
                    # install re-hashes with BLAKE3 and refuses a mismatch
                    self.cache.install(cid, view[pl.offset : pl.offset + pl.size])
            dest.unlink(missing_ok=True)

    def rootfs(self, digest: str, size: int) -> None:
        img = self.meta.rootfs.image(digest)
        hexd = digest.removeprefix("blake3:")
        with _locked(self.staging / f"rootfs-{hexd}.lock", fcntl.LOCK_EX):
            if self.cache.has_rootfs(digest, size):
                return
            segdir = self.staging / f"rootfs-{hexd}"
            segdir.mkdir(exist_ok=True)
            for seg in img.segments:
                self.say(f"fetch {seg.name} ({seg.size} B)")
                # a segment fetched by an earlier attempt is re-hashed, not downloaded again
                self.source.fetch(seg.name, segdir / seg.name.split("/")[-1], seg.size, seg.sha256)
            fd, tmp_name = tempfile.mkstemp(prefix="rootfs-", dir=self.store.root / "tmp")
            tmp = Path(tmp_name)
            try:
                whole = blake3.blake3(max_threads=blake3.blake3.AUTO)
                with os.fdopen(fd, "wb") as out:
                    for seg in img.segments:
                        h = hashlib.sha256()
                        with open(segdir / seg.name.split("/")[-1], "rb") as fin:
                            while block := fin.read(_READ):
                                h.update(block)
                                whole.update(block)
                                out.write(block)
                        if "sha256:" + h.hexdigest() != seg.sha256:
                            raise BundleError(
                                f"{seg.name}: content does not match the sha256 "
                                f"in the bundle's {rootfs_artifact.NAME}"
                            )
                    out.flush()
                    os.fsync(out.fileno())
                if "blake3:" + whole.hexdigest() != digest:
                    raise BundleError(
                        f"{rootfs_artifact.NAME}: rootfs {digest} "
                        "assembles to other content; the bundle is inconsistent"
                    )
                self.cache.install_rootfs(tmp, digest, size)
            finally:
                tmp.unlink(missing_ok=True)
            shutil.rmtree(segdir, ignore_errors=True)


def pull(
    source: Source,
    store: Store,
    out: Path,
    *,
    child: str | None = None,
    require_pin: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PullResult:
    """Materialize the parent (or ``child``) of the bundle ``source`` serves as ``out``."""
    say = progress or (lambda _msg: None)
    out = out.absolute()
    if out.exists() or out.is_symlink():
        raise BundleError(f"{out}: already exists; remove it or choose another --out")
    want = source.pinned_bundle_digest
    if want is None and require_pin:
        raise BundleError(f"{source.reference}: not pinned; pull by @sha256:<bundle digest>")
    with store.lock():  # shared: a prune waits until the pull has linked its content
        files, digest = bundle.read_metadata(source.read_small)
        if want is not None and digest != want:
            raise BundleError(
                f"{source.reference}: bundle digest is {digest}, pinned {want}; "
                "the bundle was modified or is not the one you pinned"
            )
        meta = bundle.assemble(files)
        mid = meta.select(child)
        m, data = meta.manifests[mid]
        needed = bundle.objects_of(m, bundle.manifest_name(mid))
        cache = ChunkCache(store)
        missing = {c: s for c, s in needed.items() if not cache.has(c, s)}
        say(f"bundle {digest}: {len(needed)} object(s) needed, {len(needed) - len(missing)} cached")
        with _staging(store, digest) as staging:
            puller = _Puller(source, store, meta, staging, say)
            puller.objects(missing)
            puller.rootfs(m.rootfs.digest, m.rootfs.size)
        for cid in needed:  # installed or verified above; a cheap last guard before publishing
            if not cache.chunks.has(cid):
                raise BundleError(f"object {cid} vanished from the store during the pull")
        m = manifest.decode(data)  # the exact bytes we publish, decoded once more
        write_spore(m, out, store, replace=False)  # records it as a root of the store
    return PullResult(
        out,
        digest,
        mid,
        len(needed),
        len(needed) - len(missing),
        puller.packs_fetched,
        source.bytes_received,
    )
