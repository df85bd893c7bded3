"""Boot-to-agent-ready and `run -- true`: spore's VMM vs QEMU microvm, one process run.

Both sides boot the same managed kernel build, the same initramfs (our guest
agent as /init) and the same busybox ext4 rootfs, with the same kernel options,
and talk to the same agent over a virtio-serial port named org.spore.agent:

  ours (a)   VmProcess(...) + session.wait_ready: spawn of the monitor → READY
  ours (b)   `spore run --rootfs X -- true` as a subprocess (SPORE_SERVER=off):
             wall time including Python startup, boot, exec, ending the VM, exit
  ours (c)   `spore run --from SPORE -- true` as a subprocess (SPORE_SERVER=off), where
             SPORE is a one-step spore built (once, before timing) on the same
             busybox image: Python startup, restore, exec, shutdown, exit
  ours (c')  the same through this user's resident server (`spore server start`
             before timing; the `spore` process is a thin client, docs/server.md)
  ours (d)   restore -> first output of that spore, eager and local: resume_vm (as
             `run --from`, its monitor forked from this process's zygote) + `cat` of
             the file its step wrote, until the first stdout byte
  ours (d')  the same, eager from this process's sealed RAM image of the spore (filled
             and verified once before timing, as the resident server keeps one;
             docs/restore.md, "Sealed RAM images")
  QEMU (a)   spawn of qemu-system-x86_64 -M microvm,acpi=off → READY, read
             with sporevm.runtime.agent_session.AgentSession over a unix socket
             (QEMU's virtconsole chardev connects to us as a client)
  QEMU (b)   spawn → READY → exec `true` → SHUTDOWN → QEMU exited (no Python
             startup on this side: the session lives in this process); (c) is
             compared with it too: a warm spore against QEMU's cold boot
  QEMU (d)   spawn → READY → exec `echo` → its first stdout byte: the cold boot -> first
             output that (d) is compared with (issue 16's restore goal: <= 0.25x)

QEMU runs in two modes: TCG (pure software emulation) and KVM. Every wait is
bounded; a QEMU that stops with "KVM internal error" is paused by QEMU, not
ended, so its stderr is watched and the process is killed. Prints the median
of ``--runs`` runs of each and the ratios ours/QEMU.

Run: `SPORE_HOME=~/.cache/spore-tests/kernel-store python bench/bench_boot.py [--runs 3]`
(SPORE_HOME must hold the managed kernel, or the first run builds it.)
See docs/bench.md for the choices and the figures measured on a kvm_pvm host.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

import ociimage  # noqa: E402
from sporebuild import build_spore_from  # noqa: E402

from sporevm.build.guest import GuestPlatform, ensure_guest  # noqa: E402
from sporevm.build.kernel import detect_host_class, ensure_kernel  # noqa: E402
from sporevm.build.progress import Reporter  # noqa: E402
from sporevm.build.runner import resume_vm  # noqa: E402
from sporevm.errors import SporeError  # noqa: E402
from sporevm.runtime.agent_session import AgentSession, FdChannel  # noqa: E402
from sporevm.runtime.launcher import VmProcess, VmSpec, stop_process  # noqa: E402
from sporevm.runtime.monitor_config import VmConfig  # noqa: E402
from sporevm.runtime.protocol import RestoreStrategy  # noqa: E402
from sporevm.runtime.ramimage import RamImageCache  # noqa: E402
from sporevm.spore.chunks import ChunkStore  # noqa: E402
from sporevm.spore.platform import GUEST_AGENT, GUEST_ROOT  # noqa: E402
from sporevm.spore.sporedir import open_spore  # noqa: E402
from sporevm.store import Store  # noqa: E402

MEMORY = 256 << 20
QEMU = "qemu-system-x86_64"
# QEMU -enable-kvm CPU models tried, in order. `-cpu host` (and `max`) abort at
# once on this kind of host ("failed to set MSR 0x10a", IA32_ARCH_CAPABILITIES);
# without that MSR, `host` gets as far as the kernel does on real KVM.
KVM_CPUS = ("host", "host,-arch-capabilities")
FATAL_MARKERS = ("KVM internal error", "error:", "Assertion", "Could not", "could not")


class BootFailed(Exception):
    """The VM did not reach agent READY (or did not finish `true`)."""

    def __init__(self, reason: str, elapsed: float, *, booted: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.elapsed = elapsed
        self.booted = booted  # the agent was READY; what failed came later


@dataclass
class Series:
    name: str
    times: list[float] = field(default_factory=list)
    failure: BootFailed | None = None

    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def describe(self) -> str:
        med = self.median()
        if med is not None:
            spread = f"{min(self.times):.2f}-{max(self.times):.2f}"
            return f"{med:7.2f} s  (median of {len(self.times)}, range {spread} s)"
        assert self.failure is not None
        what = "failed" if self.failure.booted else "could not boot"
        return f"{what}: {self.failure.reason} (after {self.failure.elapsed:.1f} s)"


# -- ours ----------------------------------------------------------------------


def ours_boot(guest: GuestPlatform, rootfs: Path, timeout: float) -> float:
    """Spawn the monitor and wait for READY; returns the seconds that took."""
    start = time.perf_counter()
    vm = VmProcess(VmSpec(VmConfig(guest.kernel, guest.initrd, rootfs, guest.cmdline, MEMORY)))
    try:
        try:
            vm.session.wait_ready(timeout)
        except SporeError as exc:
            elapsed = time.perf_counter() - start
            vm.wait_exit(1.0)
            raise BootFailed(f"{vm.describe_exit()} ({exc})", elapsed) from None
        elapsed = time.perf_counter() - start
        with contextlib.suppress(SporeError):
            vm.session.shutdown(timeout=30.0)
        vm.wait_exit(30.0)
        return elapsed
    finally:
        vm.close()


def ours_run_true(rootfs: Path, timeout: float) -> float:
    return ours_cli_true(["--rootfs", str(rootfs)], timeout)


def ours_run_from_true(spore: Path, timeout: float, server: bool = False) -> float:
    return ours_cli_true(["--from", str(spore)], timeout, server)


def ours_restore_output(
    spore: Path, ram: RestoreStrategy, timeout: float, images: RamImageCache | None = None
) -> float:
    """`spore run --from`'s restore (resume_vm: check the spore, a monitor forked from
    this process's zygote, restore, HELLO, generation) and then `cat` of the file the
    spore's step wrote, until its first stdout byte: restore -> first output.
    ``images``: eager takes its RAM from that cache's sealed image."""
    start = time.perf_counter()
    got: list[float] = []
    vm = resume_vm(spore, Store(), Reporter.quiet(), ram=ram, snapshots=False, ram_images=images)
    try:
        handle = vm.session.exec(
            ["cat", "/tmp/marker"], on_stdout=lambda _d: got.append(time.perf_counter())
        )
        while not got and not handle.done:
            vm.session.pump(min(1.0, max(0.01, start + timeout - time.perf_counter())))
            if time.perf_counter() > start + timeout:
                raise BootFailed("no output from the restored VM", time.perf_counter() - start)
        if not got:
            raise BootFailed(f"`cat` {handle.wait(0).describe()}, no output", 0.0, booted=True)
        with contextlib.suppress(SporeError):
            vm.session.shutdown(timeout=30.0)
        vm.wait_exit(30.0)
        return got[0] - start
    finally:
        vm.close()


def spore_argv() -> list[str]:
    """The `spore` a user runs: the console script beside this interpreter, else -m."""
    script = Path(sys.executable).with_name("spore")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sporevm.cli"]


def ours_cli_true(source: list[str], timeout: float, server: bool = False) -> float:
    """`spore run SOURCE -- true` as a subprocess, spawn to exit; ``server``: handed to
    the resident server (SPORE_SERVER=require), else run in the CLI's own process."""
    argv = [*spore_argv(), "run", *source, "--", "true"]
    env = {**os.environ, "SPORE_SERVER": "require" if server else "off"}
    start = time.perf_counter()
    # its own process group, so a timeout or an interrupt also ends its VM monitor
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BootFailed(
            f"spore run did not finish within {timeout:.0f} s", time.perf_counter() - start
        ) from None
    finally:
        if proc.poll() is None:
            kill_group(proc)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = " | ".join(err.strip().splitlines()[-3:])
        booted = "did not come up" not in err
        raise BootFailed(f"spore run exited {proc.returncode}: {tail}", elapsed, booted=booted)
    return elapsed


def kill_group(proc: subprocess.Popen[str]) -> None:
    for signo in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signo)
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


# -- QEMU ----------------------------------------------------------------------


class QemuVm:
    """qemu-system-x86_64 -M microvm with our kernel, initrd, rootfs and agent channel."""

    def __init__(
        self, accel: list[str], kernel: Path, initrd: Path, rootfs: Path, cmdline: str
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spore-bench-qemu-"))
        self.serial_log = self.dir / "serial.log"
        sock_path = self.dir / "agent.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(sock_path))
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.stderr_lines: list[str] = []
        self.fatal: str | None = None
        self.start = time.perf_counter()
        argv = [
            QEMU,
            "-M",
            "microvm,acpi=off",
            *accel,
            "-m",
            f"{MEMORY >> 20}M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-reboot",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.serial_log}",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            # microvm with acpi=off appends the virtio_mmio.device= declarations itself
            "-append",
            f"{cmdline} spore.root={GUEST_ROOT} spore.agent={GUEST_AGENT}",
            "-drive",
            f"id=root,file={rootfs},format=raw,if=none,readonly=on",
            "-device",
            "virtio-blk-device,drive=root",
            "-device",
            "virtio-serial-device",
            # reboot=k resets through the keyboard controller, as on our board;
            # microvm has none by default, and without it the reboot never ends QEMU
            "-device",
            "i8042",
            # a generic port named like ours: the agent finds it by name
            "-chardev",
            f"socket,id=agent,path={sock_path}",
            "-device",
            f"virtserialport,chardev=agent,name={GUEST_AGENT}",
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip()
            self.stderr_lines.append(line)
            if self.fatal is None and any(m in line for m in FATAL_MARKERS):
                self.fatal = line.removeprefix(f"{QEMU}: ")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self) -> None:
        """Raise BootFailed if QEMU reported a fatal error or has exited."""
        if self.fatal is not None:
            raise BootFailed(self.fatal, self.elapsed())
        code = self.proc.poll()
        if code is not None:
            self._reader.join(1.0)
            if self.fatal is not None:
                raise BootFailed(self.fatal, self.elapsed())
            why = self.stderr_lines[-1] if self.stderr_lines else "no message"
            raise BootFailed(f"QEMU exited with status {code} ({why})", self.elapsed())

    def connect(self, deadline: float) -> AgentSession:
        self.listener.settimeout(0.1)
        while self.conn is None:
            self.check()
            if time.perf_counter() > deadline:
                raise BootFailed("QEMU never connected the agent chardev", self.elapsed())
            with contextlib.suppress(TimeoutError):
                self.conn, _ = self.listener.accept()
        return AgentSession(FdChannel(self.conn.fileno()))

    def pump_until(
        self, session: AgentSession, cond: Callable[[], bool], deadline: float, what: str
    ) -> None:
        """Pump the session in short slices, watching QEMU between them."""
        while not cond():
            self.check()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BootFailed(f"no {what} within the time limit", self.elapsed())
            try:
                session.pump(min(0.2, left))
            except SporeError as exc:
                time.sleep(0.2)  # let QEMU's last words arrive
                self.check()
                raise BootFailed(str(exc), self.elapsed()) from None

    def serial_tail(self, lines: int = 3) -> str:
        try:
            text = self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def close(self) -> None:
        stop_process(self.proc)
        self._reader.join(2.0)
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def qemu_once(
    accel: list[str],
    kernel: Path,
    initrd: Path,
    rootfs: Path,
    cmdline: str,
    timeout: float,
    run_true: bool,
    first_output: bool = False,
) -> float:
    """One QEMU boot: seconds to READY, (first_output) to the first stdout byte of `echo`
    run once READY, or (run_true) to `true` done and QEMU exited."""
    vm = QemuVm(accel, kernel, initrd, rootfs, cmdline)
    deadline = vm.start + timeout
    session: AgentSession | None = None
    try:
        session = vm.connect(deadline)
        vm.pump_until(session, lambda: session.ready is not None, deadline, "agent READY")
        if first_output:
            got: list[float] = []
            session.exec(["echo", MARKER], on_stdout=lambda _d: got.append(vm.elapsed()))
            vm.pump_until(session, lambda: bool(got), deadline, "output of `echo`")
            return got[0]
        if not run_true:
            return vm.elapsed()
        handle = session.exec(["true"])
        vm.pump_until(session, lambda: handle.done, deadline, "exit of `true`")
        status = handle.wait(0)
        if status.returncode != 0:
            raise BootFailed(f"`true` {status.describe()}", vm.elapsed(), booted=True)
        try:
            # reboot, not power-off: the agent powers off through the spore power
            # port, which QEMU lacks (the guest would only halt); a reboot through
            # the i8042 with -no-reboot ends QEMU.
            session.shutdown(reboot=True, timeout=max(0.1, deadline - time.perf_counter()))
        except SporeError as exc:
            raise BootFailed(f"shutdown: {exc}", vm.elapsed(), booted=True) from None
        try:
            vm.proc.wait(max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            raise BootFailed(
                "QEMU did not exit after the guest shut down", vm.elapsed(), booted=True
            ) from None
        elapsed = vm.elapsed()
        vm._reader.join(2.0)
        killed = [line for line in vm.stderr_lines if "terminating on signal" in line]
        if vm.proc.returncode != 0 or killed:
            why = killed[0] if killed else f"status {vm.proc.returncode}"
            raise BootFailed(
                f"QEMU ended abnormally after the shutdown: {why}", elapsed, booted=True
            )
        return elapsed
    except BootFailed as exc:
        exc.booted = exc.booted or (session is not None and session.ready is not None)
        tail = vm.serial_tail()
        if tail:
            exc.reason += f"; serial: {tail}"
        raise
    finally:
        vm.close()


# -- driver --------------------------------------------------------------------


@dataclass
class Task:
    what: str
    series: Series
    fn: Callable[[], float]
    needs: Series | None = None  # skipped (with its failure) once this series failed


def measure(tasks: list[Task], runs: int) -> None:
    """Round-robin: each round runs every task once, so host load (this machine is
    shared) weighs on both sides alike. A failing series is not retried: failures
    are deterministic here and each attempt can cost tens of seconds."""
    for i in range(runs):
        for task in tasks:
            s = task.series
            if s.failure is None and task.needs is not None and task.needs.failure is not None:
                s.failure = task.needs.failure
            if s.failure is not None:
                continue
            # This harness's own garbage is collected between samples, not inside one
            # (both sides' sessions are Python in this process).
            gc.collect()
            try:
                t = task.fn()
            except BootFailed as exc:
                s.failure = exc
                print(
                    f"  {task.what} {s.name} run {i + 1}: FAILED after {exc.elapsed:.1f} s: "
                    f"{exc.reason}",
                    file=sys.stderr,
                )
                continue
            s.times.append(t)
            print(f"  {task.what} {s.name} run {i + 1}: {t:.2f} s", file=sys.stderr)


SPOREFILE = """\
sporefile: 1
name: bench-boot
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB}}
steps:
  - name: marker
    run: echo {marker} > /tmp/marker
"""
MARKER = "bench-boot"
# Restore strategies timed for restore -> first output: the default, and the fastest here.
RESTORE_ROWS = (RestoreStrategy.EAGER, RestoreStrategy.LOCAL)


def make_spore(work: Path, timeout: float) -> Path:
    """A one-step spore on the busybox layout make_rootfs wrote (built or found cached)."""
    src = work / "spore-src"
    src.mkdir()
    (src / "Sporefile").write_text(SPOREFILE.format(layout=work / "layout", marker=MARKER))
    return build_spore_from(src / "Sporefile", timeout)


def make_rootfs(work: Path) -> Path:
    layout = work / "layout"
    ociimage.write_layout(layout, list(ociimage.busybox_layers()), tag="latest")
    out = work / "busybox.ext4"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sporevm.cli",
            "rootfs",
            f"oci-layout:{layout}:latest",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"spore rootfs failed: {proc.stderr.strip()[-500:]}")
    return out


def ratio(ours: Series, peer: Series) -> str:
    o, p = ours.median(), peer.median()
    if p is None:
        return "QEMU-KVM cannot run this guest here" if "KVM" in peer.name else "peer failed"
    if o is None:
        return f"{ours.name} did not boot"
    return f"{o / p:.2f}x  ({o:.2f} s / {p:.2f} s)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rootfs", type=Path, help="ext4 rootfs (default: a fresh busybox one)")
    ap.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="bound on each boot or run, seconds (default 180)",
    )
    ap.add_argument("--skip-kvm", action="store_true", help="do not try QEMU -enable-kvm")
    ap.add_argument(
        "--skip-from",
        action="store_true",
        help="do not build a spore and time `spore run --from SPORE -- true`",
    )
    ap.add_argument(
        "--skip-server",
        action="store_true",
        help="do not time `spore run --from` through the resident server (spore server)",
    )
    ap.add_argument(
        "--skip-tcg",
        action="store_true",
        help="do not run QEMU TCG (in the hardware-KVM lane: TCG inside TCG)",
    )
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every VM, QEMU and temp dir is cleaned up
    signal.signal(signal.SIGTERM, lambda signo, frame: sys.exit(128 + signo))
    if shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found (apt install qemu-system-x86)")
    host_class = detect_host_class()
    store = Store()
    print(f"host class: {host_class}; preparing kernel, initramfs, rootfs …", file=sys.stderr)
    guest = ensure_guest(store, Reporter.quiet())
    bzimage = ensure_kernel(store, host_class).path
    work = Path(tempfile.mkdtemp(prefix="spore-bench-boot-"))
    try:
        made = make_rootfs(work)  # also the layout the spore is built on
        rootfs = args.rootfs if args.rootfs is not None else made
        spore = None if args.skip_from else make_spore(work, args.timeout * 4)
        started_server = None if spore is None or args.skip_server else start_server()
        q = (bzimage, guest.initrd, rootfs, guest.cmdline, args.timeout)
        tcg = ["-accel", "tcg"]

        def kvm(cpu: str) -> list[str]:
            return ["-accel", "kvm", "-cpu", cpu]

        boot = [Series("ours"), Series("QEMU-TCG")]
        runs = [Series("ours"), Series("QEMU-TCG")]
        tasks = [
            Task("boot", boot[0], lambda: ours_boot(guest, rootfs, args.timeout)),
            Task("run-true", runs[0], lambda: ours_run_true(rootfs, args.timeout)),
        ]
        from_true = Series("ours --from")
        served = Series("ours --from, resident server")
        restored = [Series(f"ours restore {ram.value}") for ram in RESTORE_ROWS]
        warm_notes: list[str] = []
        if spore is not None:
            tasks.append(
                Task("run-from-true", from_true, lambda: ours_run_from_true(spore, args.timeout))
            )
            if started_server is not None:
                fn = partial(ours_run_from_true, spore, args.timeout, server=True)
                # Untimed: the server's first run of the spore fills its RAM image.
                warm_notes.append(f"first served run (fills the RAM image): {fn():.2f} s")
                tasks.append(Task("run-from-true", served, fn))
            for ram, series in zip(RESTORE_ROWS, restored, strict=True):
                tasks.append(
                    Task(
                        "restore-output",
                        series,
                        partial(ours_restore_output, spore, ram, args.timeout),
                    )
                )
            images, filled = sealed_image(spore)
            warm_notes.append(f"sealed RAM image filled and verified once in {filled:.2f} s")
            sealed = Series("ours restore eager, sealed image")
            fn = partial(ours_restore_output, spore, RestoreStrategy.EAGER, args.timeout, images)
            tasks.append(Task("restore-output", sealed, fn))
            restored.append(sealed)
        outputs: list[Series] = []
        if args.skip_tcg:
            boot, runs = boot[:1], runs[:1]
        else:
            tasks += [
                Task("boot", boot[1], lambda: qemu_once(tcg, *q, run_true=False)),
                Task("run-true", runs[1], lambda: qemu_once(tcg, *q, run_true=True)),
            ]
        kvm_series: list[tuple[Series, Series]] = []
        if not args.skip_kvm:
            for cpu in KVM_CPUS:
                b, r = Series(f"QEMU-KVM -cpu {cpu}"), Series(f"QEMU-KVM -cpu {cpu}")
                accel = kvm(cpu)
                tasks.append(Task("boot", b, partial(qemu_once, accel, *q, run_true=False)))
                tasks.append(
                    Task("run-true", r, partial(qemu_once, accel, *q, run_true=True), needs=b)
                )
                kvm_series.append((b, r))
                if spore is not None:
                    o = Series(f"QEMU-KVM -cpu {cpu} cold")
                    fn = partial(qemu_once, accel, *q, run_true=False, first_output=True)
                    tasks.append(Task("boot-output", o, fn, needs=b))
                    outputs.append(o)
        load_before = os.getloadavg()
        measure(tasks, args.runs)
        load_after = os.getloadavg()

        image = "vmlinux (ELF)" if guest.kernel != bzimage else "bzImage"
        print(f"host class: {host_class}   QEMU: {qemu_version()}")
        print(f"kernel: {guest.kernel_digest} (ours boots its {image}, QEMU the bzImage)")
        print(
            f"initramfs: {guest.initrd_digest}   rootfs: {rootfs.name} "
            f"({rootfs.stat().st_size >> 20} MiB)   memory {MEMORY >> 20} MiB, 1 vCPU"
        )
        print(f"cmdline (both): {guest.cmdline}")
        for note in warm_notes:
            print(f"before timing: {note}")
        print(
            f"host load average (1 min) before/after: {load_before[0]:.1f} / "
            f"{load_after[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print()
        cold_peers = [*runs[1:], *(r for _, r in kvm_series)]
        rows = [
            ("boot to agent READY", boot[0], [*boot[1:], *(b for b, _ in kvm_series)]),
            ("run -- true (spawn to exit)", runs[0], cold_peers),
        ]
        if spore is not None:  # a warm spore against each side's cold `run -- true`
            rows.append(
                ("run --from SPORE -- true (spawn to exit)", from_true, [runs[0], *cold_peers])
            )
            if started_server is not None:
                rows.append(
                    (
                        "run --from SPORE -- true, through `spore server` (spawn to exit)",
                        served,
                        [from_true, *cold_peers],
                    )
                )
            for series in restored:  # against QEMU's cold boot -> first output
                rows.append(
                    ("restore -> first output vs cold boot -> first output", series, outputs)
                )
        for title, ours, peers in rows:
            print(f"{title}:")
            print(f"  {ours.name:38} {ours.describe()}")
            for peer in peers:
                print(f"  {peer.name:38} {peer.describe()}")
            for peer in peers:
                print(f"  ratio {ours.name}/{peer.name}: {ratio(ours, peer)}")
            print()
        print(
            "ours `run -- true` is the `spore run` CLI as a subprocess (Python startup "
            "included; after the command it ends the VM without a guest power-off); "
            "QEMU's is spawn → READY → exec → shutdown → exit."
        )
        if kvm_series and all(b.failure for b, _ in kvm_series):
            print("QEMU-KVM cannot run this guest here.")
    finally:
        if started_server:  # only the server this run started
            subprocess.run([*spore_argv(), "server", "stop", "--now"], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def sealed_image(spore: Path) -> tuple[RamImageCache, float]:
    """A cache holding the spore's sealed RAM image, and the seconds filling it took."""
    store = Store()
    m, _, _ = open_spore(spore, store, None)
    images = RamImageCache(1 << 30)
    start = time.perf_counter()
    os.close(images.image(m.memory, ChunkStore(store), m.platform.memory).fd)
    return images, time.perf_counter() - start


def start_server() -> bool | None:
    """`spore server start`: True when this run started it, False when one was already
    running (then it is left running), None when it cannot start (its row is skipped)."""
    proc = subprocess.run(
        [*spore_argv(), "server", "start", "--idle", "30m", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        print(f"no resident server: {proc.stderr.strip()}", file=sys.stderr)
        return None
    started: bool = json.loads(proc.stdout)["started"]
    return started


def qemu_version() -> str:
    try:
        out = subprocess.run(
            [QEMU, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0].removeprefix("QEMU emulator version ") if out else "?"


if __name__ == "__main__":
    sys.exit(main())
