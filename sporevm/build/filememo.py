"""Values derived from local files, remembered in the store by the files' identity.

Every `spore run`, `run --from` and no-op build looks up the managed kernel and the
guest agent by content keys whose inputs are tool versions, a 130 MB source tarball
and musl's ``libc.a``: subprocesses and hashing on every call. A value is recomputed
only when a file it came from has a new identity (path, inode, size, mtime, ctime:
what make and git trust too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import blake3

from sporevm.store import Store


def file_identity(path: Path) -> str:
    """Path, inode, size, mtime and ctime: a file with all of these unchanged is taken to
    be unchanged (as make and git do)."""
    st = path.stat()
    return f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"


def files_identity(paths: Iterable[Path]) -> str:
    """One identity for several files: any one changing changes it."""
    return "\n".join(file_identity(p) for p in paths)


def remember(
    store: Store | None,
    kind: str,
    ident: str,
    compute: Callable[[], str],
    valid: Callable[[str], bool] = lambda _v: True,
) -> str:
    """``compute()``, remembered in the store under the identity ``ident``; a remembered
    value that fails ``valid`` is a miss."""
    if store is None:
        return compute()
    key = blake3.blake3(f"{kind}\0{ident}".encode()).hexdigest()
    rec = store.get_key(kind, key)
    value = None if rec is None or rec.get("ident") != ident else rec.get("value")
    if isinstance(value, str) and valid(value):
        return value
    value = compute()
    store.put_key(kind, key, {"ident": ident, "value": value})
    return value
