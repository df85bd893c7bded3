"""Spores on real Linux: restore vs cold boot, snapshots, fork, memory of live children.

One process run prints, with medians of ``--runs`` runs and the host load average:

1. cold boot → first output vs restore → first output, per restore strategy:
   the ratio of the medians, and the median of each run's own ratio (a run's cold
   boot and restores are measured back to back, so a drifting host cancels out).
   Cold: spawn a fresh VM (VmProcess) on the spore's own busybox rootfs, wait
   for READY, exec ``sh -c 'echo … > /tmp/marker && cat /tmp/marker'`` (the
   work the spore's step did), stop at the first stdout byte. Restore: the
   same path as ``spore run --from`` (``resume_vm``: open and check the spore,
   spawn the monitor with ``restore=manifest``, HELLO, set the clock), exec
   ``cat /tmp/marker``, stop at the first stdout byte. Ratio cold/restore.
2. full vs dirty-only snapshot, in one VM session: a cold-booted VM with a
   fresh, empty store root snapshots (every chunk hashed and written), resumes,
   runs ``echo x > /tmp/y``, snapshots again (only chunks dirtied since).
   The monitor's ``snapshot`` event gives ``seconds`` and ``hashed``.
3. fork ms per child: ``fork_manifests`` + ``write_spore`` of ``--fork-count``
   children, divided by the count.
4. memory of ``--children`` live forked children vs one: each restored with the
   ``local`` strategy (the shared MAP_PRIVATE memfile), all alive and idle at
   once; PSS (``/proc/PID/smaps_rollup``) summed over their monitor processes vs
   the PSS of one child alone, plus the guest-RAM mapping on its own (the
   memfile mapping in ``/proc/PID/smaps``: shared vs private pages) so the
   per-process Python/VMM overhead is visible separately, and what each further
   child costs. Twice: children of the bench spore (an idle busybox guest that
   touches ~8 MiB; each child ran ``cat generation.json``), and children of its
   warm variant (``--warm-mib``, default 128: a background process holding that
   much memory, bench/guest/warm.c; each child's job has it read all of it), which
   is what forking a warmed machine is for. Only memory a child touches becomes
   resident, so an idle child of the warm spore costs what one of the small spore
   does; the job makes the shared part real.

Run: ``SPORE_HOME=~/.cache/spore-tests/kernel-store python bench/bench_spores.py [--runs 3]``
(SPORE_HOME must hold the managed kernel, or the first run builds it.)
See docs/bench.md ("Spores") for the figures measured on a kvm_pvm host.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ociimage  # noqa: E402
from sporebuild import build_spore_from  # noqa: E402

from sporevm.build.guest import GuestPlatform, ensure_guest  # noqa: E402
from sporevm.build.progress import Reporter  # noqa: E402
from sporevm.build.runner import boot_vm, resume_vm  # noqa: E402
from sporevm.errors import SporeError  # noqa: E402
from sporevm.runtime.launcher import VmProcess  # noqa: E402
from sporevm.runtime.protocol import RestoreStrategy  # noqa: E402
from sporevm.runtime.zygote import ForkedMonitor, Zygote  # noqa: E402
from sporevm.spore import backing, manifest  # noqa: E402
from sporevm.spore.chunks import ChunkStore  # noqa: E402
from sporevm.spore.fork import fork_manifests  # noqa: E402
from sporevm.spore.sporedir import open_spore, write_spore  # noqa: E402
from sporevm.store import Store  # noqa: E402

MARKER = "spore-bench-marker"
STRATEGIES = tuple(RestoreStrategy)
SPOREFILE = f"""\
sporefile: 1
name: bench-spores
base:
  image: oci-layout:{{layout}}:latest
machine: {{{{memory: 256MiB}}}}
steps:
  - name: marker
    run: echo {MARKER} > /tmp/marker
"""
# The same machine with a warm working set: a background process holding --warm-mib MiB
# of distinct non-zero pages (bench/guest/warm.c), as a warmed CI machine holds a build
# daemon's or a test runner's memory. Its children show what forking shares.
WARM_SPOREFILE = f"""\
sporefile: 1
name: bench-spores-warm
base:
  image: oci-layout:{{layout}}:latest
machine: {{{{memory: 256MiB}}}}
files:
  - {{{{src: warm, dst: /usr/local/bin/warm, mode: "0755"}}}}
steps:
  - name: marker
    run: echo {MARKER} > /tmp/marker
  - name: warm
    run: [/usr/local/bin/warm, "{{mib}}", /run]
    background: true
    ready: {{{{command: [test, -s, /run/warm.pid], timeout: 10m}}}}
"""
# A forked child's job on the warm spore: have the background process read all of its
# memory (shell builtins only: no exec), print the sum.
WARM_JOB = [
    "sh",
    "-c",
    "read -r p < /run/warm.pid; kill -USR1 $p; read -r s < /run/warm.fifo; echo warm-sum=$s",
]
WARM_SOURCE = ROOT / "bench" / "guest" / "warm.c"
MEM_FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


class BenchError(Exception):
    pass


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def describe(self, unit: str, scale: float = 1.0, fmt: str = ".1f") -> str:
        if not self.values:
            return "no data"
        lo, hi = min(self.values) * scale, max(self.values) * scale
        return (
            f"{self.median() * scale:{fmt}} {unit} (median of {len(self.values)}, "
            f"range {lo:{fmt}}-{hi:{fmt}})"
        )


# -- helpers -------------------------------------------------------------------


def first_output(vm: VmProcess, argv: Sequence[str], start: float, timeout: float) -> float:
    """Exec ``argv``; seconds from ``start`` to its first stdout byte. Checks the output."""
    first: list[float] = []
    out = bytearray()

    def on_stdout(data: bytes) -> None:
        if not first:
            first.append(time.perf_counter())
        out.extend(data)

    handle = vm.session.exec(list(argv), on_stdout=on_stdout, timeout=timeout)
    status = handle.wait(timeout + 5)
    if status.returncode != 0 or not first:
        raise BenchError(
            f"{' '.join(argv)}: {status.describe()}, stdout {bytes(out)!r}, "
            f"stderr {handle.stderr[-300:]!r}"
        )
    if MARKER.encode() not in out:
        raise BenchError(f"{' '.join(argv)}: unexpected output {bytes(out)!r}")
    return first[0] - start


def stop(vm: VmProcess) -> None:
    with contextlib.suppress(SporeError):
        vm.session.shutdown(timeout=10.0)
    vm.wait_exit(10.0)
    vm.close()


def build_spore(work: Path, timeout: float, warm_mib: int = 0) -> Path:
    """The bench spore (``warm_mib`` 0) or its warm variant, built (or found cached)."""
    layout = work / "layout"
    if not layout.exists():
        ociimage.write_layout(layout, list(ociimage.busybox_layers()), tag="latest")
    src = work / ("sporefile-warm" if warm_mib else "sporefile")
    src.mkdir()
    if warm_mib:
        subprocess.run(
            [
                "musl-gcc",
                "-O2",
                "-static",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-o",
                str(src / "warm"),
                str(WARM_SOURCE),
            ],
            check=True,
            timeout=timeout,
        )
        text = WARM_SPOREFILE.format(layout=layout, mib=warm_mib)
    else:
        text = SPOREFILE.format(layout=layout)
    (src / "Sporefile").write_text(text)
    spore = build_spore_from(src / "Sporefile", timeout)
    return spore


# -- 1 + 2: cold boot (with snapshots) and restores -------------------------------


@dataclass
class Snapshots:
    full_s: Series = field(default_factory=Series)
    full_hashed: Series = field(default_factory=Series)
    dirty_s: Series = field(default_factory=Series)
    dirty_hashed: Series = field(default_factory=Series)
    total_chunks: int = 0


def cold_once(
    guest: GuestPlatform,
    rootfs: Path,
    memory: int,
    timeout: float,
    snap_root: Path,
    snaps: Snapshots,
) -> float:
    start = time.perf_counter()
    vm = boot_vm(guest, rootfs, memory, 1, timeout, store_root=snap_root)
    try:
        took = first_output(
            vm, ["sh", "-c", f"echo {MARKER} > /tmp/marker && cat /tmp/marker"], start, timeout
        )
        full = vm.snapshot(timeout)
        vm.command("resume")
        status = vm.session.exec(["sh", "-c", "echo x > /tmp/y"], timeout=timeout).wait(timeout + 5)
        if status.returncode != 0:
            raise BenchError(f"echo x > /tmp/y: {status.describe()}")
        dirty = vm.snapshot(timeout)
        vm.command("resume")
        snaps.full_s.values.append(full.seconds)
        snaps.full_hashed.values.append(float(full.hashed))
        snaps.dirty_s.values.append(dirty.seconds)
        snaps.dirty_hashed.values.append(float(dirty.hashed))
        snaps.total_chunks = len(full.chunks)
        return took
    finally:
        stop(vm)


def restore_once(
    spore: Path,
    store: Store,
    strategy: RestoreStrategy,
    timeout: float,
    resumed: Series,
    second: Series,
    zygote: bool = True,
) -> float:
    """Seconds to the first output; ``resumed`` gets the part up to the agent's answer,
    ``second`` the same exec repeated at once in the same VM. ``zygote=False``: the
    monitor is a fresh interpreter (``SPORE_ZYGOTE=0``; a one-off ``spore run --from``
    forks its monitor from the CLI instead: bench_boot.py times that whole command).
    No snapshot follows, so the VM runs without a dirty log, as `spore run`'s do."""
    start = time.perf_counter()
    vm = resume_vm(spore, store, Reporter.quiet(), ram=strategy, zygote=zygote, snapshots=False)
    resumed.values.append(time.perf_counter() - start)
    try:
        took = first_output(vm, ["cat", "/tmp/marker"], start, timeout)
        again = time.perf_counter()
        second.values.append(first_output(vm, ["cat", "/tmp/marker"], again, timeout))
        return took
    finally:
        stop(vm)


FLOOR = "import sporevm.runtime.monitor, sys, time; print('ok', flush=True); time.sleep({})"


def monitor_floor(timeout: float) -> tuple[float, Mem]:
    """A bare monitor interpreter: seconds to start + import, and its memory once idle."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOR.format(timeout)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready or proc.stdout.readline() != b"ok\n":
            raise BenchError("the bare monitor interpreter did not start")
        took = time.perf_counter() - start
        return took, read_mem(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- 3: fork -------------------------------------------------------------------


def fork_once(m: manifest.Manifest, parent_id: str, count: int, out: Path) -> float:
    start = time.perf_counter()
    for i, child in enumerate(fork_manifests(m, parent_id, count)):
        write_spore(child, out / f"child-{i:04d}.spore")
    return (time.perf_counter() - start) / count


# -- 4: memory of live children --------------------------------------------------


@dataclass
class Mem:
    """kB, from /proc/PID/smaps_rollup (whole process) and the memfile mapping in smaps."""

    total: dict[str, int]
    ram: dict[str, int]

    def rest_pss(self) -> int:
        return self.total["Pss"] - self.ram["Pss"]


def read_mem(pid: int) -> Mem:
    total = dict.fromkeys(MEM_FIELDS, 0)
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in total:
            total[key] = int(rest.split()[0])
    ram = dict.fromkeys(MEM_FIELDS, 0)
    in_ram = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):  # a mapping header line
            in_ram = f"/{backing.MEMFILES}/" in line
            continue
        key, _, rest = line.partition(":")
        if in_ram and key in ram:
            ram[key] += int(rest.split()[0])
    return Mem(total, ram)


def children_memory(
    children: list[Path],
    store: Store,
    timeout: float,
    settle: float,
    job: Sequence[str],
    expect: bytes,
) -> tuple[Mem, list[Mem], Mem | None, Mem | None, float]:
    """(one child alone, each of N children alive together, the monitor zygote's memory
    with one child and with N (None when monitors are spawned, SPORE_ZYGOTE=0), seconds
    to restore the N). The zygote is counted: its pages are what the children share."""
    if not children:
        raise BenchError("no children to restore")
    vms: list[VmProcess] = []
    one: Mem | None = None
    zyg_one: Mem | None = None
    try:
        start = time.perf_counter()
        for child in children:
            vm = resume_vm(
                child, store, Reporter.quiet(), ram=RestoreStrategy.LOCAL, snapshots=False
            )
            vms.append(vm)
            handle = vm.session.exec(list(job), timeout=timeout)
            status = handle.wait(timeout + 5)
            if status.returncode != 0 or not re.search(expect, handle.stdout):
                raise BenchError(
                    f"{child}: {' '.join(job)}: {status.describe()}, stdout "
                    f"{handle.stdout[-300:]!r}, stderr {handle.stderr[-300:]!r}"
                )
            if len(vms) == 1:
                time.sleep(settle)
                one = read_mem(vm.proc.pid)
                if isinstance(vm.proc, ForkedMonitor):
                    zyg_one = read_mem(Zygote.shared().proc.pid)
        took = time.perf_counter() - start
        time.sleep(settle)
        assert one is not None
        zyg_many = read_mem(Zygote.shared().proc.pid) if zyg_one is not None else None
        return one, [read_mem(vm.proc.pid) for vm in vms], zyg_one, zyg_many, took
    finally:
        for vm in vms:
            vm.close()


@dataclass
class ChildrenMemory:
    """Section 4 for one parent spore: one child alone vs N alive together."""

    label: str
    one: Mem
    many: list[Mem]
    zyg_one: Mem | None
    zyg_many: Mem | None
    restore_s: float

    def sums(self) -> tuple[int, int]:
        """(PSS of one child alone, PSS of the N together), kB, the zygote counted."""
        zyg1 = self.zyg_one.total["Pss"] if self.zyg_one else 0
        zygn = self.zyg_many.total["Pss"] if self.zyg_many else 0
        return self.one.total["Pss"] + zyg1, sum(x.total["Pss"] for x in self.many) + zygn

    def report(self) -> None:
        n, many, one = len(self.many), self.many, self.one
        one_pss, sum_pss = self.sums()
        print(
            f"  {self.label}: {n} forked children restored with `local` "
            f"({self.restore_s:.1f} s to restore them one after another), alive and idle"
        )
        if self.zyg_one is not None and self.zyg_many is not None:
            print(
                f"    monitors forked from one zygote (counted below): its PSS "
                f"{self.zyg_one.total['Pss'] / 1024:.1f} MiB with one child, "
                f"{self.zyg_many.total['Pss'] / 1024:.1f} MiB with {n}"
            )
        else:
            print("    monitors spawned one interpreter each (SPORE_ZYGOTE=0)")
        print(
            f"    one child alone:   PSS {one_pss / 1024:7.1f} MiB "
            f"(guest RAM {one.ram['Pss'] / 1024:.1f}, rest {one.rest_pss() / 1024:.1f})   "
            f"RSS {one.total['Rss'] / 1024:.1f} MiB"
        )
        print(
            f"    {n} children, sum:  PSS {sum_pss / 1024:7.1f} MiB "
            f"(guest RAM {sum(x.ram['Pss'] for x in many) / 1024:.1f}, "
            f"rest {sum(x.rest_pss() for x in many) / 1024:.1f})   "
            f"RSS {sum(x.total['Rss'] for x in many) / 1024:.1f} MiB"
        )
        print(
            f"    ratio {n} children / one (PSS): {sum_pss / one_pss:.2f}x "
            f"(goal <= 1.5x); guest RAM only: "
            f"{sum(x.ram['Pss'] for x in many) / max(one.ram['Pss'], 1):.2f}x"
        )
        print(
            f"    each further child costs {(sum_pss - one_pss) / (n - 1) / 1024:.1f} MiB PSS "
            f"(of which guest RAM copied on write "
            f"{statistics.median(x.ram['Private_Dirty'] for x in many) / 1024:.1f} MiB, "
            f"monitor {statistics.median(x.total['Private_Dirty'] - x.ram['Private_Dirty'] for x in many) / 1024:.1f} MiB private)"  # noqa: E501
        )
        print(
            f"    guest-RAM mapping per child (median): "
            f"{statistics.median(x.ram['Shared_Clean'] for x in many) / 1024:.1f} MiB shared "
            f"clean, {statistics.median(x.ram['Private_Dirty'] + x.ram['Private_Clean'] for x in many) / 1024:.1f} MiB private (copy-on-write)"  # noqa: E501
        )


def fork_and_measure(
    label: str,
    spore: Path,
    store: Store,
    args: argparse.Namespace,
    out: Path,
    job: Sequence[str],
    expect: bytes,
) -> ChildrenMemory:
    m, _, _ = open_spore(spore, store)
    backing.ensure_memfile(m.memory, ChunkStore(store), store)
    for i, child in enumerate(fork_manifests(m, manifest.id_of(m), args.children)):
        write_spore(child, out / f"child-{i:04d}.spore")
    children = sorted(out.glob("child-*.spore"))
    return ChildrenMemory(
        label, *children_memory(children, store, args.timeout, args.settle, job, expect)
    )


# -- driver --------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fork-count", type=int, default=16)
    ap.add_argument("--children", type=int, default=8)
    ap.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="bound on each boot, restore, build or command, seconds",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="idle seconds before reading the children's memory",
    )
    ap.add_argument(
        "--warm-mib",
        type=int,
        default=128,
        help="working set of the warm spore whose children section 4 also measures (0: skip it)",
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda signo, frame: sys.exit(128 + signo))
    store = Store()
    print("preparing kernel, initramfs and the spore …", file=sys.stderr)
    guest = ensure_guest(store, Reporter.quiet())
    work = Path(tempfile.mkdtemp(prefix="spore-bench-spores-"))
    try:
        spore = build_spore(work, args.timeout)
        m, mpath, rootfs = open_spore(spore, store)
        memory = m.platform.memory
        chunks = ChunkStore(store)
        memfile = backing.memfile_path(m.memory, store)
        t = time.perf_counter()
        built = not memfile.exists()
        backing.ensure_memfile(m.memory, chunks, store)  # once per memory index, not per restore
        materialize_s = time.perf_counter() - t
        load_before = os.getloadavg()

        cold = Series()
        snaps = Snapshots()
        restores = {s: Series() for s in STRATEGIES}
        resumed = {s: Series() for s in STRATEGIES}
        second = {s: Series() for s in STRATEGIES}
        spawned, spawned_resumed, spawned_second = Series(), Series(), Series()
        floor_s = Series()
        floor_mem: list[Mem] = []
        for i in range(args.runs):
            snap_root = work / f"snap-store-{i}"
            snap_root.mkdir()
            try:
                cold.values.append(cold_once(guest, rootfs, memory, args.timeout, snap_root, snaps))
            finally:
                shutil.rmtree(snap_root, ignore_errors=True)
            print(
                f"  run {i + 1}: cold boot -> output {cold.values[-1]:.2f} s; snapshots "
                f"full {snaps.full_s.values[-1]:.3f} s, dirty {snaps.dirty_s.values[-1]:.3f} s",
                file=sys.stderr,
            )
            for s in STRATEGIES:
                restores[s].values.append(
                    restore_once(spore, store, s, args.timeout, resumed[s], second[s])
                )
                print(
                    f"  run {i + 1}: restore {s} -> output {restores[s].values[-1]:.3f} s",
                    file=sys.stderr,
                )
            spawned.values.append(
                restore_once(
                    spore,
                    store,
                    RestoreStrategy.LOCAL,
                    args.timeout,
                    spawned_resumed,
                    spawned_second,
                    zygote=False,
                )
            )

            took, mem = monitor_floor(args.timeout)
            floor_s.values.append(took)
            floor_mem.append(mem)

        parent_id = manifest.id_of(m)
        fork = Series()
        for i in range(args.runs):
            fork.values.append(fork_once(m, parent_id, args.fork_count, work / f"fork-{i}"))
        memories = [
            fork_and_measure(
                "the bench spore (idle busybox guest; each child ran `cat generation.json`)",
                spore,
                store,
                args,
                work / "children",
                ["cat", "/run/spore/generation.json"],
                rb'"generation":"',
            )
        ]
        if args.warm_mib:
            warm = build_spore(work, args.timeout, args.warm_mib)
            memories.append(
                fork_and_measure(
                    f"its warm variant (a background process holds {args.warm_mib} MiB; each "
                    "child's job reads all of it)",
                    warm,
                    store,
                    args,
                    work / "children-warm",
                    WARM_JOB,
                    rb"warm-sum=[1-9][0-9]*\n",
                )
            )
        load_after = os.getloadavg()

        print(
            f"spore: {spore.name} ({memory >> 20} MiB RAM, {len(m.memory.stored())} stored "
            f"chunks of {len(m.memory.chunks)}); rootfs {rootfs.stat().st_size >> 20} MiB"
        )
        print(
            f"host load average (1 min) before/after: {load_before[0]:.1f} / "
            f"{load_after[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print(
            f"local memfile: {'built' if built else 'already present'} "
            f"({materialize_s * 1e3:.0f} ms, once per memory index)"
        )
        print()
        print("1. -> first output (cold: boot + write + cat the marker; restore: cat it)")
        print(f"  {'cold boot':14} {cold.describe('s', fmt='.2f')}")
        for s in STRATEGIES:
            r = restores[s]
            # Each run's cold boot and restores are measured minutes apart at most: the
            # median of the per-run ratios is steadier on a host whose speed drifts.
            paired = statistics.median(c / x for c, x in zip(cold.values, r.values, strict=True))
            print(
                f"  {'restore ' + s:14} {r.describe('ms', 1e3)}   "
                f"cold/restore {cold.median() / r.median():.1f}x (goal >= 20x); "
                f"per run {paired:.1f}x"
            )
            print(
                f"  {'':14}   of which spawn -> agent answered + clock set: "
                f"{resumed[s].median() * 1e3:.0f} ms; the same exec again: "
                f"{second[s].median() * 1e3:.0f} ms"
            )
        print(
            f"  {'restore local':14} {spawned.describe('ms', 1e3)}   "
            f"cold/restore {cold.median() / spawned.median():.1f}x   with the monitor "
            f"spawned as a fresh interpreter (SPORE_ZYGOTE=0; the rows above fork it from "
            f"this process's warm zygote, and a one-off `spore run --from` from the CLI)"
        )
        print(
            f"  floor: a monitor interpreter's start + imports alone: {floor_s.describe('ms', 1e3)}"
        )
        print()
        print("2. snapshot in one VM session (fresh store root; `echo x > /tmp/y` between)")
        print(
            f"  full:       {snaps.full_s.describe('ms', 1e3)}, "
            f"{snaps.full_hashed.median():.0f} of {snaps.total_chunks} chunks hashed"
        )
        print(
            f"  dirty-only: {snaps.dirty_s.describe('ms', 1e3)}, "
            f"{snaps.dirty_hashed.median():.0f} chunks hashed   "
            f"full/dirty {snaps.full_s.median() / max(snaps.dirty_s.median(), 1e-3):.1f}x"
        )
        print()
        print(f"3. fork ({args.fork_count} children: fork_manifests + write_spore)")
        print(f"  per child: {fork.describe('ms', 1e3, '.2f')} (goal <= 20 ms)")
        print()
        print("4. memory of live forked children vs one child alone")
        for section in memories:
            section.report()
        fm = floor_mem[len(floor_mem) // 2]
        print(
            f"  a bare monitor interpreter (Python + imports, no VM): PSS "
            f"{fm.total['Pss'] / 1024:.1f} MiB, RSS {fm.total['Rss'] / 1024:.1f} MiB"
        )
        print(
            f"  per-process overhead outside guest RAM (Python + VMM), median PSS: "
            f"{statistics.median(x.rest_pss() for x in memories[0].many) / 1024:.1f} MiB"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
