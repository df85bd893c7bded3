"""VM state capture -> spore-vmstate/v1 bytes -> restore, on real KVM with the probe guest.

The headline test pauses a counting probe mid-loop, captures it, encodes the
state, and resumes it in a *fresh process* (this module run as
``python -m tests.test_capture_restore child STATE RAM``; RAM travels as a
file): the count must continue exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sporevm.runtime.capture import capture
from sporevm.runtime.restore import RamLoader, restore_board, restore_machine
from sporevm.spore import vmstate
from sporevm.spore.vmstate import VmState, VmStateError
from sporevm.vmm.board import BoardConfig, BoardWiring, build_board
from sporevm.vmm.bus import BusDevice
from sporevm.vmm.devices.virtio import WINDOW, BlkDevice, ConsoleDevice, RngDevice, VirtioMmio
from sporevm.vmm.devices.virtio import kernel_cmdline as virtio_cmdline
from sporevm.vmm.machine import Machine, StopReason
from sporevm.vmm.memory import GuestMemory
from tests.probe_build import (
    PROBE_MMIO_BASE,
    PROBE_TEST_PORT,
    PROBE_TEST_PORT_LEN,
    MmioEcho,
    ProbeVm,
)
from tests.probe_build import TestPort as ProbePort  # aliased: pytest collects Test*

needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)
REPO = Path(__file__).resolve().parent.parent
RAM = 32 << 20
LOOP = 20000
VIRTIO_BASE, VIRTIO_IRQ0 = 0xD0000000, 5


def soon(seconds: float = 20.0) -> float:
    return time.monotonic() + seconds


def attach_probe_devices(m: Machine, port: BusDevice) -> list[VirtioMmio]:
    """The probe's test port and MMIO window, as ProbeVm attaches them (no virtio)."""
    m.add_pio(PROBE_TEST_PORT, PROBE_TEST_PORT_LEN, port)
    m.add_mmio(PROBE_MMIO_BASE, 4096, MmioEcho())
    return []


def file_loader(path: str) -> RamLoader:
    def load(mem: GuestMemory) -> None:
        if os.path.getsize(path) != mem.size:
            raise VmStateError(f"{path}: RAM image is not {mem.size} bytes")
        with open(path, "rb") as f:
            view = mem.view(0, mem.size, writable=True)
            try:
                got = f.readinto(view)
            finally:
                view.release()
        assert got == mem.size

    return load


def paused_pioloop() -> tuple[ProbeVm, int]:
    """A probe mid-way through LOOP outs to the test port, paused."""
    vm = ProbeVm("pioloop", f"probe.pioloop={LOOP}")
    timer = threading.Timer(0.1, vm.machine.pause)
    timer.start()
    r = vm.machine.run(soon())
    timer.join()
    assert r.reason is StopReason.PAUSED
    k = len(vm.port.loop)
    assert 0 < k < LOOP
    return vm, k


# --- the child: restore in a fresh process ------------------------------------------------


def child(state_path: str, ram_path: str) -> None:
    t0 = time.perf_counter()
    state = vmstate.decode(Path(state_path).read_bytes())
    t1 = time.perf_counter()
    port = ProbePort()
    serial = bytearray()
    marks: dict[str, float] = {}
    load = file_loader(ram_path)

    def attach(m: Machine) -> list[VirtioMmio]:
        marks["created"] = time.perf_counter()
        return attach_probe_devices(m, port)

    def timed_load(mem: GuestMemory) -> None:
        t = time.perf_counter()
        load(mem)
        marks["ram"] = time.perf_counter() - t

    m = restore_machine(
        state,
        Machine(RAM, len(state.vcpus), strict_io=True, serial_output=serial.extend),
        timed_load,
        attach=attach,
    )
    t2 = time.perf_counter()
    r = m.run(soon())
    first = port.loop[0] if port.loop else None
    m.close()
    out = {
        "reason": r.reason.value,
        "status": r.status,
        "loop_first": first,
        "loop_len": len(port.loop),
        "loop_ok": port.loop == list(range(first, first + len(port.loop))) if first else False,
        "serial": serial.decode(errors="replace"),
        "decode_ms": (t1 - t0) * 1e3,
        "restore_ms": (t2 - t1) * 1e3,
        "create_ms": (marks["created"] - t1) * 1e3,
        "ram_ms": marks["ram"] * 1e3,
        "state_ms": (t2 - marks["created"] - marks["ram"]) * 1e3,
    }
    print(json.dumps(out))


@needs_kvm
def test_counter_continues_exactly_in_a_fresh_process(tmp_path: Path) -> None:
    vm, k = paused_pioloop()
    with vm:
        t0 = time.perf_counter()
        state = capture(vm.machine)
        t1 = time.perf_counter()
        data = vmstate.encode(state)
        t2 = time.perf_counter()
        (tmp_path / "ram").write_bytes(vm.machine.ram.read(0, RAM))
        (tmp_path / "state.json").write_bytes(data)
        before = list(vm.port.loop)
        serial_before = vm.output
    assert vmstate.encode(vmstate.decode(data)) == data  # byte-identical round trip
    t3 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "tests.test_capture_restore", "child"]
        + [str(tmp_path / "state.json"), str(tmp_path / "ram")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    t4 = time.perf_counter()
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert (res["reason"], res["status"]) == ("poweroff", 0), res
    # No lost and no repeated output: the child's first value is the parent's next one.
    assert res["loop_first"] == k and res["loop_ok"] and k + res["loop_len"] == LOOP
    assert before == list(range(k))
    assert "probe: pioloop ok" in res["serial"] and "pioloop ok" not in serial_before
    print(
        f"\nvmstate: {len(data)} bytes; capture {1e3 * (t1 - t0):.2f} ms, "
        f"encode {1e3 * (t2 - t1):.2f} ms; child: decode {res['decode_ms']:.2f} ms, "
        f"restore {res['restore_ms']:.2f} ms = VM creation {res['create_ms']:.2f} + "
        f"{RAM >> 20} MiB RAM copy {res['ram_ms']:.2f} + state {res['state_ms']:.2f} ms; "
        f"whole child process {1e3 * (t4 - t3):.0f} ms"
    )


@needs_kvm
def test_restored_state_reads_back_identical() -> None:
    """Capture -> restore in-process -> capture again: architectural state is unchanged."""
    vm, _k = paused_pioloop()
    with vm:
        a = capture(vm.machine)
        ram = vm.machine.ram.read(0, RAM)
    port = ProbePort()
    m = restore_machine(
        vmstate.decode(vmstate.encode(a)),
        Machine(RAM, 1, strict_io=True),
        lambda mem: mem.write(0, ram),
        attach=lambda m: attach_probe_devices(m, port),
    )
    with m:
        assert m.ram.read(0, RAM) == ram and not any(m.ram.vmm_dirty)
        b = capture(m)
    ja, jb = vmstate.to_json(a), vmstate.to_json(b)
    va, vb = ja["vcpus"][0], jb["vcpus"][0]
    for what in ("regs", "sregs", "fpu", "xsave", "xcrs", "lapic", "events", "mp_state"):
        assert va[what] == vb[what], what
    ma = {e["index"]: e["value"] for e in va["msrs"]}
    mb = {e["index"]: e["value"] for e in vb["msrs"]}
    assert ma.keys() == mb.keys()
    assert {i: v for i, v in ma.items() if i != 0x10} == {i: v for i, v in mb.items() if i != 0x10}
    assert 0 <= mb[0x10] - ma[0x10] < 10**10  # TSC resumed from its value, ticking forwards
    assert ja["vm"]["irqchip"] == jb["vm"]["irqchip"]
    assert ja["devices"] == jb["devices"]
    assert b.vm.clock.clock >= a.vm.clock.clock  # guest time never goes backwards
    assert b.vm.clock.clock - a.vm.clock.clock < 1_000_000_000


# --- virtio devices ----------------------------------------------------------------------


def virtio_board(m: Machine, console: ConsoleDevice, disk_fd: int) -> list[VirtioMmio]:
    out = []
    devices = (BlkDevice(disk_fd, os.fstat(disk_fd).st_size, serial=b"disk"), console, RngDevice())
    for slot, dev in enumerate(devices):
        base = VIRTIO_BASE + slot * WINDOW
        t = VirtioMmio(dev, m.ram, m.irq_line(VIRTIO_IRQ0 + slot), base=base)
        m.add_mmio(base, WINDOW, t)
        out.append(t)
    return out


@pytest.fixture
def disk_fd() -> Iterator[int]:
    fd = os.memfd_create("disk")
    os.ftruncate(fd, 8192)
    yield fd
    os.close(fd)


@needs_kvm
def test_console_queue_mid_stream_survives_restore(disk_fd: int) -> None:
    """The probe's console test, paused while it waits for the host's line, then resumed in
    a fresh VM with fresh device objects: the restored rings carry the exchange on."""
    got = bytearray()
    holder: list[Machine] = []

    def on_output(data: bytes) -> None:
        got.extend(data)
        if b"hello\n" in got and holder:
            holder[0].pause()  # mid-stream: the guest has posted its receive buffer

    console = ConsoleDevice(on_output)
    # Only the console is declared, at slot 0 (the probe driver finds it by device id).
    decl = virtio_cmdline(VIRTIO_BASE, VIRTIO_IRQ0)
    with ProbeVm("virtio_console", decl) as vm:
        holder.append(vm.machine)
        base = VIRTIO_BASE
        t = VirtioMmio(console, vm.machine.ram, vm.machine.irq_line(VIRTIO_IRQ0), base=base)
        vm.machine.add_mmio(base, WINDOW, t)
        r = vm.machine.run(soon())
        assert r.reason is StopReason.PAUSED, vm.output
        assert bytes(got) == b"probe-console: hello\n"
        state = capture(vm.machine, [t])
        ram = vm.machine.ram.read(0, RAM)
    data = vmstate.encode(state)
    assert state.virtio[0]["queues"][0]["ready"] and state.virtio[0]["status"] & 4

    got2 = bytearray()
    console2 = ConsoleDevice(got2.extend)
    serial = bytearray()

    def attach(m: Machine) -> list[VirtioMmio]:
        attach_probe_devices(m, ProbePort())
        t2 = VirtioMmio(console2, m.ram, m.irq_line(VIRTIO_IRQ0), base=VIRTIO_BASE)
        m.add_mmio(VIRTIO_BASE, WINDOW, t2)
        return [t2]

    m = restore_machine(
        vmstate.decode(data),
        Machine(RAM, 1, strict_io=True, serial_output=serial.extend),
        lambda mem: mem.write(0, ram),
        attach=attach,
    )
    with m:
        assert console2.send(b"after restore\n") == 14  # lands in the restored receive ring
        r = m.run(soon())
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), serial.decode()
        assert bytes(got2) == b"echo:after restore\n"
        assert "probe: virtio_console ok" in serial.decode()


@needs_kvm
def test_board_device_state_and_console_pending_round_trip(disk_fd: int) -> None:
    console = ConsoleDevice()
    with Machine(RAM) as m:
        ts = virtio_board(m, console, disk_fd)
        assert console.send(b"queued for the guest") == 20  # no driver yet: stays pending
        m.serial.feed(b"typed")
        state = capture(m, ts)
        ram = m.ram.read(0, RAM)
    data = vmstate.encode(state)
    console2 = ConsoleDevice()
    holder: list[list[VirtioMmio]] = []

    def attach(m: Machine) -> list[VirtioMmio]:
        holder.append(virtio_board(m, console2, disk_fd))
        return holder[0]

    with restore_machine(
        vmstate.decode(data),
        Machine(RAM, 1),
        lambda mem: mem.write(0, ram),
        attach=attach,
    ):
        assert [t.state() for t in holder[0]] == state.virtio
        assert console2.pending == 20
        assert vmstate.encode(state) == data

    # The same state against a board with a different disk, or missing a device, is refused.
    other = os.memfd_create("other")
    os.ftruncate(other, 4096)
    try:
        with pytest.raises(VmStateError, match=r"virtio\[0\].*different backing disk"):
            restore_machine(
                vmstate.decode(data),
                Machine(RAM, 1),
                lambda mem: None,
                attach=lambda m: virtio_board(m, ConsoleDevice(), other),
            )
    finally:
        os.close(other)
    with pytest.raises(VmStateError, match="3 virtio devices, the board 0"):
        restore_machine(vmstate.decode(data), Machine(RAM, 1), lambda mem: None)


@needs_kvm
def test_restore_board_rebuilds_the_spore_board(disk_fd: int) -> None:
    cfg = BoardConfig(RAM, 1, "console=ttyS0", disk_fd, os.fstat(disk_fd).st_size, b"root")
    a = build_board(cfg, BoardWiring(on_agent_output=lambda _b: None))
    with a.machine:
        a.console.send(b"hello agent")
        state = capture(a.machine, a.transports)
        ram = a.machine.ram.read(0, RAM)
    data = vmstate.encode(state)
    b = restore_board(
        vmstate.decode(data),
        cfg,
        lambda mem: mem.write(0, ram),
        BoardWiring(on_agent_output=lambda _b: None),
    )
    with b.machine:
        assert b.console.pending == 11
        assert vmstate.encode(capture(b.machine, b.transports)) != b""  # capturable again
        assert [t.state() for t in b.transports] == state.virtio


@needs_kvm
@pytest.mark.parametrize("legacy", [True, False])
def test_board_state_restores_only_on_its_own_console(disk_fd: int, legacy: bool) -> None:
    """A /1 board (legacy console: two queues, no MULTIPORT, the old state keys) restores
    on a /1 board; on a /2 board it is another device model, refused (and the other way
    round)."""
    cfg = BoardConfig(
        RAM, 1, "console=ttyS0", disk_fd, os.fstat(disk_fd).st_size, b"root", legacy_console=legacy
    )
    a = build_board(cfg, BoardWiring(on_agent_output=lambda _b: None))
    with a.machine:
        assert a.console.legacy is legacy and len(a.transports[1].queues) == (2 if legacy else 4)
        assert ("spore.agent=/dev/hvc0" in a.cmdline) is legacy
        a.console.send(b"pending")
        state = capture(a.machine, a.transports)
        ram = a.machine.ram.read(0, RAM)
    data = vmstate.encode(state)
    keys = {"pending", "tx_paused"}
    if not legacy:
        keys |= {"device_ready", "port_ready", "guest_open", "control"}
    assert set(state.virtio[1]["device"]) == keys
    b = restore_board(
        vmstate.decode(data),
        cfg,
        lambda mem: mem.write(0, ram),
        BoardWiring(on_agent_output=lambda _b: None),
    )
    with b.machine:
        assert b.console.pending == 7 and [t.state() for t in b.transports] == state.virtio
    other = dataclasses.replace(cfg, legacy_console=not legacy)
    with pytest.raises(VmStateError, match=r"virtio\[1\].*queues: expected a list of"):
        restore_board(
            vmstate.decode(data),
            other,
            lambda mem: mem.write(0, ram),
            BoardWiring(on_agent_output=lambda _b: None),
        )


# --- hostile state ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> bytes:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    vm, _k = paused_pioloop()
    with vm:
        return vmstate.encode(capture(vm.machine))


Edit = Callable[[dict[str, Any]], None]


def mutate(data: bytes, edit: Edit) -> bytes:
    obj = json.loads(data)
    edit(obj)
    return vmstate.canonical(obj)


def _set(path: str, value: object) -> Edit:
    def edit(obj: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        cur: object = obj
        for p in parents:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]  # type: ignore[index]
        if isinstance(cur, list):
            cur[int(last)] = value
        else:
            cur[last] = value  # type: ignore[index]

    return edit


def _delete(path: str) -> Edit:
    def edit(obj: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        cur: object = obj
        for p in parents:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]  # type: ignore[index]
        del cur[last]  # type: ignore[attr-defined]

    return edit


HOSTILE_EDITS = {
    "unknown top field": (_set("extra", 1), "unknown fields"),
    "other format": (_set("format", "spore-vmstate/v2"), "unsupported"),
    "missing regs": (_delete("vcpus/0/regs"), "missing fields"),
    "unknown regs field": (_set("vcpus/0/regs/rzz", 0), "unknown fields"),
    "rax too wide": (_set("vcpus/0/regs/rax", 1 << 64), "integer in"),
    "negative rip": (_set("vcpus/0/regs/rip", -1), "integer in"),
    "bool for int": (_set("vcpus/0/regs/rflags", True), "integer in"),
    "string for int": (_set("vcpus/0/sregs/cr0", "1"), "integer in"),
    "short xsave": (_set("vcpus/0/xsave", "AAAA"), "base64 of exactly 4096"),
    "bad lapic b64": (_set("vcpus/0/lapic", "!" * 1368), "base64"),
    "short fpr hex": (_set("vcpus/0/fpu/fpr/0", "00"), "hex of exactly 16"),
    "upper hex": (_set("vcpus/0/fpu/xmm/0", "AB" * 16), "lowercase hex"),
    "xcrs list short": (_set("vcpus/0/xcrs/xcrs", []), "list of 16"),
    "too many xcrs": (_set("vcpus/0/xcrs/nr_xcrs", 17), "more than 16"),
    "foreign msr": (_set("vcpus/0/msrs/0", {"index": 0xC0010117, "value": 0}), "not one"),
    "msr unsorted": (_set("vcpus/0/msrs/1", {"index": 0x10, "value": 0}), "ascending"),
    "vcpu index": (_set("vcpus/0/index", 1), "integer in"),
    "no vcpus": (_set("vcpus", []), "1..64"),
    "mp_state": (_set("vcpus/0/mp_state", 99), "integer in"),
    "ioapic pins": (_set("vm/irqchip/ioapic/redirtbl", [0] * 23), "list of 24"),
    "pit channel": (_set("vm/pit2/channels/0/mode", 256), "integer in"),
    "serial fcr": (_set("devices/serial/fcr", 0x36), "does not keep"),
    "serial rx huge": (_set("devices/serial/rx", "00" * 4097), "at most 4096"),
    "virtio unknown": (_set("devices/virtio", [{"version": 1}]), "missing fields"),
    "virtio not list": (_set("devices/virtio", {}), "list of"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_EDITS))
def test_hostile_state_is_rejected(sample: bytes, name: str) -> None:
    edit, message = HOSTILE_EDITS[name]
    bad = mutate(sample, edit)
    with pytest.raises(VmStateError, match=message) as e:
        vmstate.decode(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not ASCII JSON"),
        (b"[]", "expected an object"),
        (b'{"format":1.5}', "non-integer"),
        (b'{"format":NaN}', "non-integer"),
        (b'{"a":1,"a":2}', "duplicate key"),
        ('{"format":"\u00e9"}'.encode(), "not ASCII"),
        (b"[" * 100000 + b"]" * 100000, "not ASCII JSON|expected an object"),
        (b" " * (vmstate.MAX_STATE_BYTES + 1), "more than"),
    ],
)
def test_malformed_bytes_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(VmStateError, match=message):
        vmstate.decode(data)


def test_non_canonical_encoding_is_rejected(sample: bytes) -> None:
    pretty = json.dumps(json.loads(sample), indent=1, sort_keys=True).encode()
    with pytest.raises(VmStateError, match="canonical"):
        vmstate.decode(pretty)
    assert vmstate.encode(vmstate.decode(sample)) == sample


@needs_kvm
def test_state_kvm_refuses_is_a_clear_error(sample: bytes) -> None:
    # CR0.PG without CR0.PE is architecturally invalid; KVM_SET_SREGS refuses it.
    bad: VmState = vmstate.decode(mutate(sample, _set("vcpus/0/sregs/cr0", 1 << 31)))
    with pytest.raises(VmStateError, match=r"vcpus\[0\]\.sregs: KVM refused"):
        restore_machine(bad, Machine(RAM, 1), lambda mem: None)
    with pytest.raises(VmStateError, match="1 vCPUs, the machine 2"):
        restore_machine(vmstate.decode(sample), Machine(RAM, 2), lambda mem: None)


@needs_kvm
def test_capture_refuses_a_running_or_stopped_machine() -> None:
    with ProbeVm("hello") as vm:
        r = vm.machine.run(soon())
        assert r.reason is StopReason.POWEROFF
        with pytest.raises(VmStateError, match="already stopped"):
            capture(vm.machine)
    with ProbeVm("loop") as vm:
        errors: list[BaseException] = []

        def try_capture() -> None:
            time.sleep(0.05)
            try:
                capture(vm.machine)
            except VmStateError as e:
                errors.append(e)
            vm.machine.pause()

        th = threading.Thread(target=try_capture)
        th.start()
        assert vm.machine.run(soon()).reason is StopReason.PAUSED
        th.join()
        assert errors and "run() is in progress" in str(errors[0])


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(sys.argv[2], sys.argv[3])
