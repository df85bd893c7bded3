"""The node-local cache of pulled content: the store's chunk CAS and rootfs entries.

There is no second copy: ``chunks/blake3/<hex>`` and ``rootfs/blake3/<hex>``
of the store are the cache, so a pulled spore restores exactly like a built
one. What this module adds is cache *discipline*: a hit is re-hashed before it
counts; a corrupt, non-regular or symlinked entry is evicted (symlinks are
removed, never followed) and reported as a miss, so the caller fetches it
again; content is installed only after it hashed to its id, by temp + fsync +
rename, so concurrent pulls of the same bundle race harmlessly (identical
bytes, the last rename wins, a reader never sees a partial entry).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

import blake3

from sporevm.atomic import publish
from sporevm.errors import SporeError
from sporevm.spore.chunks import ChunkError, ChunkStore
from sporevm.store import Store

_READ = 1 << 20


class CacheError(SporeError):
    """Content could not be installed into the node cache."""


def _evict(path: Path) -> None:
    """Remove whatever sits at ``path`` without following it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class ChunkCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.chunks = ChunkStore(store)

    # -- chunks and state objects ---------------------------------------------------------
    def has(self, cid: str, size: int) -> bool:
        """True only if the entry exists, is a regular file and re-hashes to ``cid``."""
        path = self.chunks.path(cid)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            _evict(path)
            return False
        if st.st_size != size:
            # Either rot (evict, refetch) or a manifest that lies about the size; the
            # install that follows refuses the latter, so evicting is safe either way.
            _evict(path)
            return False
        try:
            self.chunks.get(cid, size=size)  # evicts a corrupt entry itself
        except ChunkError:
            return False
        return True

    def install(self, cid: str, data: bytes | memoryview) -> None:
        """Publish bytes that must hash to ``cid`` (refused, nothing written, otherwise)."""
        try:
            self.chunks.put(data, expect=cid)
        except ChunkError as exc:
            raise CacheError(str(exc)) from None

    # -- rootfs images -------------------------------------------------------------------
    def has_rootfs(self, digest: str, size: int) -> bool:
        path = self.store.rootfs_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                path.unlink(missing_ok=True)
                return False
            raise CacheError(f"rootfs {digest}: cannot open store entry: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                good = False
            else:
                h = blake3.blake3(max_threads=blake3.blake3.AUTO)
                with os.fdopen(os.dup(fd), "rb") as fh:
                    while block := fh.read(_READ):
                        h.update(block)
                good = "blake3:" + h.hexdigest() == digest
        finally:
            os.close(fd)
        if not good:
            _evict(path)
        return good

    def install_rootfs(self, tmp: Path, digest: str, size: int) -> Path:
        """Publish an assembled image; the caller hashed it while writing ``tmp``."""
        dest = self.store.rootfs_path(digest)
        try:
            if os.lstat(tmp).st_size != size:
                raise CacheError(
                    f"rootfs {digest}: assembled {os.lstat(tmp).st_size} bytes, expected {size}"
                )
            if dest.is_symlink() or dest.is_dir():
                _evict(dest)  # os.replace would fail on a directory; never write through a link
            os.chmod(tmp, 0o644)
            publish(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return dest
