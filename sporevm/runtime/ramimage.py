"""Verified guest-RAM images a long-lived process keeps: restores without a re-hash.

Every restore hands the guest only bytes verified against the spore's BLAKE3 chunk
ids (docs/restore.md). An eager restore reads and hashes every stored chunk into
fresh RAM each time: 28 MiB for the bench spore, GiBs for a large warm VM, on every
`spore run --from`. A process that restores the same spores again and again (the
resident server, docs/server.md; a fleet controller on the Python API) does that
work once per spore instead:

1. ``fill`` reads each stored chunk into a fresh memfd and verifies it there
   (``materialize``, the same read + hash as eager); zero chunks stay holes.
2. The memfd is then **sealed** against writes, shrinking, growing and further
   sealing (``F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``). From
   then on the kernel refuses every write, truncate, hole punch and unseal, through
   any descriptor of any process: the bytes stay exactly those that were verified,
   for as long as the image exists. It lives in memory (shmem), so there is no disk
   to rot under it either.
3. Each restore maps it ``MAP_PRIVATE`` over the VM's RAM: the guest's and the
   VMM's writes are copied on write and never reach the image, and the clean pages
   are shared by every VM restored from it.

``RamImageCache`` keeps images by memory-index id (BLAKE3 of the index's canonical
JSON: RAM contents depend on nothing else), least recently used first out, within a
byte budget. The monitor is handed one image fd and checks the seals and size itself
(``check_sealed``); that the sealed bytes are that index's is its caller's word, as
the manifest id is (the caller verified them, before any VM).

In the resident server the cache lives in the server and each handler is a fork of
it: a handler that fills a new image offers it back over a SOCK_SEQPACKET pair
(``send_offer``; ``receive_offer`` parses the one-line message strictly and re-checks
the seals), so the next run finds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import socket
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass

from sporevm.errors import SporeError, clear_frames
from sporevm.spore.backing import index_id
from sporevm.spore.chunks import CHUNK, ChunkError, ChunkStore, MemoryIndex, materialize

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
MAX_IMAGE = 3 << 30  # guest RAM stops at the 3 GiB MMIO hole (protocol.MAX_MEMORY)
MAX_OFFER = 96  # bytes of one offer message
NO_OFFER = "no offer yet"  # receive_offer on a socket with nothing to read
_OFFER = re.compile(rb"ram (blake3:[0-9a-f]{64}) ([1-9][0-9]{0,15})")


class RamImageError(SporeError):
    pass


@dataclass(frozen=True)
class RamImage:
    """One sealed, verified image for one restore: ``fd`` is the caller's to close."""

    fd: int
    index: str  # "blake3:<hex>": the memory index it holds (backing.index_id)
    size: int
    hit: bool  # found in the cache (no chunk read), or filled now


def image_id(index: MemoryIndex) -> str:
    return "blake3:" + index_id(index)


def fill(index: MemoryIndex, chunks: ChunkStore, size: int) -> int:
    """A new sealed memfd holding exactly ``index``'s RAM, every stored chunk verified
    on the way in; on any failure nothing is left open."""
    if index.chunk_size != CHUNK or index.memory_size != size or not 0 < size <= MAX_IMAGE:
        raise ChunkError(f"memory index covers {index.memory_size} bytes; guest RAM is {size}")
    fd = os.memfd_create("spore-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        whole = memoryview(mm)
        try:
            materialize(index, chunks, whole, out_is_zero=True, workers=min(2, os.cpu_count() or 1))
        except BaseException as exc:
            clear_frames(exc)  # its frames hold slices of the mapping
            raise
        finally:
            whole.release()
            mm.close()
        # No writable mapping is left (F_SEAL_WRITE refuses to seal over one).
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        check_sealed(fd, size)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_sealed(fd: int, size: int) -> None:
    """Refuse ``fd`` unless it is a memfd of ``size`` bytes sealed against any change."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        st = os.fstat(fd)
    except OSError as exc:
        raise RamImageError(
            f"RAM image fd {fd} is not a sealed memory file ({exc.strerror})"
        ) from None
    if seals & SEALS != SEALS:
        raise RamImageError(
            f"RAM image fd {fd} is not sealed against writes and resizing (seals {seals:#x})"
        )
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise RamImageError(f"RAM image fd {fd} is {st.st_size} bytes; guest RAM is {size}")


def resident(fd: int) -> int:
    """Bytes the image really holds (its holes cost nothing)."""
    return os.fstat(fd).st_blocks * 512


@dataclass
class _Held:
    fd: int
    size: int
    bytes: int


class RamImageCache:
    """Sealed images by memory-index id, LRU within ``budget`` bytes (module docstring).

    Thread-safe. An image larger than the budget is used for its restore and not kept.
    ``offer_to``: a socket new images are also offered on (a server's handler).
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._images: OrderedDict[str, _Held] = OrderedDict()
        self._lock = threading.Lock()
        self.offer_to: socket.socket | None = None

    def image(self, index: MemoryIndex, chunks: ChunkStore, size: int) -> RamImage:
        """A new fd of the sealed image of ``index``: the cached one, or filled now."""
        iid = image_id(index)
        with self._lock:
            held = self._images.get(iid)
            if held is not None and held.size == size:
                check_sealed(held.fd, size)
                self._images.move_to_end(iid)
                return RamImage(os.dup(held.fd), iid, size, hit=True)
        fd = fill(index, chunks, size)
        if self.offer_to is not None:
            with contextlib.suppress(OSError):  # the server gone: the run goes on
                send_offer(self.offer_to, iid, fd, size)
        kept = os.dup(fd)
        if not self.add(iid, kept, size):
            os.close(kept)
        return RamImage(fd, iid, size, hit=False)

    def add(self, iid: str, fd: int, size: int) -> bool:
        """Keep ``fd`` (checked sealed) as the image of ``iid``; False: not kept, the
        caller still owns ``fd``."""
        check_sealed(fd, size)
        held = _Held(fd, size, resident(fd))
        if held.bytes > self.budget:
            return False
        with self._lock:
            old = self._images.pop(iid, None)
            if old is not None:
                os.close(old.fd)
            self._images[iid] = held
            while sum(h.bytes for h in self._images.values()) > self.budget:
                _, out = self._images.popitem(last=False)
                os.close(out.fd)  # VMs mapping it keep their pages
        return True

    def stats(self) -> tuple[int, int]:
        """(images kept, bytes they hold)."""
        with self._lock:
            return len(self._images), sum(h.bytes for h in self._images.values())

    def fds(self) -> list[int]:
        with self._lock:
            return [h.fd for h in self._images.values()]

    def close(self) -> None:
        with self._lock:
            for held in self._images.values():
                with contextlib.suppress(OSError):
                    os.close(held.fd)
            self._images.clear()


# -- a process's own cache ------------------------------------------------------------------

_installed: RamImageCache | None = None


def install(cache: RamImageCache | None) -> None:
    """Make ``cache`` this process's (the server at start; an embedding process)."""
    global _installed
    _installed = cache


def installed() -> RamImageCache | None:
    return _installed


# -- a handler's offer to its server -----------------------------------------------------------


def encode_offer(iid: str, size: int) -> bytes:
    return f"ram {iid} {size}".encode()


def decode_offer(msg: bytes) -> tuple[str, int]:
    """(index id, size) of one offer message; anything else is a RamImageError."""
    m = _OFFER.fullmatch(msg) if len(msg) <= MAX_OFFER else None
    if m is None:
        raise RamImageError(f"malformed RAM image offer {msg[:MAX_OFFER]!r}")
    size = int(m.group(2))
    if size > MAX_IMAGE or size % CHUNK:
        raise RamImageError(f"RAM image offer of {size} bytes: not whole chunks within 3 GiB")
    return m.group(1).decode(), size


def send_offer(sock: socket.socket, iid: str, fd: int, size: int) -> None:
    socket.send_fds(sock, [encode_offer(iid, size)], [fd])


def receive_offer(sock: socket.socket, cache: RamImageCache) -> str | None:
    """Take one offer from ``sock`` into ``cache``: None at end of stream, else what
    happened, for the log. A bad offer is dropped (its descriptors closed)."""
    try:  # room for more than one descriptor, so that extra ones are closed, not lost
        msg, got, flags, _ = socket.recv_fds(sock, MAX_OFFER + 1, 4)
    except (BlockingIOError, InterruptedError):
        return NO_OFFER
    except OSError:
        return None
    if not msg and not got:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(got) != 1:
            raise RamImageError(f"RAM image offer with {len(got)} descriptors (truncated?)")
        iid, size = decode_offer(msg)
        if not cache.add(iid, got[0], size):
            raise RamImageError(f"RAM image {iid} is larger than the cache's budget")
        count, held = cache.stats()
        return f"kept RAM image {iid[:19]} ({size >> 20} MiB); {count} held, {held >> 20} MiB"
    except RamImageError as exc:
        for fd in got:
            with contextlib.suppress(OSError):
                os.close(fd)
        return f"dropped an offer: {exc}"
