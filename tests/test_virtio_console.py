"""virtio-console, one port: byte streams both ways, bounds, backpressure, snapshots."""

from __future__ import annotations

import json
import threading
import time

import pytest

from sporevm.vmm.devices.virtio import console, mmio
from sporevm.vmm.devices.virtio.console import ConsoleDevice
from sporevm.vmm.devices.virtio.state import VirtioStateError
from tests.virtio_driver import Driver, DriverQueue, RecordingIrq, make


def bring_up(
    dev: ConsoleDevice,
) -> tuple[mmio.VirtioMmio, Driver, RecordingIrq, DriverQueue, DriverQueue]:
    t, d, irq = make(dev)
    rx, tx = d.bring_up(2)
    return t, d, irq, rx, tx


def post_rx(d: Driver, rx: DriverQueue, n: int, size: int) -> list[int]:
    bufs = [d.alloc(size) for _ in range(n)]
    for b in bufs:
        rx.add([(b, size, True)])
    d.kick(console.RX_QUEUE)
    return bufs


def test_identity_and_config() -> None:
    t, d, _, _, _ = bring_up(ConsoleDevice())
    assert d.r32(mmio.REG_DEVICE_ID) == 3
    assert d.device_features() & 0b111 == 0  # no SIZE, MULTIPORT, EMERG_WRITE
    assert t.read(0x104, 4) == (1).to_bytes(4, "little")  # max_nr_ports


def test_guest_to_host() -> None:
    out: list[bytes] = []
    _, d, irq, _, tx = bring_up(ConsoleDevice(out.append))
    a, b = d.alloc.buf(b"hello, "), d.alloc.buf(b"host\n")
    tx.add([(a, 7, False), (b, 5, False)])
    d.kick(console.TX_QUEUE)
    assert b"".join(out) == b"hello, host\n"
    assert tx.take_used() == [(0, 0)] and irq.level


def test_large_tx_chain_is_delivered_in_bounded_pieces() -> None:
    out: list[bytes] = []
    _, d, _, _, tx = bring_up(ConsoleDevice(out.append))
    data = bytes(range(256)) * 1024  # 256 KiB in one descriptor
    tx.add([(d.alloc.buf(data), len(data), False)])
    d.kick(console.TX_QUEUE)
    assert b"".join(out) == data
    assert max(len(p) for p in out) <= console.TX_PIECE


def test_oversized_tx_chain_resets_device() -> None:
    out: list[bytes] = []
    t, d, _, _, tx = bring_up(ConsoleDevice(out.append))
    buf = d.alloc(console.MAX_TX_CHAIN // 4)
    tx.add([(buf, console.MAX_TX_CHAIN // 4, False)] * 5)
    d.kick(console.TX_QUEUE)
    assert out == [] and t.needs_reset_pending and "transmit buffer" in t.error


def test_host_to_guest_waits_for_buffers() -> None:
    dev = ConsoleDevice()
    _, d, irq, rx, _ = bring_up(dev)
    assert dev.send(b"abcdefghij") == 10
    assert dev.pending == 10 and not irq.level
    bufs = post_rx(d, rx, 3, 4)
    assert [d.mem.read(b, 4) for b in bufs[:2]] == [b"abcd", b"efgh"]
    assert d.mem.read(bufs[2], 2) == b"ij"
    assert rx.take_used() == [(0, 4), (1, 4), (2, 2)]
    assert dev.pending == 0 and irq.level


def test_host_to_guest_delivered_immediately_when_buffers_wait() -> None:
    dev = ConsoleDevice()
    _, d, _, rx, _ = bring_up(dev)
    (buf,) = post_rx(d, rx, 1, 64)
    assert rx.take_used() == []
    dev.send(b"ping")
    assert rx.take_used() == [(0, 4)] and d.mem.read(buf, 4) == b"ping"


def test_send_before_driver_ok_is_buffered() -> None:
    dev = ConsoleDevice()
    t, d, _ = make(dev)
    dev.send(b"early")
    rx, _ = d.bring_up(2)
    (buf,) = post_rx(d, rx, 1, 16)
    assert d.mem.read(buf, 5) == b"early"
    del t


def test_host_buffer_bound_and_on_writable() -> None:
    woken: list[int] = []
    dev = ConsoleDevice(host_buffer=8, on_writable=lambda: woken.append(1))
    _, d, _, rx, _ = bring_up(dev)
    assert dev.send(b"0123456789") == 8
    assert dev.send(b"x") == 0
    post_rx(d, rx, 1, 3)
    assert woken == [1] and dev.pending == 5
    assert dev.send(b"xyz") == 3


def test_pause_output_leaves_buffers_in_ring() -> None:
    out: list[bytes] = []
    dev = ConsoleDevice(out.append)
    _, d, _, _, tx = bring_up(dev)
    dev.pause_output()
    tx.add([(d.alloc.buf(b"later"), 5, False)])
    d.kick(console.TX_QUEUE)
    assert out == [] and tx.take_used() == []
    dev.resume_output()
    assert out == [b"later"] and tx.take_used() == [(0, 0)]


def test_hostile_rx_buffer_resets_device_not_host() -> None:
    dev = ConsoleDevice()
    t, d, irq, rx, _ = bring_up(dev)
    rx.add([(d.mem.size - 2, 16, True)])
    d.kick(console.RX_QUEUE)  # nothing pending: chain not looked at yet
    assert not t.needs_reset_pending
    assert dev.send(b"data") == 4  # host thread: must not raise
    assert t.needs_reset_pending and irq.level
    assert dev.send(b"more") == 4 and dev.pending == 8  # still buffered, not delivered


def test_rx_chain_with_only_readable_segments_gets_nothing() -> None:
    dev = ConsoleDevice()
    _, d, _, rx, _ = bring_up(dev)
    dev.send(b"abc")
    rx.add([(d.alloc(8), 8, False)])
    (buf,) = post_rx(d, rx, 1, 8)
    assert rx.take_used() == [(0, 0), (1, 3)] and d.mem.read(buf, 3) == b"abc"


def test_reset_keeps_pending_host_bytes() -> None:
    dev = ConsoleDevice()
    _, d, _, _, _ = bring_up(dev)
    dev.send(b"keep")
    d.w32(mmio.REG_STATUS, 0)
    rx, _ = d.bring_up(2)
    (buf,) = post_rx(d, rx, 1, 8)
    assert d.mem.read(buf, 4) == b"keep"


def test_snapshot_carries_pending_bytes() -> None:
    dev = ConsoleDevice()
    t, d, _, rx, _ = bring_up(dev)
    dev.send(b"in flight")
    dev.pause_output()
    state = json.loads(json.dumps(t.state()))
    assert state["device"] == {"pending": b"in flight".hex(), "tx_paused": True}

    dev2 = ConsoleDevice()
    t2 = mmio.VirtioMmio(dev2, t.mem, RecordingIrq())
    t2.restore(state)
    assert dev2.pending == 9 and dev2.tx_paused
    buf = d.alloc(16)
    rx.add([(buf, 16, True)])
    t2.notify_queue(console.RX_QUEUE)
    assert d.mem.read(buf, 9) == b"in flight"


def test_restore_rejects_non_canonical_hex() -> None:
    t, _, _ = make(ConsoleDevice())
    state = t.state()
    for bad in (" 70", "7G", "7", "AB"):
        state["device"] = {"pending": bad, "tx_paused": False}
        with pytest.raises(VirtioStateError, match="hex"):
            t.restore(state)


def test_host_thread_send_while_guest_drains() -> None:
    """send() from a host thread races guest kicks on the vCPU side; bytes stay in order."""
    data = bytes(i % 251 for i in range(20000))
    dev = ConsoleDevice(host_buffer=1000)
    _, d, _, rx, _ = bring_up(dev)

    def writer() -> None:
        pos = 0
        while pos < len(data):
            n = dev.send(data[pos : pos + 300])
            pos += n
            if not n:
                time.sleep(0.0005)

    th = threading.Thread(target=writer)
    th.start()
    got = bytearray()
    deadline = time.monotonic() + 20
    bufs: dict[int, int] = {}
    while len(got) < len(data) and time.monotonic() < deadline:
        if not bufs:
            for _ in range(8):
                addr = d.alloc(64)
                bufs[rx.add([(addr, 64, True)])] = addr
            d.kick(console.RX_QUEUE)
        for head, n in rx.take_used():
            got += d.mem.read(bufs.pop(head), n)
    th.join(5)
    assert bytes(got) == data
