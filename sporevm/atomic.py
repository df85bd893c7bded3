"""Atomic publication of files: temp file in the target directory, fsync, rename.

Nothing half-written is ever visible under a final name. A crash leaves at
worst a ``.tmp-*`` file in the staging directory: the store passes its own
``tmp/`` (same filesystem, swept by prune); other callers stage beside ``dest``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sporevm.errors import SporeError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(dest: Path, mode: int = 0o644, tmp_dir: Path | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``dest`` only if the block succeeds.

    ``tmp_dir`` must be on ``dest``'s filesystem (rename is only atomic there).
    An existing regular file (or symlink, which is replaced, not followed) at
    ``dest`` is replaced, as ``cp`` and ``-o`` options do; a directory is refused."""
    check_file_output(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=tmp_dir or dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def check_file_output(dest: Path) -> None:
    """Refuse a file output path that names an existing directory (call it before work)."""
    if dest.is_dir() and not dest.is_symlink():
        raise NotReplaceable(f"{dest}: is a directory; name a file to write (nothing was changed)")


def atomic_write(dest: Path, data: bytes, mode: int = 0o644, tmp_dir: Path | None = None) -> None:
    with atomic_output(dest, mode, tmp_dir) as fh:
        fh.write(data)


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished file (already in ``dest``'s filesystem) into place durably."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2  # glibc >= 2.28
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


@dataclass(frozen=True)
class DirKind:
    """What an existing output directory must look like before spore replaces it.

    ``marker`` must be a regular file in it; every other entry must be one of
    ``names``. Anything else (a user's files, a directory of another kind) is
    never replaced: replacing means deleting the old directory.
    """

    what: str  # "spore directory", "bundle directory"
    marker: str
    names: frozenset[str]

    def refusal(self, path: Path) -> str | None:
        """Why ``path`` may not be replaced, or None if it is empty or of this kind."""
        try:
            entries = sorted(os.listdir(path))
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if not entries:
            return None
        stranger = [e for e in entries if e not in self.names]
        if stranger:
            return f"holds {stranger[0]!r}, which no {self.what} has"
        try:
            st = os.lstat(path / self.marker)
        except OSError:
            return f"has no {self.marker}"
        if not stat.S_ISREG(st.st_mode):
            return f"its {self.marker} is not a regular file"
        return None


class NotReplaceable(SporeError):
    """An existing output path is not something spore may replace."""


def replace_dir(staged: Path, dest: Path, kind: DirKind) -> None:
    """Publish the directory ``staged`` as ``dest``, replacing an old ``dest`` in one step.

    An old ``dest`` is replaced only if it is empty or a ``kind`` directory; anything
    else raises ``NotReplaceable`` and stays untouched. The two are swapped with
    renameat2(RENAME_EXCHANGE), so ``dest`` is always either the whole old directory
    or the whole new one, even across a crash; the old one (now at ``staged``) is
    checked once more (it could have changed between the check and the swap: then
    it is swapped back) and removed. Both must be on one filesystem (stage beside
    ``dest``).

    Where the swap is refused with EXDEV (overlayfs without ``redirect_dir``: ``dest``
    comes from a lower layer, e.g. an output directory shipped in a CI container's
    image), the entries are replaced one by one instead (``_replace_entries``).
    """
    import shutil

    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise NotReplaceable(
            f"{dest}: exists and is not a {kind.what}; remove it or choose another output path"
        )
    if not dest.exists():
        os.replace(staged, dest)
        fsync_dir(dest.parent)
        return
    why = kind.refusal(dest)
    if why is not None:
        raise NotReplaceable(
            f"{dest}: exists and is not a {kind.what} ({why}); nothing was "
            "changed; remove it or choose another output path"
        )
    try:
        _exchange(staged, dest)
    except OSError as exc:
        # one filesystem, yet EXDEV: overlayfs (else: staged elsewhere, a caller's bug)
        if exc.errno != errno.EXDEV or os.stat(staged).st_dev != os.stat(dest).st_dev:
            raise
        _replace_entries(staged, dest, kind)
        return
    why = kind.refusal(staged)  # the old directory, now at ``staged``
    if why is not None:  # changed under us: put it back, publish nothing
        _exchange(staged, dest)
        raise NotReplaceable(
            f"{dest}: changed while being replaced ({why}); nothing was "
            "changed; remove it or choose another output path"
        )
    fsync_dir(dest.parent)
    shutil.rmtree(staged, ignore_errors=True)


def _replace_entries(staged: Path, dest: Path, kind: DirKind) -> None:
    """Replace what is in ``dest`` by what is in ``staged``, which then goes away.

    Not one atomic step, so ordered for readers: the old marker leaves first and the
    new marker arrives last. Whoever looks sees the whole old directory, a directory
    without its marker (refused by every reader, and by ``kind.refusal``: a crash
    here leaves that, and the next replacement says to remove it), or the whole new
    one. Only entries named in ``kind`` are ever deleted; the check runs again right
    before the first deletion.
    """
    import shutil

    why = kind.refusal(dest)
    if why is not None:
        raise NotReplaceable(
            f"{dest}: changed while being replaced ({why}); nothing was "
            "changed; remove it or choose another output path"
        )
    for name in sorted(os.listdir(dest), key=lambda n: n != kind.marker):  # the marker first
        path = dest / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        if name == kind.marker:
            fsync_dir(dest)
    for name in sorted(os.listdir(staged), key=lambda n: n == kind.marker):  # marker last
        if name == kind.marker:
            fsync_dir(dest)
        os.rename(staged / name, dest / name)
    fsync_dir(dest)
    os.rmdir(staged)
    fsync_dir(dest.parent)


def publish_new_dir(staged: Path, dest: Path) -> None:
    """Rename the directory ``staged`` to ``dest`` only if nothing is there, not even an
    empty directory (plain rename(2) would replace one), then fsync the parent."""
    try:
        _rename2(staged, dest, _RENAME_NOREPLACE, "cannot rename")
    except FileExistsError:
        raise NotReplaceable(
            f"{dest}: already exists (created meanwhile?); remove it or choose another output path"
        ) from None
    fsync_dir(dest.parent)


def _exchange(a: Path, b: Path) -> None:
    _rename2(a, b, _RENAME_EXCHANGE, "cannot exchange the two")


def _rename2(a: Path, b: Path, flags: int, what: str) -> None:
    if _renameat2()(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", str(a), None, str(b))
