"""virtio-console: the MULTIPORT handshake, byte streams both ways, bounds, backpressure,
hostile control messages, snapshots; the legacy (spore-board/1) device and its state."""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sporevm.vmm.devices.virtio import console, mmio
from sporevm.vmm.devices.virtio.console import ConsoleDevice
from sporevm.vmm.devices.virtio.device import F_INDIRECT_DESC, F_VERSION_1
from sporevm.vmm.devices.virtio.state import VirtioStateError
from tests.virtio_driver import Driver, DriverQueue, RecordingIrq, make

NAME = console.DEFAULT_PORT_NAME
REPO = Path(__file__).resolve().parent.parent


def ctrl(port: int, event: int, value: int, extra: bytes = b"") -> bytes:
    return struct.pack("<IHH", port, event, value) + extra


class Control:
    """The driver's end of the two control queues."""

    def __init__(self, d: Driver, crx: DriverQueue, ctx: DriverQueue) -> None:
        self.d, self.crx, self.ctx = d, crx, ctx
        self.bufs: dict[int, int] = {}

    def post(self, n: int = 8, size: int = 4096) -> None:
        for _ in range(n):
            addr = self.d.alloc(size)
            self.bufs[self.crx.add([(addr, size, True)])] = addr
        self.d.kick(console.CTRL_RX_QUEUE)

    def send(self, message: bytes) -> None:
        self.ctx.add([(self.d.alloc.buf(message), len(message), False)])
        self.d.kick(console.CTRL_TX_QUEUE)
        assert self.ctx.take_used()[-1][1] == 0

    def received(self) -> list[bytes]:
        return [self.d.mem.read(self.bufs.pop(h), n) for h, n in self.crx.take_used()]


def handshake(c: Control, *, open_port: bool = True) -> None:
    """What Linux's virtio_console does: DEVICE_READY, PORT_READY, then open(2)."""
    c.send(ctrl(0xFFFF_FFFF, console.DEVICE_READY, 1))
    assert c.received() == [ctrl(0, console.PORT_ADD, 0)]
    c.send(ctrl(0, console.PORT_READY, 1))
    assert c.received() == [ctrl(0, console.PORT_OPEN, 1), ctrl(0, console.PORT_NAME, 0, NAME)]
    if open_port:
        c.send(ctrl(0, console.PORT_OPEN, 1))


def bring_up_multiport(
    dev: ConsoleDevice, *, open_port: bool = True
) -> tuple[mmio.VirtioMmio, Driver, RecordingIrq, DriverQueue, DriverQueue, Control]:
    t, d, irq = make(dev)
    rx, tx, crx, ctx = d.bring_up(4)
    assert dev.multiport
    c = Control(d, crx, ctx)
    c.post()
    handshake(c, open_port=open_port)
    d.ack_all()  # the handshake's interrupts: tests below watch for their own
    return t, d, irq, rx, tx, c


def bring_up(
    dev: ConsoleDevice,
) -> tuple[mmio.VirtioMmio, Driver, RecordingIrq, DriverQueue, DriverQueue]:
    """A device whose port 0 the guest has open (the MULTIPORT handshake done)."""
    t, d, irq, rx, tx, _ = bring_up_multiport(dev)
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
    assert d.device_features() & 0b111 == console.F_MULTIPORT  # no SIZE, no EMERG_WRITE
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
    rx, _, crx, ctx = d.bring_up(4)
    (buf,) = post_rx(d, rx, 1, 16)
    assert rx.take_used() == []  # the port is not open yet: Linux would discard the bytes
    c = Control(d, crx, ctx)
    c.post()
    handshake(c)
    assert rx.take_used() == [(0, 5)] and d.mem.read(buf, 5) == b"early"
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


def test_reset_keeps_pending_host_bytes_and_forgets_the_handshake() -> None:
    dev = ConsoleDevice()
    _, d, _, _, _ = bring_up(dev)
    dev.send(b"keep")
    d.w32(mmio.REG_STATUS, 0)
    assert dev.state()["device_ready"] is False and not dev.state()["guest_open"]
    rx, _, crx, ctx = d.bring_up(4)
    (buf,) = post_rx(d, rx, 1, 8)
    c = Control(d, crx, ctx)
    c.post()
    handshake(c)  # the whole handshake again, as a re-probing driver does it
    assert d.mem.read(buf, 4) == b"keep"


def test_snapshot_carries_pending_bytes() -> None:
    dev = ConsoleDevice()
    t, d, _, rx, _ = bring_up(dev)
    dev.send(b"in flight")
    dev.pause_output()
    state = json.loads(json.dumps(t.state()))
    assert state["device"] == {
        "pending": b"in flight".hex(),
        "tx_paused": True,
        "device_ready": True,
        "port_ready": True,
        "guest_open": True,
        "control": "",
    }

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
        state["device"] = {**state["device"], "pending": bad}
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


# -- MULTIPORT: handshake, port open/close, legacy drivers ------------------------------


def test_port_name_is_configurable_and_bounded() -> None:
    dev = ConsoleDevice(port_name=b"x.y")
    t, d, _ = make(dev)
    _, _, crx, ctx = d.bring_up(4)
    c = Control(d, crx, ctx)
    c.post()
    c.send(ctrl(0xFFFF_FFFF, console.DEVICE_READY, 1))
    c.send(ctrl(0, console.PORT_READY, 1))
    assert c.received()[-1] == ctrl(0, console.PORT_NAME, 0, b"x.y")
    for bad in (b"", b"a\0b", b"n" * (console.MAX_PORT_NAME + 1)):
        with pytest.raises(ValueError):
            ConsoleDevice(port_name=bad)
    del t


def test_bytes_wait_for_the_guest_to_open_the_port_and_stop_when_it_closes() -> None:
    woken: list[int] = []
    dev = ConsoleDevice(on_writable=lambda: woken.append(1))
    _, d, _, rx, _, c = bring_up_multiport(dev, open_port=False)
    assert dev.send(b"hello") == 5
    (buf,) = post_rx(d, rx, 1, 16)
    assert rx.take_used() == [] and dev.pending == 5 and not dev.port_open
    c.send(ctrl(0, console.PORT_OPEN, 1))
    assert rx.take_used() == [(0, 5)] and d.mem.read(buf, 5) == b"hello" and woken == [1]
    c.send(ctrl(0, console.PORT_OPEN, 0))  # the guest closed it: hold bytes again
    dev.send(b"later")
    post_rx(d, rx, 1, 16)
    assert rx.take_used() == [] and dev.pending == 5
    assert dev.refused == 0


def test_control_messages_wait_for_control_buffers() -> None:
    dev = ConsoleDevice()
    _, d, _ = make(dev)
    _, _, crx, ctx = d.bring_up(4)
    c = Control(d, crx, ctx)
    c.send(ctrl(0xFFFF_FFFF, console.DEVICE_READY, 1))
    assert dev.control_pending == 1 and c.received() == []
    c.post(1)
    assert c.received() == [ctrl(0, console.PORT_ADD, 0)] and dev.control_pending == 0


def test_short_control_buffer_loses_the_message_not_the_device() -> None:
    dev = ConsoleDevice()
    t, d, _ = make(dev)
    _, _, crx, ctx = d.bring_up(4)
    c = Control(d, crx, ctx)
    c.post(1, size=4)
    c.send(ctrl(0xFFFF_FFFF, console.DEVICE_READY, 1))
    assert crx.take_used() == [(0, 0)] and dev.refused == 1 and "control buffer" in dev.last_refusal
    assert not t.needs_reset_pending


def test_driver_without_multiport_gets_the_single_port_device() -> None:
    out: list[bytes] = []
    dev = ConsoleDevice(out.append)
    t, d, _ = make(dev)
    rx, tx, crx, ctx = d.bring_up(4, F_VERSION_1 | F_INDIRECT_DESC)
    assert not dev.multiport and dev.port_open
    dev.send(b"direct")
    (buf,) = post_rx(d, rx, 1, 16)
    assert d.mem.read(buf, 6) == b"direct"
    # control queues do not exist for this driver: kicks there are ignored
    crx.add([(d.alloc(64), 64, True)])
    ctx.add([(d.alloc.buf(ctrl(0, console.DEVICE_READY, 1)), 8, False)])
    d.kick(console.CTRL_RX_QUEUE)
    d.kick(console.CTRL_TX_QUEUE)
    assert crx.take_used() == [] and ctx.take_used() == [] and dev.control_pending == 0
    tx.add([(d.alloc.buf(b"out"), 3, False)])
    d.kick(console.TX_QUEUE)
    assert out == [b"out"] and not t.needs_reset_pending


HOSTILE_CONTROL = [
    (b"", "0 bytes"),
    (ctrl(0, console.PORT_OPEN, 1)[:7], "7 bytes"),
    (ctrl(0, console.PORT_OPEN, 1) + b"x", "9 bytes"),
    (ctrl(1, console.PORT_OPEN, 1), "port 1"),
    (ctrl(0xFFFF_FFFF, console.PORT_READY, 1), "port 4294967295"),
    (ctrl(0, 99, 1), "event 99"),
    (ctrl(0, console.PORT_ADD, 0), "event 1"),
    (ctrl(0, console.PORT_NAME, 0), "event 7"),
    (ctrl(0, console.CONSOLE_PORT, 1), "event 4"),
    (ctrl(0, console.RESIZE, 0), "event 5"),
    (ctrl(0, console.PORT_REMOVE, 0), "event 2"),
    (ctrl(0, console.DEVICE_READY, 1), "DEVICE_READY(1)"),  # a second one
    (ctrl(0, console.PORT_READY, 1), "PORT_READY(1)"),  # a second one
    (ctrl(0, console.PORT_OPEN, 2), "PORT_OPEN(2)"),
]


@pytest.mark.parametrize(("message", "why"), HOSTILE_CONTROL)
def test_hostile_control_message_is_refused_and_counted(message: bytes, why: str) -> None:
    dev = ConsoleDevice()
    t, d, _, rx, _, c = bring_up_multiport(dev)
    before = dev.state()
    if message:
        c.send(message)
    else:  # a chain with no readable byte: a lone writable buffer
        c.ctx.add([(d.alloc(16), 16, True)])
        d.kick(console.CTRL_TX_QUEUE)
        assert c.ctx.take_used() == [(c.ctx.next_desc - 1, 0)]
    assert dev.refused == 1 and why in dev.last_refusal, dev.last_refusal
    assert dev.state() == before and c.received() == [] and not t.needs_reset_pending
    dev.send(b"still works")
    (buf,) = post_rx(d, rx, 1, 16)
    assert d.mem.read(buf, 11) == b"still works"


def test_out_of_order_handshake_is_refused() -> None:
    dev = ConsoleDevice()
    _, d, _ = make(dev)
    _, _, crx, ctx = d.bring_up(4)
    c = Control(d, crx, ctx)
    c.post()
    c.send(ctrl(0xFFFF_FFFF, console.DEVICE_READY, 0))  # the driver failed to fill a queue
    c.send(ctrl(0, console.PORT_READY, 1))  # no PORT_ADD was sent
    c.send(ctrl(0, console.PORT_OPEN, 1))  # no port yet
    assert dev.refused == 3 and c.received() == [] and not dev.port_open
    c.send(ctrl(0xFFFF_FFFF, console.DEVICE_READY, 1))
    c.send(ctrl(0, console.PORT_READY, 0))  # add_port failed in the guest
    assert dev.refused == 4 and c.received() == [ctrl(0, console.PORT_ADD, 0)]


control_messages = st.one_of(
    st.tuples(
        st.sampled_from([0, 1, 0xFFFF_FFFF]),
        st.integers(0, 9),
        st.sampled_from([0, 1, 2, 0xFFFF]),
    ).map(lambda m: ctrl(*m)),
    st.binary(max_size=24),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    messages=st.lists(control_messages, max_size=24),
    buffers=st.lists(st.sampled_from([0, 4, 8, 64, 4096]), max_size=6),
)
def test_any_control_sequence_is_bounded_and_snapshots(
    messages: list[bytes], buffers: list[int]
) -> None:
    dev = ConsoleDevice(host_buffer=64)
    t, d, _ = make(dev)
    rx, _, crx, ctx = d.bring_up(4)
    for size in buffers:
        crx.add([(d.alloc(max(size, 1)), size, True)])
    d.kick(console.CTRL_RX_QUEUE)
    post_rx(d, rx, 2, 16)
    dev.send(b"x" * 40)
    for m in messages:
        if m:
            ctx.add([(d.alloc.buf(m), len(m), False)])
        else:
            ctx.add([(d.alloc(8), 8, True)])
        d.kick(console.CTRL_TX_QUEUE)
    assert not t.needs_reset_pending, t.error
    assert dev.control_pending <= console.MAX_CONTROL_PENDING
    assert dev.refused <= len(messages) + len(buffers)
    written = sum(n for _, n in crx.take_used())
    assert written <= 3 * 8 + len(console.DEFAULT_PORT_NAME)  # one handshake's messages, at most
    if not dev.port_open:
        assert dev.pending == 40
    state = json.loads(json.dumps(t.state()))
    t2 = mmio.VirtioMmio(ConsoleDevice(host_buffer=64), t.mem, RecordingIrq())
    t2.restore(state)
    assert t2.state() == state


def test_snapshot_carries_the_handshake_and_undelivered_control_messages() -> None:
    dev = ConsoleDevice()
    t, d, _ = make(dev)
    _, _, crx, ctx = d.bring_up(4)
    c = Control(d, crx, ctx)
    c.send(ctrl(0xFFFF_FFFF, console.DEVICE_READY, 1))  # no control buffers yet
    state = json.loads(json.dumps(t.state()))
    assert state["device"]["device_ready"] and state["device"]["control"] == "port_add"
    dev2 = ConsoleDevice()
    t2 = mmio.VirtioMmio(dev2, t.mem, RecordingIrq())
    t2.restore(state)
    assert dev2.control_pending == 1 and dev2.multiport
    c.post(1)
    t2.notify_queue(console.CTRL_RX_QUEUE)
    assert c.received() == [ctrl(0, console.PORT_ADD, 0)]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"extra": 1}, "unknown fields"),
        ({"guest_open": 1}, "boolean"),
        ({"device_ready": False, "port_ready": True}, "without DEVICE_READY"),
        ({"device_ready": False, "guest_open": True}, "without DEVICE_READY"),
        ({"control": ["port_add"]}, "string"),
        ({"control": ",".join(["port_add"] * (console.MAX_CONTROL_PENDING + 1))}, "expected"),
        ({"control": "console_port"}, "expected"),
        ({"control": "port_add,"}, "expected"),
        ({"control": "PORT_ADD"}, "expected"),
        ({"control": "port_add port_open"}, "expected"),
    ],
)
def test_restore_refuses_bad_handshake_state(change: dict[str, object], match: str) -> None:
    t, _, _, _, _ = bring_up(ConsoleDevice())
    state = t.state()
    state["device"] = {**state["device"], **change}
    with pytest.raises(VirtioStateError, match=match):
        mmio.VirtioMmio(ConsoleDevice(), t.mem, RecordingIrq()).restore(state)


# -- legacy mode: the spore-board/1 console, for restoring spores sealed with it ---------------

LEGACY_SAMPLE = REPO / "fuzz" / "corpus" / "virtio_state" / "console-live-legacy.json"
MULTIPORT_KEYS = {"device_ready", "port_ready", "guest_open", "control"}


def test_legacy_device_is_the_single_port_console() -> None:
    out: list[bytes] = []
    dev = ConsoleDevice(out.append, legacy=True)
    t, d, _ = make(dev)
    assert d.device_features() & 0xFFFF_FFFF == F_INDIRECT_DESC  # no MULTIPORT offered
    d.w32(mmio.REG_QUEUE_SEL, 2)
    assert d.r32(mmio.REG_QUEUE_NUM_MAX) == 0  # two queues, no control queues
    rx, tx = d.bring_up(2)
    assert not dev.multiport and dev.port_open  # hvc0: open from the start
    dev.send(b"hi")
    (buf,) = post_rx(d, rx, 1, 8)
    assert d.mem.read(buf, 2) == b"hi"
    tx.add([(d.alloc.buf(b"out"), 3, False)])
    d.kick(console.TX_QUEUE)
    assert out == [b"out"]
    dev.pause_output()
    assert t.state()["device"] == {"pending": "", "tx_paused": True}


def test_legacy_state_is_the_previous_format() -> None:
    """The sample sealed by the /1 console restores into a legacy device and round-trips;
    the multiport device refuses it."""
    state = json.loads(LEGACY_SAMPLE.read_bytes())
    assert set(state["device"]) == {"pending", "tx_paused"}
    dev = ConsoleDevice(legacy=True)
    t, _, _ = make(dev)
    t.restore(state)
    assert t.state() == state and dev.pending == len(b"pending bytes") and dev.tx_paused
    with pytest.raises(VirtioStateError, match="queues: expected a list of 4"):
        make(ConsoleDevice())[0].restore(state)
    # Even with four queues the multiport device wants its own keys.
    t4, _, _, _, _ = bring_up(ConsoleDevice())
    four = {**t4.state(), "device": state["device"]}
    with pytest.raises(VirtioStateError, match="missing fields"):
        mmio.VirtioMmio(ConsoleDevice(), t4.mem, RecordingIrq()).restore(four)


@pytest.mark.parametrize("key", sorted(MULTIPORT_KEYS))
def test_legacy_state_refuses_multiport_keys(key: str) -> None:
    multi = bring_up(ConsoleDevice())[0].state()["device"]
    state = json.loads(LEGACY_SAMPLE.read_bytes())
    state["device"][key] = multi[key]
    with pytest.raises(VirtioStateError, match=rf"unknown fields \['{key}'\]"):
        make(ConsoleDevice(legacy=True))[0].restore(state)


@pytest.mark.parametrize("key", sorted(MULTIPORT_KEYS))
def test_multiport_state_refuses_missing_multiport_keys(key: str) -> None:
    t, _, _, _, _ = bring_up(ConsoleDevice())
    state = t.state()
    state["device"] = {k: v for k, v in state["device"].items() if k != key}
    with pytest.raises(VirtioStateError, match=rf"missing fields \['{key}'\]"):
        mmio.VirtioMmio(ConsoleDevice(), t.mem, RecordingIrq()).restore(state)


def test_multiport_state_refused_by_legacy_device() -> None:
    """A multiport snapshot (MULTIPORT negotiated, four queues) is another device model."""
    t, _, _, _, _ = bring_up(ConsoleDevice())
    state = t.state()
    with pytest.raises(VirtioStateError, match="bits this device does not offer"):
        mmio.VirtioMmio(ConsoleDevice(legacy=True), t.mem, RecordingIrq()).restore(state)
    # Without those two, the device keys alone are still refused.
    state["driver_features"] &= ~console.F_MULTIPORT
    state["queues"] = state["queues"][:2]
    with pytest.raises(VirtioStateError, match="unknown fields"):
        mmio.VirtioMmio(ConsoleDevice(legacy=True), t.mem, RecordingIrq()).restore(state)
