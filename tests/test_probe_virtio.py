"""The virtio devices and the agent protocol end to end through real /dev/kvm.

The probe guest (tests/probe/virtio*.c, agent.c) carries a small virtio-mmio v2
driver: it finds its devices on the kernel command line the way Linux does
(``virtio_mmio.device=4K@BASE:IRQ``), negotiates VERSION_1, runs split queues in
its RAM and polls the used rings, checking and acknowledging InterruptStatus.
The devices are sporevm's own, wired into the Machine at the board's virtio
windows (docs/vmm.md: 0xd0000000 + 4 KiB x n, IRQ 5 + n).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sporevm.runtime.agent_session import AgentSession, QueueChannel
from sporevm.vmm.bus import IrqLine
from sporevm.vmm.devices.virtio import (
    WINDOW,
    BlkDevice,
    ConsoleDevice,
    RngDevice,
    VirtioDevice,
    VirtioMmio,
    kernel_cmdline,
)
from sporevm.vmm.devices.virtio.mmio import STATUS_DRIVER_OK, STATUS_NEEDS_RESET
from sporevm.vmm.machine import ExitResult, StopReason
from tests.probe_build import ProbeVm

pytestmark = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)

VIRTIO_BASE = 0xD0000000
VIRTIO_IRQ0 = 5
DISK_BYTES = 64 * 1024
SERIAL = b"sha256:0123456789abc"  # the full 20 bytes: no NUL terminator from the device


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def cmdline(count: int) -> str:
    """The cmdline declarations of devices 0 .. count-1, as Linux would get them."""
    return " ".join(kernel_cmdline(VIRTIO_BASE + n * WINDOW, VIRTIO_IRQ0 + n) for n in range(count))


class CountedIrq:
    """The machine's real IRQ line (KVM_IRQ_LINE), with the level changes counted."""

    def __init__(self, line: IrqLine) -> None:
        self.line = line
        self.raised = 0
        self.level = False

    def set_level(self, high: bool) -> None:
        self.raised += high
        self.level = high
        self.line.set_level(high)


def attach(vm: ProbeVm, slot: int, device: VirtioDevice) -> tuple[VirtioMmio, CountedIrq]:
    base = VIRTIO_BASE + slot * WINDOW
    irq = CountedIrq(vm.machine.irq_line(VIRTIO_IRQ0 + slot))
    t = VirtioMmio(device, vm.machine.ram, irq, base=base)
    vm.machine.add_mmio(base, WINDOW, t)
    return t, irq


def fnv_words(data: bytes) -> int:
    """The probe's checksum: FNV-1a over little-endian 64-bit words."""
    h = 0xCBF29CE484222325
    for i in range(0, len(data) - 7, 8):
        h = ((h ^ int.from_bytes(data[i : i + 8], "little")) * 0x100000001B3) % (1 << 64)
    return h


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = random.Random(7).randbytes(DISK_BYTES)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    yield fd, data
    os.close(fd)
    assert path.read_bytes() == data


def test_blk_read_checksum_get_id_and_errors(disk: tuple[int, bytes]) -> None:
    fd, data = disk
    # Device 0 is the rng so that the probe's discovery has to skip a window.
    with ProbeVm("virtio_blk", cmdline(2)) as vm:
        attach(vm, 0, RngDevice())
        t, irq = attach(vm, 1, BlkDevice(fd, len(data), serial=SERIAL))
        r = vm.machine.run(soon())
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), vm.output
        assert "probe: virtio_blk ok" in vm.output
        m = re.search(r"probe: blk capacity (0x[0-9a-f]+) sum (0x[0-9a-f]+)", vm.output)
        assert m, vm.output
        assert int(m[1], 16) == DISK_BYTES // 512
        assert int(m[2], 16) == fnv_words(data)
        assert f"probe: blk id {SERIAL.decode()}\n" in vm.output
        assert f"probe: blk sector0 {fnv_words(data[:512]):#x}\n" in vm.output
        assert t.error == "" and t.status & STATUS_DRIVER_OK
        # One used-buffer interrupt per request (8 reads, GET_ID, FLUSH, 4 more), each
        # acknowledged by the probe, so the level-triggered line ends low.
        assert irq.raised == 14 and not irq.level and t.interrupt_status == 0
        assert vm.machine.stats.unhandled_mmio == {}


def test_rng() -> None:
    with ProbeVm("virtio_rng", cmdline(1)) as vm:
        t, irq = attach(vm, 0, RngDevice())
        r = vm.machine.run(soon())
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), vm.output
        assert t.queues[0].used_idx == 2
        assert irq.raised == 2 and not irq.level


def test_console_transmit_and_echo() -> None:
    received = bytearray()
    console = ConsoleDevice(received.extend)
    with ProbeVm("virtio_console", cmdline(1)) as vm:
        attach(vm, 0, console)
        assert console.send(b"ping 123\n") == 9  # held until the guest posts a buffer
        r = vm.machine.run(soon())
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), vm.output
        assert bytes(received) == b"probe-console: hello\necho:ping 123\n"
        assert console.pending == 0


class Checkpoints:
    """The probe's test port: a write at offset 8 snapshots a transport's registers."""

    def __init__(self) -> None:
        self.transport: VirtioMmio | None = None
        self.seen: list[tuple[int, int, str]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 8 and self.transport is not None:
            t = self.transport
            self.seen.append((int.from_bytes(data, "little"), t.status, t.error))


def test_hostile_descriptor_loop_resets_only_the_device() -> None:
    cp = Checkpoints()
    with ProbeVm("virtio_hostile,virtio_rng", cmdline(1), port_device=cp) as vm:
        t, irq = attach(vm, 0, RngDevice())
        cp.transport = t
        r = vm.machine.run(soon())
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), vm.output
        assert "probe: virtio_hostile ok" in vm.output and "probe: virtio_rng ok" in vm.output
        (n1, st1, err1), (n2, st2, err2), (n3, st3, err3) = cp.seen
        assert (n1, n2, n3) == (1, 2, 3)
        assert st1 & STATUS_NEEDS_RESET and "longer than" in err1, err1
        assert st2 & STATUS_NEEDS_RESET and err2 == err1  # the ignored kick changed nothing
        assert not st3 & STATUS_NEEDS_RESET and err3 == ""  # reset by the driver, working
        assert t.error == ""
        # used (1), config change for NEEDS_RESET (1), used after the reset (1), virtio_rng (2)
        assert irq.raised == 5 and not irq.level


def test_agent_exec_through_real_kvm() -> None:
    console = ConsoleDevice()
    chan = QueueChannel(console.send)
    console.on_output = chan.feed
    console.on_writable = chan.writable
    with ProbeVm("virtio_agent", cmdline(1)) as vm:
        attach(vm, 0, console)
        outcome: list[ExitResult | BaseException] = []

        def run() -> None:
            try:
                outcome.append(vm.machine.run(soon(30)))
            except BaseException as e:  # surfaced below on the test thread
                outcome.append(e)
            finally:
                chan.feed(b"")  # hang-up: a waiting session fails at once instead of timing out

        th = threading.Thread(target=run, name="probe-vm")
        th.start()
        try:
            session = AgentSession(chan, grace=10.0)
            ready = session.wait_ready(10)
            assert (ready.protocol, ready.agent_version, ready.pid) == (1, "probe-1", 1)
            assert session.hello().agent_version == "probe-1"
            h = session.exec(["/bin/probe-cmd", "arg"], env={"A": "b"}, cwd="/tmp", timeout=10)
            st = h.wait()
            assert (st.exit_code, st.signal, st.timed_out) == (7, None, False)
            assert h.pid == 2 and h.stdout == b"probe-exec:/bin/probe-cmd"
            h2 = session.exec("echo hi; exit 7")  # shell mode: argv[0] is the script
            assert h2.wait(10).returncode == 7 and h2.stdout == b"probe-exec:echo hi; exit 7"
            session.shutdown()
        except BaseException:
            vm.machine.pause()
            raise
        finally:
            th.join(30)
        assert not th.is_alive()
        (res,) = outcome
        assert isinstance(res, ExitResult), res
        assert (res.reason, res.status) == (StopReason.POWEROFF, 0), vm.output
        assert "probe: virtio_agent ok" in vm.output
