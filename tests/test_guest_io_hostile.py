"""A hostile guest at the port and MMIO level, and a malformed monitor config line.

Real devices throughout (serial UART, i8042, spore power port, a KVM Machine
for dispatch); the same cases the fuzz targets fuzz_guest_io.py and
fuzz_monitor_config.py explore.
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any

import pytest

from sporevm.errors import SporeError
from sporevm.runtime.monitor_config import MonitorConfig
from sporevm.vmm import boot
from sporevm.vmm.devices import power, serial
from sporevm.vmm.devices.power import I8042, PowerEvent, PowerPort
from sporevm.vmm.devices.serial import Serial
from sporevm.vmm.machine import SERIAL_TAIL, Machine, StopReason
from sporevm.vmm.memory import GuestMemory

needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)


class Irq:
    def __init__(self) -> None:
        self.level = False
        self.edges = 0

    def set_level(self, high: bool) -> None:
        assert high != self.level
        self.level = high
        self.edges += 1


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[PowerEvent, int]] = []

    def __call__(self, event: PowerEvent, status: int) -> None:
        self.events.append((event, status))


def uart() -> tuple[Serial, Irq, bytearray]:
    irq, out = Irq(), bytearray()
    return Serial(irq, out.extend), irq, out


# --- serial ---------------------------------------------------------------------------------


def test_serial_reads_are_exactly_size_bytes_at_every_offset_and_width() -> None:
    s, _, _ = uart()
    for offset in range(16):
        for size in range(9):
            assert len(s.read(offset, size)) == size


def test_serial_zero_width_read_returns_nothing_and_consumes_nothing() -> None:
    # Regression (fuzz_guest_io): a 0-byte read answered 1 byte, breaking the BusDevice contract.
    s, _, _ = uart()
    assert s.feed(b"x") == 1
    assert s.read(serial.RBR_THR, 0) == b""
    assert s.read(serial.LSR, 1)[0] & serial.LSR_DR
    assert s.read(serial.RBR_THR, 1) == b"x"


def test_serial_tx_storm_goes_out_byte_by_byte_and_buffers_nothing() -> None:
    s, irq, out = uart()
    s.write(serial.IER, bytes([serial.IER_THRI]))
    for i in range(20_000):
        s.write(serial.RBR_THR, bytes([i & 0xFF]))
    assert len(out) == 20_000
    assert len(s._rx) == 0
    assert irq.level  # THRE pending until IIR is read
    assert s.read(serial.IIR_FCR, 1)[0] & 0x0F == serial.IIR_THRI
    assert not irq.level


def test_serial_loopback_storm_stays_within_rx_limit() -> None:
    s, irq, out = uart()
    s.write(serial.MCR, bytes([serial.MCR_LOOP]))
    s.write(serial.IER, bytes([serial.IER_RDI]))
    for i in range(3 * serial.RX_LIMIT):
        s.write(serial.RBR_THR, bytes([i & 0xFF]))
    assert len(s._rx) == serial.RX_LIMIT
    assert out == b""  # loopback never reaches the host
    assert irq.level
    assert s.feed(b"more") == 0  # full: host input is refused, not buffered
    s.write(serial.IIR_FCR, bytes([serial.FCR_CLEAR_RCVR]))
    assert len(s._rx) == 0 and not irq.level


def test_serial_register_garbage_never_raises_and_irq_tracks_iir() -> None:
    s, irq, _ = uart()
    for i in range(4096):
        offset = (i * 7) % 11  # includes offsets past the 8-port window
        s.write(offset, bytes([(i * 37) & 0xFF, 0xAA])[: i % 3])
        if i % 5 == 0:
            s.feed(bytes(i % 17))
        assert len(s.read((i * 3) % 9, i % 9)) == i % 9
        assert irq.level == (s._iir() != serial.IIR_NO_INT)
        assert len(s._rx) <= serial.RX_LIMIT


def test_serial_feed_is_bounded() -> None:
    s, _, _ = uart()
    assert s.feed(bytes(3 * serial.RX_LIMIT)) == serial.RX_LIMIT
    assert s.feed(b"x") == 0


# --- power port and i8042 -------------------------------------------------------------------


def test_power_port_only_a_32_bit_write_at_offset_0_powers_off() -> None:
    # Regression (fuzz_guest_io): any write at offset 0 (outb, outw) powered off, though
    # docs/vmm.md specifies a 32-bit write.
    sink = Sink()
    port = PowerPort(sink)
    for offset, data in [
        (0, b""),
        (0, b"\x01"),
        (0, b"\x01\x02"),
        (0, b"\x01\x02\x03"),
        (0, b"\x01" * 8),
        (1, b"\x01\0\0\0"),
        (2, b"\x01\0"),
        (3, b"\x01"),
    ]:
        port.write(offset, data)
    assert sink.events == []
    port.write(0, (7).to_bytes(4, "little"))
    assert sink.events == [(PowerEvent.POWEROFF, 7)]


def test_power_port_reads_any_width_and_offset() -> None:
    port = PowerPort(Sink())
    assert port.read(0, 4) == b"SPOR"
    assert port.read(2, 2) == b"OR"
    assert port.read(3, 4) == b"R\0\0\0"
    assert port.read(9, 8) == bytes(8)
    assert port.read(0, 0) == b""


def test_i8042_garbage_is_ignored_and_only_0xfe_on_the_command_port_resets() -> None:
    sink = Sink()
    kbd = I8042(sink)
    for offset in range(8):
        for value in range(256):
            if (offset, value) != (power.I8042_CMD - power.I8042_DATA, power.I8042_RESET):
                kbd.write(offset, bytes([value]))
        kbd.write(offset, b"")
        for size in range(9):
            assert kbd.read(offset, size) == bytes(size)
    assert sink.events == []
    kbd.write(power.I8042_CMD - power.I8042_DATA, b"\xfe\x00")
    assert sink.events == [(PowerEvent.RESET, 0)]


# --- Machine dispatch -----------------------------------------------------------------------


@needs_kvm
def test_machine_unmapped_accesses_are_counted_and_read_as_ones() -> None:
    with Machine(16 << 20, strict_io=False) as m:
        assert m.pio_read(0, 0x2F8, 1) == b"\xff"
        m.pio_write(0, 0x80, b"\x00")
        assert m.mmio_read(0, 0xFEE00000, 4) == b"\xff" * 4
        m.mmio_write(0, 0xFFFF_FFFF_FFFF_FFF8, bytes(8))
        assert m.stats.unhandled_pio == {0x2F8: 1, 0x80: 1}
        assert m.stats.unhandled_mmio == {0xFEE00000: 1, 0xFFFF_FFFF_FFFF_FFF8: 1}
        for _ in range(10_000):  # a serial storm through dispatch: the tail stays bounded
            m.pio_write(0, serial.COM1_BASE, b"A")
        assert 0 < len(m.serial_tail) <= 2 * SERIAL_TAIL


@needs_kvm
def test_machine_power_port_wrong_width_does_not_stop() -> None:
    with Machine(16 << 20, strict_io=False) as m:
        m.pio_write(0, power.SPORE_POWER_PORT, b"\x05")
        m.pio_write(0, power.SPORE_POWER_PORT, b"\x05\x00")
        assert m.run_control.result() is None
        m.pio_write(0, power.SPORE_POWER_PORT, b"\x05\x00\x00\x00")
        stop = m.run_control.result()
        assert stop is not None and stop.reason is StopReason.POWEROFF
        assert stop.status == 5


@needs_kvm
def test_machine_unhandled_counters_are_bounded() -> None:
    with Machine(16 << 20, strict_io=False) as m:
        for i in range(5000):
            m.mmio_read(0, 0xE0000000 + 8 * i, 8)
        assert len(m.stats.unhandled_mmio) <= 1024
        assert sum(m.stats.unhandled_mmio.values()) == 5000  # every access still counted


# --- monitor config line --------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "kernel": "/k/vmlinux",
    "initrd": "/k/initrd.cpio",
    "rootfs": "/r/rootfs.ext4",
    "cmdline": "console=ttyS0",
    "memory": 256 << 20,
    "vcpus": 2,
    "agent_fd": 3,
    "serial_log": "/run/spore-vm-x/serial.log",
    "timeout": 30.5,
    "store": "/var/cache/spore",
    "restore": None,
}


def test_monitor_config_roundtrip() -> None:
    for doc in (GOOD, {**GOOD, "timeout": None, "memory": 2 << 20}):
        cfg = MonitorConfig.decode(json.dumps(doc).encode())
        assert cfg.wire() == {
            **doc,
            "ram": "eager",
            "restore_id": None,
            "kernel_digest": None,
            "initrd_digest": None,
            "net_fd": None,  # no NIC unless the caller gives one (docs/network.md)
            "net_mac": None,
            "net_mtu": None,
            "snapshots": True,  # optional: a VM may be snapshotted unless the caller says
            "ram_image_fd": None,  # optional: an eager restore reads its chunks itself
            "ram_image_index": None,
        }
        assert MonitorConfig.decode(cfg.encode()) == cfg


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\xff\xfe",
        b"[" * 5000,
        b"[1]",
        b'{"memory": ' + b"9" * 5000 + b"}",
        json.dumps({**GOOD, "extra": 1}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "vcpus"}).encode(),
        json.dumps(GOOD).encode().replace(b'"vcpus": 2', b'"vcpus": 2, "vcpus": 3'),
    ],
)
def test_monitor_config_malformed_line_is_a_spore_error(line: bytes) -> None:
    # Regression (fuzz_monitor_config): JSONDecodeError, UnicodeDecodeError, ValueError and
    # RecursionError escaped decode.
    with pytest.raises(SporeError, match="^monitor: config"):
        MonitorConfig.decode(line)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory", "256M"),
        ("memory", (256 << 20) + 1),
        ("memory", 1 << 20),
        ("memory", 4 << 30),
        ("memory", True),
        ("vcpus", 0),
        ("vcpus", 65),
        ("vcpus", True),
        ("vcpus", 2.0),
        ("agent_fd", 0),
        ("agent_fd", 2),
        ("agent_fd", 1 << 40),
        ("agent_fd", None),
        ("timeout", float("nan")),
        ("timeout", float("inf")),
        ("timeout", 0),
        ("timeout", -1),
        ("timeout", True),
        ("timeout", "30"),
        ("kernel", ""),
        ("kernel", "/k\0/vmlinux"),
        ("kernel", 3),
        ("rootfs", None),
        ("serial_log", ["a"]),
        ("cmdline", None),
        ("cmdline", "a\0b"),
        ("cmdline", "\ud800"),
    ],
)
def test_monitor_config_bad_field_is_a_spore_error(field: str, value: object) -> None:
    # Regression (fuzz_monitor_config): wrong types and out-of-range values were accepted
    # and failed later (TypeError, OverflowError, os.open ValueError) or not at all.
    line = json.dumps({**GOOD, field: value}).encode()
    with pytest.raises(SporeError, match=f"^monitor: config {field}") as info:
        MonitorConfig.decode(line)
    assert "\n" not in str(info.value)


# --- kernel images --------------------------------------------------------------------------


def elf(entry: int, segs: list[tuple[int, int, int]]) -> bytes:
    """An ELF64 x86-64 executable; segs: PT_LOAD (paddr, filesz, memsz), file data at 0x1000."""
    hdr = bytearray(64)
    hdr[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<HHIQQ", hdr, 16, 2, 62, 1, entry, 64)
    struct.pack_into("<HHH", hdr, 52, 64, 56, len(segs))
    ph = b"".join(
        struct.pack("<IIQQQQQQ", boot.PT_LOAD, 7, 0x1000, pa, pa, fs, ms, 0x1000)
        for pa, fs, ms in segs
    )
    return (bytes(hdr) + ph).ljust(0x1000, b"\0") + b"\xf4" * 16


def test_elf_overlapping_segments_are_refused_quickly() -> None:
    # Regression (fuzz_boot_image slow inputs): a 4 KiB ELF with 64 PT_LOADs each covering
    # all of RAM made boot() zero-fill RAM 64 times through RAM-sized temporaries (~25 s and
    # +1 GiB RSS for a 1 GiB VM).
    ram = 64 << 20
    mem = GuestMemory(ram)
    try:
        whole = (0x100000, 16, ram - 0x100000)
        start = time.monotonic()
        with pytest.raises(boot.BootError, match="segment 1 .* overlaps another segment"):
            boot.boot(mem, elf(0x100000, [whole] * 64), "console=ttyS0", rng_seed=bytes(32))
        assert time.monotonic() - start < 1.0
        with pytest.raises(boot.BootError, match="overlaps"):
            boot.boot(mem, elf(0x100000, [(0x100000, 16, 0x2000), (0x101000, 0, 16)]), "")
        # Adjacent segments are fine, and bss is zeroed across chunk boundaries.
        mem.write(0x200000, b"\xaa" * (3 << 20))
        loaded = boot.boot(
            mem, elf(0x100000, [(0x100000, 16, 0x100000), (0x200000, 16, 3 << 20)]), ""
        )
        assert loaded.kernel_end == 0x200000 + (3 << 20)
        assert mem.read(0x200000, 16) == b"\xf4" * 16
        assert mem.read(0x200010, (3 << 20) - 16) == bytes((3 << 20) - 16)
    finally:
        mem.close()
