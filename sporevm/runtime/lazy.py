"""Lazy restore: guest RAM is filled on first touch, one verified 2 MiB chunk at a time.

Guest RAM is registered with a userfaultfd in missing mode before anything
touches it. Two kinds of touch reach us:

* the guest, or KVM on its behalf (page walks, kvmclock, steal time): the vCPU
  thread faults inside KVM_RUN, which ctypes entered *without* the GIL, and the
  kernel queues a fault message. The pager thread here reads it, fetches the
  chunk through ``ChunkStore.get`` (BLAKE3-verified), and UFFDIO_COPYs all of it
  in, which wakes the vCPU.
* the VMM itself (virtio rings, blk data, the console, capture). Those run in
  Python threads that hold the GIL; a fault there would block the thread in
  the kernel *with the GIL held*, and the pager (a Python thread) could never
  run to serve it: deadlock. So they never fault: every VMM access goes through
  GuestMemory's bounds check, whose ``populate`` hook fills the chunks of the
  range in the calling thread first (same fetch, verify, UFFDIO_COPY). Once
  every chunk is present the hook removes itself.

Fail closed. A chunk that is missing or does not hash to its id is never
copied in: the pager records the error, calls ``on_error`` (the monitor reports
it and ends the VM process; a vCPU waiting on that chunk can otherwise wait in
the kernel forever) and serves nothing more. The same holds for *any* failure
of a fill or of the pager thread (an I/O error, a corrupt entry that cannot be
evicted, a bug): each becomes one ChunkError naming the chunk, never a pager
thread that dies and leaves the vCPU parked. A VMM access to such a chunk
raises the ChunkError, which the run loop turns into a VmmFault.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
from collections.abc import Callable

from sporevm.spore.chunks import CHUNK, ChunkError, ChunkStore, MemoryIndex
from sporevm.vmm.memory import PAGE, GuestMemory, open_userfaultfd, uffd_ioctl

UFFDIO_WAKE = 0x8010AA02  # _IOR(0xAA, 0x02, struct uffdio_range)
UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)
UFFDIO_ZEROPAGE = 0xC020AA04  # _IOWR(0xAA, 0x04, struct uffdio_zeropage)
UFFD_EVENT_PAGEFAULT = 0x12
MSG_SIZE = 32  # struct uffd_msg


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("zeropage", ctypes.c_int64),
    ]


class LazyPager:
    """Serves missing-page faults on ``mem`` from ``index``'s verified chunks."""

    def __init__(
        self,
        mem: GuestMemory,
        index: MemoryIndex,
        chunks: ChunkStore,
        *,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if index.chunk_size != CHUNK or index.memory_size != mem.size:
            raise ChunkError(
                f"memory index covers {index.memory_size} bytes; guest RAM is {mem.size}"
            )
        self.mem, self.index, self.chunks, self.on_error = mem, index, chunks, on_error
        self.present = bytearray(len(index.chunks))
        self.missing = len(index.chunks)
        self.faults = 0  # chunks filled for a fault message (the rest: VMM accesses)
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # one fill at a time: a chunk is copied exactly once
        self._zeropage = True
        # One chunk-sized buffer, filled (and verified) in place for every fault: a
        # fresh 2 MiB bytes object per fault is an mmap and 512 page faults each time
        # (~2 ms of a ~4 ms fill here, measured).
        self._buf = bytearray(CHUNK)
        self._view = memoryview(self._buf)
        self.uffd = open_userfaultfd()
        try:
            mem.register_userfaultfd(self.uffd)
        except BaseException:
            os.close(self.uffd)
            raise
        self.base = mem.address()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="lazy-pager", daemon=True)
        self._thread.start()
        mem.populate = self.populate
        mem.on_close.append(self.stop)

    # --- filling -----------------------------------------------------------------------
    def populate(self, gpa: int, length: int) -> None:
        """GuestMemory's hook: make [gpa, gpa+length) present without faulting."""
        if self.missing == 0:
            self.mem.populate = None  # everything is in: plain memory from now on
            return
        for c in range(gpa // CHUNK, (gpa + length - 1) // CHUNK + 1):
            if not self.present[c]:
                self.fill(c)

    def populate_all(self) -> None:
        """Fill every missing chunk (a prefetch, or before a snapshot reads all of RAM)."""
        self.populate(0, self.mem.size)

    def fill(self, c: int) -> None:
        with self._lock:
            if self.error is not None:
                raise self.error
            try:
                self._fill(c)
            except Exception as exc:  # noqa: BLE001 - every failure fails closed (docstring)
                err = self._chunk_error(c, exc)
                self._fail(err)
                raise err from None

    def _fill(self, c: int) -> None:
        if self.present[c]:
            self._ioctl(UFFDIO_WAKE, UffdioRange(self.base + c * CHUNK, CHUNK))
            return
        cid = self.index.chunks[c]
        if cid is None:
            self._zero(c)
        else:
            self.chunks.read_into(cid, self._view)  # verified before anything is copied in
            self._copy(c)
        self.present[c] = 1
        self.missing -= 1

    def _chunk_error(self, c: int, exc: Exception) -> ChunkError:
        """One line naming chunk ``c`` for any failure to fill it (I/O, corruption, a bug)."""
        cid = self.index.chunks[c] or "zeros"
        if isinstance(exc, ChunkError):
            return ChunkError(f"guest RAM chunk {c} ({cid}) failed verification: {exc}")
        if isinstance(exc, OSError):
            return ChunkError(
                f"guest RAM chunk {c} ({cid}): cannot map it in: {exc.strerror or exc}"
            )
        return ChunkError(
            f"guest RAM chunk {c} ({cid}): the pager failed: internal error "
            f"({type(exc).__name__}: {exc}); please report this bug"
        )

    def _copy(self, c: int) -> None:
        """UFFDIO_COPY the fill buffer to chunk ``c``; pages that appeared meanwhile
        (EEXIST) are skipped."""
        src = ctypes.addressof((ctypes.c_char * CHUNK).from_buffer(self._buf))
        dst = self.base + c * CHUNK
        done = 0
        while done < CHUNK:
            arg = UffdioCopy(dst + done, src + done, CHUNK - done, 0, 0)
            try:
                self._ioctl(UFFDIO_COPY, arg)
                return
            except OSError as exc:
                # The kernel stops at the first present page: EAGAIN with ``copy`` = bytes
                # done before it, or EEXIST (copy < 0) when it is the very first page.
                if exc.errno == errno.EEXIST:
                    done += PAGE
                elif exc.errno == errno.EAGAIN:
                    done += max(0, int(arg.copy))
                else:
                    raise

    def _zero(self, c: int) -> None:
        if self._zeropage:
            try:
                self._ioctl(UFFDIO_ZEROPAGE, UffdioZeropage(self.base + c * CHUNK, CHUNK, 0, 0))
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._zeropage = False  # not on this backing: copy zeros instead
        self._view[:] = bytes(CHUNK)
        self._copy(c)

    def _ioctl(self, request: int, arg: ctypes.Structure) -> None:
        uffd_ioctl(self.uffd, request, arg)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            if self.on_error is not None:
                self.on_error(exc)

    # --- the pager thread --------------------------------------------------------------
    def _serve(self) -> None:
        """The pager thread. Whatever ends it ends the VM (``_fail``): a vCPU waiting
        for a fill it will never get would otherwise wait in the kernel forever."""
        try:
            self._serve_faults()
        except Exception as exc:  # noqa: BLE001 - fill() failed (and said so) or a bug
            self._fail(
                exc
                if isinstance(exc, ChunkError)
                else ChunkError(
                    f"the pager failed: internal error ({type(exc).__name__}: {exc}); "
                    "please report this bug"
                )
            )

    def _serve_faults(self) -> None:
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.uffd, MSG_SIZE * 64)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ChunkError(f"reading the userfaultfd: {exc.strerror}") from None
            for off in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
                if data[off] != UFFD_EVENT_PAGEFAULT:
                    continue
                (address,) = struct.unpack_from("<Q", data, off + 16)
                c = (address - self.base) // CHUNK
                if not 0 <= c < len(self.present):
                    continue
                if not self.present[c]:
                    self.faults += 1
                self.fill(c)  # raises once failed closed: faulting threads stay parked

    def stop(self) -> None:
        """End the pager thread and drop the userfaultfd (the RAM is about to go away)."""
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        for fd in (self._stop_w, self._stop_r, self.uffd):
            os.close(fd)
        self._stop_w = self._stop_r = self.uffd = -1


def start_pager(
    mem: GuestMemory,
    index: MemoryIndex,
    chunks: ChunkStore,
    *,
    on_error: Callable[[BaseException], None] | None = None,
) -> LazyPager:
    """Register ``mem`` and start serving it from ``index`` (a RamLoader body)."""
    return LazyPager(mem, index, chunks, on_error=on_error)
