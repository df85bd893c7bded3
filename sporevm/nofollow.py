"""Opening and walking paths below a trusted root without following any symlink.

The one path walker every reader and writer of untrusted trees uses: the store,
OCI image layouts, ``file://`` bundles, the Sporefile's ``files:`` and the layer
applier. Every component is opened relative to its parent's descriptor with
``O_NOFOLLOW`` (``| O_DIRECTORY`` on the way down), so a symlink (or a
non-directory) anywhere on the way fails instead of leading outside the root,
and a rename racing the walk cannot redirect it either: what is held is the
descriptor, not the name. Failures name the component they stopped at, so each
caller can say which part of its path was refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted where a file was expected never hangs.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

Rel = str | Sequence[str | bytes]  # "a/b", or components


class NotADirectoryInPath(OSError):
    """A component of the walked path is a symlink or not a directory."""

    def __init__(self, rel: str, *, symlink: bool = False, depth: int = 0) -> None:
        super().__init__(errno.ENOTDIR, f"{rel} is a symbolic link or not a directory")
        self.rel = rel
        self.symlink = symlink  # which of the two it is
        self.depth = depth  # components up to and including the refused one


class MissingInPath(FileNotFoundError):
    """A component of the walked path does not exist."""

    def __init__(self, rel: str, *, depth: int = 0) -> None:
        super().__init__(errno.ENOENT, f"{rel} does not exist")
        self.rel = rel
        self.depth = depth


class NotARegularFile(OSError):
    """The last component is a symlink (not followed) or not a regular file."""

    def __init__(self, rel: str, *, symlink: bool) -> None:
        reason = "is a symbolic link (not followed)" if symlink else "is not a regular file"
        super().__init__(errno.ELOOP if symlink else errno.EINVAL, f"{rel} {reason}")
        self.rel = rel
        self.symlink = symlink


def components(rel: Rel) -> tuple[str | bytes, ...]:
    """``rel`` as components: ``a/b`` split on ``/``, or a sequence taken as is.

    Empty, ``.`` and ``..`` components (and ``/`` or NUL inside one) are refused:
    a walker that is handed one has been given something no caller should build."""
    parts: tuple[str | bytes, ...] = tuple(rel.split("/")) if isinstance(rel, str) else tuple(rel)
    for part in parts:
        text = os.fsdecode(part)
        if text in ("", ".", "..") or "/" in text or "\0" in text:
            raise ValueError(f"{show(parts)!r}: not a plain relative path")
    return parts


def show(parts: Sequence[str | bytes]) -> str:
    return "/".join(os.fsdecode(p) for p in parts)


def _is_symlink(dir_fd: int, name: str | bytes) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def child_dir(dir_fd: int, name: str | bytes, prefix: Sequence[str | bytes] = ()) -> int:
    """``name`` in ``dir_fd``, opened as a directory without following it.

    ``prefix`` (the components above, for the error only): a missing ``name`` raises
    MissingInPath, a symlink or non-directory NotADirectoryInPath; both name the path."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        where = (*prefix, name)
        if exc.errno == errno.ENOENT:
            raise MissingInPath(show(where), depth=len(where)) from None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotADirectoryInPath(
                show(where), symlink=_is_symlink(dir_fd, name), depth=len(where)
            ) from None
        raise


def open_root(path: str | Path, *, follow: bool = True) -> int:
    """A descriptor of a root directory named by the user. With ``follow=False`` the
    root's own last component may not be a symlink either."""
    return os.open(path, DIR_FLAGS if not follow else DIR_FLAGS & ~os.O_NOFOLLOW)


def open_dir(root_fd: int, rel: Rel) -> int:
    """A descriptor of ``rel`` (``a/b`` or components) below ``root_fd``; no components:
    a duplicate of ``root_fd``.

    Raises NotADirectoryInPath naming the first component that is a symlink or not
    a directory, MissingInPath (a FileNotFoundError) if one is missing."""
    parts = components(rel)
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            nxt = child_dir(fd, part, parts[:i])
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def opened_dir(root_fd: int, rel: Rel) -> contextlib.AbstractContextManager[int]:
    """:func:`open_dir`, closed at the end of the with-block."""
    return _owned(open_dir(root_fd, rel))


def open_file(root_fd: int, rel: Rel, *, flags: int = FILE_FLAGS, regular: bool = True) -> int:
    """A descriptor of the file ``rel`` below ``root_fd``, no component followed.

    ``flags`` are for the last component (O_NOFOLLOW is always added). With
    ``regular``, anything but a regular file is refused (NotARegularFile); a final
    symlink always is. Errors on the way down are those of :func:`open_dir`."""
    parts = components(rel)
    if not parts:
        raise ValueError("open_file needs at least one component")
    parent = open_dir(root_fd, parts[:-1])
    try:
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise MissingInPath(show(parts), depth=len(parts)) from None
            if exc.errno == errno.ELOOP or (
                exc.errno == errno.ENOTDIR and _is_symlink(parent, parts[-1])
            ):
                raise NotARegularFile(show(parts), symlink=True) from None
            raise
    finally:
        os.close(parent)
    if regular and not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFile(show(parts), symlink=False)
    return fd


@dataclass(frozen=True)
class Entry:
    """One entry met by :func:`walk`, in the open directory ``dir_fd`` (valid until the
    walk moves on), at ``path`` (components below the walk's root)."""

    dir_fd: int
    path: tuple[str, ...]
    dirent: os.DirEntry[str]

    @property
    def name(self) -> str:
        return self.dirent.name

    def is_dir(self) -> bool:
        """A real directory (never a symlink to one); from d_type when the FS has it."""
        return self.dirent.is_dir(follow_symlinks=False)

    def lstat(self) -> os.stat_result:
        return self.dirent.stat(follow_symlinks=False)


def walk(root_fd: int) -> Iterator[Entry]:
    """Every entry below ``root_fd``, depth first, each directory's entries sorted by
    their bytes. A directory is entered after it is yielded (so a caller may refuse
    it first) through a descriptor opened without following; symlinks and everything
    else are yielded and never followed."""
    yield from _walk(root_fd, ())


def _walk(dir_fd: int, path: tuple[str, ...]) -> Iterator[Entry]:
    with os.scandir(dir_fd) as it:
        dirents = sorted(it, key=lambda d: os.fsencode(d.name))
    for dirent in dirents:
        entry = Entry(dir_fd, (*path, dirent.name), dirent)
        yield entry
        if entry.is_dir():
            with _owned(child_dir(dir_fd, dirent.name, path)) as child:
                yield from _walk(child, entry.path)


@contextlib.contextmanager
def _owned(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)
