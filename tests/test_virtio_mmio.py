"""virtio-mmio v2 transport: registers, negotiation, interrupts, NEEDS_RESET, snapshots."""

from __future__ import annotations

import json

import pytest

from sporevm.vmm.devices.virtio import mmio
from sporevm.vmm.devices.virtio.device import F_INDIRECT_DESC, F_VERSION_1
from sporevm.vmm.devices.virtio.rng import RngDevice
from sporevm.vmm.devices.virtio.state import VirtioStateError
from tests.virtio_driver import RAM, make


def test_identity_registers() -> None:
    t, d, _ = make(RngDevice())
    assert d.r32(mmio.REG_MAGIC) == 0x74726976
    assert d.r32(mmio.REG_VERSION) == 2
    assert d.r32(mmio.REG_DEVICE_ID) == 4
    assert d.r32(mmio.REG_SHM_LEN_LOW) == 0xFFFF_FFFF
    assert d.device_features() == F_VERSION_1 | F_INDIRECT_DESC
    assert t.notify_address == 0xD000_0050
    assert mmio.kernel_cmdline(0xD000_0000, 5) == "virtio_mmio.device=4K@0xd0000000:5"


@pytest.mark.parametrize("offset,size", [(0, 1), (0, 2), (2, 4), (0, 8), (1, 4), (-4, 4)])
def test_bad_register_reads_return_zeros(offset: int, size: int) -> None:
    t, _, _ = make(RngDevice())
    assert t.read(offset, size) == bytes(size)


def test_bad_register_writes_are_ignored() -> None:
    t, d, _ = make(RngDevice())
    t.write(mmio.REG_STATUS, b"\x01")  # wrong width
    t.write(mmio.REG_STATUS + 1, b"\x01\x00\x00\x00")  # unaligned
    t.write(0xFF8, b"\x01\x00\x00\x00")  # beyond the config space
    t.write(mmio.REG_MAGIC, b"\x00\x00\x00\x00")  # read-only
    assert d.status == 0 and d.r32(mmio.REG_MAGIC) == mmio.MAGIC


def test_features_ok_requires_version_1() -> None:
    _, d, _ = make(RngDevice())
    assert not d.negotiate(F_INDIRECT_DESC)
    d.driver_ok()
    assert not d.status & mmio.STATUS_DRIVER_OK


def test_features_ok_refuses_unoffered_bits() -> None:
    _, d, _ = make(RngDevice())
    assert not d.negotiate(F_VERSION_1 | 1 << 29)  # EVENT_IDX is not offered


def test_features_frozen_after_features_ok() -> None:
    t, d, _ = make(RngDevice())
    assert d.negotiate(F_VERSION_1)
    d.w32(mmio.REG_DRIVER_FEATURES_SEL, 0)
    d.w32(mmio.REG_DRIVER_FEATURES, F_INDIRECT_DESC)
    assert t.driver_features == F_VERSION_1


def test_status_bits_cannot_be_cleared_except_by_reset() -> None:
    _, d, _ = make(RngDevice())
    d.negotiate()
    before = d.status
    d.w32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE)
    assert d.status == before
    d.w32(mmio.REG_STATUS, 0)
    assert d.status == 0


def test_queue_select_out_of_range() -> None:
    t, d, _ = make(RngDevice())
    d.negotiate()
    d.w32(mmio.REG_QUEUE_SEL, 7)
    assert d.r32(mmio.REG_QUEUE_NUM_MAX) == 0
    d.w32(mmio.REG_QUEUE_NUM, 4)
    d.w32(mmio.REG_QUEUE_READY, 1)
    assert d.r32(mmio.REG_QUEUE_READY) == 0
    assert not t.needs_reset_pending
    d.kick(7)  # ignored


def test_bad_queue_layout_sets_needs_reset() -> None:
    t, d, irq = make(RngDevice())
    d.negotiate()
    d.w32(mmio.REG_QUEUE_SEL, 0)
    d.w32(mmio.REG_QUEUE_NUM, 3)  # not a power of 2
    d.w32(mmio.REG_QUEUE_READY, 1)
    assert d.r32(mmio.REG_QUEUE_READY) == 0
    assert d.status & mmio.STATUS_NEEDS_RESET
    assert "power of 2" in t.error
    assert not irq.level  # DRIVER_OK not set yet: no config interrupt
    d.w32(mmio.REG_STATUS, 0)
    assert d.status == 0 and t.error == ""


def test_queue_registers_frozen_while_ready() -> None:
    t, d, _ = make(RngDevice())
    d.negotiate()
    q = d.setup_queue(0)
    d.w32(mmio.REG_QUEUE_NUM, 2)
    d.w32(mmio.REG_QUEUE_DESC_LOW, 0)
    assert t.queues[0].size == q.size and t.queues[0].desc_addr == q.desc
    d.w32(mmio.REG_QUEUE_READY, 0)
    assert not t.queues[0].ready


def test_high_address_halves() -> None:
    t, d, _ = make(RngDevice())
    d.w32(mmio.REG_QUEUE_SEL, 0)
    d.w32(mmio.REG_QUEUE_DESC_HIGH, 0x12)
    d.w32(mmio.REG_QUEUE_DESC_LOW, 0x3400)
    assert t.queues[0].desc_addr == 0x12_0000_3400
    d.w32(mmio.REG_QUEUE_READY, 1)  # outside RAM
    assert t.needs_reset_pending


def test_notify_before_driver_ok_is_ignored() -> None:
    _, d, irq = make(RngDevice())
    d.negotiate()
    q = d.setup_queue(0)
    q.add([(d.alloc(8), 8, True)])
    d.kick(0)
    assert q.take_used() == [] and not irq.level
    d.driver_ok()
    d.kick(0)
    assert q.take_used() == [(0, 8)] and irq.level


def test_interrupt_raise_ack_and_suppression() -> None:
    _, d, irq = make(RngDevice())
    (q,) = d.bring_up(1)
    buf = d.alloc(8)
    q.add([(buf, 8, True)])
    d.kick(0)
    assert irq.level and d.r32(mmio.REG_INTERRUPT_STATUS) == mmio.INT_VRING
    d.w32(mmio.REG_INTERRUPT_ACK, mmio.INT_VRING)
    assert not irq.level and irq.changes == [True, False]
    q.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    q.add([(buf, 8, True)])
    d.kick(0)
    assert len(q.take_used()) == 2  # both served...
    assert not irq.level and irq.changes == [True, False]  # ...but no new interrupt


def test_hostile_chain_sets_needs_reset_with_config_interrupt() -> None:
    t, d, irq = make(RngDevice())
    (q,) = d.bring_up(1)
    q.add([(RAM - 4, 64, True)])
    d.kick(0)
    assert d.status & mmio.STATUS_NEEDS_RESET
    assert d.r32(mmio.REG_INTERRUPT_STATUS) == mmio.INT_CONFIG and irq.level
    assert "outside guest RAM" in t.error
    # Stopped until reset: further valid requests are not served.
    q.add([(d.alloc(8), 8, True)])
    d.kick(0)
    assert q.take_used() == []
    d.ack_all()
    assert not irq.level
    d.w32(mmio.REG_STATUS, 0)
    (q,) = d.bring_up(1)
    q.add([(d.alloc(8), 8, True)])
    d.kick(0)
    assert q.take_used() == [(0, 8)]


def test_driver_cannot_set_needs_reset_bit() -> None:
    _, d, _ = make(RngDevice())
    d.w32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_NEEDS_RESET)
    assert d.status == mmio.STATUS_ACKNOWLEDGE


def test_config_changed_bumps_generation() -> None:
    t, d, irq = make(RngDevice())
    d.bring_up(1)
    t.config_changed()
    assert d.r32(mmio.REG_CONFIG_GENERATION) == 1
    assert d.r32(mmio.REG_INTERRUPT_STATUS) == mmio.INT_CONFIG and irq.level


def test_snapshot_mid_stream_restores_into_fresh_transport() -> None:
    t, d, irq = make(RngDevice())
    (q,) = d.bring_up(1)
    buf = d.alloc(8)
    q.add([(buf, 8, True)])
    d.kick(0)
    q.add([(buf, 8, True)])  # posted, not yet kicked
    state = json.loads(json.dumps(t.state()))  # must survive a JSON round trip
    assert state["queues"][0]["last_avail_idx"] == 1

    # A new transport over the same RAM (as after restoring guest memory).
    t2 = mmio.VirtioMmio(RngDevice(), t.mem, irq2 := type(irq)())
    t2.restore(state)
    assert t2.state() == state
    assert irq2.level  # the unacknowledged interrupt is still pending
    t2.write(mmio.REG_QUEUE_NOTIFY, (0).to_bytes(4, "little"))
    assert [h for h, _ in q.take_used()] == [0, 1]


@pytest.mark.parametrize(
    "patch",
    [
        {"version": 2},
        {"device_id": 2},
        {"status": 0x100},
        {"status": 0x10},
        {"status": mmio.STATUS_DRIVER_OK},
        {"driver_features": 1 << 29},
        {"status": mmio.STATUS_FEATURES_OK, "driver_features": 0},
        {"interrupt_status": 4},
        {"queues": []},
        {"queues": "x"},
        {"device": {"x": 1}},
        {"error": 5},
        {"config_generation": -1},
    ],
)
def test_restore_rejects_bad_state(patch: dict[str, object]) -> None:
    t, d, _ = make(RngDevice())
    d.bring_up(1)
    state = {**t.state(), **patch}
    t2, _, _ = make(RngDevice())
    with pytest.raises(VirtioStateError):
        t2.restore(state)
    assert t2.status == 0 and not t2.queues[0].ready


def test_restore_rejects_missing_field() -> None:
    t, _, _ = make(RngDevice())
    state = t.state()
    del state["queue_sel"]
    with pytest.raises(VirtioStateError, match="missing"):
        t.restore(state)
