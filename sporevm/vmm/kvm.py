"""The KVM ABI: ioctl numbers, struct layouts and a GIL-free ioctl, declared once.

Layouts follow ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``
(x86_64). Every struct that crosses the ioctl boundary is size-asserted at
import so an accidental layout change fails loudly instead of corrupting state.

``ioctl`` goes through ctypes' libc binding, which releases the GIL for the
duration of the call: a vCPU thread blocked in KVM_RUN never stalls the rest of
the VMM (``fcntl.ioctl`` would hold the GIL).
"""

from __future__ import annotations

import ctypes
import os
from ctypes import (
    Structure,
    Union,
    c_char,
    c_int,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_ulong,
    c_void_p,
    sizeof,
)
from typing import TypeVar

from sporevm.errors import SporeError

# The state structures are the spore VM-state schema (sporevm/spore/x86.py, the format's):
# the same layouts KVM's ioctls take, re-exported here with the rest of the KVM ABI.
from sporevm.spore.x86 import IoapicState as IoapicState
from sporevm.spore.x86 import KvmClockData as KvmClockData
from sporevm.spore.x86 import KvmDtable as KvmDtable
from sporevm.spore.x86 import KvmFpu as KvmFpu
from sporevm.spore.x86 import KvmLapicState as KvmLapicState
from sporevm.spore.x86 import KvmPitChannelState as KvmPitChannelState
from sporevm.spore.x86 import KvmPitState2 as KvmPitState2
from sporevm.spore.x86 import KvmRegs as KvmRegs
from sporevm.spore.x86 import KvmSegment as KvmSegment
from sporevm.spore.x86 import KvmSregs as KvmSregs
from sporevm.spore.x86 import KvmVcpuEvents as KvmVcpuEvents
from sporevm.spore.x86 import KvmXcr as KvmXcr
from sporevm.spore.x86 import KvmXcrs as KvmXcrs
from sporevm.spore.x86 import KvmXsave as KvmXsave
from sporevm.spore.x86 import PicState as PicState


class KvmError(SporeError):
    """A KVM ioctl failed or KVM lacks something the VMM needs."""


# --- ioctl encoding (asm-generic/ioctl.h) -------------------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# --- structs ------------------------------------------------------------------------------


class KvmCpuidEntry2(Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
MAX_CPUID_ENTRIES = 256


class KvmCpuid2(Structure):
    _fields_ = [
        ("nent", c_uint32),
        ("padding", c_uint32),
        ("entries", KvmCpuidEntry2 * MAX_CPUID_ENTRIES),
    ]


class KvmIrqchip(Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", c_char * 512)]


KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2


class KvmPitConfig(Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8


class KvmMsrEntry(Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


MAX_MSRS = 256


class KvmMsrs(Structure):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", KvmMsrEntry * MAX_MSRS)]


class KvmMsrList(Structure):
    _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * 1024)]


class KvmMpState(Structure):
    _fields_ = [("mp_state", c_uint32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class KvmUserspaceMemoryRegion(Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2


class KvmDirtyLog(Structure):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class KvmIrqLevel(Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class KvmIoeventfd(Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class KvmIrqfd(Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class KvmSignalMask(Structure):
    # struct kvm_signal_mask has a flexible sigset; the kernel's sigset is 8 bytes on x86_64.
    _fields_ = [("len", c_uint32), ("sigset", c_uint8 * 8)]


class KvmTranslation(Structure):
    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


# --- the kvm_run page (mmap'd from the vCPU fd) -------------------------------------------


class RunIo(Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1


class RunMmio(Structure):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class RunInternal(Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class RunFailEntry(Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class RunSystemEvent(Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class RunException(Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class RunExit(Union):
    _fields_ = [
        ("io", RunIo),
        ("mmio", RunMmio),
        ("internal", RunInternal),
        ("fail_entry", RunFailEntry),
        ("system_event", RunSystemEvent),
        ("ex", RunException),
        ("hw_exit_reason", c_uint64),
        ("padding", c_char * 256),
    ]


class KvmRun(Structure):
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", RunExit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
    ]


# Exit reasons (uapi/linux/kvm.h).
EXIT_NAMES = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    7: "IRQ_WINDOW_OPEN",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    11: "SET_TPR",
    12: "TPR_ACCESS",
    17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
}
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_CRASH = 1, 2, 3

# --- layout checks ------------------------------------------------------------------------

# (The VM-state structures are size-checked where they are defined: sporevm/spore/x86.py.)
_SIZES: dict[type[Structure] | type[Union], int] = {
    KvmCpuidEntry2: 40,
    KvmIrqchip: 520,
    KvmPitConfig: 64,
    KvmMsrEntry: 16,
    KvmUserspaceMemoryRegion: 32,
    KvmDirtyLog: 16,
    KvmIrqLevel: 8,
    KvmIoeventfd: 64,
    KvmIrqfd: 32,
    KvmTranslation: 24,
    RunIo: 16,
    RunMmio: 24,
    RunExit: 256,
    KvmRun: 304,
}
for _t, _n in _SIZES.items():
    assert sizeof(_t) == _n, f"{_t.__name__} is {sizeof(_t)} bytes, KVM expects {_n}"
assert KvmRun.exit.offset == 32 and KvmRun.kvm_valid_regs.offset == 288

# --- ioctl numbers ------------------------------------------------------------------------

# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)  # sizeof(struct kvm_msr_list) without the array
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
# VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, sizeof(KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, sizeof(KvmIrqLevel))
KVM_GET_IRQCHIP = _iowr(0x62, sizeof(KvmIrqchip))
KVM_SET_IRQCHIP = _ior(0x63, sizeof(KvmIrqchip))  # sic: the uapi header encodes it _IOR
KVM_IRQFD = _iow(0x76, sizeof(KvmIrqfd))
KVM_CREATE_PIT2 = _iow(0x77, sizeof(KvmPitConfig))
KVM_IOEVENTFD = _iow(0x79, sizeof(KvmIoeventfd))
KVM_SET_CLOCK = _iow(0x7B, sizeof(KvmClockData))
KVM_GET_CLOCK = _ior(0x7C, sizeof(KvmClockData))
KVM_GET_PIT2 = _ior(0x9F, sizeof(KvmPitState2))  # same nr as GET_VCPU_EVENTS, other fd
KVM_SET_PIT2 = _iow(0xA0, sizeof(KvmPitState2))
# vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, sizeof(KvmSregs))
KVM_TRANSLATE = _iowr(0x85, sizeof(KvmTranslation))
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_SET_SIGNAL_MASK = _iow(0x8B, 4)
KVM_GET_FPU = _ior(0x8C, sizeof(KvmFpu))
KVM_SET_FPU = _iow(0x8D, sizeof(KvmFpu))
KVM_GET_LAPIC = _ior(0x8E, sizeof(KvmLapicState))
KVM_SET_LAPIC = _iow(0x8F, sizeof(KvmLapicState))
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_CPUID2 = _iowr(0x91, 8)
KVM_GET_MP_STATE = _ior(0x98, sizeof(KvmMpState))
KVM_SET_MP_STATE = _iow(0x99, sizeof(KvmMpState))
KVM_GET_VCPU_EVENTS = _ior(0x9F, sizeof(KvmVcpuEvents))
KVM_SET_VCPU_EVENTS = _iow(0xA0, sizeof(KvmVcpuEvents))
KVM_GET_XSAVE = _ior(0xA4, sizeof(KvmXsave))
KVM_SET_XSAVE = _iow(0xA5, sizeof(KvmXsave))
KVM_GET_XCRS = _ior(0xA6, sizeof(KvmXcrs))
KVM_SET_XCRS = _iow(0xA7, sizeof(KvmXcrs))

assert KVM_SET_IRQCHIP == 0x8208AE63
assert KVM_GET_PIT2 & 0xFF == KVM_GET_VCPU_EVENTS & 0xFF == 0x9F

# Capabilities (KVM_CHECK_EXTENSION).
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT2 = 33
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_CAP_IMMEDIATE_EXIT = 136

KVM_API_VERSION = 12

# --- the call -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [c_int, c_ulong, c_void_p]
_ioctl.restype = c_int

_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_") and isinstance(v, int)}


def ioctl(fd: int, request: int, arg: int | ctypes._CData | None = None) -> int:
    """ioctl(2) without the GIL; ``arg`` is an int or a ctypes object passed by reference."""
    ptr: object = arg if arg is None or isinstance(arg, int) else ctypes.byref(arg)
    ret = int(_ioctl(fd, request, ptr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{_NAMES.get(request, hex(request))}: {os.strerror(err)}")
    return ret


def ioctl_eintr_ok(fd: int, request: int) -> tuple[int, int]:
    """Like ``ioctl`` for KVM_RUN: returns (ret, errno) instead of raising."""
    ret = int(_ioctl(fd, request, None))
    return ret, (ctypes.get_errno() if ret < 0 else 0)


_S = TypeVar("_S", bound=Structure)


def fill(fd: int, request: int, s: _S) -> _S:
    """Run a getter ioctl into ``s`` and return it."""
    ioctl(fd, request, s)
    return s


class IrqLineIoctl:
    """A GSI on the in-kernel irqchip (KVM_IRQ_LINE); redundant levels are not re-sent."""

    def __init__(self, vm_fd: int, gsi: int) -> None:
        self._fd, self.gsi, self._level = vm_fd, gsi, False

    def set_level(self, high: bool) -> None:
        if high == self._level:
            return
        self._level = high
        ioctl(self._fd, KVM_IRQ_LINE, KvmIrqLevel(self.gsi, int(high)))


class IrqLineEventfd:
    """A GSI driven through KVM_IRQFD: each write to the eventfd pulses the line (up, then
    down) inside KVM without a VM ioctl. The board's lines are edge-triggered in the guest
    (PIC in virtual-wire mode, IOAPIC pins declared edge in the MP table), so a pulse on
    every rising level is what ``IrqLineIoctl`` delivers too; lowering is then a no-op."""

    def __init__(self, fd: int) -> None:
        self.fd, self._level = fd, False
        self._one = (1).to_bytes(8, "little")

    def set_level(self, high: bool) -> None:
        if high and not self._level:
            os.write(self.fd, self._one)
        self._level = high


def struct_bytes(s: Structure) -> bytes:
    return ctypes.string_at(ctypes.addressof(s), sizeof(s))


def struct_from(cls: type[Structure], data: bytes) -> Structure:
    if len(data) != sizeof(cls):
        raise KvmError(f"{cls.__name__}: expected {sizeof(cls)} bytes, got {len(data)}")
    return cls.from_buffer_copy(data)


def supported_cpuid(sys_fd: int) -> list[KvmCpuidEntry2]:
    c = KvmCpuid2()
    c.nent = MAX_CPUID_ENTRIES
    ioctl(sys_fd, KVM_GET_SUPPORTED_CPUID, c)
    return [KvmCpuidEntry2.from_buffer_copy(c.entries[i]) for i in range(c.nent)]


def msr_index_list(sys_fd: int) -> list[int]:
    m = KvmMsrList()
    m.nmsrs = len(m.indices)
    ioctl(sys_fd, KVM_GET_MSR_INDEX_LIST, m)
    return [int(m.indices[i]) for i in range(m.nmsrs)]


def host_class() -> str:
    """Which KVM module backs /dev/kvm: "kvm_pvm", "kvm_intel", "kvm_amd" or "unknown".

    kvm_pvm (a software hypervisor: guest kernel code is emulated) needs the guest-kernel
    patch set and the VMM fix-ups described in docs/vmm.md.
    """
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{name}"):
            return name
    return "unknown"
