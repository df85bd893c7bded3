"""Moving bundle files: the Source/Sink protocols every transport implements.

A *source* hands out the files of one pinned bundle by bundle-relative name;
a *sink* receives them and, at ``finish``, returns the pinned reference users
pull. Transports move bytes and verify them against what the caller expects
(size and sha256 from already-verified bundle metadata); they never decide
what a bundle means — that is ``bundle.py``'s job.

``fetch`` streams into ``dest`` while hashing, resumes a partial ``dest`` by
asking only for the missing tail (Range / offset), and on any integrity
failure deletes ``dest`` and raises. A transfer that merely breaks keeps the
verified-so-far prefix for the next attempt; its final hash is still checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from sporevm.dist.uri import BundleURI
from sporevm.errors import DistError
from sporevm.net.deadline import Deadline

__all__ = [
    "DistError",
    "Sink",
    "Source",
    "StreamSource",
    "check_name",
    "check_sha256",
    "open_sink",
    "open_source",
]

MAX_NAME = 255
MAX_SMALL = 64 << 20  # read_small never returns more, whatever the caller asks
MAX_FETCH = 64 << 30  # one bundle file
BLOCK = 1 << 20  # the largest piece a transport hands out at once
# Time bounds (per read, headers, whole transfer) are in net/deadline.py, shared by all.

# Up to four segments, each starting with a letter or digit: no '..', no '/', no
# hidden files, nothing a server or file system would reinterpret.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,3}\Z")
_SHA256 = re.compile(r"(?:sha256:)?([0-9a-f]{64})\Z")


def check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not _NAME.match(name):
        raise DistError(
            f"{where}: file name {str(name)[:80]!r} is not a bundle-relative "
            "name (segments of A-Z a-z 0-9 . _ -, no leading '.', '/' or '..')"
        )
    return name


def check_sha256(value: str, where: str) -> str:
    """'sha256:<hex>' or bare '<hex>' (64 lowercase hex) → the bare hex."""
    m = _SHA256.match(value) if isinstance(value, str) else None
    if m is None:
        raise DistError(f"{where}: {str(value)[:80]!r} is not a sha256 digest")
    return m.group(1)


def check_size(size: int, where: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FETCH:
        raise DistError(f"{where}: size {size!r} is outside 0..{MAX_FETCH}")
    return size


class Source(Protocol):
    reference: str  # the pinned reference being pulled (printable)
    pinned_bundle_digest: str | None  # 'sha256:<hex>' the bundle's metadata must hash to
    bytes_received: int  # bytes over the wire so far

    def read_small(self, name: str, limit: int) -> bytes: ...

    def fetch(self, name: str, dest: Path, size: int, sha256: str) -> None: ...


class Sink(Protocol):
    def put(self, name: str, src: Path, size: int, sha256: str) -> None: ...

    def finish(self, bundle_digest: str, metadata_names: list[str]) -> str: ...

    def abort(self) -> None: ...


class StreamSource:
    """``read_small`` and ``fetch`` on top of one primitive: a byte range of a file.

    Every call of ``_open`` and the bytes it yields run under a :class:`Deadline`
    (net/deadline.py): the transport's request is made inside ``Deadline.open`` and its
    iterator read through ``Deadline.guard``, so no transport can stall a pull."""

    reference: str = ""
    server: str = "the source"  # who serves the bytes, for error messages
    pinned_bundle_digest: str | None = None
    bytes_received: int = 0

    def _open(
        self, name: str, start: int, size: int | None, what: str
    ) -> tuple[int, Iterator[bytes]]:
        """Bytes of ``name`` from ``start`` (the offset actually served, ``start`` or 0).

        ``size`` is the expected full length when known. Transports raise DistError;
        an iterator that breaks mid-way raises DistError too (via ``broke``)."""
        raise NotImplementedError

    def _what(self, name: str) -> str:
        return f"{self.reference}: {name}"

    def read_small(self, name: str, limit: int) -> bytes:
        what = self._what(check_name(name, self.reference))
        limit = min(limit, MAX_SMALL)
        parts: list[bytes] = []
        total = 0
        with contextlib.closing(Deadline(what, self.server, limit)) as deadline:
            _, blocks = deadline.open(lambda: self._open(name, 0, None, what))
            for block in deadline.guard(blocks):
                total += len(block)
                self.bytes_received += len(block)
                if total > limit:
                    raise DistError(f"{what}: larger than the {limit}-byte limit; refusing")
                parts.append(block)
        return b"".join(parts)

    def fetch(self, name: str, dest: Path, size: int, sha256: str) -> None:
        what = self._what(check_name(name, self.reference))
        want = check_sha256(sha256, what)
        check_size(size, what)
        fd = _open_partial(dest, what)
        try:
            have, hasher = _hash_prefix(fd, size)
            if have == size and hasher.hexdigest() != want:
                # A complete but wrong local copy: start over once from the source.
                os.ftruncate(fd, 0)
                have, hasher = 0, hashlib.sha256()
            if have < size:
                with contextlib.closing(
                    Deadline(what, self.server, size - have, resume=True)
                ) as deadline:
                    hasher = self._receive(fd, name, have, size, hasher, what, dest, deadline)
            got = hasher.hexdigest()
            if got != want:
                _discard(dest)
                raise DistError(
                    f"{what}: sha256 mismatch (expected {want[:16]}…, got "
                    f"{got[:16]}…); the source is corrupt or was tampered with"
                )
            os.fsync(fd)
        finally:
            os.close(fd)

    def _receive(
        self,
        fd: int,
        name: str,
        have: int,
        size: int,
        hasher: hashlib._Hash,
        what: str,
        dest: Path,
        deadline: Deadline,
    ) -> hashlib._Hash:
        try:
            start, blocks = deadline.open(lambda: self._open(name, have, size, what))
        except DistError:
            if have == 0:
                _discard(dest)  # nothing of ours was there: leave nothing behind
            raise
        if start != have:  # the server ignored Range: take the whole file again
            os.ftruncate(fd, 0)
            deadline.grow(have)
            hasher, have = hashlib.sha256(), 0
        os.lseek(fd, have, os.SEEK_SET)
        pos = have
        for block in deadline.guard(blocks):
            self.bytes_received += len(block)
            if pos + len(block) > size:
                _discard(dest)
                raise DistError(
                    f"{what}: more than the expected {size} bytes; the source "
                    "does not match the bundle metadata"
                )
            hasher.update(block)
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
            pos += len(block)
        if pos < size:
            raise DistError(
                f"{what}: transfer ended after {pos} of {size} bytes; run the pull again to resume"
            )
        return hasher


def _open_partial(dest: Path, what: str) -> int:
    try:
        fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise DistError(
            f"{what}: cannot write {dest} ({exc.strerror}); it must be a regular file or absent"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DistError(f"{what}: {dest} is not a regular file; remove it")
    return fd


def _hash_prefix(fd: int, size: int) -> tuple[int, hashlib._Hash]:
    """Hash what a previous attempt left (re-hashed, never trusted); drop an over-long one."""
    hasher = hashlib.sha256()
    have = os.fstat(fd).st_size
    if have > size:
        os.ftruncate(fd, 0)
        return 0, hasher
    pos = 0
    while pos < have:
        block = os.pread(fd, min(BLOCK, have - pos), pos)
        if not block:
            break
        hasher.update(block)
        pos += len(block)
    return pos, hasher


def _discard(dest: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()


def open_source(
    uri: BundleURI, *, s3_endpoint: str | None = None, mutable: bool = False
) -> Source:
    """A source for a pull URI (already checked by ``parse_pull_uri``). ``mutable``: an
    unpinned location is acceptable (a remote cache's pointer; its caller verifies)."""
    # Imported per scheme: boto3 and oras cost noticeable startup time.
    if uri.scheme == "file":
        from sporevm.dist.transport_file import FileSource

        return FileSource(uri)
    if uri.scheme in ("http", "https"):
        from sporevm.dist.transport_http import HttpSource

        return HttpSource(uri, mutable=mutable)
    if uri.scheme == "s3":
        from sporevm.dist.transport_s3 import S3Source

        return S3Source(uri, endpoint=s3_endpoint, mutable=mutable)
    if uri.scheme == "oci":
        from sporevm.dist.transport_oci import OciSource

        return OciSource(uri)
    raise DistError(f"{uri}: no transport for scheme {uri.scheme!r}")


def open_sink(uri: BundleURI, *, s3_endpoint: str | None = None) -> Sink:
    """A sink for a push URI (already checked by ``parse_push_uri``)."""
    if uri.pin is not None:
        raise DistError(f"{uri}: push URIs carry no pin")
    if uri.scheme == "file":
        from sporevm.dist.transport_file import FileSink

        return FileSink(uri)
    if uri.scheme == "s3":
        from sporevm.dist.transport_s3 import S3Sink

        return S3Sink(uri, endpoint=s3_endpoint)
    if uri.scheme == "oci":
        from sporevm.dist.transport_oci import OciSink

        return OciSink(uri)
    raise DistError(f"{uri}: {uri.scheme}:// is read-only; push to file://, oci:// or s3://")
