"""Extracting a hostile guest's tar archive into a new host directory (``--copy-out``).

The archive comes from the guest, so every byte is hostile. It is parsed by the
layer code's bounded tar reader (``tarsafety``: extension headers size-checked
before they are read, our own PAX parser, sparse members refused) and names are
checked by the same ``split_name`` (no ``..``, no NUL, bounded length and
depth); a copy archive is stricter than a layer in that an absolute name is
refused rather than stripped. Entries are created with *at() calls from
descriptors reached through the shared no-follow walker, so a symlink in the
archive is created as a link and never followed, a later member that names a
path through it is refused, and a hardlink may only name a regular file this
archive already created. Device nodes, FIFOs and every other member type are
refused; permission bits are kept without setuid, setgid and sticky; owners are
the invoking user's. Bounds: ``max_entries`` members, ``max_bytes`` of file
content (checked from the header before any data is read), and the raw stream
(``stream_limit``).

Nothing half-written: the tree is built in a temp directory beside the target,
every file and directory fsync'd, then renamed onto the target (which must not
exist or be an empty directory); any failure removes the temp directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

from sporevm import nofollow
from sporevm.atomic import fsync_dir
from sporevm.build.tarsafety import (
    CHUNK,
    Limits,
    ParseState,
    Reject,
    display,
    mtime_ns,
    open_tar,
    split_name,
)
from sporevm.errors import CopyError, LayerError

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_HEADER = 16 << 10  # one PAX header: a 4096-byte path and link target fit twice over
ENTRY_OVERHEAD = 12 << 10  # stream bytes one member may cost beyond its data (headers, padding)


@dataclass(frozen=True)
class Bounds:
    """What one copy-out may bring back (``--copy-out-max-bytes/-entries``)."""

    max_bytes: int = 1 << 30
    max_entries: int = 100_000

    def stream_limit(self) -> int:
        """Raw archive bytes accepted: the content plus a fixed cost per member."""
        return self.max_bytes + (self.max_entries + 2) * ENTRY_OVERHEAD + (1 << 20)

    def limits(self) -> Limits:
        return Limits(
            max_entries=self.max_entries,
            max_total_bytes=self.max_bytes,
            max_header_bytes=MAX_HEADER,
            max_stream_bytes=self.stream_limit(),
        )


@dataclass(frozen=True)
class ExtractStats:
    entries: int
    bytes: int


def check_target(dest: Path, what: str) -> None:
    """Refuse before any work a target that exists and is not an empty real directory."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise CopyError(f"{what}: {dest} exists and is not a directory; name a new or empty one")
    with os.scandir(dest) as entries:
        if any(entries):
            raise CopyError(f"{what}: {dest} is not empty; name a new or empty directory")


class _Tree:
    def __init__(self, root: int, bounds: Bounds) -> None:
        self.root = root
        self.bounds = bounds
        self.limits = bounds.limits()
        self.entries = 0
        self.bytes = 0
        # directories in creation order (parents before children) -> (mode, mtime ns)
        self.dirs: dict[tuple[bytes, ...], tuple[int, int]] = {}

    def parent(self, comps: tuple[bytes, ...]) -> int:
        """An owned descriptor of ``comps``, missing directories created, no link followed."""
        fd = os.dup(self.root)
        try:
            for i, comp in enumerate(comps):
                try:
                    child = nofollow.child_dir(fd, comp, comps[:i])
                except nofollow.MissingInPath:
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    self.dirs.setdefault(comps[: i + 1], (0o755, 0))
                    child = nofollow.child_dir(fd, comp, comps[:i])
                except nofollow.NotADirectoryInPath:
                    raise Reject(
                        f"parent '{display(b'/'.join(comps[: i + 1]))}' is a symlink or not "
                        "a directory; copies never write through links"
                    ) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        raw = m.name.encode("utf-8", "surrogateescape")
        if raw.startswith(b"/"):
            raise Reject("name is absolute; a copy names paths below its target")
        comps = split_name(raw, self.limits, "name")
        if not comps:
            if not m.isdir():
                raise Reject("names the target itself but is not a directory")
            return
        self.entries += 1
        if self.entries > self.bounds.max_entries:
            raise Reject(
                f"more than {self.bounds.max_entries} entries (--copy-out-max-entries); refused"
            )
        if m.mode < 0:
            raise Reject(f"mode {m.mode} out of range")
        perm = m.mode & 0o777  # never setuid, setgid or sticky from a guest
        ns = mtime_ns(m)
        if m.type in tarfile.REGULAR_TYPES:
            if not 0 <= m.size <= self.bounds.max_bytes - self.bytes:
                raise Reject(
                    f"{m.size} bytes would exceed the limit of {self.bounds.max_bytes} bytes "
                    "(--copy-out-max-bytes); refused"
                )
        elif m.type not in (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE):
            kinds = {
                tarfile.CHRTYPE: "a character device",
                tarfile.BLKTYPE: "a block device",
                tarfile.FIFOTYPE: "a FIFO",
            }
            raise Reject(
                f"is {kinds.get(m.type, f'of tar type {m.type!r}')}; copy-out takes files, "
                "directories and symbolic links only"
            )
        link = self._link(m, comps) if m.type == tarfile.LNKTYPE else None
        pfd = self.parent(comps[:-1])
        try:
            self._create(tf, m, pfd, comps, perm, ns, link)
        finally:
            os.close(pfd)
            if link is not None:
                os.close(link[0])

    def _create(
        self,
        tf: tarfile.TarFile,
        m: tarfile.TarInfo,
        pfd: int,
        comps: tuple[bytes, ...],
        perm: int,
        ns: int,
        link: tuple[int, bytes] | None,
    ) -> None:
        name = comps[-1]
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if m.isdir() and stat.S_ISDIR(st.st_mode):
                self.dirs[comps] = (perm, ns)  # a directory named again: its last metadata wins
                return
            raise Reject("names an entry the archive already created; refused")
        if m.isdir():
            os.mkdir(name, 0o700, dir_fd=pfd)
            self.dirs[comps] = (perm, ns)
        elif m.issym():
            target = m.linkname.encode("utf-8", "surrogateescape")
            if not target or b"\0" in target or len(target) > self.limits.max_name_bytes:
                raise Reject("symlink target is empty, contains NUL or is too long")
            os.symlink(target, name, dir_fd=pfd)  # any text: it is never followed here
            os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
        elif link is not None:
            os.link(link[1], name, src_dir_fd=link[0], dst_dir_fd=pfd, follow_symlinks=False)
        else:
            self._file(tf, m, pfd, name, perm, ns)

    def _link(self, m: tarfile.TarInfo, comps: tuple[bytes, ...]) -> tuple[int, bytes]:
        raw = m.linkname.encode("utf-8", "surrogateescape")
        if raw.startswith(b"/"):
            raise Reject("hardlink target is absolute; hardlinks must name an earlier member")
        target = split_name(raw, self.limits, "hardlink target")
        if not target or target[: len(comps)] == comps:
            raise Reject("hardlink target is the target root, the entry itself or inside it")
        try:
            fd = nofollow.open_dir(self.root, target[:-1])
        except OSError:
            raise Reject(
                f"hardlink target '{display(raw)}' is not an earlier member of the archive"
            ) from None
        try:
            st = os.stat(target[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise Reject(
                f"hardlink target '{display(raw)}' is not a regular file the archive created"
            )
        return fd, target[-1]

    def _file(
        self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, name: bytes, perm: int, ns: int
    ) -> None:
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            left = m.size
            src = tf.extractfile(m) if left else None
            while left:
                assert src is not None
                block = src.read(min(left, CHUNK))
                if not block:
                    raise Reject("file data is truncated")
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view) :]
                left -= len(block)
            self.bytes += m.size
            os.fchmod(fd, perm)
            os.utime(fd, ns=(ns, ns))
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Directory metadata last, children before parents (so a parent's mode cannot
        lock us out of a child), each fsync'd."""
        for comps, (perm, ns) in reversed(list(self.dirs.items())):
            with nofollow.opened_dir(self.root, comps) as fd:
                os.fsync(fd)
                os.fchmod(fd, perm)
                os.utime(fd, ns=(ns, ns))
        os.fsync(self.root)


class Source(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Counted:
    """``source`` cut off at ``limit`` bytes: past it, the copy fails (a guest that streams
    forever, or pads the end with gigabytes of zeros, is stopped by the host)."""

    def __init__(self, source: Source, limit: int) -> None:
        self.source, self.left, self.limit = source, limit, limit

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.left -= len(data)
        if self.left < 0:
            raise CopyError(
                f"the archive is over {self.limit} bytes, more than the bounds allow "
                "(--copy-out-max-bytes / --copy-out-max-entries)"
            )
        return data


def _members(tree: _Tree, source: _Counted, state: ParseState) -> None:
    prev: str | None = None

    def at() -> str:
        return f"after member {prev!r}" if prev is not None else "at the first member"

    try:
        tf = open_tar(cast(IO[bytes], source), state)
    except LayerError as exc:
        raise CopyError(f"{at()}: {exc}") from None
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise CopyError(f"not a valid tar stream: {exc}") from None
    with tf:
        while True:
            try:
                m = tf.next()
            except LayerError as exc:
                raise CopyError(f"{at()}: {exc}") from None
            except (tarfile.TarError, ValueError, EOFError) as exc:
                raise CopyError(f"{at()}: malformed tar: {exc}") from None
            if m is None:
                break
            prev = m.name
            try:
                tree.member(tf, m)
            except (Reject, LayerError) as exc:
                raise CopyError(f"member {m.name!r}: {exc}") from None
            except (tarfile.TarError, EOFError) as exc:
                raise CopyError(f"member {m.name!r}: malformed tar: {exc}") from None
        if state.bad_header is not None:
            raise CopyError(f"{at()}: corrupt tar header ({state.bad_header})")
    # The rest must be the end marker's zeros and record padding, up to the guest's DONE.
    while block := source.read(CHUNK):
        if block.count(0) != len(block):
            raise CopyError(f"{at()}: data after the end-of-archive marker")


def extract(source: Source, dest: Path, bounds: Bounds, what: str) -> ExtractStats:
    """Extract the archive read from ``source`` into ``dest`` (new, or an empty directory)."""
    check_target(dest, what)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.copy-", dir=dest.parent))
    try:
        root = nofollow.open_root(tmp, follow=False)
        try:
            tree = _Tree(root, bounds)
            try:
                _members(tree, _Counted(source, bounds.stream_limit()), ParseState(tree.limits))
            except CopyError as exc:
                raise CopyError(f"{what}: {exc}; nothing was written to {dest}") from None
            except OSError as exc:
                raise CopyError(
                    f"{what}: {exc.strerror or exc} while writing below {dest}; nothing was written"
                ) from None
            tree.finish()
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(root, 0o777 & ~umask)
        finally:
            os.close(root)
        try:  # onto a missing path or an empty directory: atomic either way
            os.rename(tmp, dest)
        except OSError as exc:
            raise CopyError(
                f"{what}: {dest}: {exc.strerror} (did something else fill it?); nothing was written"
            ) from None
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return ExtractStats(tree.entries, tree.bytes)
