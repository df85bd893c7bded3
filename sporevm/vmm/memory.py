"""Guest RAM: one memfd mapping, bounds-checked access, and VMM-write dirty tracking.

Guest memory is hostile input. Every access from device code goes through
``read``/``write``/``view`` here, which check ``gpa`` and ``length`` against
RAM and raise GuestMemoryError (never IndexError or a crash) when a guest
hands us an address or length outside it.

KVM's dirty log does not see writes the VMM makes itself (virtio used rings,
blk reads, the agent channel), so ``write`` and ``view(writable=True)`` mark
the 4 KiB pages they touch in ``vmm_dirty``; snapshots OR that into KVM's log.
"""

from __future__ import annotations

import mmap
import os

from sporevm.errors import SporeError

PAGE = 4096


class GuestMemoryError(SporeError):
    """A guest-supplied address or length lies outside guest RAM."""


class GuestMemory:
    def __init__(self, size: int, *, name: str = "spore-guest-ram") -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest RAM size {size} is not a positive multiple of {PAGE}")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mv = memoryview(self.mmap)
        self.vmm_dirty = bytearray(size // PAGE)  # 1 = the VMM wrote this page

    def close(self) -> None:
        self._mv.release()
        self.mmap.close()
        os.close(self.fd)

    def address(self) -> int:
        """Host virtual address of guest physical 0 (for KVM_SET_USER_MEMORY_REGION)."""
        import ctypes

        buf = (ctypes.c_char * 1).from_buffer(self.mmap)
        addr = ctypes.addressof(buf)
        del buf
        return addr

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(
                f"guest range [{gpa:#x}, +{length:#x}) is outside guest RAM ({self.size:#x})"
            )

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
