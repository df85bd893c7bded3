"""KVM core: struct layouts, ioctl numbers, state round-trips on a real vCPU, dirty log, boot."""

from __future__ import annotations

import ctypes
import os
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from sporevm.vmm import boot, kvm
from sporevm.vmm.boot import BootError
from sporevm.vmm.cpu import code_at, translate
from sporevm.vmm.machine import Machine, StopReason
from sporevm.vmm.memory import GuestMemory, GuestMemoryError
from tests.probe_build import ProbeVm

needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)


@pytest.mark.parametrize(
    ("cls", "size"),
    [
        (kvm.KvmRegs, 144),
        (kvm.KvmSregs, 312),
        (kvm.KvmCpuidEntry2, 40),
        (kvm.KvmIrqchip, 520),
        (kvm.KvmPitState2, 112),
        (kvm.KvmClockData, 48),
        (kvm.KvmVcpuEvents, 64),
        (kvm.KvmXcrs, 392),
        (kvm.KvmLapicState, 1024),
        (kvm.KvmFpu, 416),
        (kvm.KvmXsave, 4096),
        (kvm.KvmUserspaceMemoryRegion, 32),
        (kvm.KvmMsrEntry, 16),
        (kvm.KvmPitConfig, 64),
        (kvm.KvmIrqLevel, 8),
        (kvm.KvmRun, 304),
    ],
)
def test_struct_sizes(cls: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(cls) == size


def test_ioctl_numbers() -> None:
    assert kvm.KVM_SET_IRQCHIP == 0x8208AE63  # encoded _IOR in the uapi header
    assert kvm.KVM_GET_PIT2 == 0x8070AE9F
    assert kvm.KVM_GET_VCPU_EVENTS == 0x8040AE9F  # same nr, vCPU fd
    assert kvm.KVM_RUN == 0xAE80
    assert kvm.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert kvm.KvmRun.exit.offset == 32
    assert kvm.KvmRun.kvm_valid_regs.offset == 288


@pytest.fixture
def machine() -> Iterator[Machine]:
    with Machine(16 << 20) as m:
        yield m


def same(a: ctypes.Structure, b: ctypes.Structure) -> bool:
    return kvm.struct_bytes(a) == kvm.struct_bytes(b)


@needs_kvm
@pytest.mark.parametrize("what", ["regs", "sregs", "fpu", "xsave", "xcrs", "lapic", "events"])
def test_vcpu_state_round_trip(machine: Machine, what: str) -> None:
    v = machine.vcpus[0]
    get, put = getattr(v, f"get_{what}"), getattr(v, f"set_{what}")
    if what == "regs":  # make it non-trivial
        r = v.get_regs()
        r.rax, r.r15, r.rip, r.rflags = 0x1122334455667788, 7, 0x100000, 0x202
        v.set_regs(r)
    a = get()
    put(a)
    assert same(a, get())


@needs_kvm
def test_vcpu_mp_state_msrs_cpuid_round_trip(machine: Machine) -> None:
    v = machine.vcpus[0]
    v.set_mp_state(kvm.KVM_MP_STATE_HALTED)
    assert v.get_mp_state() == kvm.KVM_MP_STATE_HALTED
    v.set_mp_state(kvm.KVM_MP_STATE_RUNNABLE)
    idx = v.readable_msrs(machine.msr_index_list)
    assert len(idx) >= 10
    values = v.get_msrs(idx)
    # Counters that keep ticking: the TSC, and Hyper-V's virtual processor run time
    # (HV_X64_MSR_VP_RUNTIME, the vCPU thread's CPU time) and partition reference counter
    # (HV_X64_MSR_TIME_REF_COUNT), which hardware KVM lists and kvm_pvm does not.
    ticking = {0x10, 0x4000_0010, 0x4000_0020}
    v.set_msrs({k: values[k] for k in idx if k not in ticking})
    again = v.get_msrs(idx)
    assert {k: again[k] for k in idx if k not in ticking} == {
        k: values[k] for k in idx if k not in ticking
    }
    cpuid = {(e.function, e.index): e for e in v.get_cpuid()}
    assert cpuid[(1, 0)].ecx & (1 << 31)  # hypervisor bit
    sig = cpuid[(0x40000000, 0)]
    assert struct.pack("<III", sig.ebx, sig.ecx, sig.edx) == b"KVMKVMKVM\0\0\0"


@needs_kvm
def test_vm_state_round_trip(machine: Machine) -> None:
    for chip in (kvm.KVM_IRQCHIP_PIC_MASTER, kvm.KVM_IRQCHIP_PIC_SLAVE, kvm.KVM_IRQCHIP_IOAPIC):
        a = machine.get_irqchip(chip)
        machine.set_irqchip(a)
        assert same(a, machine.get_irqchip(chip))
    pit = machine.get_pit2()
    machine.set_pit2(pit)
    back = machine.get_pit2()
    for ch in range(3):  # count_load_time is re-based to "now" on every set
        back.channels[ch].count_load_time = pit.channels[ch].count_load_time
    assert same(pit, back)
    clk = machine.get_clock()
    machine.set_clock(clk)
    later = machine.get_clock()
    assert clk.clock <= later.clock < clk.clock + 1_000_000_000


@needs_kvm
def test_dirty_log_sees_guest_writes() -> None:
    base, pages = 0x800000, 5
    with ProbeVm("dirty", f"probe.dirty={base:#x},{pages}", dirty_log=True) as vm:
        vm.machine.get_dirty_log()  # turns the log on (everything dirty so far)
        r = vm.machine.run(time.monotonic() + 5)
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0)
        log = vm.machine.get_dirty_log()

        def bit(page: int) -> bool:
            return bool(log[page // 8] >> (page % 8) & 1)

        first = base // 4096
        assert all(bit(first + i) for i in range(pages))
        assert not bit(first + pages) and not bit(first - 1)
        assert not any(vm.machine.get_dirty_log())  # reading cleared it


@needs_kvm
@pytest.mark.parametrize("ram", [64 << 20, (64 << 20) + 3 * 4096])
def test_first_dirty_log_turns_it_on_and_reports_everything(ram: int) -> None:
    """The RAM slot starts without KVM_MEM_LOG_DIRTY_PAGES (so KVM may map 2 MiB pages);
    the first read turns logging on and, relative to nothing, every page is dirty."""
    with Machine(ram, 1, dirty_log=True) as m:
        armed: list[bool] = []
        m.on_log_armed = lambda: armed.append(m.dirty_log_armed)
        assert not m.dirty_log_armed
        pages = ram // 4096
        first = m.get_dirty_log()
        assert len(first) == (pages + 7) // 8
        assert sum(bin(b).count("1") for b in first) == pages  # exactly one bit per page
        assert m.dirty_log_armed and armed == [True]
        assert not any(m.get_dirty_log())  # on from here: nothing ran, nothing written
        assert armed == [True]  # the hook runs once


def test_guest_ram_is_2mib_aligned() -> None:
    """Host address ≡ guest physical address mod 2 MiB, so KVM can map 2 MiB pages."""
    for size in (4 << 20, (64 << 20) + 4096, 1 << 30):
        mem = GuestMemory(size)
        try:
            assert mem.address() % (2 << 20) == 0
            mem.write(size - 8, b"lastbyte")  # the whole range is usable, and bounded
            assert mem.read(size - 8, 8) == b"lastbyte" and mem.read(0, 8) == bytes(8)
            with pytest.raises(GuestMemoryError):
                mem.read(size - 4, 8)
            # the view starts at address(): a write through it lands there
            ctypes.memmove(mem.address() + 4096, b"direct", 6)
            assert mem.read(4096, 6) == b"direct"
        finally:
            mem.close()


@needs_kvm
def test_dirty_log_requires_opt_in(machine: Machine) -> None:
    with pytest.raises(kvm.KvmError, match="not enabled"):
        machine.get_dirty_log()


@needs_kvm
def test_irq_line_and_gsi_bounds(machine: Machine) -> None:
    line = machine.irq_line(5)
    line.set_level(True)
    line.set_level(False)
    with pytest.raises(kvm.KvmError):
        machine.irq_line(24)


def test_host_class_is_known() -> None:
    assert kvm.host_class() in ("kvm_pvm", "kvm_intel", "kvm_amd", "unknown")


# --- boot protocol ------------------------------------------------------------------------


def fake_bzimage(*, version: int = 0x020F, xlf: int = 1, setup_sects: int = 1) -> bytes:
    img = bytearray(0x400 + 0x2000)
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200], img[0x201] = 0xEB, 0x6A  # jmp: header ends at 0x202 + 0x6a = 0x26c
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = 0x01
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", img, 0x230, 0x200000)
    struct.pack_into("<H", img, 0x236, xlf)
    struct.pack_into("<I", img, 0x238, 2047)
    struct.pack_into("<Q", img, 0x258, 0x1000000)
    struct.pack_into("<I", img, 0x260, 0x100000)
    img[0x400:0x404] = b"KERN"
    return bytes(img)


def test_bzimage_boot_params() -> None:
    mem = GuestMemory(64 << 20)
    try:
        initrd = b"I" * 10000
        k = boot.boot(mem, fake_bzimage(), "console=ttyS0 quiet", initrd, rng_seed=b"s" * 32)
        bp = mem.read(boot.BOOT_PARAMS_ADDR, 4096)
        assert k.kind == "bzimage" and k.entry.rip == 0x100200 and k.entry.rsi == 0x7000
        assert mem.read(0x100000, 4) == b"KERN"
        assert bp[0x202:0x206] == b"HdrS" and bp[0x210] == 0xFF and bp[0x211] & 0x81 == 0x81
        cmd = struct.unpack_from("<I", bp, 0x228)[0]
        assert mem.read(cmd, 20) == b"console=ttyS0 quiet\0"
        addr, size = struct.unpack_from("<II", bp, 0x218)
        assert size == len(initrd) and mem.read(addr, size) == initrd and addr % 4096 == 0
        assert addr + size <= 64 << 20 and addr >= k.kernel_end
        n = bp[0x1E8]
        e820 = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)]
        assert (0x100000, (64 << 20) - 0x100000, 1) in e820
        sd = struct.unpack_from("<Q", bp, 0x250)[0]
        assert mem.read(sd, 16 + 32) == struct.pack("<QII", 0, 9, 32) + b"s" * 32
        # Page tables identity-map the first 4 GiB; the GDT has code 0x10, data 0x18, TSS 0x20.
        sregs = kvm.KvmSregs()
        sregs.cr0, sregs.cr4, sregs.efer, sregs.cr3 = 0x80000001, 0x20, 0x500, k.entry.cr3
        for va in (0, 0x100200, 0xD0000000, 0xFFFFF000):
            assert translate(mem, sregs, va) == va
        assert code_at(mem, sregs, 0x100000, 4) == b"KERN"
        gdt = struct.unpack_from("<6Q", mem.read(boot.GDT_ADDR, 48))
        assert gdt[2] >> 40 & 0xFF == 0x9B and gdt[2] >> 53 & 1  # present code, L=1
        assert gdt[3] >> 40 & 0xFF == 0x93
        assert gdt[4] >> 40 & 0xFF == 0x8B  # busy 64-bit TSS
    finally:
        mem.close()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\0" * 100, "too short"),
        (b"\0" * 0x2000, "no 'HdrS'"),
        (fake_bzimage(version=0x020B), "older than 2.12"),
        (fake_bzimage(xlf=0), "XLF_KERNEL_64"),
        (fake_bzimage(setup_sects=200), "past the end"),
        (b"\x7fELF" + b"\x01" * 60, "64-bit little-endian"),
    ],
)
def test_bad_images_are_clear_errors(image: bytes, message: str) -> None:
    mem = GuestMemory(64 << 20)
    try:
        with pytest.raises(BootError, match=message):
            boot.boot(mem, image, "")
    finally:
        mem.close()


def test_cmdline_and_memory_limits() -> None:
    mem = GuestMemory(64 << 20)
    try:
        with pytest.raises(BootError, match="command line"):
            boot.boot(mem, fake_bzimage(), "x" * 2048)
        with pytest.raises(BootError, match="initrd"):
            boot.boot(mem, fake_bzimage(), "", b"i" * (60 << 20))
    finally:
        mem.close()
    small = GuestMemory(8 << 20)
    try:
        with pytest.raises(BootError, match="more memory"):
            boot.boot(small, fake_bzimage(), "")
    finally:
        small.close()


def fake_elf(segments: list[tuple[int, int, bytes, int]], entry: int) -> bytes:
    """An x86-64 ET_EXEC with PT_LOAD (vaddr, paddr, file bytes, memsz) segments."""
    phoff, data_off = 64, 64 + 56 * len(segments)
    out = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9))
    out += struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, 64, 56, len(segments), 0, 0, 0
    )
    blobs = b""
    for vaddr, paddr, data, memsz in segments:
        out += struct.pack(
            "<IIQQQQQQ", 1, 5, data_off + len(blobs), vaddr, paddr, len(data), memsz, 0x1000
        )
        blobs += data
    return bytes(out + blobs)


@pytest.mark.parametrize("entry", [0x1000010, 0xFFFFFFFF81000010])
def test_elf_vmlinux_layout(entry: int) -> None:
    mem = GuestMemory(64 << 20)
    try:
        mem.write(0x1000000 + 4, b"\xee" * 8)  # must be zeroed as .bss
        elf = fake_elf([(0xFFFFFFFF81000000, 0x1000000, b"CODE", 0x2000)], entry)
        k = boot.boot(mem, elf, "root=/dev/vda")
        assert k.kind == "elf" and k.entry.rip == 0x1000010 and k.kernel_end == 0x1002000
        assert mem.read(0x1000000, 12) == b"CODE" + bytes(8)
        bp = mem.read(boot.BOOT_PARAMS_ADDR, 4096)
        assert bp[0x202:0x206] == b"HdrS" and bp[0x210] == 0xFF
    finally:
        mem.close()


def test_elf_rejections() -> None:
    mem = GuestMemory(16 << 20)
    try:
        with pytest.raises(BootError, match="outside guest RAM"):
            boot.boot(mem, fake_elf([(0x2000000, 0x2000000, b"x", 1)], 0x2000000), "")
        with pytest.raises(BootError, match="outside guest RAM"):
            boot.boot(mem, fake_elf([(0x1000, 0x1000, b"x", 1)], 0x1000), "")  # below 1 MiB
        with pytest.raises(BootError, match="entry point"):
            boot.boot(mem, fake_elf([(0x100000, 0x100000, b"x", 1)], 0x500000), "")
    finally:
        mem.close()


def test_translate_higher_half_4k_and_legacy_modes() -> None:
    mem = GuestMemory(4 << 20)
    try:
        # 4-level: 0xffffffff81000000 -> 0x200000 through 4 KiB pages.
        va, pa = 0xFFFFFFFF81000000, 0x200000
        pml4, pdpt, pd, pt = 0x10000, 0x11000, 0x12000, 0x13000
        mem.write_u64(pml4 + ((va >> 39) & 511) * 8, pdpt | 3)
        mem.write_u64(pdpt + ((va >> 30) & 511) * 8, pd | 3)
        mem.write_u64(pd + ((va >> 21) & 511) * 8, pt | 3)
        mem.write_u64(pt + ((va >> 12) & 511) * 8, pa | 3)
        mem.write(pa + 0xFFE, b"\x0f\x0b")
        s = kvm.KvmSregs()
        s.cr0, s.cr4, s.efer, s.cr3 = 0x80000001, 0x20, 0x500, pml4
        assert translate(mem, s, va + 0x123) == pa + 0x123
        assert translate(mem, s, va + 0x1000) is None  # next page not mapped
        assert code_at(mem, s, va + 0xFFE) == b"\x0f\x0b"  # stops at the unmapped page
        # 32-bit paging with a 4 MiB page, then paging off.
        s.efer, s.cr4, s.cr3 = 0, 0x10, 0x20000
        mem.write_u32(0x20000 + (0xC0000000 >> 22) * 4, 0x000000 | 0x83)
        assert translate(mem, s, 0xC0001234) == 0x1234
        s.cr0 = 1
        assert translate(mem, s, 0x1234) == 0x1234
    finally:
        mem.close()


# --- the state set is complete: pause a guest, move it to a fresh VM, finish it there ------


def test_pause_capture_restore_into_a_new_vm() -> None:
    n = 20000
    with ProbeVm("pioloop", f"probe.pioloop={n}") as src:
        m = src.machine
        timer = threading.Timer(0.1, m.pause)
        timer.start()
        assert m.run(time.monotonic() + 20).reason is StopReason.PAUSED
        timer.join()
        k = len(src.port.loop)
        assert 0 < k < n
        v = m.vcpus[0]
        msr_ids = v.readable_msrs(m.msr_index_list)
        regs, sregs, xsave, xcrs = v.get_regs(), v.get_sregs(), v.get_xsave(), v.get_xcrs()
        lapic, events = v.get_lapic(), v.get_events()
        msrs = v.get_msrs(msr_ids)
        mp = v.get_mp_state()
        chips = [m.get_irqchip(c) for c in range(3)]
        pit, clock = m.get_pit2(), m.get_clock()
        ram = m.ram.read(0, m.ram.size)
        loop_so_far = list(src.port.loop)

    with ProbeVm("hello") as dst:  # same board; its own boot is overwritten below
        m = dst.machine
        m.ram.write(0, ram)
        m.set_pit2(pit)
        m.set_clock(clock)
        for chip in chips:
            m.set_irqchip(chip)
        v = m.vcpus[0]
        v.set_msrs(msrs)
        v.set_sregs(sregs)
        v.set_regs(regs)
        v.set_xsave(xsave)
        v.set_xcrs(xcrs)
        v.set_lapic(lapic)
        v.set_mp_state(mp)
        v.set_events(events)
        dst.port.loop = loop_so_far
        r = m.run(time.monotonic() + 20)
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), dst.output
        assert dst.port.loop == list(range(n))  # resumed exactly where it paused
        assert "probe: pioloop ok" in dst.output and "hello" not in dst.output
