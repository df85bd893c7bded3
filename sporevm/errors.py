"""Error types shared by every floor of the package.

Every error a user can cause carries one line that names the file, field or
member, says what is wrong and what to do. The CLI prints ``str(error)`` and
exits non-zero; it never prints a traceback for these.
"""

from __future__ import annotations

import traceback


def clear_frames(exc: BaseException) -> None:
    """Drop the locals of the finished frames in ``exc``'s tracebacks (and its causes').

    A failure while filling a buffer (guest RAM, a RAM image) leaves slices of it in
    those frames; clearing them lets the caller unmap the buffer at once, instead of
    ``BufferError`` replacing the failure."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # skips frames still running
        todo += [e.__cause__, e.__context__]


class SporeError(Exception):
    """Base class for errors reported to the user as one clear line."""

    exit_code = 1


class UsageError(SporeError):
    """Bad command-line usage."""

    exit_code = 2


class SporefileError(SporeError):
    """The Sporefile (or its lock file) is malformed or inconsistent."""

    exit_code = 2


class StoreError(SporeError):
    """The content-addressed store is corrupt or cannot be written."""


class OCIError(SporeError):
    """A registry, OCI layout, manifest, index, config or blob was rejected."""


class LayerError(SporeError):
    """A layer tar was rejected while being applied."""


class RootfsError(SporeError):
    """The ext4 root filesystem could not be built."""


class CopyError(SporeError):
    """A copy between the host and a guest (``--copy-in``/``--copy-out``, ``copy_out:``)
    failed or was refused; its own exit code, so CI tells it from the command's."""

    exit_code = 74  # EX_IOERR (sysexits.h)


class LockMismatchError(SporefileError):
    """``--locked`` was given and resolution would change Sporefile.lock."""


class DistError(SporeError):
    """A bundle could not be pushed, pulled or verified (names the URI and the file)."""
