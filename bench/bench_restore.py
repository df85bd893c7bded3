"""Restore strategies (docs/restore.md): restore -> first guest output, in one process.

The counting probe guest with 256 MiB of RAM, half of it filled with random bytes
(so chunks are real, not elided zeros), is paused mid-loop and chunked into a
temporary store. Each strategy then restores it into a fresh Machine; we time
the restore itself (VM creation + RAM + state) and restore -> the guest's next
output, and check that the count continues exactly. Baselines: a raw memcpy of
the same RAM size, and a cold boot of the probe to its first output.

    python bench/bench_restore.py
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sporevm.runtime.capture import capture  # noqa: E402
from sporevm.runtime.lazy import LazyPager, start_pager  # noqa: E402
from sporevm.runtime.restore import RamLoader, map_local, restore_machine  # noqa: E402
from sporevm.spore import backing, vmstate  # noqa: E402
from sporevm.spore.chunks import ChunkStore, materialize, snapshot_memory  # noqa: E402
from sporevm.store import Store  # noqa: E402
from sporevm.vmm.devices.virtio import VirtioMmio  # noqa: E402
from sporevm.vmm.machine import Machine, StopReason  # noqa: E402
from sporevm.vmm.memory import GuestMemory  # noqa: E402
from tests.probe_build import (  # noqa: E402
    PROBE_MMIO_BASE,
    PROBE_TEST_PORT,
    PROBE_TEST_PORT_LEN,
    MmioEcho,
    ProbeVm,
    TestPort,
)

RAM = 256 << 20
LOOP = 20000


class TimedPort(TestPort):
    """The probe's test port, noting when the first loop value arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.first: float | None = None

    def write(self, offset: int, data: bytes) -> None:
        if offset == 8 and self.first is None:
            self.first = time.perf_counter()
        super().write(offset, data)


def paused() -> tuple[ProbeVm, int]:
    for _ in range(5):
        vm = ProbeVm("pioloop", f"probe.pioloop={LOOP}", memory_bytes=RAM)
        # Real data in the upper half of RAM, which the probe never uses.
        vm.machine.ram.write(RAM // 2, os.urandom(RAM // 2))
        timer = threading.Timer(0.1, vm.machine.pause)
        timer.start()
        r = vm.machine.run(time.monotonic() + 20)
        timer.join()
        k = len(vm.port.loop)
        if r.reason is StopReason.PAUSED and 0 < k < LOOP:
            return vm, k
        vm.machine.close()
    raise SystemExit("could not pause the probe mid-loop")


def cold_boot() -> float:
    port = TimedPort()
    t0 = time.perf_counter()
    vm = ProbeVm("pioloop", f"probe.pioloop={LOOP}", memory_bytes=RAM, port_device=port)
    with vm:
        vm.machine.run(time.monotonic() + 20)
    assert port.first is not None
    return port.first - t0


def memcpy_ms() -> float:
    a, b = GuestMemory(RAM), GuestMemory(RAM)
    try:
        a.write(0, os.urandom(1 << 20) * (RAM >> 20))
        b.write(0, bytes(RAM))  # both sides resident: a pure copy
        t0 = time.perf_counter()
        ctypes.memmove(b.address(), a.address(), RAM)
        return (time.perf_counter() - t0) * 1e3
    finally:
        a.close()
        b.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vm, k = paused()
        with vm:
            state = vmstate.decode(vmstate.encode(capture(vm.machine)))
            store = Store(Path(tmp))
            chunks = ChunkStore(store)
            index = snapshot_memory(vm.machine.ram.view(0, vm.machine.ram.size), chunks)
        stored = len(index.stored())
        print(
            f"probe guest, {RAM >> 20} MiB RAM: {stored} stored chunks, "
            f"{len(index.chunks) - stored} zero chunks"
        )

        pagers: list[LazyPager] = []

        def eager(mem: GuestMemory) -> None:
            materialize(index, chunks, mem.view(0, mem.size, writable=True), out_is_zero=True)

        def local(mem: GuestMemory) -> None:
            backing._verified.clear()  # measure the per-process re-hash every time
            map_local(mem, index, chunks, store)

        def local_trusted(mem: GuestMemory) -> None:
            map_local(mem, index, chunks, store)  # verified earlier in this process

        def lazy(mem: GuestMemory) -> None:
            pagers.append(start_pager(mem, index, chunks))

        def one(name: str, loader: RamLoader) -> tuple[float, float]:
            port = TimedPort()
            t0 = time.perf_counter()
            m = restore_machine(
                state,
                Machine(RAM, 1, strict_io=True),
                loader,
                attach=lambda m: _attach(m, port),
            )
            t1 = time.perf_counter()
            with m:
                r = m.run(time.monotonic() + 20)
            assert r.reason is StopReason.POWEROFF, (name, r)
            assert port.loop == list(range(k, LOOP)), f"{name}: the count did not continue"
            assert port.first is not None
            return (t1 - t0) * 1e3, (port.first - t0) * 1e3

        rows: list[tuple[str, float, float]] = []
        backing.ensure_memfile(index, chunks, store)  # published once, as a first run would
        t = time.perf_counter()
        backing.memfile_path(index, store).unlink()
        backing.ensure_memfile(index, chunks, store)
        materialize_ms = (time.perf_counter() - t) * 1e3
        for name, loader in (
            ("eager", eager),
            ("lazy", lazy),
            ("local (re-hash)", local),
            ("local (verified)", local_trusted),
        ):
            best = min((one(name, loader) for _ in range(3)), key=lambda x: x[1])
            rows.append((name, *best))
        faults = pagers[-1].faults
        copy_ms = memcpy_ms()
        boot_ms = cold_boot() * 1e3

        print(f"memfile materialization (once per memory index): {materialize_ms:.0f} ms")
        print(f"lazy: the guest faulted in {faults} of {stored} stored chunks")
        print(
            f"{'strategy':18} {'restore ms':>10} {'-> output ms':>12} {'vs eager':>9} "
            f"{'vs boot':>8}"
        )
        eager_out = rows[0][2]
        for name, restore_ms, out_ms in rows:
            print(
                f"{name:18} {restore_ms:10.1f} {out_ms:12.1f} {eager_out / out_ms:8.1f}x "
                f"{boot_ms / out_ms:7.1f}x"
            )
        print(
            f"raw memcpy of {RAM >> 20} MiB: {copy_ms:.1f} ms; "
            f"cold boot -> first output: {boot_ms:.1f} ms"
        )


def _attach(m: Machine, port: TestPort) -> list[VirtioMmio]:
    m.add_pio(PROBE_TEST_PORT, PROBE_TEST_PORT_LEN, port)
    m.add_mmio(PROBE_MMIO_BASE, 4096, MmioEcho())
    return []


if __name__ == "__main__":
    main()
