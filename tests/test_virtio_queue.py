"""Split virtqueue against synthetic guest memory: well-formed and hostile rings."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sporevm.vmm.devices.virtio.queue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    ChainError,
    QueueError,
    Segment,
    Virtqueue,
)
from sporevm.vmm.devices.virtio.state import VirtioStateError
from sporevm.vmm.memory import GuestMemory
from tests.virtio_driver import RAM, Allocator, DriverQueue

SIZE = 8


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(RAM)
    yield m
    m.close()


def make_queue(mem: GuestMemory, size: int = SIZE) -> tuple[Virtqueue, DriverQueue, Allocator]:
    alloc = Allocator(mem)
    dq = DriverQueue(mem, alloc, size)
    q = Virtqueue(mem, 256)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = size, dq.desc, dq.avail, dq.used
    assert q.layout_error() is None
    q.ready = True
    q.indirect = True
    return q, dq, alloc


def test_simple_chain_readable_then_writable(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    a = alloc.buf(b"hello ")
    b = alloc.buf(b"world")
    w = alloc(32)
    head = dq.add([(a, 6, False), (b, 5, False), (w, 32, True)])
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain.readable == [Segment(a, 6), Segment(b, 5)]
    assert chain.writable == [Segment(w, 32)]
    assert chain.gather(mem, 0, 100) == b"hello world"
    assert chain.gather(mem, 3, 5) == b"lo wo"
    assert chain.scatter(mem, 30, b"abcdef") == 2  # clipped to the writable part
    assert mem.read(w + 30, 2) == b"ab"
    assert q.pop() is None
    q.push_used(head, 7)
    assert dq.take_used() == [(head, 7)]


def test_avail_and_used_index_wraparound(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    start = 0xFFFF - 2
    q.last_avail_idx = q.used_idx = dq.avail_idx = dq.used_seen = start
    buf = alloc(16)
    heads = []
    for _ in range(6):
        heads.append(dq.add([(buf, 16, True)]))
        chain = q.pop()
        assert chain is not None
        q.push_used(chain.head, 16)
    assert [h for h, _ in dq.take_used()] == heads
    assert q.last_avail_idx == q.used_idx == (start + 6) & 0xFFFF


def test_a_used_batch_publishes_the_index_once_at_its_end(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    buf = alloc(16)
    heads = [dq.add([(buf, 16, True)]) for _ in range(3)]
    with q.used_batch():
        for _ in heads:
            chain = q.pop()
            assert chain is not None
            q.push_used(chain.head, 16)
            assert mem.read_u16(dq.used + 2) == 0  # the driver sees none of it yet
    assert mem.read_u16(dq.used + 2) == 3
    assert [h for h, _ in dq.take_used()] == heads
    # An error inside still publishes what was returned before it; an empty batch writes
    # nothing.
    more = [dq.add([(buf, 16, True)]) for _ in range(2)]
    with pytest.raises(RuntimeError), q.used_batch():
        chain = q.pop()
        assert chain is not None
        q.push_used(chain.head, 1)
        raise RuntimeError("a malformed chain, say")
    assert dq.take_used() == [(more[0], 1)]
    mem.write_u16(dq.used + 2, 0xBEEF)
    with q.used_batch():
        pass
    assert mem.read_u16(dq.used + 2) == 0xBEEF


def test_zero_length_segments_are_dropped(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    w = alloc(8)
    dq.add([(0, 0, False), (w, 0, True), (w, 8, True)])
    chain = q.pop()
    assert chain is not None and chain.readable == [] and chain.writable == [Segment(w, 8)]


def test_descriptor_loop_is_a_chain_error(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    buf = alloc(16)
    dq.write_desc(dq.desc, 0, buf, 16, DESC_F_NEXT, 1)
    dq.write_desc(dq.desc, 1, buf, 16, DESC_F_NEXT, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="loop"):
        q.pop()


def test_self_loop_in_full_table(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem, 256)
    buf = alloc(16)
    for i in range(256):
        dq.write_desc(dq.desc, i, buf, 16, DESC_F_NEXT, (i + 1) % 256)
    dq.publish(5)
    with pytest.raises(ChainError, match="longer than its table"):
        q.pop()


def test_next_out_of_range(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    dq.write_desc(dq.desc, 0, alloc(4), 4, DESC_F_NEXT, SIZE)
    dq.publish(0)
    with pytest.raises(ChainError, match="next index"):
        q.pop()


def test_head_out_of_range(mem: GuestMemory) -> None:
    q, dq, _ = make_queue(mem)
    dq.publish(SIZE)
    with pytest.raises(ChainError, match="head index"):
        q.pop()


@pytest.mark.parametrize(
    "addr,length",
    [(RAM - 4, 8), (RAM, 1), (1 << 63, 16), ((1 << 64) - 1, 0xFFFF_FFFF), (0, 0xFFFF_FFFF)],
)
def test_buffers_outside_ram(mem: GuestMemory, addr: int, length: int) -> None:
    q, dq, _ = make_queue(mem)
    dq.add([(addr, length, True)])
    with pytest.raises(ChainError, match="outside guest RAM"):
        q.pop()


def test_readable_after_writable(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    dq.add([(alloc(4), 4, True), (alloc(4), 4, False)])
    with pytest.raises(ChainError, match="readable descriptor after"):
        q.pop()


def test_avail_idx_jump_beyond_queue_size(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    dq.add([(alloc(4), 4, True)])
    dq.publish(0, idx_step=SIZE + 1)
    with pytest.raises(QueueError, match="more than the queue size"):
        q.pop()


def test_avail_ring_moved_outside_ram(mem: GuestMemory) -> None:
    q, _, _ = make_queue(mem)
    q.avail_addr = RAM - 2  # as a corrupt restore might leave it
    with pytest.raises(QueueError, match="available ring"):
        q.pop()


def test_not_ready_pops_nothing(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    dq.add([(alloc(4), 4, True)])
    q.ready = False
    assert q.pop() is None


def test_indirect_chain(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    r = alloc.buf(b"req")
    w = alloc(64)
    head = dq.add_indirect([(r, 3, False), (w, 64, True)], alloc)
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain.readable == [Segment(r, 3)] and chain.writable == [Segment(w, 64)]


def test_indirect_not_negotiated(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    q.indirect = False
    dq.add_indirect([(alloc(4), 4, True)], alloc)
    with pytest.raises(ChainError, match="not negotiated"):
        q.pop()


def test_nested_indirect(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    inner = alloc(16, 16)
    dq.write_desc(inner, 0, alloc(4), 4, DESC_F_WRITE, 0)
    outer = alloc(16, 16)
    dq.write_desc(outer, 0, inner, 16, DESC_F_INDIRECT, 0)
    dq.write_desc(dq.desc, 0, outer, 16, DESC_F_INDIRECT, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="nested"):
        q.pop()


@pytest.mark.parametrize(
    "addr,length,flags,match",
    [
        (RAM - 16, 32, DESC_F_INDIRECT, "outside guest RAM"),
        (0x8000, 0, DESC_F_INDIRECT, "length 0"),
        (0x8000, 24, DESC_F_INDIRECT, "length 24"),
        (0x8000, 16 * 257, DESC_F_INDIRECT, "length"),
        (0x8008, 16, DESC_F_INDIRECT, "aligned"),
        (0x8000, 16, DESC_F_INDIRECT | DESC_F_NEXT, "whole chain"),
    ],
)
def test_bad_indirect_tables(
    mem: GuestMemory, addr: int, length: int, flags: int, match: str
) -> None:
    q, dq, _ = make_queue(mem)
    dq.write_desc(dq.desc, 0, addr, length, flags, 1)
    dq.publish(0)
    with pytest.raises(ChainError, match=match):
        q.pop()


def test_indirect_after_direct_descriptor(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    table = alloc(16, 16)
    dq.write_desc(table, 0, alloc(4), 4, DESC_F_WRITE, 0)
    dq.write_desc(dq.desc, 0, alloc(4), 4, DESC_F_NEXT, 1)
    dq.write_desc(dq.desc, 1, table, 16, DESC_F_INDIRECT, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="whole chain"):
        q.pop()


def test_indirect_loop(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    table = alloc(32, 16)
    buf = alloc(4)
    dq.write_desc(table, 0, buf, 4, DESC_F_NEXT, 1)
    dq.write_desc(table, 1, buf, 4, DESC_F_NEXT, 0)
    dq.write_desc(dq.desc, 0, table, 32, DESC_F_INDIRECT, 0)
    dq.publish(0)
    with pytest.raises(ChainError, match="loop"):
        q.pop()


def test_full_size_indirect_table(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    buf = alloc(1)
    dq.add_indirect([(buf, 1, True)] * 256, alloc)
    chain = q.pop()
    assert chain is not None and len(chain.writable) == 256


def test_no_interrupt_flag(mem: GuestMemory) -> None:
    q, dq, _ = make_queue(mem)
    assert q.needs_interrupt()
    dq.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    assert not q.needs_interrupt()


def test_layout_errors(mem: GuestMemory) -> None:
    q, _, _ = make_queue(mem)
    q.size = 3
    assert "power of 2" in (q.layout_error() or "")
    q.size = 512
    assert "power of 2" in (q.layout_error() or "")
    q.size = SIZE
    q.desc_addr += 8
    assert "aligned" in (q.layout_error() or "")
    q.desc_addr = RAM - 16
    assert "outside guest RAM" in (q.layout_error() or "")


def test_state_round_trip(mem: GuestMemory) -> None:
    q, dq, alloc = make_queue(mem)
    buf = alloc(4)
    dq.add([(buf, 4, True)])
    dq.add([(buf, 4, True)])
    chain = q.pop()
    assert chain is not None
    q.push_used(chain.head, 4)
    state = q.state()
    other = Virtqueue(mem, 256)
    other.restore(state)
    assert other.state() == state
    second = other.pop()  # continues with the second request
    assert second is not None and second.head == 1


@pytest.mark.parametrize(
    "patch",
    [
        {"size": 0},
        {"size": 512},
        {"size": 1 << 32},
        {"ready": 1},
        {"used_idx": 0x10000},
        {"desc_addr": -1},
        {"desc_addr": True},
        {"avail_addr": RAM},
        {"extra": 1},
    ],
)
def test_restore_rejects_bad_state(mem: GuestMemory, patch: dict[str, object]) -> None:
    q, _, _ = make_queue(mem)
    state = {**q.state(), **patch}
    other = Virtqueue(mem, 256)
    with pytest.raises(VirtioStateError):
        other.restore(state)
    assert not other.ready


def test_restore_keeps_bogus_size_of_unready_queue(mem: GuestMemory) -> None:
    q = Virtqueue(mem, 8)
    q.size = 0xFFFF_FFFF  # the driver may write anything to QueueNum before QueueReady
    other = Virtqueue(mem, 8)
    other.restore(q.state())
    assert other.size == 0xFFFF_FFFF and not other.ready


def test_restore_rejects_non_mapping(mem: GuestMemory) -> None:
    with pytest.raises(VirtioStateError):
        Virtqueue(mem, 8).restore(["size", 8])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(
        st.tuples(
            st.one_of(st.integers(0, RAM + 64), st.integers(0, (1 << 64) - 1)),
            st.one_of(st.integers(0, 64), st.integers(0, 0xFFFF_FFFF)),
            st.integers(0, 0xFFFF),
            st.integers(0, 20),
        ),
        min_size=16,
        max_size=16,
    ),
    ring=st.lists(st.integers(0, 0xFFFF), min_size=16, max_size=16),
    avail_idx=st.integers(0, 0xFFFF),
    last_avail=st.integers(0, 0xFFFF),
    indirect=st.booleans(),
)
def test_random_tables_only_fail_cleanly(
    table: list[tuple[int, int, int, int]],
    ring: list[int],
    avail_idx: int,
    last_avail: int,
    indirect: bool,
) -> None:
    mem = GuestMemory(RAM)
    try:
        q, dq, _ = make_queue(mem, 16)
        q.indirect = indirect
        q.last_avail_idx = last_avail
        for i, (addr, length, flags, nxt) in enumerate(table):
            dq.write_desc(dq.desc, i, addr, length, flags, nxt)
        # Point some descriptors at the table itself, to exercise indirect walks.
        mem.write(0x8000, mem.read(dq.desc, 16 * 16))
        mem.write(dq.avail + 4, struct.pack("<16H", *ring))
        mem.write_u16(dq.avail + 2, avail_idx)
        for _ in range(20):
            try:
                chain = q.pop()
            except QueueError:
                break
            if chain is None:
                break
            total = chain.readable_len + chain.writable_len
            assert len(chain.readable) + len(chain.writable) <= 256
            assert chain.writable_len <= 0xFFFF_FFFF and total >= 0
            chain.gather(mem, 0, 4096)
            chain.scatter(mem, 0, b"x" * 64)
            q.push_used(chain.head, min(chain.writable_len, 64))
    finally:
        mem.close()
