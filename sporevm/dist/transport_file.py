"""``file:///abs/dir``: a bundle as a plain directory.

Pull opens every file through the shared no-follow walker (``nofollow.py``:
relative to a directory fd, O_NOFOLLOW at each level, regular files only), so a
bundle directory cannot make us read outside it. Push writes into a temporary
sibling directory and renames it into place: readers see either no bundle or
the whole one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from sporevm import nofollow
from sporevm.atomic import fsync_dir
from sporevm.dist.transports import (
    BLOCK,
    StreamSource,
    check_name,
    check_sha256,
    check_size,
)
from sporevm.dist.uri import BundleURI
from sporevm.errors import DistError


def _open_below(root: Path, name: str, what: str) -> int:
    try:
        root_fd = nofollow.open_root(root)
    except OSError as exc:
        raise DistError(
            f"{what}: cannot open the bundle directory {root} ({exc.strerror}); check the path"
        ) from None
    try:
        return nofollow.open_file(root_fd, name)
    except FileNotFoundError:
        raise DistError(f"{what}: missing from the bundle directory") from None
    except (nofollow.NotADirectoryInPath, nofollow.NotARegularFile) as exc:
        reason = (
            "a symlink (not followed)"
            if exc.symlink
            else "not a regular file"
            if isinstance(exc, nofollow.NotARegularFile)
            else f"{exc.rel} is not a directory"
        )
        raise DistError(f"{what}: {reason}") from None
    except OSError as exc:
        raise DistError(f"{what}: {exc.strerror}") from None
    finally:
        os.close(root_fd)


class FileSource(StreamSource):
    def __init__(self, uri: BundleURI) -> None:
        self.root = Path(uri.path)
        self.reference = str(uri)
        self.pinned_bundle_digest = uri.pin
        self.bytes_received = 0

    def _open(
        self, name: str, start: int, size: int | None, what: str
    ) -> tuple[int, Iterator[bytes]]:
        fd = _open_below(self.root, name, what)
        actual = os.fstat(fd).st_size
        if size is not None and actual != size:
            os.close(fd)
            raise DistError(
                f"{what}: has {actual} bytes, the bundle metadata says {size}; "
                "the bundle is corrupt or was tampered with"
            )

        def blocks() -> Iterator[bytes]:
            try:
                pos = start
                while block := os.pread(fd, BLOCK, pos):
                    pos += len(block)
                    yield block
            except OSError as exc:
                raise DistError(f"{what}: read failed ({exc.strerror})") from None
            finally:
                os.close(fd)

        return start, blocks()


def _copy_hashed(src: Path, dest: Path, size: int, want: str, what: str) -> None:
    hasher = hashlib.sha256()
    total = 0
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while block := fin.read(BLOCK):
            total += len(block)
            if total > size:
                break
            hasher.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    if total != size or hasher.hexdigest() != want:
        raise DistError(
            f"{what}: {src} does not have the size and sha256 the bundle says; "
            "it changed while pushing — pack again"
        )


def _tree_digests(root: Path) -> dict[str, tuple[int, str]]:
    """name → (size, sha256) of every regular file under root; other entries are errors."""
    out: dict[str, tuple[int, str]] = {}
    root_fd = nofollow.open_root(root, follow=False)
    try:
        for entry in nofollow.walk(root_fd):
            rel = "/".join(entry.path)
            st = entry.lstat()
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                out[rel] = (-1, "")
                continue
            hasher = hashlib.sha256()
            with open(nofollow.open_file(entry.dir_fd, (entry.name,)), "rb") as fh:
                while block := fh.read(BLOCK):
                    hasher.update(block)
            out[rel] = (st.st_size, hasher.hexdigest())
    finally:
        os.close(root_fd)
    return out


class FileSink:
    def __init__(self, uri: BundleURI) -> None:
        self.uri = uri
        self.dest = Path(uri.path)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dest.parent / f".{self.dest.name}.tmp-{secrets.token_hex(6)}"
        self.tmp.mkdir(mode=0o755)
        self.files: dict[str, tuple[int, str]] = {}

    def put(self, name: str, src: Path, size: int, sha256: str) -> None:
        what = f"{self.uri}: {check_name(name, str(self.uri))}"
        want = check_sha256(sha256, what)
        check_size(size, what)
        if name in self.files:
            raise DistError(f"{what}: pushed twice")
        target = self.tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_hashed(src, target, size, want, what)
        self.files[name] = (size, want)

    def finish(self, bundle_digest: str, metadata_names: list[str]) -> str:
        pin = "sha256:" + check_sha256(bundle_digest, str(self.uri))
        missing = [n for n in metadata_names if n not in self.files]
        if missing:
            raise DistError(f"{self.uri}: metadata {missing[0]} was never pushed")
        for dirpath, _, _ in os.walk(self.tmp, topdown=False):
            fsync_dir(Path(dirpath))
        try:
            os.rename(self.tmp, self.dest)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                self.abort()
                raise DistError(f"{self.uri}: cannot publish ({exc.strerror})") from None
            # Pushing the same bundle again is a no-op; anything else must not be clobbered.
            same = (
                self.dest.is_dir()
                and not self.dest.is_symlink()
                and _tree_digests(self.dest) == self.files
            )
            self.abort()
            if not same:
                raise DistError(
                    f"{self.uri}: already exists and holds something else; "
                    "push to a new path or remove it first"
                ) from None
        fsync_dir(self.dest.parent)
        return str(self.uri.with_pin(pin))

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.tmp)
