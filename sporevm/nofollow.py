"""Opening directories below a trusted root without following any symlink.

Every component is opened relative to its parent's descriptor with
``O_NOFOLLOW | O_DIRECTORY``, so a symlink (or a non-directory) anywhere on the
way fails instead of leading outside the root, and a rename racing the walk
cannot redirect it either: what is held is the descriptor, not the name.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NotADirectoryInPath(OSError):
    """A component of the walked path is a symlink or not a directory."""

    def __init__(self, rel: str) -> None:
        super().__init__(errno.ENOTDIR, f"{rel} is a symbolic link or not a directory")
        self.rel = rel


def open_dir(root_fd: int, rel: str) -> int:
    """A descriptor of ``rel`` (components separated by ``/``) below ``root_fd``.

    Raises NotADirectoryInPath naming the first component that is a symlink or not
    a directory, FileNotFoundError if one is missing."""
    fd = os.dup(root_fd)
    done: list[str] = []
    try:
        for part in rel.split("/"):
            if part in ("", ".", ".."):
                raise ValueError(f"{rel!r}: not a plain relative path")
            done.append(part)
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotADirectoryInPath("/".join(done)) from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened_dir(root_fd: int, rel: str) -> Iterator[int]:
    fd = open_dir(root_fd, rel)
    try:
        yield fd
    finally:
        os.close(fd)
