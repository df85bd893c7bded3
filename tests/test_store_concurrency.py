"""Concurrency on one store (issue 6 part 5): builds with builds, builds and runs with prune.

- many processes publishing the same and different chunks and records at once
  leave a store that verifies (no VM);
- prune waits for a shared holder of the store lock and says so (no VM);
- three `spore build`s of overlapping Sporefiles (same base, shared first step,
  different suffixes) at once: all succeed, each spore holds its own steps,
  the store verifies, and serial rebuilds find everything cached with the same
  spore ids;
- two builds racing `spore cache prune --all` / `--older-than 1s` in a loop:
  all succeed (the verify checks inside each build restore its own spore while
  prunes run), rootfs and lock are what a build on a quiet store produces;
- `spore run --from` (lazy restore: chunks are read while the guest runs)
  racing prune: prune waits for the run, the run sees every chunk, and the
  prune keeps what every spore still on disk needs.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from sporevm.build import lockfile
from sporevm.spore.chunks import ChunkStore
from sporevm.store import Store
from sporevm.storecheck import verify_store
from tests import crashharness as H
from tests.test_kernel import built_kernel  # noqa: F401  (session fixture: seeds come from it)

# -- no VM ------------------------------------------------------------------------------

_WRITER = """
import os, sys
from sporevm.store import Store
from sporevm.spore.chunks import ChunkStore
store = Store(); chunks = ChunkStore(store); me = int(sys.argv[1])
for i in range(40):
    shared = chunks.put(bytes([i]) * (1 << 20))        # every writer: the same bytes
    mine = chunks.put(f"{me}/{i}".encode() * 4096)     # only this writer
    store.put_key("step", f"{i:064x}", {"manifest": shared})
    store.put_key("step", f"{me * 1000 + i:064x}", {"manifest": mine})
"""


def test_parallel_writers_leave_a_verifiable_store(tmp_path: Path) -> None:
    home = tmp_path / "store"
    Store(home)
    env = H.spore_env(home)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(n)], env=env) for n in range(6)]
    assert [p.wait(120) for p in procs] == [0] * 6
    report = verify_store(Store(home))
    # The records name chunks that are not manifests: only decoding complains, nothing torn.
    assert [p for p in report.problems if "does not decode" not in p.message] == []
    assert report.checked["chunks"] == 40 + 6 * 40
    assert not list((home / "tmp").iterdir())  # writers clean up their own staging


def test_prune_waits_for_a_shared_holder_and_says_so(tmp_path: Path) -> None:
    home = tmp_path / "store"
    chunks = ChunkStore(Store(home))
    cid = chunks.put(b"held")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom sporevm.store import Store\n"
            "with Store().lock():\n print('held', flush=True)\n sys.stdin.readline()",
        ],
        env=H.spore_env(home),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == "held\n"
    prune = subprocess.Popen(
        H.spore_argv("cache", "prune", "--all"),
        env=H.spore_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    assert prune.poll() is None  # still waiting
    assert chunks.has(cid)
    holder.stdin.write("\n")
    holder.stdin.flush()
    out, err = prune.communicate(timeout=60)
    assert holder.wait(10) == 0
    assert prune.returncode == 0 and "waiting up to 5m for 1 running spore command" in err
    assert not chunks.has(cid) and out.startswith("removed ")


# -- real VMs ---------------------------------------------------------------------------

SUFFIXES = {"left": ("a", "b"), "right": ("a", "c"), "long": ("a", "b", "d")}


@dataclass(frozen=True)
class Project:
    name: str
    sporefile: Path
    steps: tuple[str, ...]

    @property
    def spore(self) -> Path:
        return self.sporefile.parent / "out" / f"{self.name}.spore"


def _projects(base: Path, layout: Path, token: str, kernel: Path | None = None) -> list[Project]:
    out = []
    for name, steps in SUFFIXES.items():
        d = base / name
        d.mkdir(parents=True)
        if kernel is not None:
            os.link(kernel, d / "vmlinux")  # a Sporefile may only name files in its context
        (d / "Sporefile").write_text(
            H.sporefile(layout, name, token, steps, kernel="vmlinux" if kernel else None)
        )
        out.append(Project(name, d / "Sporefile", steps))
    return out


def _all_at_once(
    fns: list[Callable[[], subprocess.CompletedProcess[str]]],
) -> list[subprocess.CompletedProcess[str]]:
    results: list[subprocess.CompletedProcess[str] | None] = [None] * len(fns)

    def one(i: int) -> None:
        results[i] = fns[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def _wait_until_held(home: Path, timeout: float = 120.0) -> None:
    """Return once some process holds the store lock (an exclusive try fails)."""
    fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(0.05)
        raise AssertionError("nobody took the store lock")
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, built_kernel: object) -> Path:  # noqa: F811
    # built_kernel: on a fresh machine the shared kernel store is filled first (minutes)
    return H.busybox_layout(tmp_path_factory.mktemp("conc-image") / "layout")


@pytest.fixture(scope="module")
def overlap(
    layout: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Project], dict[str, H.Outcome], float]:
    base = tmp_path_factory.mktemp("overlap")
    home = base / "store"
    H.seed_store(home)
    projects = _projects(base, layout, "ov3rlap")
    started = time.monotonic()
    results = _all_at_once(
        [partial(H.run_spore, home, "build", str(p.sporefile)) for p in projects]
    )
    took = time.monotonic() - started
    for p, r in zip(projects, results, strict=True):
        assert r.returncode == 0, f"{p.name}: {r.stderr[-3000:]}"
    return home, projects, {p.name: H.outcome(p.sporefile, p.spore) for p in projects}, took


@pytest.mark.vm
@pytest.mark.kernelbuild
def test_overlapping_builds_at_once(
    overlap: tuple[Path, list[Project], dict[str, H.Outcome], float],
) -> None:
    home, projects, outcomes, took = overlap
    assert H.store_problems(home) == []
    # Same base and guest: the parts that do not depend on the steps agree everywhere.
    assert len({(o.image, o.rootfs, o.lock) for o in outcomes.values()}) == 1
    assert len({str(o.stable["platform"]) for o in outcomes.values()}) == 1
    for p in projects:
        # Serially again on the same store: nothing runs, the same spore.
        again = H.run_spore(home, "build", str(p.sporefile))
        assert again.returncode == 0, again.stderr
        assert "▶ boot" not in again.stderr, again.stderr
        assert H.outcome(p.sporefile, p.spore).manifest_id == outcomes[p.name].manifest_id
        assert len(outcomes[p.name].stable["steps"]) == len(p.steps)
    print(f"\n3 overlapping builds at once: {took:.1f} s")


@pytest.mark.vm
@pytest.mark.kernelbuild
def test_run_from_racing_prune(
    overlap: tuple[Path, list[Project], dict[str, H.Outcome], float],
) -> None:
    """The run holds the store lock for the VM's life: prune waits, the lazy pager
    finds every chunk, and only afterwards does it prune, keeping all that the live
    spores need (their directories still exist)."""
    home, projects, _, _ = overlap
    p = next(p for p in projects if p.name == "long")
    run = subprocess.Popen(
        H.spore_argv(
            "run",
            "-q",
            "--restore",
            "lazy",
            "--from",
            str(p.spore),
            "--",
            "sh",
            "-c",
            "sleep 3; cat /root/log",
        ),
        env=H.spore_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_until_held(home)  # the run has the lock: it takes it before opening the spore
    prune = subprocess.Popen(
        H.spore_argv("cache", "prune", "--all"),
        env=H.spore_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert out == "a ov3rlap\nb ov3rlap\nd ov3rlap\n"
    pout, perr = prune.communicate(timeout=120)
    assert prune.returncode == 0, perr
    assert "waiting up to 5m for" in perr and "to release the store lock" in perr
    assert H.store_problems(home) == []
    for q in projects:  # every spore still on disk still has every object it names
        check = H.run_spore(home, "verify", str(q.spore))
        assert check.returncode == 0, check.stderr


@pytest.mark.vm
@pytest.mark.kernelbuild
def test_builds_racing_prune(layout: Path, tmp_path: Path) -> None:
    """Two builds and a prune loop: a managed kernel would be pruned too (and rebuilt for
    minutes), so these Sporefiles boot the prebuilt kernel from their own context."""
    home = tmp_path / "store"
    Store(home)
    projects = _projects(tmp_path / "p", layout, "r4ce", kernel=H.managed_vmlinux())[:2]
    quiet = _projects(tmp_path / "q", layout, "r4ce", kernel=H.managed_vmlinux())[0]
    stop = threading.Event()
    prunes: list[str] = []

    def prune_loop() -> None:
        i = 0
        while not stop.is_set():
            mode = ["--all"] if i % 2 == 0 else ["--older-than", "1s"]
            r = H.run_spore(home, "cache", "prune", *mode)
            assert r.returncode == 0, r.stderr
            prunes.append(r.stdout.strip() + (" (waited)" if "waiting" in r.stderr else ""))
            i += 1
            time.sleep(0.2)

    pruner = threading.Thread(target=prune_loop)
    pruner.start()
    try:
        results = _all_at_once(
            [partial(H.run_spore, home, "build", str(p.sporefile)) for p in projects]
        )
    finally:
        stop.set()
        pruner.join()
    for p, r in zip(projects, results, strict=True):
        assert r.returncode == 0, f"{p.name}: {r.stderr[-3000:]}"
        assert "✓ verify" in r.stderr  # its own spore restored and checked, mid-race
    assert any("waited" in s for s in prunes), prunes  # a prune ran into a live build
    assert H.store_problems(home) == []  # prune by reachability leaves no record dangling
    # A build of the same inputs on a quiet, fresh store: the same rootfs and lock.
    qhome = tmp_path / "quiet-store"
    Store(qhome)
    for until in ("rootfs", "guest"):  # (--until guest alone skips resolve)
        q = H.run_spore(qhome, "build", "--until", until, str(quiet.sporefile))
        assert q.returncode == 0, q.stderr
    want = lockfile.load(lockfile.lock_path(quiet.sporefile)).encode()
    rootfs = {r.name for r in (qhome / "rootfs" / "blake3").iterdir()}
    for p in projects:
        got = H.outcome(p.sporefile, p.spore)
        assert got.lock == want
        assert {got.rootfs.split(":", 1)[1]} == rootfs
    print(f"\n{len(prunes)} prunes raced 2 builds: {prunes}")
