"""virtio-rng: writable buffers are filled with host entropy, bounded per request."""

from __future__ import annotations

from sporevm.vmm.devices.virtio import mmio, rng
from tests.virtio_driver import RAM, make


def test_fills_buffers() -> None:
    _, d, irq = make(rng.RngDevice())
    (q,) = d.bring_up(1)
    a, b = d.alloc(32), d.alloc(32)
    q.add([(a, 32, True), (b, 32, True)])
    d.kick(0)
    assert q.take_used() == [(0, 64)] and irq.level
    assert d.mem.read(a, 32) + d.mem.read(b, 32) != bytes(64)
    assert d.r32(mmio.REG_DEVICE_ID) == 4


def test_request_bounded() -> None:
    _, d, _ = make(rng.RngDevice(), ram=4 * RAM)
    (q,) = d.bring_up(1)
    big = d.alloc(2 * rng.MAX_REQUEST)
    q.add([(big, 2 * rng.MAX_REQUEST, True)])
    d.kick(0)
    assert q.take_used() == [(0, rng.MAX_REQUEST)]
    assert d.mem.read(big + rng.MAX_REQUEST, rng.MAX_REQUEST) == bytes(rng.MAX_REQUEST)


def test_readable_only_request_gets_zero_bytes() -> None:
    t, d, _ = make(rng.RngDevice())
    (q,) = d.bring_up(1)
    q.add([(d.alloc(8), 8, False)])
    d.kick(0)
    assert q.take_used() == [(0, 0)] and not t.needs_reset_pending
