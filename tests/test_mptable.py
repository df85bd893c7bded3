"""The MP table an SMP guest learns its vCPUs from (sporevm/vmm/mptable.py, issue 12).

Parsed back here the way Linux's arch/x86/kernel/mpparse.c reads it: the scan for
the floating pointer over the three ranges Linux searches, both checksums, the
header checks of smp_check_mpc, then every entry by type. The last tests load the
probe on a real Machine: the table is in guest RAM with two vCPUs and absent with
one (a one-vCPU guest boots exactly as before).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from sporevm.vmm import boot, mptable
from tests.probe_build import ProbeVm

# default_find_smp_config: the first KiB, the KiB below 640 KiB, the BIOS area.
LINUX_SCAN = ((0x0, 0x400), (639 * 0x400, 0x400), (0xF0000, 0x10000))


@dataclass
class Parsed:
    physptr: int
    spec: int
    lapic: int
    oem: bytes
    cpus: list[tuple[int, int, int]] = field(default_factory=list)  # apicid, apicver, flags
    buses: list[tuple[int, bytes]] = field(default_factory=list)
    ioapics: list[tuple[int, int, int, int]] = field(default_factory=list)  # id, ver, flags, addr
    intsrc: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    lintsrc: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)


def low_memory(table: bytes, base: int = mptable.MPTABLE_ADDR) -> bytes:
    ram = bytearray(0x100000)
    ram[base : base + len(table)] = table
    return bytes(ram)


def linux_scan(ram: bytes) -> int | None:
    """smp_scan_config over Linux's three ranges: where it finds the floating pointer."""
    for start, length in LINUX_SCAN:
        for at in range(start, start + length, 16):
            mpf = ram[at : at + 16]
            if mpf[:4] == b"_MP_" and mpf[8] == 1 and sum(mpf) % 256 == 0 and mpf[9] in (1, 4):
                return at
    return None


def parse(ram: bytes) -> Parsed:
    """smp_check_mpc + smp_read_mpc, strictly: every check Linux makes, and a few more."""
    at = linux_scan(ram)
    assert at is not None, "Linux would not find the MP floating pointer"
    physptr = struct.unpack_from("<I", ram, at + 4)[0]
    feature1, feature2 = ram[at + 11], ram[at + 12]
    assert feature1 == 0  # 0: a configuration table is present (no default configuration)
    assert feature2 == 0 and ram[at + 13 : at + 16] == b"\0\0\0"
    (
        sig,
        length,
        spec,
        _ck,
        oem,
        _product,
        oemptr,
        oemsize,
        count,
        lapic,
        ext_len,
        ext_ck,
        _res,
    ) = struct.unpack_from("<4sHBB8s12sIHHIHBB", ram, physptr)
    assert sig == b"PCMP" and spec in (1, 4) and lapic != 0
    assert sum(ram[physptr : physptr + length]) % 256 == 0, "configuration table checksum"
    assert (oemptr, oemsize, ext_len, ext_ck) == (0, 0, 0, 0)
    p = Parsed(physptr, spec, lapic, oem)
    pos, end = physptr + 44, physptr + length
    for _ in range(count):
        kind = ram[pos]
        if kind == mptable.MP_PROCESSOR:
            _t, apicid, ver, flags, _sig, _feat = struct.unpack_from("<BBBBII", ram, pos)
            p.cpus.append((apicid, ver, flags))
            pos += 20
            continue
        fields = struct.unpack_from("<BBBBBBBB", ram, pos)
        if kind == mptable.MP_BUS:
            p.buses.append((fields[1], bytes(ram[pos + 2 : pos + 8])))
        elif kind == mptable.MP_IOAPIC:
            p.ioapics.append(
                (fields[1], fields[2], fields[3], struct.unpack_from("<I", ram, pos + 4)[0])
            )
        elif kind == mptable.MP_INTSRC:
            irqtype, irqflag = fields[1], struct.unpack_from("<H", ram, pos + 2)[0]
            p.intsrc.append((irqtype, irqflag, *fields[4:8]))
        elif kind == mptable.MP_LINTSRC:
            irqtype, irqflag = fields[1], struct.unpack_from("<H", ram, pos + 2)[0]
            p.lintsrc.append((irqtype, irqflag, *fields[4:8]))
        else:
            raise AssertionError(f"unknown MP entry type {kind} at {pos:#x}")
        pos += 8
    assert pos == end, "entry count and table length disagree"
    return p


@pytest.mark.parametrize("vcpus", [1, 2, 3, 8, 64])
def test_linux_finds_a_checksummed_table_with_every_entry(vcpus: int) -> None:
    data = mptable.build(vcpus)
    assert len(data) == mptable.table_size(vcpus)
    assert sum(data[:16]) % 256 == 0 and sum(data[16:]) % 256 == 0
    ram = low_memory(data)
    assert linux_scan(ram) == mptable.MPTABLE_ADDR  # the BIOS area, found on the first step
    p = parse(ram)
    assert p.physptr == mptable.MPTABLE_ADDR + 16 and p.spec == 4 and p.oem == b"SPORE   "
    assert p.lapic == 0xFEE00000
    # One enabled processor per vCPU, LAPIC ids 0..N-1, vCPU 0 the boot processor.
    assert p.cpus == [(i, mptable.APIC_VERSION, 1 | (2 if i == 0 else 0)) for i in range(vcpus)]
    assert p.buses == [(0, b"ISA   ")]
    io_id = vcpus  # above every LAPIC id
    assert p.ioapics == [(io_id, 0x11, 1, 0xFEC00000)]
    # GSI n -> IOAPIC pin n on the ISA bus, as KVM routes KVM_IRQ_LINE (PIT 0, COM1 4,
    # virtio 5..): type INT, polarity and trigger conforming to the bus.
    assert p.intsrc == [(mptable.MP_INT, 0, 0, pin, io_id, pin) for pin in range(24)]
    assert p.lintsrc == [(mptable.MP_EXTINT, 0, 0, 0, 0xFF, 0), (mptable.MP_NMI, 0, 0, 0, 0xFF, 1)]


def test_table_stays_inside_the_reserved_bios_area() -> None:
    largest = mptable.MPTABLE_ADDR + mptable.table_size(mptable.MAX_VCPUS)
    assert largest <= boot.BIOS_END
    reserved = [(a, a + n) for a, n, kind in boot.e820_map(64 << 20) if kind == boot.E820_RESERVED]
    assert any(a <= mptable.MPTABLE_ADDR and largest <= b for a, b in reserved)


@pytest.mark.parametrize("vcpus", [0, -1, 65, 256])
def test_vcpu_count_out_of_range_is_refused(vcpus: int) -> None:
    with pytest.raises(ValueError, match="1..64"):
        mptable.build(vcpus)


@pytest.mark.parametrize("base", [0xF0008, 0xEFFF0, 0xFFF00, 0x9FC00])
def test_base_outside_the_bios_area_or_misaligned_is_refused(base: int) -> None:
    with pytest.raises(ValueError, match="BIOS area"):
        mptable.build(2, base)


def test_a_corrupted_byte_breaks_a_checksum() -> None:
    data = bytearray(mptable.build(4))
    data[16 + 60] ^= 1  # inside the first processor entry
    assert sum(data[16:]) % 256 != 0
    data = bytearray(mptable.build(4))
    data[4] ^= 1  # the floating pointer's physptr
    assert linux_scan(low_memory(bytes(data))) is None


def test_machine_writes_the_table_only_for_more_than_one_vcpu() -> None:
    with ProbeVm("hello", vcpus=2) as vm:
        size = mptable.table_size(2)
        ram = vm.machine.ram.read(mptable.MPTABLE_ADDR, size)
        assert ram == mptable.build(2)
    with ProbeVm("hello") as vm:  # one vCPU: no MP table, the boot is exactly as before
        assert vm.machine.ram.read(mptable.MPTABLE_ADDR, 0x10000) == bytes(0x10000)
