"""Split virtqueues (virtio 1.2 §2.7) over hostile guest memory.

The driver owns the descriptor table and the available ring; both are read
here as untrusted bytes. Every descriptor is fetched once and copied into a
DescriptorChain before any device looks at it (no double fetch), every segment
is checked against guest RAM while the chain is walked, and every walk is
bounded by a descriptor count, so a hostile table can neither loop nor make us
allocate more than a few KiB.

Failures are QueueError (the ring itself is unusable) or ChainError (one chain
is malformed). The transport turns both into DEVICE_NEEDS_RESET; they never
leave the device layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from sporevm.errors import SporeError
from sporevm.spore.vmstate import VIRTIO_QUEUE_FIELDS
from sporevm.vmm.memory import GuestMemory, GuestMemoryError

from .state import State, VirtioStateError, expect_keys, get_bool, get_int

MAX_QUEUE_SIZE = 256
MAX_INDIRECT = 256  # entries in one indirect table (4 KiB); Linux needs seg_max + 2
U32_MAX = 0xFFFF_FFFF

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16

_STATE_KEYS = set(VIRTIO_QUEUE_FIELDS)  # the spore VM-state schema's (the format's)


class QueueError(SporeError):
    """The queue's rings are unusable (out of RAM, bad index); the device needs a reset."""


class ChainError(QueueError):
    """One descriptor chain is malformed (loop, too long, bad indirect, bad order, bad range)."""

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(f"descriptor chain at head {head}: {reason}")
        self.head = head


@dataclass(frozen=True)
class Segment:
    addr: int
    length: int


@dataclass
class DescriptorChain:
    """A popped chain: device-readable segments, then device-writable ones."""

    head: int
    readable: list[Segment] = field(default_factory=list)
    writable: list[Segment] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(s.length for s in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(s.length for s in self.writable)

    def gather(self, mem: GuestMemory, offset: int, length: int) -> bytes:
        """Up to ``length`` readable bytes starting ``offset`` bytes into the readable part.

        Callers pass an explicit bound: the copy is never sized by the guest alone.
        """
        out = bytearray()
        for addr, n in _slices(self.readable, offset, length):
            out += mem.view(addr, n)
        return bytes(out)

    def scatter(self, mem: GuestMemory, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` into the writable part at ``offset``; returns bytes written (clipped)."""
        done = 0
        for addr, n in _slices(self.writable, offset, len(data)):
            mem.write(addr, data[done : done + n])
            done += n
        return done

    def writable_views(self, mem: GuestMemory, offset: int, length: int) -> list[memoryview]:
        """Zero-copy writable views (pages marked dirty) covering [offset, offset+length)."""
        return [mem.view(a, n, writable=True) for a, n in _slices(self.writable, offset, length)]


def _slices(segments: list[Segment], offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(addr, len) pieces of the byte range [offset, offset+length) of a segment list."""
    pos = 0
    end = offset + length
    for seg in segments:
        if pos >= end:
            return
        lo, hi = max(offset, pos), min(end, pos + seg.length)
        if lo < hi:
            yield seg.addr + (lo - pos), hi - lo
        pos += seg.length


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Virtqueue:
    """Device side of one split virtqueue. Addresses and size come from the transport."""

    def __init__(self, mem: GuestMemory, max_size: int) -> None:
        if not _is_pow2(max_size) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue max size {max_size} must be a power of 2 <= 256")
        self.mem = mem
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.last_avail_idx = 0  # next avail ring slot we will consume (free-running u16)
        self.used_idx = 0  # next used ring slot we will fill (free-running u16)
        self.indirect = False  # VIRTIO_F_INDIRECT_DESC negotiated
        self._batching = False  # inside used_batch(): the used index is written at its end

    def layout_error(self) -> str | None:
        """Why the driver's size/addresses cannot be used, or None if they can."""
        if not _is_pow2(self.size) or self.size > self.max_size:
            return f"queue size {self.size} is not a power of 2 <= {self.max_size}"
        n = self.size
        rings = (
            ("descriptor table", self.desc_addr, 16, DESC_SIZE * n),
            ("available ring", self.avail_addr, 2, 6 + 2 * n),
            ("used ring", self.used_addr, 4, 6 + 8 * n),
        )
        for name, addr, align, length in rings:
            if addr % align:
                return f"{name} address {addr:#x} is not {align}-byte aligned"
            if addr + length > self.mem.size:
                return f"{name} [{addr:#x}, +{length:#x}) is outside guest RAM"
        return None

    # -- driver -> device -------------------------------------------------

    def has_pending(self) -> bool:
        return self._avail_idx() != self.last_avail_idx

    def _avail_idx(self) -> int:
        try:
            return self.mem.read_u16(self.avail_addr + 2)
        except GuestMemoryError as e:
            raise QueueError(f"available ring unreadable: {e}") from None

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has posted nothing new."""
        if not self.ready:
            return None
        avail_idx = self._avail_idx()
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise QueueError(
                f"available index {avail_idx} is {pending} ahead of {self.last_avail_idx}, "
                f"more than the queue size {self.size}"
            )
        slot = self.avail_addr + 4 + 2 * (self.last_avail_idx % self.size)
        try:
            head = self.mem.read_u16(slot)
        except GuestMemoryError as e:
            raise QueueError(f"available ring unreadable: {e}") from None
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return self._walk(head)

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise ChainError(head, f"head index {head} >= queue size {self.size}")
        chain = DescriptorChain(head)
        self._walk_table(chain, self.desc_addr, self.size, head, top=True)
        if chain.writable_len > U32_MAX:
            raise ChainError(head, "writable length does not fit the used ring's u32")
        return chain

    def _walk_table(
        self, chain: DescriptorChain, table: int, entries: int, first: int, *, top: bool
    ) -> None:
        """Follow NEXT links from ``first`` in a table of ``entries`` descriptors.

        At most ``entries`` descriptors are visited, so any loop is caught as
        "chain longer than its table" without keeping a visited set.
        """
        idx = first
        for count in range(entries):
            try:
                raw = self.mem.read(table + DESC_SIZE * idx, DESC_SIZE)
            except GuestMemoryError as e:
                raise ChainError(chain.head, f"descriptor {idx} unreadable: {e}") from None
            addr = int.from_bytes(raw[0:8], "little")
            length = int.from_bytes(raw[8:12], "little")
            flags = int.from_bytes(raw[12:14], "little")
            nxt = int.from_bytes(raw[14:16], "little")
            if flags & DESC_F_INDIRECT:
                self._indirect(chain, addr, length, flags, top=top, pos=count)
                return
            self._add_segment(chain, addr, length, flags)
            if not flags & DESC_F_NEXT:
                return
            if nxt >= entries:
                raise ChainError(chain.head, f"next index {nxt} >= table size {entries}")
            idx = nxt
        raise ChainError(chain.head, f"chain longer than its table ({entries}): loop or overrun")

    def _indirect(
        self, chain: DescriptorChain, addr: int, length: int, flags: int, *, top: bool, pos: int
    ) -> None:
        if not self.indirect:
            raise ChainError(chain.head, "indirect descriptor but INDIRECT_DESC not negotiated")
        if not top:
            raise ChainError(chain.head, "nested indirect descriptor")
        # Only a lone head may be indirect: what Linux does, and it keeps the
        # total chain bound at one table's worth.
        if pos != 0 or flags & DESC_F_NEXT:
            raise ChainError(chain.head, "indirect descriptor must be the whole chain")
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
            raise ChainError(chain.head, f"indirect table length {length} invalid")
        if addr % DESC_SIZE:
            # Not required by the spec, but an unaligned table is a driver bug.
            raise ChainError(chain.head, f"indirect table {addr:#x} not 16-byte aligned")
        try:
            self.mem.check(addr, length)
        except GuestMemoryError as e:
            raise ChainError(chain.head, f"indirect table: {e}") from None
        self._walk_table(chain, addr, length // DESC_SIZE, 0, top=False)

    def _add_segment(self, chain: DescriptorChain, addr: int, length: int, flags: int) -> None:
        try:
            self.mem.check(addr, length)
        except GuestMemoryError as e:
            raise ChainError(chain.head, f"buffer {e}") from None
        if flags & DESC_F_WRITE:
            if length:
                chain.writable.append(Segment(addr, length))
            return
        if chain.writable:
            raise ChainError(chain.head, "device-readable descriptor after a device-writable one")
        if length:
            chain.readable.append(Segment(addr, length))

    # -- device -> driver -------------------------------------------------

    def push_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes filled in (published
        at once, or at the end of the enclosing ``used_batch``)."""
        if not 0 <= written <= U32_MAX:
            raise ValueError(f"used length {written} out of range")
        elem = self.used_addr + 4 + 8 * (self.used_idx % self.size)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        try:
            self.mem.write(elem, head.to_bytes(4, "little") + written.to_bytes(4, "little"))
        except GuestMemoryError as e:
            raise QueueError(f"used ring unwritable: {e}") from None
        if not self._batching:
            self._publish_used()

    def _publish_used(self) -> None:
        # The elements must be visible before the index; x86 keeps store order.
        try:
            self.mem.write_u16(self.used_addr + 2, self.used_idx)
        except GuestMemoryError as e:
            raise QueueError(f"used ring unwritable: {e}") from None

    @contextlib.contextmanager
    def used_batch(self) -> Iterator[None]:
        """``push_used`` calls inside write their elements only; the used index is
        written once, at the end, also when the batch ends in an error (what was
        returned stays returned). The caller holds the device lock throughout, so a
        snapshot never sees a batch half published."""
        start, self._batching = self.used_idx, True
        try:
            yield
        finally:
            self._batching = False
            if self.used_idx != start:
                self._publish_used()

    def needs_interrupt(self) -> bool:
        """False while the driver asks for no used-buffer interrupts (AVAIL_F_NO_INTERRUPT)."""
        try:
            return not self.mem.read_u16(self.avail_addr) & AVAIL_F_NO_INTERRUPT
        except GuestMemoryError:
            return True

    # -- snapshot ---------------------------------------------------------

    def state(self) -> State:
        return {
            "size": self.size,
            "ready": self.ready,
            "desc_addr": self.desc_addr,
            "avail_addr": self.avail_addr,
            "used_addr": self.used_addr,
            "last_avail_idx": self.last_avail_idx,
            "used_idx": self.used_idx,
            "indirect": self.indirect,
        }

    def restore(self, state: object, where: str = "queue") -> None:
        """Load ``state()`` output; raises VirtioStateError and leaves the queue reset if bad."""
        s = expect_keys(state, where, _STATE_KEYS)
        u64 = (1 << 64) - 1
        fields = (
            # Any u32 the driver wrote to QueueNum; checked by layout_error() if ready.
            get_int(s, where, "size", 0, U32_MAX),
            get_bool(s, where, "ready"),
            get_int(s, where, "desc_addr", 0, u64),
            get_int(s, where, "avail_addr", 0, u64),
            get_int(s, where, "used_addr", 0, u64),
            get_int(s, where, "last_avail_idx", 0, 0xFFFF),
            get_int(s, where, "used_idx", 0, 0xFFFF),
            get_bool(s, where, "indirect"),
        )
        (
            self.size,
            self.ready,
            self.desc_addr,
            self.avail_addr,
            self.used_addr,
            self.last_avail_idx,
            self.used_idx,
            self.indirect,
        ) = fields
        if self.ready and (err := self.layout_error()) is not None:
            self.reset()
            raise VirtioStateError(f"{where}: {err}")
