"""Intel MultiProcessor Specification (1.4) tables: how an SMP guest finds its vCPUs.

The board has no firmware and no ACPI, so a Linux guest (CONFIG_X86_MPPARSE)
learns how many processors there are, where the IOAPIC is and how interrupts
reach it only from an MP table: a 16-byte *floating pointer* that Linux scans
for (the first KiB of RAM, the KiB below 640 KiB, then the BIOS area
0xF0000-0xFFFFF, 16-byte aligned) pointing at a *configuration table*: a
header, then one entry per vCPU, the ISA bus, the IOAPIC, one interrupt
assignment per IOAPIC pin and the two local-interrupt lines. Each part carries
a checksum that makes its bytes sum to 0.

Both go at the start of the BIOS area, which the e820 map already reserves
(boot.e820_map), so the guest never reuses those pages; the last KiB below
640 KiB (the EBDA) would not hold the table of 64 vCPUs. The wiring mirrors
what KVM's in-kernel irqchip does with its default routing: GSI n is IOAPIC
pin n (the PIT on pin 0, COM1 on 4, virtio-mmio device k on 5 + k), ISA
interrupts, edge-triggered, active high. The VMM writes the table only for
more than one vCPU: a one-vCPU guest keeps booting exactly as before (no MP
table: virtual-wire mode through the PIC).
"""

from __future__ import annotations

import struct

from sporevm.vmm.memory import GuestMemory

MPTABLE_ADDR = 0xF0000  # the floating pointer; the configuration table follows it
BIOS_END = 0x100000
MAX_VCPUS = 64  # machine.vcpus' bound; LAPIC ids 0..63 and the IOAPIC id fit a byte
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
IOAPIC_PINS = 24  # KVM's in-kernel IOAPIC
APIC_VERSION = 0x14  # what KVM's LAPIC version register reads
IOAPIC_VERSION = 0x11  # what KVM's IOAPIC version register reads
SPEC_REVISION = 4  # MP spec 1.4
OEM_ID = b"SPORE   "
PRODUCT_ID = b"SPORE-VM    "
ISA_BUS_ID = 0
ISA_BUS_TYPE = b"ISA   "

# Entry types and flags (arch/x86/include/asm/mpspec_def.h).
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
MPC_APIC_USABLE = 1
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
MP_IRQ_DEFAULT = 0  # polarity and trigger "conform to the bus": ISA = active high, edge
MP_APIC_ALL = 0xFF
# CPU signature and feature flags of the processor entries: informational only (Linux
# reads CPUID itself); family 6, and FPU + APIC as every x86-64 CPU has them.
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)

FLOATING_SIZE = 16
HEADER_SIZE = 44
PROCESSOR_SIZE = 20
ENTRY_SIZE = 8  # bus, IOAPIC, interrupt source, local interrupt source


def table_size(vcpus: int) -> int:
    """Bytes of floating pointer + configuration table for ``vcpus`` vCPUs."""
    return FLOATING_SIZE + HEADER_SIZE + PROCESSOR_SIZE * vcpus + ENTRY_SIZE * (2 + IOAPIC_PINS + 2)


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte as 0) sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def ioapic_id(vcpus: int) -> int:
    """The IOAPIC's id: the first one above every LAPIC id (0 .. vcpus - 1)."""
    return vcpus


def build(vcpus: int, base: int = MPTABLE_ADDR) -> bytes:
    """Floating pointer at ``base`` followed by the configuration table, checksummed."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"MP table: {vcpus} vCPUs; must be 1..{MAX_VCPUS}")
    if base % 16 or not MPTABLE_ADDR <= base or base + table_size(vcpus) > BIOS_END:
        raise ValueError(f"MP table at {base:#x} is not 16-byte aligned inside the BIOS area")
    io_id = ioapic_id(vcpus)
    entries = b"".join(
        struct.pack(
            "<BBBBII8x",
            MP_PROCESSOR,
            cpu,
            APIC_VERSION,
            CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0),
            CPU_SIGNATURE,
            CPU_FEATURES,
        )
        for cpu in range(vcpus)
    )
    entries += struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, ISA_BUS_TYPE)
    entries += struct.pack("<BBBBI", MP_IOAPIC, io_id, IOAPIC_VERSION, MPC_APIC_USABLE, IOAPIC_ADDR)
    # GSI n = IOAPIC pin n, as KVM routes KVM_IRQ_LINE by default.
    entries += b"".join(
        struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, MP_IRQ_DEFAULT, ISA_BUS_ID, pin, io_id, pin)
        for pin in range(IOAPIC_PINS)
    )
    # LINT0 is the 8259's ExtINT (virtual wire), LINT1 NMI, on every LAPIC.
    entries += struct.pack(
        "<BBHBBBB", MP_LINTSRC, MP_EXTINT, MP_IRQ_DEFAULT, ISA_BUS_ID, 0, MP_APIC_ALL, 0
    )
    entries += struct.pack(
        "<BBHBBBB", MP_LINTSRC, MP_NMI, MP_IRQ_DEFAULT, ISA_BUS_ID, 0, MP_APIC_ALL, 1
    )
    count = vcpus + 2 + IOAPIC_PINS + 2
    length = HEADER_SIZE + len(entries)
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBB",
            b"PCMP",
            length,
            SPEC_REVISION,
            0,
            OEM_ID,
            PRODUCT_ID,
            0,
            0,
            count,
            LAPIC_ADDR,
            0,
            0,
            0,
        )
    )
    table = bytearray(header + entries)
    table[7] = checksum(bytes(table))
    # Floating pointer: physptr, length 1 (16-byte units), revision, checksum, no default
    # configuration (feature1 0: the table is present), no IMCR (feature2 0: virtual wire).
    floating = bytearray(
        struct.pack("<4sIBBBBB3x", b"_MP_", base + FLOATING_SIZE, 1, SPEC_REVISION, 0, 0, 0)
    )
    floating[10] = checksum(bytes(floating))
    return bytes(floating + table)


def write(mem: GuestMemory, vcpus: int, base: int = MPTABLE_ADDR) -> int:
    """Write the MP table for ``vcpus`` vCPUs into guest RAM; returns its size."""
    data = build(vcpus, base)
    if base + len(data) > mem.size:
        raise ValueError(f"MP table at {base:#x} does not fit in guest RAM ({mem.size:#x})")
    mem.write(base, data)
    return len(data)
