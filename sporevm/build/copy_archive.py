"""The tar archive `spore run --copy-in` streams into a guest, written from a host path.

The source is walked with the shared no-follow walker (``sporevm/nofollow.py``):
symlinks inside it are archived as links, never followed, and every file is
opened ``O_NOFOLLOW`` from its directory's descriptor. The archive is what the
guest's unpacker (``guest/copyin.c``) accepts: POSIX tar (PAX headers only
where ustar fields do not fit), a root member named ``.`` for the source itself,
then its entries by relative name; directories, regular files and symlinks
only, modes kept (setuid and friends too: the guest is the user's machine),
owners left to the guest (``--copy-in-owner``). Nothing is buffered beyond
tarfile's record: the output is a file-like whose ``write`` sends frames.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

from sporevm import nofollow
from sporevm.errors import CopyError

COPY_BUF = 256 << 10  # file data read per step


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass(frozen=True)
class ArchiveStats:
    entries: int
    bytes: int  # regular-file content


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = max(0, int(st.st_mtime))
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _Exact:
    """A file's data, exactly ``size`` bytes: a file that shrinks while archived is an
    error (the header already promised its size), growth is cut off."""

    def __init__(self, fd: int, size: int, shown: str) -> None:
        self.fd, self.left, self.shown = fd, size, shown

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        data = os.read(self.fd, want) if want else b""
        if want and not data:
            raise CopyError(f"--copy-in: {self.shown} shrank while it was being copied")
        self.left -= len(data)
        return data


def _member(tf: tarfile.TarFile, dir_fd: int, leaf: str, name: str, shown: str) -> int:
    """Archive ``leaf`` of ``dir_fd`` as ``name``; the file bytes written."""
    st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        tf.addfile(_info(name, st, tarfile.DIRTYPE))
        return 0
    if stat.S_ISLNK(st.st_mode):
        info = _info(name, st, tarfile.SYMTYPE)
        info.linkname = os.fsdecode(os.readlink(leaf, dir_fd=dir_fd))
        tf.addfile(info)
        return 0
    if not stat.S_ISREG(st.st_mode):
        raise CopyError(
            f"--copy-in: {shown} is not a file, directory or symlink (a FIFO, socket or "
            "device); copy-in takes only those"
        )
    fd = os.open(leaf, nofollow.FILE_FLAGS, dir_fd=dir_fd)
    try:
        os.set_blocking(fd, True)
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):  # replaced between the stat and the open
            raise CopyError(f"--copy-in: {shown} changed while it was being copied")
        info = _info(name, fst, tarfile.REGTYPE)
        info.size = fst.st_size
        tf.addfile(info, cast(IO[bytes], _Exact(fd, fst.st_size, shown)))
        return fst.st_size
    finally:
        os.close(fd)


def write_archive(src: Path, out: Sink | IO[bytes]) -> ArchiveStats:
    """Write the archive of ``src`` (a file, directory or symlink; not followed) to ``out``.

    ``src`` must be absolute and not ``/``; its parents may be links (the user named it)."""
    if not src.is_absolute() or not src.name:
        raise CopyError(f"--copy-in: {src}: name an absolute file or directory other than /")
    try:
        parent = nofollow.open_root(src.parent)
    except OSError as exc:
        raise CopyError(f"--copy-in: {src}: {exc.strerror or exc}") from None
    tf = tarfile.open(  # noqa: SIM115 - closed below; closing writes the end marker
        fileobj=cast(IO[bytes], out),
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    )
    tf.copybufsize = COPY_BUF  # type: ignore[attr-defined]  # not in typeshed
    entries, size = 1, 0
    try:
        size += _member(tf, parent, src.name, ".", str(src))
        if stat.S_ISDIR(os.stat(src.name, dir_fd=parent, follow_symlinks=False).st_mode):
            with nofollow.opened_dir(parent, [src.name]) as root:
                for entry in nofollow.walk(root):
                    rel = "/".join(entry.path)
                    size += _member(tf, entry.dir_fd, entry.name, rel, f"{src}/{rel}")
                    entries += 1
        tf.close()
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise CopyError(f"--copy-in: {src}: {exc.strerror or exc}{where}") from None
    finally:
        os.close(parent)
    return ArchiveStats(entries, size)
