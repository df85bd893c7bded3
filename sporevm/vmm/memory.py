"""Guest RAM: a 2 MiB-aligned anonymous mapping, bounds-checked access, VMM-write dirty tracking.

Guest memory is hostile input. Every access from device code goes through
``read``/``write``/``view`` here, which check ``gpa`` and ``length`` against
RAM and raise GuestMemoryError (never IndexError or a crash) when a guest
hands us an address or length outside it.

KVM's dirty log does not see writes the VMM makes itself (virtio used rings,
blk reads, the agent channel), so ``write`` and ``view(writable=True)`` mark
the 4 KiB pages they touch in ``vmm_dirty``; snapshots OR that into KVM's log.

RAM is private anonymous memory with transparent huge pages asked for, at a host
address congruent to guest physical 0 modulo 2 MiB: the mapping is 2 MiB larger
than RAM and RAM starts at its first 2 MiB-aligned address. KVM maps a guest
2 MiB page with one nested-page-table entry only where host and guest addresses
agree modulo 2 MiB and the host page is huge (docs/bench.md, "Nested page
faults"); a memfd (shmem, 4 KiB pages) or an unaligned mapping keeps it at
4 KiB and costs thousands of nested page faults per boot. Nothing shares RAM by
descriptor, so there is no memfd.

Backings (docs/restore.md). A restore may swap that for a file mapped
MAP_PRIVATE at the *same* address (``map_file_private``: the KVM memslot keeps
pointing at it, clean pages are shared with every other mapping of the file,
writes stay private), or register the range with a userfaultfd
(``register_userfaultfd``) and fill it on demand. For the latter, ``populate``
is called with every range the VMM is about to touch, so that a Python thread
(which holds the GIL) never page-faults on missing guest RAM: the Python pager
thread that would serve the fault could never run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Callable

from sporevm.errors import SporeError

PAGE = 4096
HUGE = 2 << 20  # a transparent huge page, and the alignment of guest RAM

# userfaultfd(2) ABI, x86_64 (linux/userfaultfd.h).
SYS_USERFAULTFD = 323
UFFD_API = 0xAA
USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0x00) on /dev/userfaultfd
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_REGISTER_MODE_MISSING = 1
_UFFDIO_COPY_BIT = 1 << 0x03  # ioctls bitmask bit for UFFDIO_COPY

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long
_MAP_FIXED = 0x10
_MADV_HUGEPAGE = 14
_MAP_FAILED = ctypes.c_void_p(-1).value


class UffdApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRegister(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


def uffd_ioctl(fd: int, request: int, arg: ctypes.Structure) -> None:
    """ioctl through ctypes, so the GIL is released while the kernel works."""
    if _libc.ioctl(fd, request, ctypes.addressof(arg)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd ioctl {request:#x}: {os.strerror(err)}")


def open_userfaultfd() -> int:
    """A non-blocking, close-on-exec userfaultfd with the API handshake done.

    Non-blocking because poll(2) reports EPOLLERR on a blocking userfaultfd.

    The syscall first (needs CAP_SYS_PTRACE unless vm.unprivileged_userfaultfd=1);
    /dev/userfaultfd otherwise. Not UFFD_USER_MODE_ONLY: KVM's own accesses to guest
    RAM are kernel-mode faults and must reach the pager too.
    """
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    fd = int(_libc.syscall(SYS_USERFAULTFD, flags))
    if fd < 0:
        first = ctypes.get_errno()
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise GuestMemoryError(
                f"userfaultfd unavailable (syscall: {os.strerror(first)}; /dev/userfaultfd: "
                f"{e.strerror}); use another restore strategy"
            ) from None
        try:
            fd = int(_libc.ioctl(dev, USERFAULTFD_IOC_NEW, flags))
            err = ctypes.get_errno()
        finally:
            os.close(dev)
        if fd < 0:
            raise GuestMemoryError(f"/dev/userfaultfd: {os.strerror(err)}")
    try:
        uffd_ioctl(fd, UFFDIO_API, UffdApi(UFFD_API, 0, 0))
    except OSError as e:
        os.close(fd)
        raise GuestMemoryError(f"userfaultfd API handshake failed: {e.strerror}") from None
    return fd


class GuestMemoryError(SporeError):
    """A guest-supplied address or length lies outside guest RAM."""


class GuestMemory:
    def __init__(self, size: int) -> None:
        """``size`` bytes of private anonymous RAM, zero-filled, 2 MiB-aligned (module doc)."""
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest RAM size {size} is not a positive multiple of {PAGE}")
        self.size = size
        # Mapped HUGE larger than RAM; RAM is [offset, offset + size) of it, the rest is
        # never touched (address space only) and goes when the whole mapping is unmapped.
        self.mmap = mmap.mmap(
            -1,
            size + HUGE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            mmap.PROT_READ | mmap.PROT_WRITE,
        )
        buf = (ctypes.c_char * 1).from_buffer(self.mmap)
        start = ctypes.addressof(buf)
        del buf
        self._offset = -start % HUGE
        self._base = start + self._offset
        with contextlib.suppress(OSError):  # THP off or unsupported: 4 KiB pages
            self.mmap.madvise(_MADV_HUGEPAGE)
        self._whole = memoryview(self.mmap)
        self._mv = self._whole[self._offset : self._offset + size]
        self.vmm_dirty = bytearray(size // PAGE)  # 1 = the VMM wrote this page
        # Called with (gpa, length) before the VMM touches a range (lazy restore).
        self.populate: Callable[[int, int], None] | None = None
        self.on_close: list[Callable[[], None]] = []  # e.g. stop a pager first
        self.backing = "anonymous"

    def close(self) -> None:
        """Drop the RAM; never raises because a view of it is still alive.

        close() runs in cleanup paths, often while an exception propagates whose
        traceback still holds views of this RAM (a chunk being read into it, say):
        a BufferError from here would replace that error. Such a mapping is unmapped
        by the garbage collector once nothing refers to it any more.
        """
        try:
            for fn in self.on_close:
                fn()
        finally:
            self.on_close = []
            for mv in (self._mv, self._whole):
                with contextlib.suppress(BufferError):
                    mv.release()
            with contextlib.suppress(BufferError):
                self.mmap.close()  # the whole mapping, alignment slack included

    def address(self) -> int:
        """Host virtual address of guest physical 0 (for KVM_SET_USER_MEMORY_REGION);
        a multiple of 2 MiB."""
        return self._base

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(
                f"guest range [{gpa:#x}, +{length:#x}) is outside guest RAM ({self.size:#x})"
            )
        if self.populate is not None and length:
            self.populate(gpa, length)

    def map_file_private(self, fd: int) -> None:
        """Back all of RAM by ``fd`` (exactly ``size`` bytes) mapped MAP_PRIVATE, in place.

        MAP_FIXED over our own mapping keeps the host address, so the KVM memslot
        registered at creation now reads the file: clean pages come from (and are
        shared through) the page cache, guest and VMM writes are copied on write
        and never reach the file. Call it before the VM first runs.
        """
        if os.fstat(fd).st_size != self.size:
            raise GuestMemoryError(f"memory file is {os.fstat(fd).st_size} bytes, RAM {self.size}")
        addr = self._base
        got = _libc.mmap(
            addr, self.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0
        )
        if got == _MAP_FAILED or got != addr:
            err = ctypes.get_errno()
            raise GuestMemoryError(f"cannot map the memory file: {os.strerror(err)}")
        self.backing = "file"

    def register_userfaultfd(self, uffd: int) -> None:
        """Register all of RAM with ``uffd`` in missing mode (before anything touches it)."""
        reg = UffdioRegister(self._base, self.size, UFFDIO_REGISTER_MODE_MISSING, 0)
        try:
            uffd_ioctl(uffd, UFFDIO_REGISTER, reg)
        except OSError as e:
            hint = " (RAM already touched?)" if e.errno == errno.EBUSY else ""
            raise GuestMemoryError(f"UFFDIO_REGISTER of guest RAM: {e.strerror}{hint}") from None
        if not reg.ioctls & _UFFDIO_COPY_BIT:
            raise GuestMemoryError("userfaultfd cannot UFFDIO_COPY into guest RAM here")
        self.backing = "userfaultfd"

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return bytes(self._mv[gpa : gpa + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        self.check(gpa, length)
        self._mv[gpa : gpa + length] = data
        self.mark_dirty(gpa, length)

    def view(self, gpa: int, length: int, *, writable: bool = False) -> memoryview:
        """Zero-copy access; a writable view marks its pages dirty up front."""
        self.check(gpa, length)
        if writable:
            self.mark_dirty(gpa, length)
            return self._mv[gpa : gpa + length]
        return self._mv[gpa : gpa + length].toreadonly()

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(2, "little"))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def mark_dirty(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first, last = gpa // PAGE, (gpa + length - 1) // PAGE
        self.vmm_dirty[first : last + 1] = b"\x01" * (last - first + 1)
