"""virtio-net over a frame channel: framing, bounds, exhaustion, reset, link, snapshots."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from sporevm.egress import frames as egress_frames
from sporevm.vmm.devices.virtio import mmio, net
from sporevm.vmm.devices.virtio.device import F_VERSION_1
from sporevm.vmm.devices.virtio.net import NetDevice
from sporevm.vmm.devices.virtio.state import VirtioStateError
from tests.virtio_driver import Driver, DriverQueue, RecordingIrq, make

MAC = bytes.fromhex("52540012ab56")
HDR = net.HDR


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def frame(n: int, fill: int = 0xAB) -> bytes:
    """An Ethernet frame of n bytes: broadcast destination, our MAC, IPv4 ethertype."""
    return (b"\xff" * 6 + MAC + b"\x08\x00" + bytes([fill]) * n)[:n]


def bring_up(
    dev: NetDevice,
) -> tuple[mmio.VirtioMmio, Driver, RecordingIrq, DriverQueue, DriverQueue]:
    t, d, irq = make(dev)
    rx, tx = d.bring_up(2)
    return t, d, irq, rx, tx


def post_rx(d: Driver, rx: DriverQueue, n: int, size: int) -> list[int]:
    bufs = [d.alloc(size) for _ in range(n)]
    for b in bufs:
        rx.add([(b, size, True)])
    d.kick(net.RX_QUEUE)
    return bufs


def send_tx(d: Driver, tx: DriverQueue, f: bytes, *, split: bool = True) -> int:
    hdr = d.alloc.buf(bytes(HDR))
    if split:  # header and frame in separate descriptors, as Linux may post them
        return tx.add([(hdr, HDR, False), (d.alloc.buf(f), len(f), False)])
    return tx.add([(d.alloc.buf(bytes(HDR) + f), HDR + len(f), False)])


def read_frames(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    """Frames from the peer end, parsed by the gateway's own reader."""
    reader = egress_frames.FrameReader()
    out: list[bytes] = []
    sock.settimeout(timeout)
    while len(out) < count:
        out += reader.feed(sock.recv(1 << 16))
    return out


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_identity_features_and_config(pair: tuple[socket.socket, socket.socket]) -> None:
    t, d, _ = make(NetDevice(pair[0].fileno(), MAC, mtu=9000))
    assert d.r32(mmio.REG_DEVICE_ID) == 1
    feats = d.device_features()
    assert feats & (net.F_MAC | net.F_MTU | net.F_STATUS | F_VERSION_1) == (
        net.F_MAC | net.F_MTU | net.F_STATUS | F_VERSION_1
    )
    assert feats & ((1 << 0) | (1 << 15) | (1 << 7) | (1 << 17)) == 0  # CSUM, MRG, TSO, CTRL
    assert t.read(0x100, 8)[:6] == MAC
    assert struct.unpack("<HHH", bytes(t.read(0x106, 2) + t.read(0x108, 2) + t.read(0x10A, 2))) == (
        net.S_LINK_UP,
        1,
        9000,
    )
    plain = NetDevice(pair[0].fileno(), MAC, link_status=False)
    assert plain.features() == net.F_MAC and plain.config()[10:12] == b"\0\0"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mac": bytes(6)},
        {"mac": b"\x01" * 6},
        {"mac": MAC[:5]},
        {"mtu": 67},
        {"mtu": 65523},
        {"rx_backlog": 0},
        {"rx_backlog": 257},
    ],
)
def test_constructor_bounds(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"mac": MAC, **kwargs}
    mac = args.pop("mac")
    assert isinstance(mac, bytes)
    with pytest.raises(ValueError):
        NetDevice(0, mac, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("split", [True, False])
def test_tx_strips_header_and_frames_for_the_gateway(
    pair: tuple[socket.socket, socket.socket], split: bool
) -> None:
    dev = NetDevice(pair[0].fileno(), MAC)
    _, d, irq, _, tx = bring_up(dev)
    f1, f2 = frame(60), frame(1514, 0x11)
    h1, h2 = send_tx(d, tx, f1, split=split), send_tx(d, tx, f2, split=split)
    d.kick(net.TX_QUEUE)
    assert tx.take_used() == [(h1, 0), (h2, 0)] and irq.level
    assert dev.tx_pending == 2 and dev.flush() == 2
    assert read_frames(pair[1], 2) == [f1, f2]
    assert dev.counters["tx_frames"] == 2


def test_tx_bad_lengths_are_dropped_and_returned(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC)
    t, d, _, _, tx = bring_up(dev)
    runt = send_tx(d, tx, frame(13))  # header + 13: not even an Ethernet header
    big = d.alloc(net.MAX_TX_CHAIN + 1)
    huge = tx.add([(big, net.MAX_TX_CHAIN + 1, False)])
    ok = send_tx(d, tx, frame(14))
    d.kick(net.TX_QUEUE)
    assert tx.take_used() == [(runt, 0), (huge, 0), (ok, 0)] and not t.needs_reset_pending
    assert dev.counters["tx_dropped_bad_length"] == 2 and dev.flush() == 1
    assert read_frames(pair[1], 1) == [frame(14)]


def test_tx_backpressure_leaves_chains_in_ring(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC)
    _, d, _, _, tx = bring_up(dev)
    n = net.TX_BACKLOG + 10
    f = frame(60)
    one = d.alloc.buf(bytes(HDR) + f)
    for _ in range(n):
        tx.add([(one, HDR + len(f), False)])
    d.kick(net.TX_QUEUE)
    assert len(tx.take_used()) == net.TX_BACKLOG and dev.tx_stalled
    assert dev.flush() == net.TX_BACKLOG  # makes room and takes the rest from the ring
    assert len(tx.take_used()) == 10 and not dev.tx_stalled
    assert dev.flush() == 10
    assert read_frames(pair[1], n) == [f] * n


def test_rx_writes_zeroed_header_and_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC)
    _, d, irq, rx, _ = bring_up(dev)
    (buf,) = post_rx(d, rx, 1, HDR + 1514)
    f = frame(1514, 0x42)
    assert dev.receive(f)
    assert rx.take_used() == [(0, HDR + 1514)] and irq.level
    got = d.mem.read(buf, HDR + 1514)
    assert got[:HDR] == bytes(10) + b"\x01\x00" and got[HDR:] == f
    assert dev.counters["rx_frames"] == 1


def test_rx_chain_too_short_drops_the_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC)
    t, d, _, rx, _ = bring_up(dev)
    small, big = post_rx(d, rx, 1, HDR + 59)[0], post_rx(d, rx, 1, HDR + 60)[0]
    before = d.mem.read(small, HDR + 59)
    dev.receive(frame(60, 1))  # one byte too many for the first chain: dropped
    dev.receive(frame(60, 2))
    assert rx.take_used() == [(0, 0), (1, HDR + 60)] and not t.needs_reset_pending
    assert d.mem.read(small, HDR + 59) == before and d.mem.read(big + HDR, 60) == frame(60, 2)
    assert dev.counters["rx_dropped_short_buffer"] == 1


def test_rx_bad_lengths_are_dropped(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC, mtu=1000)
    _, d, _, rx, _ = bring_up(dev)
    post_rx(d, rx, 2, 4096)
    assert not dev.receive(frame(13)) and not dev.receive(frame(1015))
    assert dev.receive(frame(1014))
    assert rx.take_used() == [(0, HDR + 1014)]
    assert dev.counters["rx_dropped_bad_length"] == 2


def test_rx_exhaustion_waits_then_drops(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC, rx_backlog=4)
    _, d, _, rx, _ = bring_up(dev)
    accepted = [dev.receive(frame(60, i)) for i in range(6)]
    assert accepted == [True] * 4 + [False] * 2 and dev.rx_pending == 4
    assert dev.counters["rx_dropped_queue_full"] == 2
    bufs = post_rx(d, rx, 5, 128)
    assert [n for _, n in rx.take_used()] == [HDR + 60] * 4 and dev.rx_pending == 0
    assert [d.mem.read(b + HDR, 60) for b in bufs[:4]] == [frame(60, i) for i in range(4)]
    dev.receive(frame(60, 9))  # the fifth buffer still waits in the ring
    assert rx.take_used() == [(4, HDR + 60)]


def test_rx_byte_bound(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC, mtu=net.MAX_MTU)
    bring_up(dev)
    big = frame(net.MAX_FRAME)
    kept = sum(dev.receive(big) for _ in range(80))
    assert kept == net.RX_BACKLOG_BYTES // net.MAX_FRAME
    assert dev.counters["rx_dropped_queue_full"] == 80 - kept


def test_reset_drops_waiting_frames_and_inactive_drops(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    dev = NetDevice(pair[0].fileno(), MAC)
    t, d, _ = make(dev)
    assert not dev.receive(frame(60))  # before DRIVER_OK: no NIC to receive on
    rx, _ = d.bring_up(2)
    dev.receive(frame(60))
    dev.receive(frame(61))
    d.w32(mmio.REG_STATUS, 0)
    assert dev.rx_pending == 0 and dev.counters["rx_dropped_inactive"] == 3
    assert not dev.receive(frame(60))
    rx, _ = d.bring_up(2)
    post_rx(d, rx, 1, 128)
    assert dev.receive(frame(62)) and rx.take_used() == [(0, HDR + 62)]
    del t


def test_hostile_rx_chain_resets_device_not_host(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC)
    t, d, irq, rx, _ = bring_up(dev)
    rx.add([(d.mem.size - 2, 4096, True)])
    d.kick(net.RX_QUEUE)  # nothing pending: chain not looked at yet
    assert not t.needs_reset_pending
    dev.receive(frame(60))  # host thread: must not raise
    assert t.needs_reset_pending and irq.level and t.error
    assert not dev.receive(frame(60))  # stopped device: dropped


def test_rx_waits_for_the_device_lock(pair: tuple[socket.socket, socket.socket]) -> None:
    """A capture holds the transport lock: a host thread must not write RAM meanwhile."""
    dev = NetDevice(pair[0].fileno(), MAC)
    t, d, _, rx, _ = bring_up(dev)
    (buf,) = post_rx(d, rx, 1, 128)
    with t.lock:
        th = threading.Thread(target=dev.receive, args=(frame(60, 7),))
        th.start()
        time.sleep(0.05)
        assert d.mem.read(buf + HDR, 60) != frame(60, 7) and rx.take_used() == []
    th.join(5)
    assert d.mem.read(buf + HDR, 60) == frame(60, 7)


def test_threads_pump_both_directions(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC)
    t, d, irq, rx, tx = bring_up(dev)
    bufs = {rx.add([(a, 2048, True)]): a for a in (d.alloc(2048) for _ in range(8))}
    d.kick(net.RX_QUEUE)
    dev.start()
    try:
        sent = [frame(60 + i, i) for i in range(8)]
        stream = b"".join(egress_frames.encode(f) for f in sent)
        for k in range(0, len(stream), 7):  # framing must survive any chunking
            pair[1].sendall(stream[k : k + 7])
        got: list[bytes] = []

        def drain() -> bool:
            with t.lock:
                used = rx.take_used()
            for head, n in used:
                got.append(d.mem.read(bufs[head] + HDR, n - HDR))
            return len(got) == 8

        wait_for(drain)
        assert got == sent
        for f in sent[:3]:
            send_tx(d, tx, f)
        d.kick(net.TX_QUEUE)
        assert read_frames(pair[1], 3) == sent[:3]
        d.ack_all()
        pair[1].close()  # the gateway went away: link down, a config interrupt
        wait_for(lambda: not dev.link_up)
        assert dev.channel_error == "channel closed"
        assert irq.level and d.r32(mmio.REG_INTERRUPT_STATUS) & mmio.INT_CONFIG
        assert t.read(0x106, 2) == b"\0\0"
        send_tx(d, tx, sent[0])
        d.kick(net.TX_QUEUE)
        assert dev.counters["tx_dropped_channel"] == 1 and dev.tx_pending == 0
    finally:
        dev.close()
    for th in dev.threads:
        th.join(5)
        assert not th.is_alive()


def test_reader_waits_for_rx_buffers_instead_of_dropping(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Backpressure: with the host queue full the reader stops reading the channel (the
    gateway and passt hold the rest) and nothing is dropped; posted buffers resume it."""
    dev = NetDevice(pair[0].fileno(), MAC, rx_backlog=4)
    t, d, _, rx, _ = bring_up(dev)
    dev.start()
    try:
        sent = [frame(60 + i, i) for i in range(10)]
        pair[1].sendall(b"".join(egress_frames.encode(f) for f in sent))
        wait_for(lambda: dev.rx_pending == 4)
        time.sleep(0.2)  # the reader is held, not dropping
        assert dev.rx_pending == 4 and dev.counters["rx_dropped_queue_full"] == 0
        bufs = {rx.add([(a, 2048, True)]): a for a in (d.alloc(2048) for _ in range(10))}
        with t.lock:
            d.kick(net.RX_QUEUE)
        got: list[bytes] = []

        def drain() -> bool:
            with t.lock:
                used = rx.take_used()
            got.extend(d.mem.read(bufs[head] + HDR, n - HDR) for head, n in used)
            return len(got) == 10

        wait_for(drain)
        assert got == sent and dev.counters["rx_dropped_queue_full"] == 0
    finally:
        dev.close()
        pair[1].close()
    for th in dev.threads:
        th.join(5)
        assert not th.is_alive()


def test_broken_framing_takes_the_link_down(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC)
    bring_up(dev)
    dev.start()
    pair[1].sendall(struct.pack("!I", net.MAX_FRAME + 1) + b"x" * 64)
    wait_for(lambda: not dev.link_up)
    assert "frame length" in dev.channel_error
    dev.close()


def test_write_error_drops_and_takes_the_link_down() -> None:
    r, w = os.pipe()
    os.close(r)  # EPIPE on write (Python ignores SIGPIPE)
    dev = NetDevice(w, MAC)
    _, d, _, _, tx = bring_up(dev)
    send_tx(d, tx, frame(60))
    d.kick(net.TX_QUEUE)
    assert dev.flush() == 0 and not dev.link_up
    assert dev.counters["tx_dropped_channel"] == 1
    os.close(w)


def test_splitter_agrees_with_the_gateway_reader() -> None:
    frames_ = [b"", frame(14), frame(1514), frame(net.MAX_FRAME)]
    stream = b"".join(egress_frames.encode(f) for f in frames_)
    for cut in (1, 3, 4, 5, 1000, len(stream)):
        ours, theirs = net.FrameSplitter(), egress_frames.FrameReader()
        a: list[bytes] = []
        b: list[bytes] = []
        for k in range(0, len(stream), cut):
            a += ours.feed(stream[k : k + cut])
            b += theirs.feed(stream[k : k + cut])
        assert a == b == frames_
    assert net.MAX_FRAME == egress_frames.MAX_FRAME
    with pytest.raises(net.FrameError):
        net.FrameSplitter().feed(struct.pack("!I", net.MAX_FRAME + 1))


def test_snapshot_round_trip_and_identity(pair: tuple[socket.socket, socket.socket]) -> None:
    dev = NetDevice(pair[0].fileno(), MAC, mtu=1400)
    t, d, _, rx, _ = bring_up(dev)
    dev.receive(frame(60))  # waiting frames are not carried
    state = json.loads(json.dumps(t.state()))
    assert state["device"] == {"mac": MAC.hex(), "mtu": 1400, "link_status": True}
    dev2 = NetDevice(pair[0].fileno(), MAC, mtu=1400)
    t2 = mmio.VirtioMmio(dev2, t.mem, RecordingIrq())
    t2.restore(state)
    assert t2.state() == state and dev2.active and dev2.rx_pending == 0
    buf = d.alloc(128)
    rx.add([(buf, 128, True)])
    t2.notify_queue(net.RX_QUEUE)
    assert dev2.receive(frame(60, 5)) and d.mem.read(buf + HDR, 60) == frame(60, 5)


@pytest.mark.parametrize(
    "device",
    [
        {"mac": "52540012ab57", "mtu": 1400, "link_status": True},
        {"mac": MAC.hex(), "mtu": 1500, "link_status": True},
        {"mac": MAC.hex(), "mtu": 1400, "link_status": False},
        {"mac": MAC.hex().upper(), "mtu": 1400, "link_status": True},
        {"mac": MAC.hex(), "mtu": True, "link_status": True},
        {"mac": MAC.hex(), "mtu": 1400, "link_status": 1},
        {"mac": MAC.hex(), "mtu": 1400},
        {"mac": MAC.hex(), "mtu": 1400, "link_status": True, "pending": ""},
    ],
)
def test_restore_rejects(
    pair: tuple[socket.socket, socket.socket], device: dict[str, object]
) -> None:
    t, _, _ = make(NetDevice(pair[0].fileno(), MAC, mtu=1400))
    state = t.state()
    state["device"] = device
    with pytest.raises(VirtioStateError):
        t.restore(state)
    assert t.status == 0
