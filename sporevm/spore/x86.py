"""x86-64 machine state as the spore VM-state schema lays it out (docs/vm-state.md).

The VM state object of a spore (``spore-vmstate/v1``, ``vmstate.py``) names each
field of these structures: they *are* the schema. Their layouts are KVM's
(``arch/x86/include/uapi/asm/kvm.h``), byte for byte, so the KVM backend
(``sporevm/vmm/kvm.py`` re-exports them) hands them to its ioctls as they are;
another backend converts its own CPU and chipset state to and from them.

This module belongs to the spore format and imports no VMM. Every structure is
size-asserted at import, so an accidental layout change fails loudly instead of
changing what a spore means.
"""

from __future__ import annotations

import ctypes
from ctypes import Structure, c_char, c_int64, c_uint8, c_uint16, c_uint32, c_uint64, sizeof


class KvmRegs(Structure):
    _fields_ = [
        (n, c_uint64)
        for n in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class KvmSegment(Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        *[(n, c_uint8) for n in "type present dpl db s l g avl unusable padding".split()],
    ]


class KvmDtable(Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class KvmSregs(Structure):
    _fields_ = [
        *[(n, KvmSegment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *[(n, c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class KvmFpu(Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


_PIT_U8 = "count_latched status_latched status read_state write_state write_latch rw_mode mode"


class KvmPitChannelState(Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        *[(n, c_uint8) for n in (*_PIT_U8.split(), "bcd", "gate")],
        ("count_load_time", c_int64),
    ]


class KvmPitState2(Structure):
    _fields_ = [
        ("channels", KvmPitChannelState * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


class KvmClockData(Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class _EvException(Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _EvInterrupt(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _EvNmi(Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _EvSmi(Structure):
    _fields_ = [(n, c_uint8) for n in ("smm", "pending", "smm_inside_nmi", "latched_init")]


class KvmVcpuEvents(Structure):
    _fields_ = [
        ("exception", _EvException),
        ("interrupt", _EvInterrupt),
        ("nmi", _EvNmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _EvSmi),
        ("triple_fault_pending", c_uint8),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class KvmXcr(Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class KvmXcrs(Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", KvmXcr * 16),
        ("padding", c_uint64 * 16),
    ]


class KvmLapicState(Structure):
    _fields_ = [("regs", c_char * 1024)]


class KvmXsave(Structure):
    _fields_ = [("region", c_uint32 * 1024)]


# --- irqchip payloads (the union inside struct kvm_irqchip) --------------------------------


class PicState(Structure):
    """struct kvm_pic_state (arch/x86/include/uapi/asm/kvm.h)."""

    _fields_ = [
        (n, ctypes.c_uint8)
        for n in (
            "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask "
            "init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr "
            "elcr_mask"
        ).split()
    ]


IOAPIC_PINS = 24


class IoapicState(Structure):
    """struct kvm_ioapic_state; ``redirtbl`` holds each pin's 64-bit redirection entry."""

    _fields_ = [
        ("base_address", ctypes.c_uint64),
        ("ioregsel", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("irr", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("redirtbl", ctypes.c_uint64 * IOAPIC_PINS),
    ]


# --- layout checks ------------------------------------------------------------------------

_SIZES: dict[type[Structure], int] = {
    KvmRegs: 144,
    KvmSegment: 24,
    KvmDtable: 16,
    KvmSregs: 312,
    KvmFpu: 416,
    KvmPitChannelState: 24,
    KvmPitState2: 112,
    KvmClockData: 48,
    KvmVcpuEvents: 64,
    KvmXcrs: 392,
    KvmLapicState: 1024,
    KvmXsave: 4096,
    PicState: 16,
    IoapicState: 216,
}
for _t, _n in _SIZES.items():
    assert sizeof(_t) == _n, f"{_t.__name__} is {sizeof(_t)} bytes, KVM expects {_n}"
assert KvmVcpuEvents.exception_payload.offset == 56
