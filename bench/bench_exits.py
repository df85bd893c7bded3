"""VM exits by class: spore's VMM vs QEMU microvm, for boot, restore and `run -- true`.

Two sources, printed side by side:

* KVM's per-VM statistics in debugfs (``/sys/kernel/debug/kvm/<pid>-<fd>/``:
  ``exits``, ``io_exits``, ``mmio_exits``, ``halt_exits``, ``irq_exits``, …),
  the same counters for both VMMs and independent of either. The bench mounts
  debugfs when it is not (root only) and reads the VM's directory at the moment
  that ends the phase (while the VM is alive: the directory goes with the VM).
* Our VMM's own counts and host time per exit class (the monitor's exit event,
  ``Exited.exits``; ``SPORE_EXIT_STATS=1`` prints the same table from `spore run`):
  what each userspace exit class costs in Python.

Phases (one VM each, ``--runs`` times, medians of each counter):

  boot        spawn → agent READY. Ours: VmProcess; the VM is stopped with SIGTERM
              at READY, so its exit event counts exactly this phase. QEMU: -M microvm
              -accel kvm with the same kernel, initramfs, rootfs (bench_boot.QemuVm).
  restore     ours only: resume the bench spore (bench_spores' busybox spore, built
              or found cached) → first stdout byte of `cat /tmp/marker`, then SIGTERM.
  run-true    ours: `spore run --rootfs X -- true` (the CLI, SPORE_EXIT_STATS=1);
              QEMU: spawn → READY → exec `true` → reboot → exit. debugfs is polled
              every 20 ms until the VM's directory goes away (the last reading is kept).

Run: `SPORE_HOME=~/.cache/spore-tests/kernel-store python bench/bench_exits.py [--runs 1]`
See docs/bench.md ("bench_exits.py") for the tables measured here and in the lane.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_boot  # noqa: E402
import bench_spores  # noqa: E402
from bench_boot import MEMORY, QEMU, BootFailed, QemuVm  # noqa: E402

from sporevm.build.guest import GuestPlatform, ensure_guest  # noqa: E402
from sporevm.build.kernel import detect_host_class, ensure_kernel  # noqa: E402
from sporevm.build.progress import Reporter  # noqa: E402
from sporevm.build.runner import resume_vm  # noqa: E402
from sporevm.errors import SporeError  # noqa: E402
from sporevm.runtime.launcher import VmProcess, VmSpec  # noqa: E402
from sporevm.runtime.monitor_config import VmConfig  # noqa: E402
from sporevm.runtime.protocol import Exited  # noqa: E402
from sporevm.runtime.ramimage import RamImageCache  # noqa: E402
from sporevm.store import Store  # noqa: E402

ROOT = bench_boot.ROOT
DEBUGFS = Path("/sys/kernel/debug")
KVM_DIR = DEBUGFS / "kvm"
# The per-VM counters worth a row (others exist; these say where exits go).
KVM_FIELDS = (
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "halt_wakeup",
    "irq_exits",
    "irq_window_exits",
    "irq_injections",
    "request_irq_exits",
    "signal_exits",
    "insn_emulation",
    "hypercalls",
    "nmi_window_exits",
    "pf_taken",
    "pages_4k",  # guest memory mapped by KVM at the moment read, 4 KiB / 2 MiB pages
    "pages_2m",
    "pf_fixed",
    "pf_guest",
    "tlb_flush",
)
Counts = dict[str, int]
Classes = dict[str, tuple[int, int]]  # class -> (count, ns)


def ensure_debugfs() -> bool:
    if KVM_DIR.is_dir():
        return True
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["mount", "-t", "debugfs", "none", str(DEBUGFS)],
            capture_output=True,
            timeout=10,
            check=False,
        )
    return KVM_DIR.is_dir()


def descendants(root: int) -> set[int]:
    """``root`` and every process below it (the CLI → zygote → monitor chain)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(kids)
        frontier.extend(kids)
    return found


def read_vm(pids: set[int]) -> Counts | None:
    """The debugfs counters of the (first) VM owned by one of ``pids``; None if none."""
    if not KVM_DIR.is_dir():
        return None
    for d in sorted(KVM_DIR.iterdir()):
        pid = d.name.split("-", 1)[0]
        if not (pid.isdigit() and int(pid) in pids):
            continue
        out: Counts = {}
        for name in KVM_FIELDS:
            with contextlib.suppress(OSError, ValueError):
                out[name] = int((d / name).read_text())
        if out:
            return out
    return None


class Watcher(threading.Thread):
    """Polls the debugfs counters of the VM under ``root`` and keeps the latest."""

    def __init__(self, root: int, tree: bool) -> None:
        super().__init__(daemon=True)
        self.root, self.tree = root, tree
        self.latest: Counts | None = None
        self._done = threading.Event()

    def run(self) -> None:
        pids = {self.root}
        while not self._done.wait(0.02):
            if self.tree:
                pids = descendants(self.root)
            got = read_vm(pids)
            if got is not None:
                self.latest = got

    def stop(self) -> Counts | None:
        self._done.set()
        self.join(2)
        return self.latest


# -- phases --------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    kvm: Counts | None
    ours: Classes | None = None


def classes(ev: object) -> Classes | None:
    if not isinstance(ev, Exited):
        return None
    return {e.name: (e.count, e.ns) for e in ev.exits}


def sigterm_and_classes(vm: VmProcess) -> Classes | None:
    """Stop the VM where it is (SIGTERM pauses it and ends the monitor) and return the
    counts of its exit event: exactly the phase that just ended."""
    vm.proc.terminate()
    return classes(vm.wait_exit(30.0))


def ours_boot(guest: GuestPlatform, rootfs: Path, timeout: float) -> Sample:
    start = time.perf_counter()
    vm = VmProcess(VmSpec(VmConfig(guest.kernel, guest.initrd, rootfs, guest.cmdline, MEMORY)))
    try:
        try:
            vm.session.wait_ready(timeout)
        except SporeError as exc:
            vm.wait_exit(1.0)
            raise BootFailed(f"{vm.describe_exit()} ({exc})", time.perf_counter() - start) from None
        took = time.perf_counter() - start
        kvm = read_vm({vm.proc.pid})
        return Sample(took, kvm, sigterm_and_classes(vm))
    finally:
        vm.close()


def ours_restore(
    spore: Path, store: Store, timeout: float, images: RamImageCache | None = None
) -> Sample:
    """``images``: from that cache's sealed RAM image (a served `run --from`), shmem
    mapped in 4 KiB pages; else eager, as an unserved `run --from`."""
    start = time.perf_counter()
    # as `spore run --from` resumes: no dirty log, so KVM maps eager RAM in 2 MiB pages
    vm = resume_vm(spore, store, Reporter.quiet(), snapshots=False, ram_images=images)
    try:
        took = bench_spores.first_output(vm, ["cat", "/tmp/marker"], start, timeout)
        kvm = read_vm({vm.proc.pid})
        return Sample(took, kvm, sigterm_and_classes(vm))
    finally:
        vm.close()


TABLE_LINE = re.compile(r"^(\S+)\s+(\d+)\s+([\d.]+)\s+[\d.]+$")


def ours_run_true(rootfs: Path, timeout: float) -> Sample:
    argv = [sys.executable, "-m", "sporevm.cli", "run", "--rootfs", str(rootfs), "--", "true"]
    # in this process tree (the watcher follows it), not a resident server's handler
    env = {**os.environ, "SPORE_EXIT_STATS": "1", "SPORE_SERVER": "off"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    watcher = Watcher(proc.pid, tree=True)
    watcher.start()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BootFailed("spore run did not finish", time.perf_counter() - start) from None
    finally:
        if proc.poll() is None:
            bench_boot.kill_group(proc)
        kvm = watcher.stop()
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise BootFailed(f"spore run exited {proc.returncode}: {err.strip()[-300:]}", took)
    ours: Classes = {}
    for line in err.split("spore: VM exits", 1)[-1].splitlines():
        m = TABLE_LINE.match(line.strip())
        if m:
            ours[m[1]] = (int(m[2]), int(float(m[3]) * 1e6))
    return Sample(took, kvm, ours or None)


def qemu_phase(
    accel: list[str], q: tuple[Path, Path, Path, str], timeout: float, run: bool
) -> Sample:
    vm = QemuVm(accel, *q)
    deadline = vm.start + timeout
    watcher = Watcher(vm.proc.pid, tree=False)
    watcher.start()
    try:
        session = vm.connect(deadline)
        vm.pump_until(session, lambda: session.ready is not None, deadline, "agent READY")
        if not run:
            took = vm.elapsed()
            return Sample(took, read_vm({vm.proc.pid}))
        handle = session.exec(["true"])
        vm.pump_until(session, lambda: handle.done, deadline, "exit of `true`")
        with contextlib.suppress(SporeError):
            session.shutdown(reboot=True, timeout=max(0.1, deadline - time.perf_counter()))
        with contextlib.suppress(subprocess.TimeoutExpired):
            vm.proc.wait(max(0.1, deadline - time.perf_counter()))
        took = vm.elapsed()
        return Sample(took, watcher.stop())
    finally:
        watcher.stop()
        vm.close()


# -- report --------------------------------------------------------------------------


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)
    failure: str | None = None

    def seconds(self) -> float | None:
        return statistics.median(s.seconds for s in self.samples) if self.samples else None

    def kvm(self, name: str) -> int | None:
        vals = [s.kvm[name] for s in self.samples if s.kvm and name in s.kvm]
        return int(statistics.median(vals)) if vals else None

    def ours(self) -> dict[str, tuple[int, float]]:
        """class -> (median count, median µs per exit)."""
        names = {n for s in self.samples if s.ours for n in s.ours}
        out: dict[str, tuple[int, float]] = {}
        for n in names:
            pairs = [s.ours[n] for s in self.samples if s.ours and n in s.ours]
            count = int(statistics.median(c for c, _ in pairs))
            per = statistics.median(ns / c / 1000 if c else 0.0 for c, ns in pairs)
            out[n] = (count, per)
        return out


def attempt(series: Series, fn: Callable[[], Sample], what: str) -> None:
    if series.failure is not None:
        return
    try:
        s = fn()
    except (BootFailed, SporeError, bench_spores.BenchError) as exc:
        series.failure = str(exc)[:300]
        print(f"  {what}: FAILED: {series.failure}", file=sys.stderr)
        return
    series.samples.append(s)
    print(f"  {what}: {s.seconds:.2f} s", file=sys.stderr)


def fmt(v: int | None) -> str:
    return "-" if v is None else str(v)


def report(title: str, ours: Series, peer: Series | None) -> None:
    print(f"## {title}")
    if ours.failure:
        print(f"ours failed: {ours.failure}")
    if peer is not None and peer.failure:
        print(f"QEMU failed: {peer.failure}")
    os_, ps_ = ours.seconds(), peer.seconds() if peer else None
    print(f"wall: ours {os_ or 0:.2f} s" + (f", QEMU {ps_:.2f} s" if ps_ else ""))
    print(f"{'KVM debugfs counter':22} {'ours':>10} {'QEMU':>10}")
    for name in KVM_FIELDS:
        print(f"{name:22} {fmt(ours.kvm(name)):>10} {fmt(peer.kvm(name) if peer else None):>10}")
    oc = ours.ours()
    if oc:
        print(f"\n{'our exit class':16} {'count':>9} {'us/exit':>9} {'host ms':>10}")
        for name, (count, per) in sorted(oc.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
            print(f"{name:16} {count:9} {per:9.1f} {count * per / 1000:10.1f}")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--rootfs", type=Path)
    ap.add_argument("--skip-qemu", action="store_true")
    ap.add_argument("--skip-restore", action="store_true")
    ap.add_argument("--cpu", default="host", help="QEMU -cpu model (default host)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda signo, frame: sys.exit(128 + signo))
    if not ensure_debugfs():
        print("KVM debugfs not available (not root?): only our own counts", file=sys.stderr)
    host_class = detect_host_class()
    store = Store()
    guest = ensure_guest(store, Reporter.quiet())
    bzimage = ensure_kernel(store, host_class).path
    work = Path(tempfile.mkdtemp(prefix="spore-bench-exits-"))
    try:
        rootfs = args.rootfs or bench_boot.make_rootfs(work)
        spore = None if args.skip_restore else bench_spores.build_spore(work, args.timeout)
        q = (bzimage, guest.initrd, rootfs, guest.cmdline)
        accel = ["-accel", "kvm", "-cpu", args.cpu]
        qemu = not args.skip_qemu and shutil.which(QEMU) is not None
        s = {k: Series() for k in ("boot", "qboot", "restore", "sealed", "run", "qrun")}
        # filled and verified once, before anything is counted (as a resident server's)
        images = bench_boot.sealed_image(spore)[0] if spore is not None else None
        for i in range(args.runs):
            attempt(s["boot"], lambda: ours_boot(guest, rootfs, args.timeout), f"boot ours {i}")
            if qemu:
                attempt(
                    s["qboot"], lambda: qemu_phase(accel, q, args.timeout, False), f"boot QEMU {i}"
                )
            if spore is not None:
                attempt(
                    s["restore"], lambda: ours_restore(spore, store, args.timeout), f"restore {i}"
                )
                attempt(
                    s["sealed"],
                    lambda: ours_restore(spore, store, args.timeout, images),
                    f"restore from a sealed RAM image {i}",
                )
            attempt(s["run"], lambda: ours_run_true(rootfs, args.timeout), f"run-true ours {i}")
            if qemu:
                attempt(
                    s["qrun"],
                    lambda: qemu_phase(accel, q, args.timeout, True),
                    f"run-true QEMU {i}",
                )
        ioev = os.environ.get("SPORE_IOEVENTFD", "1") != "0"
        print(
            f"host class: {host_class}; {args.runs} run(s), medians; QEMU -cpu {args.cpu}; "
            f"ours with ioeventfd/irqfd {'on' if ioev else 'off (SPORE_IOEVENTFD=0)'}\n"
        )
        report("boot -> agent READY", s["boot"], s["qboot"] if qemu else None)
        if spore is not None:
            report("restore -> first output (QEMU: no restore)", s["restore"], None)
            report("restore from a sealed RAM image -> first output", s["sealed"], None)
        report("run -- true (spawn -> exit)", s["run"], s["qrun"] if qemu else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
