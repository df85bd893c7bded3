"""One vCPU: its fd and kvm_run page, CPUID/MSR setup, long-mode entry, state access.

Every piece of architectural state a snapshot needs has a getter and a setter
here that moves whole KVM structs; ``capture``/``apply`` move all of them as the
spore VM-state schema's ``VcpuState``, ``apply`` in the order KVM needs.
``code_at`` translates a guest virtual address through the guest's own page
tables so fault reports can show the instruction bytes at RIP.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from sporevm.spore.vmstate import MSR_TSC_DEADLINE, VcpuState, VmStateError
from sporevm.vmm import kvm
from sporevm.vmm.kvm import (
    KvmCpuid2,
    KvmCpuidEntry2,
    KvmFpu,
    KvmLapicState,
    KvmMpState,
    KvmMsrs,
    KvmRegs,
    KvmRun,
    KvmSignalMask,
    KvmSregs,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
    ioctl,
)

# Control-register and EFER bits used by the boot path and the page walker.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1,
    1 << 1,
    1 << 4,
    1 << 5,
    1 << 16,
    1 << 18,
    1 << 31,
)
CR4_PSE, CR4_PAE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_IF = 1 << 9

# KVM paravirt features we expose (CPUID 0x40000001.EAX). A conservative subset:
# kvmclock (0, 3) and its stable bit (24), and NOP_IO_DELAY (1). Async page faults,
# steal time and PV EOI are left out: each parks guest-memory pointers in MSRs that
# a snapshot would have to carry and a fork would have to re-home.
KVM_PV_FEATURES = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24)

# MSRs initialised on every vCPU (written only if KVM lists them).
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_LSTAR: 0,
    MSR_CSTAR: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: 1,  # fast-string enable, as firmware leaves it
    MSR_MTRR_DEF_TYPE: (1 << 11) | 6,  # MTRRs on, default type write-back
}


_S = TypeVar("_S", bound=ctypes.Structure)


class PhysReader(Protocol):
    size: int

    def read(self, gpa: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class LongModeEntry:
    """Where and how the boot path enters the guest (64-bit, paging on)."""

    rip: int
    rsi: int
    cr3: int
    gdt_base: int
    gdt_limit: int
    code_selector: int
    data_selector: int
    tss_selector: int
    tss_base: int
    tss_limit: int
    rsp: int = 0


def build_cpuid(supported: list[KvmCpuidEntry2], index: int, count: int) -> list[KvmCpuidEntry2]:
    """The CPUID table for vCPU ``index`` of ``count``: host-supported leaves, fixed up."""
    out: list[KvmCpuidEntry2] = []
    for src in supported:
        e = KvmCpuidEntry2.from_buffer_copy(src)
        if e.function == 1:
            e.ecx |= 1 << 31  # hypervisor present
            e.ebx = (e.ebx & 0xFFFF) | (index << 24) | (count << 16)
            if count > 1:
                e.edx |= 1 << 28  # HTT: the logical-count field is valid
        elif e.function in (0xB, 0x1F):
            e.edx = index  # x2APIC id
        elif e.function == 0x40000000:
            e.eax = 0x40000001
            e.ebx, e.ecx, e.edx = (
                int.from_bytes(b, "little") for b in (b"KVMK", b"VMKV", b"M\0\0\0")
            )
        elif e.function == 0x40000001:
            e.eax &= KVM_PV_FEATURES
            e.ebx = e.ecx = e.edx = 0
        out.append(e)
    return out


class Vcpu:
    """A vCPU fd plus its mmap'd kvm_run page."""

    def __init__(self, vm_fd: int, index: int, mmap_size: int) -> None:
        self.index = index
        self.fd = ioctl(vm_fd, kvm.KVM_CREATE_VCPU, index)
        try:
            self._mm = mmap.mmap(
                self.fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self.fd)
            raise
        probe = (ctypes.c_char * 1).from_buffer(self._mm)
        self._base = ctypes.addressof(probe)
        del probe  # keep no buffer export alive, so close() can unmap
        self.run = KvmRun.from_address(self._base)

    def close(self) -> None:
        if self.fd >= 0:
            self._mm.close()
            os.close(self.fd)
            self.fd = -1

    # --- kvm_run page access ---------------------------------------------------------
    def io_data(self, length: int) -> bytes:
        return ctypes.string_at(self._base + self.run.exit.io.data_offset, length)

    def set_io_data(self, data: bytes) -> None:
        ctypes.memmove(self._base + self.run.exit.io.data_offset, data, len(data))

    # --- setup -----------------------------------------------------------------------
    def set_cpuid(self, entries: list[KvmCpuidEntry2]) -> None:
        c = KvmCpuid2()
        c.nent = len(entries)
        for i, e in enumerate(entries):
            c.entries[i] = e
        ioctl(self.fd, kvm.KVM_SET_CPUID2, c)

    def get_cpuid(self) -> list[KvmCpuidEntry2]:
        c = KvmCpuid2()
        c.nent = kvm.MAX_CPUID_ENTRIES
        ioctl(self.fd, kvm.KVM_GET_CPUID2, c)
        return [KvmCpuidEntry2.from_buffer_copy(c.entries[i]) for i in range(c.nent)]

    def set_signal_mask(self, blocked: set[int]) -> None:
        """The signal mask in force *while inside KVM_RUN* (see machine.py's kick)."""
        m = KvmSignalMask()
        m.len = 8
        bits = sum(1 << (s - 1) for s in blocked)
        for i in range(8):
            m.sigset[i] = (bits >> (8 * i)) & 0xFF
        ioctl(self.fd, kvm.KVM_SET_SIGNAL_MASK, m)

    def enter_long_mode(self, e: LongModeEntry) -> None:
        s = self.get_sregs()
        code = s.cs
        code.base, code.limit, code.selector = 0, 0xFFFFFFFF, e.code_selector
        code.type, code.present, code.dpl, code.db, code.s, code.l, code.g = 0xB, 1, 0, 0, 1, 1, 1
        code.avl = code.unusable = 0
        for name in ("ds", "es", "fs", "gs", "ss"):
            d = getattr(s, name)
            d.base, d.limit, d.selector = 0, 0xFFFFFFFF, e.data_selector
            d.type, d.present, d.dpl, d.db, d.s, d.l, d.g = 0x3, 1, 0, 1, 1, 0, 1
            d.avl = d.unusable = 0
        t = s.tr
        t.base, t.limit, t.selector = e.tss_base, e.tss_limit, e.tss_selector
        t.type, t.present, t.dpl, t.db, t.s, t.l, t.g = 0xB, 1, 0, 0, 0, 0, 0  # busy 64-bit TSS
        t.avl = t.unusable = 0
        s.gdt.base, s.gdt.limit = e.gdt_base, e.gdt_limit
        s.idt.base, s.idt.limit = 0, 0
        s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
        s.cr3 = e.cr3
        s.cr4 = CR4_PAE
        s.efer = EFER_LME | EFER_LMA
        self.set_sregs(s)
        r = KvmRegs()
        r.rflags = 2  # bit 1 is reserved-one; interrupts off until the guest enables them
        r.rip, r.rsi, r.rsp = e.rip, e.rsi, e.rsp
        self.set_regs(r)

    # --- state: each getter returns a fresh struct the matching setter accepts -------
    def _get(self, req: int, cls: type[_S]) -> _S:
        return kvm.fill(self.fd, req, cls())

    def get_regs(self) -> KvmRegs:
        return self._get(kvm.KVM_GET_REGS, KvmRegs)

    def set_regs(self, s: KvmRegs) -> None:
        ioctl(self.fd, kvm.KVM_SET_REGS, s)

    def get_sregs(self) -> KvmSregs:
        return self._get(kvm.KVM_GET_SREGS, KvmSregs)

    def set_sregs(self, s: KvmSregs) -> None:
        ioctl(self.fd, kvm.KVM_SET_SREGS, s)

    def get_fpu(self) -> KvmFpu:
        return self._get(kvm.KVM_GET_FPU, KvmFpu)

    def set_fpu(self, s: KvmFpu) -> None:
        ioctl(self.fd, kvm.KVM_SET_FPU, s)

    def get_xsave(self) -> KvmXsave:
        return self._get(kvm.KVM_GET_XSAVE, KvmXsave)

    def set_xsave(self, s: KvmXsave) -> None:
        ioctl(self.fd, kvm.KVM_SET_XSAVE, s)

    def get_xcrs(self) -> KvmXcrs:
        return self._get(kvm.KVM_GET_XCRS, KvmXcrs)

    def set_xcrs(self, s: KvmXcrs) -> None:
        ioctl(self.fd, kvm.KVM_SET_XCRS, s)

    def get_lapic(self) -> KvmLapicState:
        return self._get(kvm.KVM_GET_LAPIC, KvmLapicState)

    def set_lapic(self, s: KvmLapicState) -> None:
        ioctl(self.fd, kvm.KVM_SET_LAPIC, s)

    def get_events(self) -> KvmVcpuEvents:
        return self._get(kvm.KVM_GET_VCPU_EVENTS, KvmVcpuEvents)

    def set_events(self, s: KvmVcpuEvents) -> None:
        ioctl(self.fd, kvm.KVM_SET_VCPU_EVENTS, s)

    def get_mp_state(self) -> int:
        s = KvmMpState()
        ioctl(self.fd, kvm.KVM_GET_MP_STATE, s)
        return int(s.mp_state)

    def set_mp_state(self, state: int) -> None:
        s = KvmMpState()
        s.mp_state = state
        ioctl(self.fd, kvm.KVM_SET_MP_STATE, s)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        if len(indices) > kvm.MAX_MSRS:
            raise kvm.KvmError(f"at most {kvm.MAX_MSRS} MSRs per call")
        m = KvmMsrs()
        m.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            m.entries[i].index = idx
        n = ioctl(self.fd, kvm.KVM_GET_MSRS, m)
        if n != len(indices):
            raise kvm.KvmError(
                f"KVM_GET_MSRS read {n} of {len(indices)}; MSR {indices[n]:#x} is not readable"
            )
        return {int(m.entries[i].index): int(m.entries[i].data) for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        if len(values) > kvm.MAX_MSRS:
            raise kvm.KvmError(f"at most {kvm.MAX_MSRS} MSRs per call")
        m = KvmMsrs()
        m.nmsrs = len(values)
        for i, (idx, val) in enumerate(values.items()):
            m.entries[i].index, m.entries[i].data = idx, val
        n = ioctl(self.fd, kvm.KVM_SET_MSRS, m)
        if n != len(values):
            bad = list(values)[n]
            raise kvm.KvmError(f"KVM_SET_MSRS wrote {n} of {len(values)}; MSR {bad:#x} refused")

    # --- the vCPU's part of a spore's VM state (docs/vm-state.md) ------------------------
    def capture(self, msrs: list[int]) -> VcpuState:
        """Every piece of this (stopped) vCPU's state; ``msrs``: the MSRs to read."""
        return VcpuState(
            regs=self.get_regs(),
            sregs=self.get_sregs(),
            fpu=self.get_fpu(),
            xsave=self.get_xsave(),
            xcrs=self.get_xcrs(),
            msrs=self.get_msrs(msrs),
            lapic=self.get_lapic(),
            events=self.get_events(),
            mp_state=self.get_mp_state(),
        )

    def apply(self, s: VcpuState, where: str) -> None:
        """Write ``s`` into this never-run vCPU, in the order KVM needs (docs/vm-state.md,
        "Restore order"): sregs before regs (the mode RIP and RFLAGS are read in, and
        APIC_BASE); FPU, XCRs, then XSAVE (XCR0 enables what XSAVE carries; XSAVE
        supersedes the legacy FPU image); MSRs (APIC_BASE before the LAPIC, the TSC
        before the clock); the LAPIC; TSC_DEADLINE only after it (KVM drops a deadline
        unless the LAPIC timer is already in deadline mode); MP state; vCPU events last
        (pending exceptions, NMIs and the interrupt shadow apply to all of the above).
        What KVM refuses is a VmStateError naming ``where`` and the part."""
        early = {k: val for k, val in s.msrs.items() if k != MSR_TSC_DEADLINE}
        steps: list[tuple[str, Callable[[], None]]] = [
            ("sregs", lambda: self.set_sregs(s.sregs)),
            ("regs", lambda: self.set_regs(s.regs)),
            ("fpu", lambda: self.set_fpu(s.fpu)),
            ("xcrs", lambda: self.set_xcrs(s.xcrs)),
            ("xsave", lambda: self.set_xsave(s.xsave)),
            ("msrs", lambda: self.set_msrs(early)),
            ("lapic", lambda: self.set_lapic(s.lapic)),
        ]
        if MSR_TSC_DEADLINE in s.msrs:
            deadline = {MSR_TSC_DEADLINE: s.msrs[MSR_TSC_DEADLINE]}
            steps.append(("msrs (TSC_DEADLINE)", lambda: self.set_msrs(deadline)))
        steps += [
            ("mp_state", lambda: self.set_mp_state(s.mp_state)),
            ("events", lambda: self.set_events(s.events)),
        ]
        for part, fn in steps:
            refused(f"{where}.{part}", fn)

    def dead_halted(self) -> bool:
        """In HLT with interrupts disabled: only NMI/INIT could wake it, and we send neither."""
        if self.get_mp_state() != kvm.KVM_MP_STATE_HALTED:
            return False
        return not self.get_regs().rflags & RFLAGS_IF

    def readable_msrs(self, candidates: list[int]) -> list[int]:
        """The subset of ``candidates`` this vCPU can read (the snapshot MSR list)."""
        ok = []
        for idx in candidates:
            try:
                self.get_msrs([idx])
            except kvm.KvmError:
                continue
            ok.append(idx)
        return ok


def refused(what: str, fn: Callable[[], None]) -> None:
    """Run one step of applying a spore's state; KVM refusing it is a VmStateError."""
    try:
        fn()
    except (OSError, kvm.KvmError) as e:
        raise VmStateError(f"restoring {what}: KVM refused the state ({e})") from None


# --- kvm_pvm fix-ups ------------------------------------------------------------------

INT3, FWAIT = 0xCC, 0x9B
BP_VECTOR = 3


def host_fixup(v: Vcpu, mem: PhysReader) -> str | None:
    """Complete an instruction kvm_pvm's emulator stopped on (INTERNAL_ERROR, suberror 1).

    Only two exact one-byte instructions, recognised by the byte at RIP: ``int3``
    is delivered as the #BP trap the CPU would raise (RIP advanced past it first,
    as hardware pushes it), ``fwait`` without pending x87 exceptions is a no-op and
    is stepped over. Returns the fix-up's name, or None when it is neither.
    """
    regs, sregs = v.get_regs(), v.get_sregs()
    pa = translate(mem, sregs, int(regs.rip))
    if pa is None or pa >= mem.size:
        return None
    op = mem.read(pa, 1)[0]
    if op not in (INT3, FWAIT):
        return None
    regs.rip += 1
    v.set_regs(regs)
    if op == FWAIT:
        return "fwait"
    ev = v.get_events()
    ev.exception.injected, ev.exception.nr = 1, BP_VECTOR
    ev.exception.has_error_code, ev.exception.error_code = 0, 0
    ev.flags = 0
    v.set_events(ev)
    return "int3"


# --- diagnostics ----------------------------------------------------------------------

_PTE_P, _PTE_PS = 1, 1 << 7
_ADDR_MASK = 0x000F_FFFF_FFFF_F000


def translate(mem: PhysReader, sregs: KvmSregs, gva: int) -> int | None:
    """Guest virtual → physical through the guest page tables (None if unmapped)."""
    if not sregs.cr0 & CR0_PG:
        return gva & 0xFFFFFFFF
    try:
        if sregs.efer & EFER_LMA:
            levels = 5 if sregs.cr4 & CR4_LA57 else 4
            table = sregs.cr3 & _ADDR_MASK
            for level in range(levels, 0, -1):
                shift = 12 + 9 * (level - 1)
                pte = int.from_bytes(mem.read(table + ((gva >> shift) & 0x1FF) * 8, 8), "little")
                if not pte & _PTE_P:
                    return None
                if level == 1 or (level in (2, 3) and pte & _PTE_PS):
                    base = pte & _ADDR_MASK & ~((1 << shift) - 1)
                    return base | (gva & ((1 << shift) - 1))
                table = pte & _ADDR_MASK
            return None
        if sregs.cr4 & CR4_PAE:
            pdpte = int.from_bytes(
                mem.read((sregs.cr3 & ~0x1F) + ((gva >> 30) & 3) * 8, 8), "little"
            )
            if not pdpte & _PTE_P:
                return None
            pde = int.from_bytes(
                mem.read((pdpte & _ADDR_MASK) + ((gva >> 21) & 0x1FF) * 8, 8), "little"
            )
            if not pde & _PTE_P:
                return None
            if pde & _PTE_PS:
                return (pde & _ADDR_MASK & ~0x1FFFFF) | (gva & 0x1FFFFF)
            pte = int.from_bytes(
                mem.read((pde & _ADDR_MASK) + ((gva >> 12) & 0x1FF) * 8, 8), "little"
            )
            return (pte & _ADDR_MASK) | (gva & 0xFFF) if pte & _PTE_P else None
        pde = int.from_bytes(
            mem.read((sregs.cr3 & ~0xFFF) + ((gva >> 22) & 0x3FF) * 4, 4), "little"
        )
        if not pde & _PTE_P:
            return None
        if pde & _PTE_PS and sregs.cr4 & CR4_PSE:
            return (pde & 0xFFC00000) | (gva & 0x3FFFFF)
        pte = int.from_bytes(mem.read((pde & ~0xFFF) + ((gva >> 12) & 0x3FF) * 4, 4), "little")
        return (pte & ~0xFFF) | (gva & 0xFFF) if pte & _PTE_P else None
    except Exception:  # a hostile or half-built page table must not break a fault report
        return None


def code_at(mem: PhysReader, sregs: KvmSregs, rip: int, length: int = 16) -> bytes | None:
    """Up to ``length`` instruction bytes at ``rip`` (stops at an unmapped page or RAM end)."""
    linear = rip if sregs.efer & EFER_LMA else (sregs.cs.base + rip) & 0xFFFFFFFF
    out = b""
    while len(out) < length:
        pa = translate(mem, sregs, linear + len(out))
        if pa is None:
            break
        chunk = min(length - len(out), 4096 - (pa & 0xFFF), mem.size - pa)
        if chunk <= 0:
            break
        out += mem.read(pa, chunk)
    return out or None
