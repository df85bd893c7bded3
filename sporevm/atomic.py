"""Atomic publication of files: temp file in the target directory, fsync, rename.

Nothing half-written is ever visible under a final name. A crash leaves at
worst a ``.tmp-*`` file in the staging directory: the store passes its own
``tmp/`` (same filesystem, swept by prune); other callers stage beside ``dest``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(
    dest: Path, mode: int = 0o644, tmp_dir: Path | None = None
) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``dest`` only if the block succeeds.

    ``tmp_dir`` must be on ``dest``'s filesystem (rename is only atomic there)."""
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


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _renameat2() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2  # glibc >= 2.28
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def replace_dir(staged: Path, dest: Path) -> None:
    """Publish the directory ``staged`` as ``dest``, replacing any old ``dest`` in one step.

    With an old ``dest``, the two are swapped with renameat2(RENAME_EXCHANGE), so
    ``dest`` is always either the whole old directory or the whole new one, even
    across a crash; the old one (now at ``staged``) is then removed. Both must be on
    one filesystem (stage beside ``dest``).
    """
    import shutil

    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise FileExistsError(f"{dest}: exists and is not a directory; remove it")
    if not dest.exists():
        os.replace(staged, dest)
    else:
        if _renameat2()(_AT_FDCWD, os.fsencode(staged), _AT_FDCWD, os.fsencode(dest),
                        _RENAME_EXCHANGE) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, f"exchange {staged} with {dest}: {os.strerror(err)}")
        shutil.rmtree(staged, ignore_errors=True)
    fsync_dir(dest.parent)
