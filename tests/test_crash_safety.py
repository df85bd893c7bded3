"""Crash safety of the store (issue 6 part 4): SIGKILL `spore build` anywhere, then check.

After every kill: nothing half-written is visible under a final name (every
entry re-hashes to its name, every record's entries exist, no staging name
outside tmp/), the output spore is absent or whole, and the next run picks up
from whatever is left. At the end of each chain of kills an uninterrupted run
must succeed and produce what an uninterrupted build on a fresh store produced
(image, lock, rootfs digest, platform, provenance); where the kills left the
final step's snapshot recorded, the very same spore id.

Real VMs, so trials are few by default; SPORE_CRASH_TRIALS=N runs more and
SPORE_CRASH_SEED picks the kill points (both printed). Kills are aimed at a
task drawn uniformly from the reference build's timeline (resolve, fetch,
rootfs, guest, boot, each step, snapshot, verify and its publish), then a
delay drawn uniformly over that task's measured duration.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sporevm.dist import chunkpack
from sporevm.dist.pack import pack
from sporevm.spore.chunks import MAX_OBJECT, ChunkStore
from sporevm.spore.manifest import verify_chunks
from sporevm.spore.sporedir import open_spore
from sporevm.store import Store
from sporevm.storecheck import verify_store
from tests import crashharness as H
from tests.dist_servers import Slow, SlowServer
from tests.test_bundle import SEG, make_spores
from tests.test_kernel import built_kernel  # noqa: F401  (session fixture: seeds come from it)

TRIALS = int(os.environ.get("SPORE_CRASH_TRIALS", "10"))
SEED = int(os.environ.get("SPORE_CRASH_SEED", "6"))
CHAIN = 4  # kills per store before the completing run


# -- the checker itself must catch what it is for (no VM) ---------------------------


def test_storecheck_finds_torn_and_stray_entries(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    blob = store.ingest_blob_bytes("sha256:" + hashlib.sha256(b"x").hexdigest(), b"x", what="t")
    assert verify_store(store).problems == []
    blob.write_bytes(b"y")  # bytes no longer match the name
    (store.root / "keys" / "rootfs").mkdir(parents=True)
    (store.root / "keys" / "rootfs" / ("a" * 64 + ".json")).write_text(
        '{"digest": "blake3:' + "b" * 64 + '", "size": 1'
    )
    (store.root / "keys" / "rootfs" / ".tmp-x1").write_bytes(b"")
    (store.root / "keys" / "rootfs" / ("c" * 64 + ".json")).write_text(
        json.dumps({"digest": "blake3:" + "d" * 64, "size": 1})
    )
    chunks = store.root / "chunks" / "blake3"
    chunks.mkdir(parents=True, exist_ok=True)
    (chunks / ("e" * 64)).write_bytes(b"half")
    kinds = sorted((p.kind, p.path.split("/")[-1][:6]) for p in verify_store(store).problems)
    assert kinds == [
        ("corrupt", "2d7116"),
        ("corrupt", "aaaaaa"),
        ("corrupt", "eeeeee"),
        ("dangling", "cccccc"),
        ("temp", ".tmp-x"),
    ]
    assert len(verify_store(store).fatal()) == 4


def test_prune_sweeps_staging_leftovers_everywhere(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.put_key("rootfs", "f" * 64, {"x": 1})
    assert list((store.root / "keys" / "rootfs").iterdir()) == [
        store.root / "keys" / "rootfs" / ("f" * 64 + ".json")
    ]  # staged in tmp/, not beside
    for d in ("keys/rootfs", "blobs/sha256", "tmp"):
        (store.root / d / ".tmp-left").write_bytes(b"")
    store.prune(10_000)
    assert not list(store.root.rglob(".tmp-*"))
    assert (store.root / "keys" / "rootfs" / ("f" * 64 + ".json")).is_file()


def test_killed_pull_stuck_on_a_slow_server(tmp_path: Path) -> None:
    """SIGKILL a `spore pull` while a server on 127.0.0.1 stalls it mid-pack (default
    deadlines: it is still waiting, holding the store lock shared). Afterwards the store
    verifies clean, the lock is free, there is no output, and the next pull resumes the
    pack from what the killed one had verified and written (no VM)."""
    s = make_spores(tmp_path / "src")
    local = tmp_path / "b.bundle"
    res = pack(str(s.parent), s.children, local, s.store, pack_limit=MAX_OBJECT, segment_limit=SEG)
    server = SlowServer()
    try:
        for f in local.rglob("*"):
            if f.is_file():
                server.files[f"/b/{f.relative_to(local)}"] = f.read_bytes()
        stuck = f"/b/{chunkpack.decode((local / chunkpack.NAME).read_bytes()).packs[0].name}"
        server.slow[stuck] = Slow(first=1 << 20, byte_gap=None)  # then nothing, ever
        home, out = tmp_path / "home", tmp_path / "pulled.spore"
        uri = f"{server.url}/b@{res.digest}"
        run = H.run_and_kill(
            H.spore_argv("pull", uri, "--out", str(out)),
            H.spore_env(home),
            phase=None,
            delay=1.0,
            when=server.stalled,
            timeout=120,
        )
        assert run.killed and server.stalled.is_set(), run.stderr
        assert "fetch packs/" in run.stderr  # killed in the transfer, not before it
        assert H.store_problems(home) == []
        assert not out.exists() and not list(tmp_path.glob(".tmp-pulled.spore-*"))
        with Store(home).lock(exclusive=True, timeout=0):  # StoreBusy if still held
            pass
        check = H.run_spore(home, "cache", "verify")
        assert check.returncode == 0, check.stdout + check.stderr
        partial = list((home / "tmp").glob("pull-*/*.pack"))
        assert len(partial) == 1 and 0 < (have := partial[0].stat().st_size) <= 1 << 20
        server.slow.clear()
        server.log.clear()
        done = H.run_spore(home, "pull", uri, "--out", str(out), timeout=120)
        assert done.returncode == 0, done.stderr
        assert (out / "id").read_text().strip() == s.parent_id
        assert H.spore_dir_problems(out) == [] and H.store_problems(home) == []
        assert [r for p, r in server.log if p == stuck] == [f"bytes={have}-"]  # resumed
    finally:
        server.stop()


def _entries(home: Path) -> set[str]:
    return {f"{e.kind} {e.name}" for e in Store(home).entries()} | {
        f"root {p.name}" for p in (home / "roots").iterdir()
    }


def test_killed_prune_leaves_a_consistent_store(tmp_path: Path) -> None:
    """SIGKILL `spore cache prune --all` at points drawn uniformly over its run (no VM).
    After every kill the store verifies clean (no record names a removed entry, no
    half-removed kernel under its name, staging only in tmp/), every live spore opens
    with every object it names, and the next prune finishes the job."""
    template, live = H.prune_victim(tmp_path / "victim", garbage=6000)
    before = _entries(template)
    ref = tmp_path / "ref"
    shutil.copytree(template, ref, symlinks=True, copy_function=os.link)  # prune only unlinks
    first, full_s = H.removal_window(ref, "cache", "prune", "--all")
    after = _entries(ref)
    assert len(before) - len(after) > 7000 and H.store_problems(ref) == []
    rng = random.Random(SEED + 2)
    log, partial = [], 0
    for i in range(max(TRIALS, 6)):
        home = tmp_path / f"store-{i}"
        shutil.copytree(template, home, symlinks=True, copy_function=os.link)
        delay = rng.uniform(first * 0.9, full_s)  # aimed at the removals (planning: before)
        run = H.run_and_kill(
            H.spore_argv("cache", "prune", "--all"), H.spore_env(home), phase=None, delay=delay
        )
        assert run.killed or run.returncode == 0, run.stderr
        left = _entries(home)
        partial += after < left < before
        log.append(
            f"+{delay:.2f}s: {'killed' if run.killed else 'finished'}, "
            f"{len(before) - len(left)} of {len(before) - len(after)} removed"
        )
        problems = [p for p in H.store_problems(home) if not p.startswith("stale: roots/")]
        assert problems == [], log[-1]
        assert after <= left  # nothing a live spore needs was taken
        for spore in live:
            m, _, _ = open_spore(spore, Store(home))
            verify_chunks(m, ChunkStore(Store(home)), rehash=True)
        done = H.run_spore(home, "cache", "prune", "--all")
        assert done.returncode == 0, done.stderr
        assert _entries(home) == after and H.store_problems(home) == []
        assert not any((home / "tmp").iterdir())
        shutil.rmtree(home)
    print(
        f"\nprune {full_s:.2f} s ({len(before) - len(after)} entries, the first removed "
        f"after {first:.2f} s); kills:\n  " + "\n  ".join(log)
    )
    assert partial >= 1, log  # at least one kill landed mid-way


# -- killed builds on real VMs --------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    outcome: H.Outcome
    timeline: dict[str, tuple[float, float]]
    seconds: float
    home: Path  # the store it was built in
    spore: Path


def _project(base: Path, layout: Path, name: str) -> Path:
    proj = base / name
    proj.mkdir(parents=True)
    (proj / "Sporefile").write_text(H.sporefile(layout, "crash", "t0k3n"))
    return proj / "Sporefile"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, built_kernel: object) -> Path:  # noqa: F811
    # built_kernel: on a fresh machine the shared kernel store is filled first (minutes)
    return H.busybox_layout(tmp_path_factory.mktemp("crash-image") / "layout")


@pytest.fixture(scope="module")
def reference(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    base = tmp_path_factory.mktemp("crash-ref")
    H.seed_store(base / "store")
    sf = _project(base, layout, "proj")
    run = H.run_and_kill(
        H.spore_argv("build", str(sf)), H.spore_env(base / "store"), phase=None, delay=1e9
    )
    assert run.returncode == 0 and not run.killed, run.stderr
    assert H.store_problems(base / "store") == []
    timeline = {k: v for k, v in run.timeline().items() if k != "steps"}  # steps = step:*
    print(
        f"\nreference build {run.seconds:.1f} s: "
        + ", ".join(f"{k} {d:.2f}" for k, (_, d) in timeline.items())
    )
    spore = sf.parent / "out" / "crash.spore"
    return Reference(H.outcome(sf, spore), timeline, run.seconds, base / "store", spore)


def _final_step_record(home: Path, reference: Reference) -> str | None:
    """The manifest the store records for the spore's last step, if any (before a run)."""
    rec = Store(home).get_key("step", reference.outcome.stable["steps"][-1])
    mid = rec.get("manifest") if rec else None
    return mid if isinstance(mid, str) else None


@pytest.mark.vm
@pytest.mark.kernelbuild
def test_killed_builds_leave_a_consistent_store(
    reference: Reference, layout: Path, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    trials, kills, started = 0, 0, time.monotonic()
    log: list[str] = []
    chain = 0
    while trials < TRIALS:
        home = tmp_path / f"store-{chain}"
        H.seed_store(home)
        sf = _project(tmp_path, layout, f"proj-{chain}")
        env = H.spore_env(home)
        n = min(CHAIN, TRIALS - trials)
        points = sorted(
            (H.pick(rng, reference.timeline) for _ in range(n)),
            key=lambda p: reference.timeline[p[0]][0],
        )
        for phase, delay in points:
            run = H.run_and_kill(H.spore_argv("build", str(sf)), env, phase=phase, delay=delay)
            trials += 1
            kills += run.killed
            log.append(
                f"chain {chain}: {run.target} -> "
                + (
                    f"killed in {run.phase} at {run.seconds:.1f} s"
                    if run.killed
                    else f"finished (rc {run.returncode}) in {run.seconds:.1f} s"
                )
            )
            assert run.killed or run.returncode == 0, run.stderr[-3000:]
            problems = H.store_problems(home) + H.spore_dir_problems(
                sf.parent / "out" / "crash.spore"
            )
            problems += H.bundle_problems(home, sf.parent / "out" / "crash.bundle", tmp_path)[0]
            assert problems == [], f"after {log[-1]}:\n" + "\n".join(problems)
            if not run.killed:
                break  # the pipeline is done: later points of this chain would find it cached
        recorded = _final_step_record(home, reference)
        final = H.run_and_kill(H.spore_argv("build", str(sf)), env, phase=None, delay=1e9)
        assert final.returncode == 0 and not final.killed, final.stderr[-3000:]
        assert H.store_problems(home) == []
        got = H.outcome(sf, sf.parent / "out" / "crash.spore")
        ref = reference.outcome
        assert (got.image, got.rootfs, got.lock, got.stable) == (
            ref.image,
            ref.rootfs,
            ref.lock,
            ref.stable,
        )
        if recorded is not None:
            assert got.manifest_id == recorded  # the snapshot the kills left is the spore
        bad, packed = H.bundle_problems(home, sf.parent / "out" / "crash.bundle", tmp_path)
        assert bad == [] and packed == got.manifest_id  # the bundle holds this very spore
        # The kills' garbage is all in tmp/; a default prune (168h) removes it and nothing else.
        garbage = len(list((home / "tmp").iterdir()))
        pruned = H.run_spore(home, "cache", "prune")
        assert pruned.returncode == 0, pruned.stderr
        assert not any((home / "tmp").iterdir()) and H.store_problems(home) == []
        assert H.spore_dir_problems(sf.parent / "out" / "crash.spore") == []
        log.append(
            f"chain {chain}: completing run {final.seconds:.1f} s, spore "
            f"{got.manifest_id[:19]} ({'reused' if recorded else 'fresh'} snapshot), "
            f"{garbage} staging leftover(s) pruned"
        )
        chain += 1
    # The last chain's spore runs: the steps' effects are in the restored guest.
    proc = H.run_spore(
        home,
        "run",
        "-q",
        "--from",
        str(sf.parent / "out" / "crash.spore"),
        "--",
        "cat",
        "/root/log",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "a t0k3n\nb t0k3n\n"
    print(
        f"\n{trials} kill trials ({kills} killed mid-run), seed {SEED}, "
        f"{time.monotonic() - started:.0f} s:\n  " + "\n  ".join(log)
    )


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _leftovers(parent: Path, name: str) -> list[str]:
    """Staging names a killed writer may leave beside its output (never the output)."""
    return sorted(p.name for p in parent.iterdir() if p.name != name)


@pytest.mark.vm
@pytest.mark.kernelbuild
def test_killed_pack_and_pull(reference: Reference, tmp_path: Path) -> None:
    """`spore pack` and `spore pull` (file:// bundle into a clean store), killed at points
    drawn uniformly over their uninterrupted run time, then run to completion."""
    rng = random.Random(SEED + 1)
    n = max(TRIALS, 6)
    home, spore = reference.home, reference.spore
    mid = (spore / "id").read_text().strip()
    want = tmp_path / "want.bundle"
    # Kills during interpreter start-up test nothing: draw from when the work begins.
    t0 = time.monotonic()
    assert H.run_spore(home, "--version").returncode == 0
    startup = (time.monotonic() - t0) * 0.8
    t0 = time.monotonic()
    full = H.run_spore(home, "pack", str(spore), "--out", str(want))
    pack_s = time.monotonic() - t0
    assert full.returncode == 0, full.stderr
    log = []
    out = tmp_path / "packs"
    out.mkdir()
    for _ in range(n):
        delay = rng.uniform(startup, pack_s * 1.1)
        run = H.run_and_kill(
            H.spore_argv("pack", str(spore), "--out", str(out / "b")),
            H.spore_env(home),
            phase=None,
            delay=delay,
        )
        assert run.killed or run.returncode == 0, run.stderr
        log.append(
            f"pack +{delay:.2f}s: {'killed' if run.killed else 'finished'}, bundle "
            + ("present" if (out / "b").exists() else "absent")
        )
        if (out / "b").exists():
            assert _tree(out / "b") == _tree(want), log[-1]  # whole, byte-identical, or absent
        assert H.store_problems(home) == []
    again = H.run_spore(home, "pack", str(spore), "--out", str(out / "b"))
    assert again.returncode == 0, again.stderr
    assert _tree(out / "b") == _tree(want)
    # Publish it once; pull it into clean stores, killed.
    remote = tmp_path / "remote"
    pushed = H.run_spore(home, "push", str(want), f"file://{remote}")
    assert pushed.returncode == 0, pushed.stderr
    ref = pushed.stdout.strip()
    clean = tmp_path / "clean-store"
    H.seed_store(clean)
    t0 = time.monotonic()
    first = H.run_spore(clean, "pull", ref, "--out", str(tmp_path / "first.spore"))
    pull_s = time.monotonic() - t0
    assert first.returncode == 0, first.stderr
    for i in range(n):
        home_i = tmp_path / f"pull-store-{i}"
        H.seed_store(home_i)
        dest = tmp_path / f"pulled-{i}"
        dest.mkdir()
        delay = rng.uniform(startup, pull_s * 1.1)
        run = H.run_and_kill(
            H.spore_argv("pull", ref, "--out", str(dest / "s.spore")),
            H.spore_env(home_i),
            phase=None,
            delay=delay,
        )
        assert run.killed or run.returncode == 0, run.stderr
        staged = list((home_i / "tmp").glob("pull-*/*"))
        log.append(
            f"pull +{delay:.2f}s: {'killed' if run.killed else 'finished'}, "
            f"{len(staged)} staged file(s) left in tmp/"
        )
        assert H.store_problems(home_i) == [], log[-1]
        assert H.spore_dir_problems(dest / "s.spore") == []
        if run.killed:
            assert not (dest / "s.spore").exists() or (dest / "s.spore" / "id").is_file()
            done = (
                H.run_spore(home_i, "pull", ref, "--out", str(dest / "s.spore"))
                if not (dest / "s.spore").exists()
                else None
            )
            assert done is None or done.returncode == 0, done.stderr if done else ""
        assert (dest / "s.spore" / "id").read_text().strip() == mid
        check = H.run_spore(home_i, "verify", str(dest / "s.spore"))
        assert check.returncode == 0, check.stderr
        assert H.store_problems(home_i) == []
    print(
        f"\npack {pack_s:.2f} s, pull {pull_s:.2f} s, start-up {startup:.2f} s; "
        f"{n} + {n} kill trials:\n  " + "\n  ".join(log)
    )
