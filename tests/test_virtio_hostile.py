"""A hostile guest against every virtqueue device and the virtio-mmio transport.

Hypothesis builds random descriptor tables, indirect tables and available
rings in synthetic guest RAM (descriptor loops, chains longer than the queue,
addresses outside RAM or on the MMIO window, zero and huge lengths, jumping
indices, garbage flags) next to well-formed requests, then plays a random
sequence of driver actions against a real transport: kicks (also of reset,
unready and non-existent queues), register reads and writes of any width and
offset, device resets, index jumps, descriptors rewritten between kicks, host
console traffic, host network frames (any length) and net channel flushes. After
every single action:

- no exception escaped the transport (reads return exactly the access width);
- the action finished inside a hard per-call deadline (SIGALRM aborts a hang);
- every byte of guest RAM that changed lies in a buffer some descriptor marks
  device-writable or in the used ring, and its page is marked VMM-dirty (so a
  snapshot sees it); the blk backing file never changes;
- a kick either served everything the driver posted (used index advanced by as
  many chains as were consumed) or left the device in DEVICE_NEEDS_RESET, and a
  kick on a stopped device or queue changed nothing;
- the transport's invariants hold (DRIVER_OK => FEATURES_OK => VERSION_1, a
  ready queue's layout lies in RAM, the IRQ line follows InterruptStatus), and
  its snapshot restores into a fresh transport unchanged.

Deterministic (derandomize) so CI sees the same cases every run.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sporevm.vmm.devices.virtio import blk as blkmod
from sporevm.vmm.devices.virtio import mmio
from sporevm.vmm.devices.virtio.blk import BlkDevice
from sporevm.vmm.devices.virtio.console import ConsoleDevice
from sporevm.vmm.devices.virtio.device import F_INDIRECT_DESC, F_VERSION_1, VirtioDevice
from sporevm.vmm.devices.virtio.net import NetDevice
from sporevm.vmm.devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from sporevm.vmm.devices.virtio.rng import RngDevice
from sporevm.vmm.memory import PAGE, GuestMemory
from tests.virtio_driver import RecordingIrq

EXAMPLES = int(os.environ.get("SPORE_HOSTILE_EXAMPLES", "2000"))
DEADLINE_S = 5.0  # per call; generous for a loaded 2-core CI box, a hang never ends

RAM = 0x20000
MMIO_BASE = 0xD000_0000  # where the transport window would be; never guest RAM
CTRL, CTRL_STRIDE, CTRL_QUEUES = 0x1000, 0x3000, 5  # queue i: desc, +0x1000 avail, +0x2000 used
INDIRECT, INDIRECT_STRIDE, INDIRECT_TABLES = 0x10000, 0x400, 4
DATA, SLOT, SLOTS = 0x14000, 0x400, 48
DISK = 64 * blkmod.SECTOR
CAPACITY = DISK // blkmod.SECTOR
# The disk's bytes read as u64 are far outside RAM, so blk data landing on a
# descriptor table makes a dead descriptor rather than a new valid buffer.
DISK_BYTES = bytes(0x80 | (i * 37 & 0x7F) for i in range(DISK))
U64 = (1 << 64) - 1

HOSTILE_ADDRS = [
    0,
    RAM - 1,
    RAM - 16,
    RAM,
    RAM + 16,
    MMIO_BASE,
    MMIO_BASE + mmio.REG_QUEUE_NOTIFY,
    MMIO_BASE + 0xFF0,
    1 << 32,
    (1 << 63),
    U64 - 15,
    U64,
]
HOSTILE_LENS = [0, 1, 15, 16, 17, 511, 512, 513, SLOT, RAM, 1 << 31, 0xFFFF_FFFF]
REGS = [v for k, v in vars(mmio).items() if k.startswith("REG_")]


class Hang(BaseException):
    """Raised by SIGALRM: a BaseException so no `except SporeError` can swallow it."""


def _alarm(_sig: int, _frame: FrameType | None) -> None:
    raise Hang(f"a device call ran longer than {DEADLINE_S} s")


@pytest.fixture(autouse=True, scope="module")
def _alarm_handler() -> Iterator[None]:
    old = signal.signal(signal.SIGALRM, _alarm)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


_disk_fd = os.memfd_create("hostile-disk", os.MFD_CLOEXEC)
os.write(_disk_fd, DISK_BYTES)
_null_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
NET_MAC = bytes.fromhex("525400000001")
slowest = [0.0]  # worst single call seen, for the report


def timed(fn: Callable[..., Any], *args: Any, deadline: float = DEADLINE_S) -> Any:
    signal.setitimer(signal.ITIMER_REAL, deadline)
    t0 = time.monotonic()
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        slowest[0] = max(slowest[0], time.monotonic() - t0)


# --- scenarios ----------------------------------------------------------------------------
# Hypothesis draws one byte string and Reader decodes it into a scenario: ~10x
# cheaper per example than composing hundreds of small strategies, and it still
# shrinks (shorter and smaller bytes decode to simpler, more benign scenarios).

Desc = tuple[int, int, int, int]  # addr, len, flags, next
GOOD_FLAGS = [0, DESC_F_NEXT, DESC_F_WRITE, DESC_F_NEXT | DESC_F_WRITE, DESC_F_INDIRECT]
BLK_TYPES = [blkmod.T_IN] * 4 + [blkmod.T_OUT, blkmod.T_FLUSH, blkmod.T_GET_ID, 3]
FEATURES = [F_VERSION_1 | F_INDIRECT_DESC] * 6 + [F_VERSION_1, F_INDIRECT_DESC]
VALUES = [0, 1, 2, 3, 0xB, 0xF, 0x40, 0xFF, 0x1000, 0xFFFF_FFFF]
WIDTHS = [4, 4, 4, 1, 2, 8, 0, 3]
OPS = [
    "kick",
    "publish",
    "reg",
    "read",
    "status0",
    "unready",
    "poke",
    "send",
    "pause",
    "restart",
    "kick",
    "publish",
]
REGISTER_OPS = ["reg", "reg", "read", "kick", "status0", "restart", "publish"]


class Reader:
    """Decodes bytes into choices; reads past the end are zeros (the benign choice)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def uint(self, nbytes: int) -> int:
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk, "little")

    def below(self, n: int) -> int:
        return self.uint(1 if n <= 256 else 2) % n

    def pick(self, seq: list[Any]) -> Any:
        return seq[self.below(len(seq))]


def read_desc(r: Reader) -> Desc:
    kind = r.below(8)
    if kind < 4:
        addr = DATA + r.below(SLOTS) * SLOT + r.pick([0, 0, 1, 8, 600])
    elif kind == 4:
        addr = INDIRECT + r.below(INDIRECT_TABLES) * INDIRECT_STRIDE
    elif kind == 5:
        addr = r.pick(HOSTILE_ADDRS)
    else:
        addr = r.uint(3) % (RAM + 64) if kind == 6 else r.uint(8)
    kind = r.below(4)
    length = (
        r.uint(2) % (2 * SLOT + 1) if kind < 2 else r.pick(HOSTILE_LENS) if kind == 2 else r.uint(4)
    )
    fl = r.pick(GOOD_FLAGS) if r.below(4) < 3 else r.uint(2)
    nxt = r.below(18) if r.below(2) == 0 else r.uint(2)
    return addr, length, fl, nxt


@dataclass
class QueueSpec:
    size: int
    desc: int
    avail: int
    used: int
    good: list[list[tuple[int, int, bool]]]  # well-formed chains, laid out first
    table: list[Desc]  # tiled over the rest of the table
    heads: list[int]  # tiled over the avail ring
    avail_flags: int
    posted: int  # initial available index


Template = Callable[[Reader], list[tuple[int, bool]]]  # (length, device-writable) per segment


def blk_request(r: Reader) -> list[tuple[int, bool]]:
    data = [(r.pick([512, 1024, 512, 0, 20]), True) for _ in range(r.below(3))]
    return [(16, False), *data, (1, True)]


def device_buffer(writable: bool) -> Template:
    return lambda r: [(r.pick([SLOT, 64, 1, 4 * SLOT]), writable) for _ in range(1 + r.below(2))]


def net_tx(r: Reader) -> list[tuple[int, bool]]:
    """A virtio-net transmit: the 12-byte header, then a frame (sometimes in one buffer)."""
    n = r.pick([14, 60, 200, SLOT, 1, 0])
    return [(12 + n, False)] if r.below(2) else [(12, False), (n, False)]


# Per device, per queue: the request a well-behaved driver would post.
TEMPLATES: dict[type[VirtioDevice], list[Template]] = {
    BlkDevice: [blk_request],
    ConsoleDevice: [device_buffer(True), device_buffer(False)],
    RngDevice: [device_buffer(True)],
    NetDevice: [device_buffer(True), net_tx],
}


def read_queue(r: Reader, index: int, max_size: int, template: Template) -> QueueSpec:
    kind = r.below(16)
    if kind < 14:
        size = r.pick([n for n in (16, 8, 4, 2, 1, 16, max_size) if n <= max_size])
    else:
        size = r.pick([0, 3, max_size * 2]) if kind == 14 else r.uint(4)
    base = CTRL + (index % CTRL_QUEUES) * CTRL_STRIDE
    rings = [base, base + 0x1000, base + 0x2000]
    if r.below(20) == 19:  # hostile layout: unaligned, outside RAM, on the MMIO window
        rings = [
            x if r.below(2) else (r.pick(HOSTILE_ADDRS) if r.below(2) else r.uint(3) % RAM)
            for x in rings
        ]
    good = []
    for _ in range(1 + r.below(4)):
        if r.below(8) < 6:  # what a real driver posts on this queue, at random slots
            chain = [(r.below(SLOTS), n, w) for n, w in template(r)]
        else:
            chain = [
                (r.below(SLOTS), r.pick([16, 16, 1, 512, 1024, 3]), bool(r.below(2)))
                for _ in range(1 + r.below(4))
            ]
            if r.below(8):
                chain.sort(key=lambda seg: seg[2])  # readable first, as a real driver does
        good.append(chain)
    table = [read_desc(r) for _ in range(1 + r.below(12))]
    # A negative head -k-1 names the k-th well-formed chain (resolved when laid out).
    heads = [
        -1 - r.below(4) if r.below(8) < 6 else r.below(16) if r.below(2) else r.uint(2)
        for _ in range(1 + r.below(8))
    ]
    posted = min(size, 16) - r.below(min(size, 16) + 1) if r.below(8) else r.uint(2)
    desc, avail, used = rings
    return QueueSpec(size, desc, avail, used, good, table, heads, r.pick([0, 0, 1, 0xFFFF]), posted)


def read_op(r: Reader, nqueues: int, kinds: list[str]) -> tuple[Any, ...]:
    kind = r.pick(kinds)
    q = r.below(nqueues) if r.below(4) else r.uint(4)
    if kind in ("kick", "unready"):
        return kind, q
    if kind == "publish":
        return kind, r.below(nqueues), r.below(4) if r.below(8) else r.uint(2)
    if kind in ("reg", "read"):
        k = r.below(3)
        off = (
            r.pick(REGS)
            if k == 0
            else r.uint(2) % 0x1200
            if k == 1
            else mmio.CONFIG_OFFSET + r.below(0x48)
        )
        width = r.pick(WIDTHS)
        if kind == "read":
            return kind, off, width
        return kind, off, width, r.pick(VALUES) if r.below(2) else r.uint(4)
    if kind == "poke":
        return kind, r.below(nqueues), r.below(16), read_desc(r)
    if kind == "send":
        return kind, r.uint(2) % 3001
    if kind == "pause":
        return kind, bool(r.below(2))
    return (kind,)


@dataclass
class Scenario:
    features: int
    queues: list[QueueSpec]
    headers: list[tuple[int, int]]  # blk request headers planted at every slot
    seed: int  # the rest of the data slots
    ops: list[tuple[Any, ...]]


def read_scenario(data: bytes, device: type[VirtioDevice], register_heavy: bool) -> Scenario:
    r = Reader(data)
    sizes = device.queue_max_sizes
    features = r.pick(FEATURES) if r.below(16) < 15 else r.uint(8)
    tpl = TEMPLATES.get(device, [])
    queues = [
        read_queue(r, i, n, tpl[i] if i < len(tpl) else device_buffer(i % 2 == 0))
        for i, n in enumerate(sizes)
    ]
    headers = [
        (
            r.pick(BLK_TYPES) if r.below(4) else r.uint(4),
            r.below(CAPACITY + 1) if r.below(4) else r.pick([CAPACITY - 1, CAPACITY + 1, U64]),
        )
        for _ in range(1 + r.below(6))
    ]
    seed = r.uint(4)
    kinds = REGISTER_OPS if register_heavy else OPS
    ops = [read_op(r, len(sizes), kinds) for _ in range(r.below(25))]
    return Scenario(features, queues, headers, seed, ops)


# --- the guest ----------------------------------------------------------------------------


def pack_desc(d: Desc) -> bytes:
    addr, length, fl, nxt = d
    return struct.pack("<QIHH", addr & U64, length & 0xFFFF_FFFF, fl & 0xFFFF, nxt & 0xFFFF)


def lay_out(mem: GuestMemory, sc: Scenario) -> None:
    """Write data slots, blk headers, indirect tables and every queue's rings into RAM."""
    rnd = random.Random(sc.seed)
    mem.write(DATA, rnd.randbytes(SLOTS * SLOT))
    for s in range(SLOTS):
        rtype, sector = sc.headers[s % len(sc.headers)]
        mem.write(DATA + s * SLOT, struct.pack("<IIQ", rtype, 0, sector))
    # Indirect tables: copies of the first queue's template, so NEXT links stay short.
    for k in range(INDIRECT_TABLES):
        tpl = sc.queues[k % len(sc.queues)].table
        tab = b"".join(pack_desc(tpl[(k + j) % len(tpl)]) for j in range(INDIRECT_STRIDE // 16))
        mem.write(INDIRECT + k * INDIRECT_STRIDE, tab)
    for i, qs in enumerate(sc.queues):
        base = CTRL + (i % CTRL_QUEUES) * CTRL_STRIDE
        n = 256  # fill the whole control area: a bad QueueNum still reads our bytes
        table: list[Desc] = []
        starts = []
        for chain in qs.good:
            starts.append(len(table))
            for j, (slot, length, writable) in enumerate(chain):
                last = j == len(chain) - 1
                fl = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
                table.append((DATA + slot * SLOT, length, fl, 0 if last else len(table) + 1))
        while len(table) < n:
            table.append(qs.table[len(table) % len(qs.table)])
        mem.write(base, b"".join(pack_desc(d) for d in table[:n]))
        ring = [qs.heads[j % len(qs.heads)] for j in range(n)]
        ring = [starts[(-h - 1) % len(starts)] if h < 0 and starts else max(h, 0) for h in ring]
        mem.write(base + 0x1000, struct.pack(f"<HH{n}H", qs.avail_flags, qs.posted, *ring))


class Guest:
    """Drives one transport as a (hostile) driver and checks every step."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, sc: Scenario) -> None:
        self.dev, self.mem, self.sc = device, mem, sc
        self.irq = RecordingIrq()
        self.t = mmio.VirtioMmio(device, mem, self.irq, base=MMIO_BASE)
        self.avail_idx = [qs.posted for qs in sc.queues]

    def w32(self, off: int, value: int) -> None:
        timed(self.t.write, off, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def bring_up(self) -> None:
        self.w32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        for sel in (0, 1):
            self.w32(mmio.REG_DRIVER_FEATURES_SEL, sel)
            self.w32(mmio.REG_DRIVER_FEATURES, self.sc.features >> (32 * sel))
        self.w32(mmio.REG_STATUS, 0xB)
        for i, qs in enumerate(self.sc.queues):
            self.w32(mmio.REG_QUEUE_SEL, i)
            self.w32(mmio.REG_QUEUE_NUM, qs.size)
            for reg, addr in (
                (mmio.REG_QUEUE_DESC_LOW, qs.desc),
                (mmio.REG_QUEUE_DRIVER_LOW, qs.avail),
                (mmio.REG_QUEUE_DEVICE_LOW, qs.used),
            ):
                self.w32(reg, addr)
                self.w32(reg + 4, addr >> 32)
            self.w32(mmio.REG_QUEUE_READY, 1)
        self.w32(mmio.REG_STATUS, 0xF)

    def allowed(self, img: bytes) -> list[tuple[int, int]]:
        """Ranges the device may write given RAM image ``img``: used rings, and buffers that a
        descriptor (in any table the device could walk) marks device-writable; merged, sorted."""
        out: list[tuple[int, int]] = []
        tables = {
            (INDIRECT + k * INDIRECT_STRIDE, INDIRECT_STRIDE // 16) for k in range(INDIRECT_TABLES)
        }
        for q in self.t.queues:
            n = min(q.size, 256) if q.size else 256
            out.append((q.used_addr, q.used_addr + 6 + 8 * n))
            tables.add((q.desc_addr, n))
        tables.update((qs.desc, 256) for qs in self.sc.queues)
        seen: set[tuple[int, int]] = set()
        while tables:
            addr, n = tables.pop()
            seen.add((addr, n))
            n = min(n, max(0, (len(img) - addr) // 16))
            for a, ln, fl, _ in struct.iter_unpack("<QIHH", img[addr : addr + 16 * n]):
                if fl & DESC_F_WRITE:
                    out.append((a, a + ln))
                if fl & DESC_F_INDIRECT and a % 16 == 0 and (a, min(ln // 16, 256)) not in seen:
                    tables.add((a, min(ln // 16, 256)))
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(out):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    def check_writes(self, before: bytes) -> None:
        after = self.mem.read(0, self.mem.size)
        if after == before:
            return
        # Descriptors the device itself rewrote count too (their writable buffers as well).
        allowed = self.allowed(before) + self.allowed(after)
        allowed.sort()
        starts = [lo for lo, _ in allowed]
        ends = list(itertools.accumulate((hi for _, hi in allowed), max))
        for page in range(0, self.mem.size, PAGE):
            if after[page : page + PAGE] == before[page : page + PAGE]:
                continue
            assert self.mem.vmm_dirty[page // PAGE], f"page {page:#x} changed but is not dirty"
            for piece in range(page, page + PAGE, 64):
                if after[piece : piece + 64] == before[piece : piece + 64]:
                    continue
                for off in range(piece, piece + 64):
                    if after[off] != before[off]:
                        i = bisect.bisect_right(starts, off) - 1
                        assert i >= 0 and ends[i] > off, (
                            f"device wrote {off:#x}, outside every writable buffer and used ring"
                        )

    def check_transport(self) -> None:
        t, st_ = self.t, self.t.status
        assert st_ & ~(0xFF) == 0
        if st_ & mmio.STATUS_DRIVER_OK:
            assert st_ & mmio.STATUS_FEATURES_OK
        if st_ & mmio.STATUS_FEATURES_OK:
            assert t.driver_features & F_VERSION_1
            assert t.driver_features & ~t.offered_features == 0
        if self.dev.active:
            assert st_ & mmio.STATUS_DRIVER_OK and not st_ & mmio.STATUS_NEEDS_RESET
        for q in t.queues:
            if q.ready:
                assert q.layout_error() is None
        assert t.interrupt_status & ~3 == 0
        assert self.irq.level == (t.interrupt_status != 0)

    def act(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        t, dev = self.t, self.dev
        if kind == "publish":
            # The driver may post more than a ring holds, or jump the index anywhere.
            _, i, n = op
            i %= len(self.avail_idx)
            self.avail_idx[i] = (self.avail_idx[i] + n) & 0xFFFF
            base = CTRL + (i % CTRL_QUEUES) * CTRL_STRIDE + 0x1000
            self.mem.write_u16(base + 2, self.avail_idx[i])
            return
        if kind == "poke":
            _, i, idx, d = op
            self.mem.write(CTRL + (i % CTRL_QUEUES) * CTRL_STRIDE + 16 * idx, pack_desc(d))
            return
        if kind == "restart":  # the guest's own part: fresh indices, before the check window
            self.avail_idx = [0] * len(self.avail_idx)
            for i in range(len(self.sc.queues)):
                self.mem.write_u16(CTRL + (i % CTRL_QUEUES) * CTRL_STRIDE + 0x1000 + 2, 0)
        self.mem.vmm_dirty[:] = bytes(len(self.mem.vmm_dirty))
        before = self.mem.read(0, self.mem.size)
        live = dev.active and not t.needs_reset_pending
        if kind == "kick":
            q = op[1]
            queue = t.queues[q] if q < len(t.queues) else None
            served = live and queue is not None and queue.ready
            if served:
                assert queue is not None
                avail = self.mem.read_u16(queue.avail_addr + 2)
                last, used = queue.last_avail_idx, queue.used_idx
            self.w32(mmio.REG_QUEUE_NOTIFY, q)
            if not served:
                assert self.mem.read(0, self.mem.size) == before, "a stopped queue changed RAM"
            elif not t.needs_reset_pending:
                assert queue is not None
                consumed = (queue.last_avail_idx - last) & 0xFFFF
                assert (queue.used_idx - used) & 0xFFFF == consumed, "popped chain not returned"
                if self._drains(q):
                    assert queue.last_avail_idx == avail, "kick left posted requests behind"
        elif kind == "reg":
            _, off, width, value = op
            timed(t.write, off, value.to_bytes(8, "little")[:width])
        elif kind == "read":
            _, off, width = op
            assert len(timed(t.read, off, width)) == width
        elif kind == "status0":
            self.w32(mmio.REG_STATUS, 0)
            assert not dev.active and t.status == 0
        elif kind == "unready":
            self.w32(mmio.REG_QUEUE_SEL, op[1])
            self.w32(mmio.REG_QUEUE_READY, 0)
        elif kind == "send" and isinstance(dev, ConsoleDevice):
            data = bytes(range(256)) * (op[1] // 256 + 1)
            room = dev.host_buffer - dev.pending
            assert timed(dev.send, data[: op[1]]) == min(room, op[1])
            assert dev.pending <= dev.host_buffer
        elif kind == "pause" and isinstance(dev, ConsoleDevice):
            timed(dev.resume_output if op[1] else dev.pause_output)
        elif kind == "send" and isinstance(dev, NetDevice):
            n = op[1] % 1100  # mtu 1000: mostly frames that fit, some runts and oversize
            data = (bytes(range(256)) * 5)[:n]
            c0 = dev.counters
            queued = timed(dev.receive, data)
            c1 = dev.counters
            drops = sum(
                c1[k] - c0[k]
                for k in ("rx_dropped_queue_full", "rx_dropped_inactive", "rx_dropped_bad_length")
            )
            assert drops == (0 if queued else 1), "a refused frame must be counted once"
            assert dev.rx_pending <= dev.rx_backlog
        elif kind == "pause" and isinstance(dev, NetDevice):
            timed(dev.flush)  # the writer thread's round: makes room, takes stalled chains
            assert dev.tx_pending == 0
        elif kind == "restart":
            self.w32(mmio.REG_STATUS, 0)
            self.bring_up()
        self.check_writes(before)
        self.check_transport()

    def _drains(self, q: int) -> bool:
        """Does a kick on queue q consume everything posted (vs. waiting for host data)?"""
        if isinstance(self.dev, ConsoleDevice):
            if q == 0:  # with MULTIPORT, bytes wait for the guest to open the port
                return self.dev.pending > 0 and self.dev.port_open
            if q >= 2:  # the control queues exist only with MULTIPORT
                return self.dev.multiport and (q == 3 or self.dev.control_pending > 0)
            return not self.dev.tx_paused
        if isinstance(self.dev, NetDevice):
            if q == 0:
                return self.dev.rx_pending > 0
            return not self.dev.tx_stalled
        return True

    def finish(self) -> None:
        state = timed(self.t.state)
        other = mmio.VirtioMmio(
            make_device(type(self.dev)), self.mem, RecordingIrq(), base=MMIO_BASE
        )
        timed(other.restore, state)
        assert other.state() == state
        assert os.pread(_disk_fd, DISK + 1, 0) == DISK_BYTES, "blk wrote its read-only disk"
        assert self.mem.size == RAM and self.mem.backing == "anonymous", "guest RAM changed"


def make_device(kind: type[VirtioDevice]) -> VirtioDevice:
    if kind is BlkDevice:
        return BlkDevice(_disk_fd, DISK, serial=b"hostile")
    if kind is ConsoleDevice:
        out: list[bytes] = []

        def sink(piece: bytes) -> None:
            assert 0 < len(piece) <= 64 * 1024
            out.append(piece)

        return ConsoleDevice(sink, host_buffer=4096)
    if kind is NetDevice:  # a channel that takes anything: flush never blocks
        return NetDevice(_null_fd, NET_MAC, mtu=1000, rx_backlog=8)
    return kind()


def run(kind: type[VirtioDevice], sc: Scenario) -> None:
    mem = GuestMemory(RAM)
    try:
        lay_out(mem, sc)
        g = Guest(make_device(kind), mem, sc)
        g.bring_up()
        g.check_transport()
        kicks = [("kick", q) for q in range(len(g.t.queues))]
        for op in [*kicks, *sc.ops, *kicks]:  # serve what was posted, misbehave, kick again
            g.act(op)
        g.finish()
    finally:
        mem.close()


blobs = st.binary(min_size=256, max_size=640)  # a scenario reads ~200-550 bytes
HOSTILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize(
    "kind", [BlkDevice, ConsoleDevice, RngDevice, NetDevice], ids=["blk", "console", "rng", "net"]
)
@HOSTILE
@given(data=blobs)
def test_hostile_guest(kind: type[VirtioDevice], data: bytes) -> None:
    run(kind, read_scenario(data, kind, False))


@HOSTILE
@given(data=blobs)
def test_hostile_guest_mmio_registers(data: bytes) -> None:
    kind = [BlkDevice, ConsoleDevice, RngDevice, NetDevice][data[0] % 4 if data else 0]
    run(kind, read_scenario(data[1:], kind, True))


def test_refused_feature_bits_do_not_break_the_snapshot() -> None:
    """Found by test_hostile_guest[blk]: a driver that writes unoffered feature bits (and is
    refused FEATURES_OK) left a snapshot that restore rejected."""
    mem = GuestMemory(RAM)
    try:
        t = mmio.VirtioMmio(make_device(BlkDevice), mem, RecordingIrq())
        t.write(mmio.REG_DRIVER_FEATURES, (1).to_bytes(4, "little"))
        t.write(mmio.REG_STATUS, (0xB).to_bytes(4, "little"))
        assert not t.status & mmio.STATUS_FEATURES_OK
        other = mmio.VirtioMmio(make_device(BlkDevice), mem, RecordingIrq())
        other.restore(t.state())
        assert other.state() == t.state()
    finally:
        mem.close()


def test_deadline_alarm_catches_a_hang() -> None:
    """The per-call deadline is real: a call that never returns is aborted, not waited for."""

    def spin() -> None:
        while True:
            pass

    with pytest.raises(Hang):
        timed(spin, deadline=0.05)
