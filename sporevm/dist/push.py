"""``spore push``: a local bundle directory -> any writable transport, printing the pin.

The bundle is checked first with the code a pull uses (metadata parsed and
cross-checked, the digest computed), every pack and segment is re-hashed
against its index entry before it is handed to the sink, and the metadata
goes last, from the exact bytes that were hashed, so a destination never
holds metadata whose payload is missing.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sporevm.dist import bundle
from sporevm.dist.docjson import BundleError
from sporevm.dist.transport_file import FileSource
from sporevm.dist.transports import Sink
from sporevm.dist.uri import BundleURI
from sporevm.store import sha256_file

_READ = 1 << 20


@dataclass(frozen=True)
class PushResult:
    digest: str
    reference: str  # what to pull: the sink's pinned reference
    files: int
    bytes: int


def _check_file(path: Path, size: int, sha256: str, name: str) -> None:
    try:
        got, total = sha256_file(path)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror})") from None
    if (total, got) != (size, sha256):
        raise BundleError(
            f"{path}: does not match the size and sha256 the bundle index gives "
            f"for {name}; the bundle is corrupt, pack it again"
        )


def push(bundle_dir: Path, sink: Sink, progress: Callable[[str], None] | None = None) -> PushResult:
    say = progress or (lambda _msg: None)
    root = bundle_dir.absolute()
    source = FileSource(BundleURI("file", path=str(root)))
    files, digest = bundle.read_metadata(source.read_small)
    meta = bundle.assemble(files)
    payload = [(p.name, p.size, p.sha256) for p in meta.chunkpack.packs]
    payload += [(s.name, s.size, s.sha256) for img in meta.rootfs.images for s in img.segments]
    total = 0
    try:
        for name, size, sha in payload:
            path = root / name
            _check_file(path, size, sha, name)
            say(f"push {name} ({size} B)")
            sink.put(name, path, size, sha)
            total += size
        with tempfile.TemporaryDirectory(prefix="spore-push-") as tmp:
            for i, (name, data) in enumerate(files):
                # the exact bytes that were hashed into the digest, not a re-read of the file
                copy = Path(tmp) / f"{i:06d}"
                copy.write_bytes(data)
                sink.put(name, copy, len(data), "sha256:" + hashlib.sha256(data).hexdigest())
                total += len(data)
        reference = sink.finish(digest, [n for n, _ in files])
    except BaseException:
        sink.abort()
        raise
    return PushResult(digest, reference, len(payload) + len(files), total)
