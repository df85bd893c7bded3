"""The probe guest through real /dev/kvm: boot path, serial, PIO/MMIO dispatch, stops, faults.

Every test boots tests/probe (built by tests/probe_build.py) with the same boot
path a Linux kernel takes, so these are end-to-end checks of boot.py, cpu.py,
machine.py and the devices.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from sporevm.vmm import boot, kvm
from sporevm.vmm.bus import IrqLine
from sporevm.vmm.cpu import LongModeEntry
from sporevm.vmm.devices import serial as uart
from sporevm.vmm.kvm import KvmError
from sporevm.vmm.machine import StopReason, VmmFault
from tests.probe_build import PROBE_TEST_PORT, ProbeVm, build_probe

pytestmark = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)
PVM = kvm.host_class() == "kvm_pvm"


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_probe_builds_reproducibly(tmp_path: Path) -> None:
    a = build_probe()
    b = build_probe(tmp_path)  # a fresh build in another directory
    assert a != b and a.parent.name == b.parent.name
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[:4] == b"\x7fELF"


def test_boot_serial_pio_mmio_poweroff() -> None:
    t0 = time.monotonic()
    with ProbeVm("hello,pio,mmio") as vm:
        r = vm.machine.run(soon())
        elapsed = time.monotonic() - t0
        assert r.reason is StopReason.POWEROFF and r.status == 0, vm.output
        for name in ("hello", "pio", "mmio"):
            assert f"probe: {name} ok\n" in vm.output
        assert "probe: e820 ram 0x1f9fc00" in vm.output  # 32 MiB minus the low holes
        assert vm.port.value == 0x12345678
        assert vm.mmio.accesses == 8
        assert vm.machine.stats.exits["MMIO"] == 8
        assert r.code is not None and r.rip is not None  # every stop says where
        assert elapsed < 2.0, f"probe boot-to-poweroff took {elapsed:.3f}s"


def test_poweroff_status_counts_failures() -> None:
    with ProbeVm("hello,nosuchtest,alsonot") as vm:
        r = vm.machine.run(soon())
        assert (r.reason, r.status) == (StopReason.POWEROFF, 2)
        assert "probe: nosuchtest unknown" in vm.output


def test_pio_loop_rate_and_order() -> None:
    n = 3000
    with ProbeVm("pioloop", f"probe.pioloop={n}") as vm:
        t0 = time.monotonic()
        r = vm.machine.run(soon(10))
        dt = time.monotonic() - t0
        assert r.reason is StopReason.POWEROFF and r.status == 0
        assert vm.port.loop == list(range(n))
        print(f"PIO exits: {vm.machine.stats.exits['IO'] / dt:.0f}/s over {dt:.3f}s")


def test_deadline_stops_a_spinning_guest() -> None:
    with ProbeVm("loop") as vm:
        t0 = time.monotonic()
        r = vm.machine.run(time.monotonic() + 0.3)
        dt = time.monotonic() - t0
        assert r.reason is StopReason.DEADLINE
        assert 0.3 <= dt < 1.0
        assert r.code is not None and r.code[:2] in (b"\xf3\x90", b"\xeb\xfc")  # pause; jmp
        # Not terminal: the guest can be run further.
        assert vm.machine.run(time.monotonic() + 0.05).reason is StopReason.DEADLINE


def test_past_deadline_returns_at_once() -> None:
    with ProbeVm("loop") as vm:
        t0 = time.monotonic()
        assert vm.machine.run(t0 - 1).reason is StopReason.DEADLINE
        assert time.monotonic() - t0 < 0.05


def test_deadline_stops_a_guest_halted_with_interrupts_on() -> None:
    with ProbeVm("idle", kick_interval=10.0) as vm:  # only the deadline kick can stop it
        t0 = time.monotonic()
        r = vm.machine.run(time.monotonic() + 0.3)
        assert r.reason is StopReason.DEADLINE
        assert time.monotonic() - t0 < 1.0


def test_hlt_with_interrupts_off_is_reported() -> None:
    with ProbeVm("hlt") as vm:
        r = vm.machine.run(soon())
        assert r.reason is StopReason.HALTED
        assert "interrupts disabled" in r.detail
        assert r.rip is not None
        pa = r.rip - 1  # RIP is past the HLT; identity-mapped, so linear == physical
        assert vm.machine.ram.read(pa, 1) == b"\xf4"


def test_unmapped_port_is_a_fault_with_rip_and_bytes() -> None:
    with ProbeVm("badport") as vm:
        with pytest.raises(VmmFault) as e:
            vm.machine.run(soon())
        f = e.value
        assert "pio write outside any device" in str(f) and "0x99 <- 01" in str(f)
        assert f.rip is not None and f.code
        assert vm.machine.ram.read(f.rip - 2, 2) == b"\xe6\x99"  # out %al, $0x99 just before


def test_unmapped_port_lenient_mode_counts() -> None:
    with ProbeVm("badport", strict_io=False) as vm:
        r = vm.machine.run(soon())
        assert r.reason is StopReason.POWEROFF and r.status == 0
        assert vm.machine.stats.unhandled_pio[0x99] == 1


def test_triple_fault_is_shutdown_and_terminal() -> None:
    with ProbeVm("ud2") as vm:
        r = vm.machine.run(soon())
        assert r.reason is StopReason.SHUTDOWN
        assert r.code is not None and r.code[:2] == b"\x0f\x0b"
        with pytest.raises(KvmError, match="already stopped"):
            vm.machine.run(soon())


def test_i8042_reset() -> None:
    with ProbeVm("reset") as vm:
        assert vm.machine.run(soon()).reason is StopReason.RESET


def test_int3_and_fwait_run() -> None:
    with ProbeVm("int3,fwait") as vm:
        r = vm.machine.run(soon())
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), vm.output
        if PVM:  # on hardware KVM both run natively
            assert vm.machine.stats.fixups == {"int3": 2, "fwait": 2}


@pytest.mark.skipif(not PVM, reason="kvm_pvm emulator gap only")
def test_without_fixups_the_gap_is_reported() -> None:
    with ProbeVm("int3", host_fixups=False) as vm:
        with pytest.raises(VmmFault) as e:
            vm.machine.run(soon())
        assert "internal error" in str(e.value) and e.value.code is not None
        assert e.value.code[0] == 0xCC


def test_pause_and_resume_lose_no_io() -> None:
    n = 20000
    with ProbeVm("pioloop", f"probe.pioloop={n}") as vm:
        m = vm.machine
        timer = threading.Timer(0.1, m.pause)
        timer.start()
        r = m.run(soon(20))
        timer.join()
        assert r.reason is StopReason.PAUSED
        k = len(vm.port.loop)
        assert 0 < k < n
        assert vm.port.loop == list(range(k))
        regs = m.vcpus[0].get_regs()  # state is readable and the pending OUT completed
        assert regs.rip == r.rip
        r = m.run(soon(20))
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0)
        assert vm.port.loop == list(range(n))


def test_pause_reaches_a_halted_guest() -> None:
    with ProbeVm("idle", kick_interval=10.0) as vm:
        m = vm.machine
        timer = threading.Timer(0.2, m.pause)
        timer.start()
        t0 = time.monotonic()
        r = m.run(soon(5))
        timer.join()
        assert r.reason is StopReason.PAUSED
        assert time.monotonic() - t0 < 1.0


def test_pause_without_run_is_a_noop() -> None:
    with ProbeVm("hello") as vm:
        assert vm.machine.pause() is False
        assert vm.machine.run(soon()).reason is StopReason.POWEROFF


def test_run_leaves_the_gil_free() -> None:
    with ProbeVm("loop") as vm:
        ticks = 0
        stop = threading.Event()

        def spin() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1

        t = threading.Thread(target=spin)
        t.start()
        vm.machine.run(time.monotonic() + 0.3)
        stop.set()
        t.join()
        assert ticks > 100_000


def test_two_vcpus_boot_and_stop() -> None:
    with ProbeVm("hello,loop", vcpus=2) as vm:
        r = vm.machine.run(time.monotonic() + 0.3)
        assert r.reason is StopReason.DEADLINE
        assert "probe: hello ok" in vm.output
        assert vm.machine.vcpus[1].get_mp_state() == kvm.KVM_MP_STATE_UNINITIALIZED


AP_CODE = 0x8000  # free low page: between boot_params (0x7000) and the PML4 (0x9000)


def _start_ap(vm: ProbeVm, code: bytes) -> None:
    """Put vCPU 1 straight into long mode at ``code`` (as if the guest had started it)."""
    vm.machine.ram.write(AP_CODE, code)
    vm.machine.vcpus[1].enter_long_mode(
        LongModeEntry(
            rip=AP_CODE,
            rsi=0,
            cr3=boot.PML4_ADDR,
            gdt_base=boot.GDT_ADDR,
            gdt_limit=6 * 8 - 1,
            code_selector=boot.CODE_SELECTOR,
            data_selector=boot.DATA_SELECTOR,
            tss_selector=boot.TSS_SELECTOR,
            tss_base=boot.TSS_ADDR,
            tss_limit=boot.TSS_LIMIT,
            rsp=0x3000,
        )
    )
    vm.machine.vcpus[1].set_mp_state(kvm.KVM_MP_STATE_RUNNABLE)


CLI_HLT = b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp back to the hlt
SPIN = b"\xf3\x90\xeb\xfc"  # pause; jmp back


def test_one_dead_vcpu_is_not_a_dead_vm() -> None:
    # Linux parks the other CPUs in HLT with interrupts off before the boot CPU resets:
    # that must not end the VM as HALTED while vCPU 0 still runs.
    with ProbeVm("loop", vcpus=2) as vm:
        _start_ap(vm, CLI_HLT)
        r = vm.machine.run(time.monotonic() + 0.5)
        assert r.reason is StopReason.DEADLINE, r
        assert vm.machine.vcpus[1].get_mp_state() == kvm.KVM_MP_STATE_HALTED


def test_dead_boot_vcpu_with_a_running_ap_is_not_halted() -> None:
    with ProbeVm("hlt", vcpus=2) as vm:
        _start_ap(vm, SPIN)
        assert vm.machine.run(time.monotonic() + 0.5).reason is StopReason.DEADLINE


@pytest.mark.parametrize("ap", ["never started", "halted"])
def test_every_vcpu_dead_is_halted(ap: str) -> None:
    # A kernel without SMP never starts vCPU 1: vCPU 0 in cli;hlt is then a dead VM.
    with ProbeVm("hlt", vcpus=2) as vm:
        if ap == "halted":
            _start_ap(vm, CLI_HLT)
        r = vm.machine.run(soon())
        assert r.reason is StopReason.HALTED and "interrupts disabled" in r.detail


# --- the 16550 on its own -----------------------------------------------------------------


class Levels:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, high: bool) -> None:
        self.levels.append(high)


def make_uart() -> tuple[uart.Serial, Levels, bytearray]:
    irq, out = Levels(), bytearray()
    line: IrqLine = irq
    return uart.Serial(line, out.extend), irq, out


def test_uart_registers_as_8250_probes_them() -> None:
    s, _, out = make_uart()
    s.write(uart.SCR, b"\x5a")
    assert s.read(uart.SCR, 1) == b"\x5a"
    s.write(uart.LCR, b"\x83")  # DLAB on
    s.write(uart.RBR_THR, b"\x01")
    s.write(uart.IER, b"\x00")
    assert s.read(uart.RBR_THR, 1) == b"\x01" and s.divisor == 1
    s.write(uart.LCR, b"\x03")
    s.write(uart.IIR_FCR, b"\x01")
    assert s.read(uart.IIR_FCR, 1)[0] & 0xC0 == 0xC0  # 16550A FIFO bits
    s.write(uart.MCR, bytes([uart.MCR_LOOP | 0x0A]))  # loopback, RTS + OUT2
    assert s.read(uart.MSR, 1)[0] & 0xF0 == 0x90  # CTS + DCD
    s.write(uart.RBR_THR, b"L")  # loopback: back into RBR, not to the output
    assert out == b"" and s.read(uart.LSR, 1)[0] & uart.LSR_DR
    assert s.read(uart.RBR_THR, 1) == b"L"
    s.write(uart.MCR, b"\x0b")
    s.write(uart.RBR_THR, b"hi"[:1])
    assert out == b"h"
    assert s.read(uart.LSR, 1)[0] & 0x60 == 0x60


def test_uart_interrupts() -> None:
    s, irq, _ = make_uart()
    s.write(uart.IER, bytes([uart.IER_THRI]))
    assert irq.levels == [True]
    assert s.read(uart.IIR_FCR, 1)[0] & 0x0F == uart.IIR_THRI
    assert irq.levels == [True, False]  # reading IIR acknowledged THRE
    s.write(uart.RBR_THR, b"x")
    assert irq.levels[-1] is True
    s.write(uart.IER, bytes([uart.IER_RDI]))
    assert irq.levels[-1] is False
    assert s.feed(b"ab") == 2 and irq.levels[-1] is True
    assert s.read(uart.IIR_FCR, 1)[0] & 0x0F == uart.IIR_RDI
    assert s.read(uart.RBR_THR, 1) == b"a" and s.read(uart.RBR_THR, 1) == b"b"
    assert irq.levels[-1] is False
    assert s.feed(b"z" * (uart.RX_LIMIT + 10)) == uart.RX_LIMIT


def test_probe_test_port_constant_matches_header() -> None:
    src = (Path(__file__).parent / "probe" / "probe.h").read_text()
    assert f"#define PROBE_TEST_PORT {PROBE_TEST_PORT:#x}" in src


class Broken:
    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * (size + 1)

    def write(self, offset: int, data: bytes) -> None:
        raise ValueError("device bug")


def test_failing_device_is_a_fault_not_a_traceback() -> None:
    with ProbeVm("pio", port_device=Broken()) as vm:
        with pytest.raises(VmmFault, match="pio device failed.*device bug") as e:
            vm.machine.run(soon())
        assert isinstance(e.value.__cause__, ValueError)


def test_short_device_read_is_a_fault() -> None:
    class Short:
        def read(self, offset: int, size: int) -> bytes:
            return b""

        def write(self, offset: int, data: bytes) -> None:
            pass

    with ProbeVm("pio", port_device=Short()) as vm:
        with pytest.raises(VmmFault, match="answered 0 bytes"):
            vm.machine.run(soon())


# --- opt-in: a real Linux kernel through the same boot path -------------------------------


@pytest.mark.skipif(
    not os.environ.get("SPORE_TEST_KERNEL"),
    reason="set SPORE_TEST_KERNEL=/path/to/vmlinux-or-bzImage (takes ~30 s+ on kvm_pvm)",
)
def test_linux_boots_to_panic_and_resets() -> None:
    """No root fs: the kernel panics, panic=-1 reboots at once, reboot=k resets via i8042."""
    from sporevm.vmm.machine import Machine

    image = Path(os.environ["SPORE_TEST_KERNEL"]).read_bytes()
    cmdline = os.environ.get(
        "SPORE_TEST_KERNEL_CMDLINE",
        "console=ttyS0 panic=-1 reboot=k noxsave"
        + (" rodata=off clearcpuid=smap,cx16,popcnt,rdrand,rdseed,erms,fsrm" if PVM else ""),
    )
    log = bytearray()
    with Machine(128 << 20, serial_output=log.extend) as m:
        m.load_kernel(image, cmdline)
        r = m.run(soon(300))
        text = log.decode(errors="replace")
        assert r.reason in (StopReason.RESET, StopReason.SHUTDOWN), (r, text[-2000:])
        assert "Linux version" in text and "Kernel panic" in text
        assert "16550A" in text  # the 8250 driver probed our UART
