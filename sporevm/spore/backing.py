"""Local backing: a spore's RAM materialized once as a file, mapped MAP_PRIVATE per restore.

This module is the store side of it (the file's name, building it from verified
chunks, verifying it before use); mapping it into a VM's RAM is the runtime's
(``sporevm.runtime.restore.map_local``).

Layout (docs/restore.md)::

    <store>/memfiles/blake3/<hex>   guest RAM of one memory index, byte for byte

``<hex>`` is BLAKE3-256 of the memory index's canonical JSON (chunk size and
chunk ids): RAM contents depend on nothing else, so every spore (and every
forked child) with the same index shares one file. Zero chunks are holes.

Verification policy. The file is built only from chunks that ``ChunkStore.get``
has verified, and published atomically (temp + fsync + rename, mode 0444). It
is not trusted blindly afterwards: ``open_memfile`` re-hashes it against the
manifest's own chunk ids, 2 MiB at a time, *through the fd that is then
mapped*, once per process (a per-process cache keyed by device, inode, size and
mtime skips a second pass when one process restores the same file twice).
Checking against the index rather than a stored whole-file hash means nothing
beside the file can be tampered with to make it pass. A corrupt file is removed
and the restore fails naming the first bad chunk; the next restore rebuilds it.
What this cannot cover: a writer with access to the store that modifies the
inode *after* the check (MAP_PRIVATE shows later file writes in pages the guest
has not written yet). Nothing in spore writes a published memfile, and such a
writer can already rewrite chunks and manifests, so the store's permissions
are the boundary here (SECURITY.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import stat
import threading
from pathlib import Path

import blake3

from sporevm.atomic import publish
from sporevm.spore.chunks import CHUNK, ChunkError, ChunkStore, MemoryIndex, chunk_id, is_zero
from sporevm.store import Store

MEMFILES = Path("memfiles") / "blake3"
_verified: set[tuple[int, int, int, int]] = set()  # (dev, ino, size, mtime_ns) this process
_lock = threading.Lock()


def index_id(index: MemoryIndex) -> str:
    """Hex BLAKE3 of the index's canonical JSON: the memfile's name."""
    doc = {"chunk_size": index.chunk_size, "chunks": list(index.chunks)}
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return str(blake3.blake3(data).hexdigest())


def memfile_path(index: MemoryIndex, store: Store) -> Path:
    return store.root / MEMFILES / index_id(index)


def _check_index(index: MemoryIndex) -> None:
    if index.chunk_size != CHUNK or not index.chunks:
        raise ChunkError(f"memory index: chunk size {index.chunk_size}, expected {CHUNK}")


def _fill(fd: int, path: Path, index: MemoryIndex, chunks: ChunkStore) -> None:
    """Write ``index``'s memory into the new file ``fd``: zero chunks stay holes, every
    stored chunk is verified (ChunkStore.get) before it is written."""
    os.ftruncate(fd, index.memory_size)
    for c, cid in enumerate(index.chunks):
        if cid is not None:
            if os.pwrite(fd, chunks.get(cid, size=CHUNK), c * CHUNK) != CHUNK:
                raise ChunkError(f"memory file {path}: short write")


def ensure_memfile(index: MemoryIndex, chunks: ChunkStore, store: Store) -> Path:
    """The published memory file of ``index``, built from verified chunks if absent."""
    _check_index(index)
    dest = memfile_path(index, store)
    try:
        st = dest.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_size == index.memory_size:
            return dest
        dest.unlink()  # wrong size or kind: never reuse it
    except FileNotFoundError:
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.temp_path("memfile")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _fill(fd, tmp, index, chunks)
            os.fchmod(fd, 0o444)
        finally:
            os.close(fd)
        publish(tmp, dest)
    except OSError as exc:
        raise ChunkError(f"memory file {dest}: cannot publish: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def open_memfile(path: Path, index: MemoryIndex) -> int:
    """An fd of ``path`` whose bytes match ``index`` (checked on this fd; module docstring)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ChunkError(f"memory file {path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != index.memory_size:
            raise ChunkError(
                f"memory file {path}: {st.st_size} bytes, the index needs {index.memory_size}"
            )
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _lock:
            if key not in _verified:
                bad = _first_bad_chunk(fd, index)
                if bad is not None:
                    with contextlib.suppress(OSError):
                        if os.stat(path).st_ino == st.st_ino:
                            path.unlink()  # the next restore rebuilds it from chunks
                    raise ChunkError(
                        f"memory file {path}: chunk {bad} does not match "
                        f"{index.chunks[bad] or 'zeros'} (corrupt); removed it"
                    )
                _verified.add(key)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _first_bad_chunk(fd: int, index: MemoryIndex) -> int | None:
    with mmap.mmap(fd, index.memory_size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        mv = memoryview(mm)
        try:
            for c, cid in enumerate(index.chunks):
                if cid is None and _is_hole(fd, c * CHUNK):
                    continue  # a hole reads as zeros; reading it would fill the page cache
                piece = mv[c * CHUNK : (c + 1) * CHUNK]
                ok = is_zero(piece) if cid is None else chunk_id(piece) == cid
                piece.release()
                if not ok:
                    return c
        finally:
            mv.release()
    return None


def open_local(index: MemoryIndex, chunks: ChunkStore, store: Store) -> int:
    """A verified fd of the memfile of ``index``, built first if need be (before any VM)."""
    if not store.publish_from_staging:
        return _private_memfile(index, chunks, store)
    return open_memfile(ensure_memfile(index, chunks, store), index)


def _private_memfile(index: MemoryIndex, chunks: ChunkStore, store: Store) -> int:
    """A memfile only this process maps, for a store that cannot publish one (a monitor
    jailed on Landlock ABI 1): built from verified chunks in staging, then unlinked, so
    it lives as long as the fd and is shared with no other VM."""
    _check_index(index)
    tmp = store.temp_path("memfile")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        try:
            _fill(fd, tmp, index, chunks)
        except BaseException:
            os.close(fd)
            raise
    except OSError as exc:
        raise ChunkError(f"memory file {tmp}: cannot build: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return fd


def _is_hole(fd: int, offset: int) -> bool:
    """True if [offset, offset+CHUNK) has no data extent (SEEK_DATA skips past it)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + CHUNK
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data at all after offset
