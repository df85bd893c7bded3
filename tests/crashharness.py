"""Kill `spore` commands at random points and check what they leave in the store.

Used by tests/test_crash_safety.py and tests/test_store_concurrency.py. Every
store here is fresh and seeded from the shared kernel store with the managed
kernel and the guest agent/initramfs only (hard links: the store never writes a
published file in place), so no test here ever builds a kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sporevm.build import lockfile
from sporevm.spore import manifest
from sporevm.store import Store
from sporevm.storecheck import verify_store

ROOT = Path(__file__).resolve().parent.parent
KERNEL_STORE = Path.home() / ".cache" / "spore-tests" / "kernel-store"
SEEDED_KINDS = (
    "kernel",
    "source-sha256",
    "source-version",
    "tool-version",
    "guest-agent",
    "initrd",
)

# What `spore build` prints when a task starts: the phases a kill is aimed at.
TASK_LINE = re.compile(r"^▶ (\S+)", re.M)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return  # two records may name one entry (the agent is in both guest records)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def seed_store(root: Path) -> Store:
    """A fresh store holding the prebuilt kernel and guest pieces (and their records)."""
    src = KERNEL_STORE
    if not (src / "keys" / "kernel").is_dir():
        raise RuntimeError(f"{src} has no kernel; run tests/test_kernel.py once to build it")
    store = Store(root)
    for kind in SEEDED_KINDS:
        for rec_path in sorted((src / "keys" / kind).glob("*.json")):
            rec = json.loads(rec_path.read_bytes())
            entries: list[Path] = []
            if kind == "kernel":
                entries.append(src / "kernels" / "blake3" / rec["digest"].split(":", 1)[1])
            for name in ("agent", "initrd"):
                if kind != "kernel" and name in rec:
                    entries.append(src / "guest" / "blake3" / rec[name].split(":", 1)[1])
            if not all(e.exists() for e in entries):
                continue  # a pruned leftover in the shared store: not worth seeding
            for e in entries:
                rel = e.relative_to(src)
                if e.is_dir():
                    for f in e.iterdir():
                        _link_or_copy(f, root / rel / f.name)
                else:
                    _link_or_copy(e, root / rel)
            _link_or_copy(rec_path, root / rec_path.relative_to(src))
    return store


def prune_victim(root: Path, garbage: int = 8000) -> tuple[Path, list[Path]]:
    """A store as a nightly prune meets it (no VM): three live spores recorded as roots,
    ``garbage`` unreachable chunks named by a quarter as many unreachable step snapshots
    (record + manifest), unreachable kernel directories, memfiles and blobs, and two
    roots whose directories are gone. Returns the store root and the live spores."""
    import dataclasses
    import uuid

    import blake3

    from sporevm.spore.sporedir import keep_spore, read_spore
    from tests.test_bundle import make_spores

    s = make_spores(root, 2)
    live = [s.parent, *sorted(s.children.glob("*.spore"))]
    for d in live:
        keep_spore(str(d), s.store)
    for d in (root / "gone-a.spore", root / "gone-b.spore"):
        shutil.copytree(s.parent, d)
        keep_spore(str(d), s.store)
        shutil.rmtree(d)
    _, m, _ = read_spore(str(s.parent))
    chunks, steps = s.store.root / "chunks" / "blake3", s.store.root / "keys" / "step"
    steps.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:  # content-addressed, as verify checks; no fsync (speed)
        hexd = blake3.blake3(data).hexdigest()
        (chunks / hexd).write_bytes(data)
        return "blake3:" + hexd

    ids = [put(f"garbage {i}".encode() * 8) for i in range(garbage)]
    for i in range(0, garbage - 3, 4):
        snap = dataclasses.replace(
            m,
            memory=dataclasses.replace(m.memory, chunks=tuple(ids[i : i + 4])),
            generation=manifest.Generation(str(uuid.uuid4()), None, 0, 1),
        )
        (steps / f"{i:064x}.json").write_text(json.dumps({"manifest": put(manifest.encode(snap))}))
    for i in range(4):
        bz = f"bzImage {i}".encode()
        kdir = s.store.root / "kernels" / "blake3" / blake3.blake3(bz).hexdigest()
        kdir.mkdir(parents=True)
        for name, body in (("bzImage", bz), ("vmlinux", b"v" * 4096), ("config", b"c")):
            (kdir / name).write_bytes(body)
        (s.store.root / "memfiles" / "blake3" / (f"{i}" * 64)).write_bytes(b"\0" * 4096)
        s.store.ingest_blob_bytes("sha256:" + hashlib.sha256(bz).hexdigest(), bz, what="t")
    return s.store.root, live


def removal_window(home: Path, *args: str) -> tuple[float, float]:
    """Run a spore command that prunes ``home`` to the end, watching from outside:
    (seconds until its first removal, seconds in all), so kills can be aimed at the
    removals rather than at start-up and planning. Prune drops dead roots first, so
    the first change to ``roots/`` (its mtime: cheap to poll) marks the start."""
    watched = home / "roots"
    mtime = os.stat(watched).st_mtime_ns
    started = time.monotonic()
    proc = subprocess.Popen(
        spore_argv(*args), env=spore_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    first = None
    while proc.poll() is None:
        if first is None and os.stat(watched).st_mtime_ns != mtime:
            first = time.monotonic() - started
        time.sleep(0.001)
    total = time.monotonic() - started
    _, err = proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")
    return (first if first is not None else total * 0.5), total


def managed_vmlinux() -> Path:
    """The kernel image the managed platform boots here (for Sporefiles naming a file)."""
    from sporevm.build.guest import lookup_guest

    guest = lookup_guest(Store(KERNEL_STORE))
    if guest is None:
        raise RuntimeError(f"{KERNEL_STORE}: no managed kernel built")
    return guest.kernel


def busybox_layout(dest: Path) -> Path:
    """An OCI layout with static busybox, built offline (tools/ociimage.py)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import ociimage

    if not (dest / "index.json").is_file():
        ociimage.write_layout(dest, list(ociimage.busybox_layers()), tag="latest")
    return dest


def sporefile(
    layout: Path,
    name: str,
    token: str,
    steps: Sequence[str] = ("a", "b"),
    kernel: str | None = None,
    verify: bool = True,
) -> str:
    """A small Sporefile: each step appends its name to a file; the spore checks it."""
    lines = [
        "sporefile: 1",
        f"name: {name}",
        "base:",
        f"  image: oci-layout:{layout}:latest",
        "machine:",
        "  memory: 256MiB",
    ]
    if kernel is not None:
        lines.append(f"  kernel: {kernel}")
    lines += [f'env: {{TOKEN: "{token}"}}', "steps:"]
    for s in steps:
        lines += [f"  - name: {s}", f'    run: echo "{s} $TOKEN" >> /root/log']
    if verify:
        lines += ["verify:", "  - run: [cat, /root/log]"]
    return "\n".join(lines) + "\n"


def spore_env(home: Path) -> dict[str, str]:
    return {**os.environ, "SPORE_HOME": str(home), "PYTHONPATH": str(ROOT)}


def spore_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sporevm.cli", *args]


def run_spore(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        spore_argv(*args), capture_output=True, text=True, env=spore_env(home), timeout=timeout
    )


@dataclass
class Attempt:
    """One run of a command that may have been killed."""

    killed: bool
    returncode: int
    seconds: float
    stderr: str
    stdout: str
    phase: str | None  # the last task line seen before the kill
    target: str = ""  # what the kill aimed at ("phase+delay")
    starts: list[tuple[str, float]] = field(default_factory=list)  # task -> seconds in

    def timeline(self) -> dict[str, tuple[float, float]]:
        """Each task's (start, duration) in seconds; the last one runs to the exit."""
        out = {}
        for i, (name, at) in enumerate(self.starts):
            end = self.starts[i + 1][1] if i + 1 < len(self.starts) else self.seconds
            out[name] = (at, max(end - at, 0.0))
        return out


def run_and_kill(
    argv: list[str],
    env: dict[str, str],
    *,
    phase: str | None,
    delay: float,
    timeout: float = 600,
    when: threading.Event | None = None,
) -> Attempt:
    """Start ``argv`` in its own process group; once ``phase`` is printed (None: at once)
    or ``when`` is set (an event outside the process, e.g. a test server stalling it),
    wait ``delay`` seconds and SIGKILL the whole group (the VM monitors die with it)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    err: list[str] = []
    out: list[bytes] = []
    starts: list[tuple[str, float]] = []
    seen = threading.Event()
    if phase is None and when is None:
        seen.set()

    def read_err() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            err.append(line)
            m = TASK_LINE.match(line)
            if m:
                starts.append((m.group(1), time.monotonic() - started))
                if m.group(1) == phase:
                    seen.set()

    def read_out() -> None:
        assert proc.stdout is not None
        out.append(proc.stdout.read())

    readers = [
        threading.Thread(target=read_err, daemon=True),
        threading.Thread(target=read_out, daemon=True),
    ]
    for t in readers:
        t.start()
    killed = False
    deadline = started + timeout

    def ready() -> bool:
        return seen.is_set() or (when is not None and when.is_set())

    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        seen.wait(0.05)
    if proc.poll() is None and ready():
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        killed = True
        with_pgid(proc.pid, signal.SIGKILL)
    proc.wait()
    _reap_group(proc.pid)
    for t in readers:
        t.join(10)
    text = "".join(err)
    last = TASK_LINE.findall(text)
    return Attempt(
        killed,
        proc.returncode,
        time.monotonic() - started,
        text,
        b"".join(out).decode(errors="replace"),
        last[-1] if last else None,
        f"{phase}+{delay:.2f}s",
        starts,
    )


def with_pgid(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _reap_group(pgid: int) -> None:
    """Wait until nothing of the killed group is left (monitors are its children)."""
    for _ in range(200):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        with_pgid(pgid, signal.SIGKILL)
        time.sleep(0.05)
    raise AssertionError(f"process group {pgid} survived SIGKILL")


def store_problems(root: Path) -> list[str]:
    """Everything the publish protocol forbids after a crash (dangling records included)."""
    report = verify_store(Store(root))
    return [f"{p.kind}: {p.path}: {p.message}" for p in report.problems]


def spore_dir_problems(spore_dir: Path) -> list[str]:
    """The output spore is absent or whole: manifest and id agree."""
    if not spore_dir.exists():
        return []
    try:
        data = (spore_dir / "manifest.json").read_bytes()
        want = (spore_dir / "id").read_text().strip()
    except OSError as exc:
        return [f"{spore_dir}: incomplete spore directory ({exc})"]
    manifest.decode(data, str(spore_dir))
    if manifest.manifest_id(data) != want:
        return [f"{spore_dir}: id file does not match manifest.json"]
    return []


def bundle_problems(home: Path, bundle: Path, scratch: Path) -> tuple[list[str], str | None]:
    """The output bundle is absent or whole: it unpacks (every file and object checked).
    Returns the problems and the id of the spore it holds."""
    if not bundle.exists():
        return [], None
    dest = scratch / f"unpacked-{time.monotonic_ns()}.spore"
    r = run_spore(home, "unpack", str(bundle), "--out", str(dest))
    if r.returncode != 0:
        return [f"{bundle}: does not unpack: {r.stderr.strip()}"], None
    return spore_dir_problems(dest), (dest / "id").read_text().strip()


@dataclass
class Outcome:
    """What an uninterrupted build produced, in the parts that are reproducible."""

    image: str
    rootfs: str
    manifest_id: str
    lock: bytes = b""
    stable: dict[str, Any] = field(default_factory=dict)


def outcome(sporefile_path: Path, spore_dir: Path) -> Outcome:
    """Everything of a finished build that must not depend on how it got there.

    Guest memory is not: a cold boot's RAM differs run to run (timers, entropy), so
    the spore's id is compared separately, only where a snapshot was reused."""
    data = (spore_dir / "manifest.json").read_bytes()
    m = manifest.decode(data)
    doc = manifest.to_document(m)
    lock = lockfile.load(lockfile.lock_path(sporefile_path))
    stable = {
        "platform": doc["platform"],
        "rootfs": doc["rootfs"],
        "steps": list(m.provenance.steps),  # step keys: inputs only, not paths or timing
        "sporefile": m.provenance.sporefile,
        "chunks": (m.memory.chunk_size, len(m.memory.chunks)),
        "state": sorted(m.state),
    }
    return Outcome(
        lock.images[0].digest, m.rootfs.digest, manifest.manifest_id(data), lock.encode(), stable
    )


def pick(rng: random.Random, timeline: dict[str, tuple[float, float]]) -> tuple[str, float]:
    """A kill point: a task drawn uniformly (short ones count as much as the boot), then
    a delay uniform over its measured duration, a little past its end included."""
    name = rng.choice(sorted(timeline, key=lambda n: timeline[n][0]))
    return name, rng.uniform(0.0, timeline[name][1] * 1.1 + 0.05)
