"""``spore inspect`` / ``spore verify`` of a local bundle directory.

Inspect checks the metadata (digest, canonical form, cross-checks) and
describes it; verify additionally re-hashes every pack (sha256), every object
in it (BLAKE3), every rootfs segment (sha256) and every image (BLAKE3), and
fails naming the first mismatch.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path
from typing import Any

import blake3

from sporevm.dist import bundle
from sporevm.dist.docjson import BundleError
from sporevm.dist.transport_file import FileSource
from sporevm.dist.uri import BundleURI
from sporevm.spore.chunks import chunk_id
from sporevm.store import sha256_file

_READ = 1 << 20


def is_bundle(text: str) -> bool:
    base, sep, pin = text.rpartition("@")
    path = Path(base if sep and pin.startswith("sha256:") else text)
    return (path / bundle.NAME).is_file()


def load(text: str) -> tuple[Path, bundle.Metadata]:
    """The bundle at ``DIR`` or ``DIR@sha256:<digest>`` with its metadata checked."""
    base, sep, pin = text.rpartition("@")
    path, want = (Path(base), pin) if sep and pin.startswith("sha256:") else (Path(text), None)
    root = path.absolute()
    files, digest = bundle.read_metadata(FileSource(BundleURI("file", path=str(root))).read_small)
    if want is not None and digest != want:
        raise BundleError(f"{root}: bundle digest is {digest}, pinned {want}")
    return root, bundle.assemble(files)


def describe(root: Path, meta: bundle.Metadata) -> dict[str, Any]:
    return {
        "bundle": str(root),
        "digest": meta.digest,
        "parent": meta.doc.parent,
        "children": list(meta.doc.children),
        "objects": len(meta.chunkpack.objects),
        "packs": [
            {"name": p.name, "size": p.size, "sha256": p.sha256} for p in meta.chunkpack.packs
        ],
        "rootfs": [
            {"digest": i.digest, "size": i.size, "segments": len(i.segments)}
            for i in meta.rootfs.images
        ],
        "metadata_bytes": sum(len(d) for _, d in meta.files),
    }


def verify(root: Path, meta: bundle.Metadata) -> int:
    """Re-hash every payload byte of the bundle; returns the bytes checked."""
    total = 0
    for i, pack in enumerate(meta.chunkpack.packs):
        path = root / pack.name
        got, size = sha256_file(path)
        if (got, size) != (pack.sha256, pack.size):
            raise BundleError(
                f"{path}: is {size} B with {got}; the index says {pack.size} B with {pack.sha256}"
            )
        if pack.size:
            with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    for cid, pl in meta.chunkpack.contents(i):
                        if chunk_id(view[pl.offset : pl.offset + pl.size]) != cid:
                            raise BundleError(
                                f"{path}: object {cid} at {pl.offset} does not hash to its id"
                            )
                finally:
                    view.release()
        total += size
    for img in meta.rootfs.images:
        whole = blake3.blake3(max_threads=blake3.blake3.AUTO)
        for seg in img.segments:
            h = hashlib.sha256()
            with open(root / seg.name, "rb") as fh:
                while block := fh.read(_READ):
                    h.update(block)
                    whole.update(block)
                    total += len(block)
            if "sha256:" + h.hexdigest() != seg.sha256:
                raise BundleError(f"{root / seg.name}: does not match its sha256 in the index")
        if "blake3:" + whole.hexdigest() != img.digest:
            raise BundleError(f"{root}: rootfs {img.digest} assembles to other content")
    return total
