"""`spore cache prune` against a busy store: a bounded wait, then one clear error with
nothing removed (`--wait`, `--no-wait`), and `--older-than 0` (every entry, as `--all`).

Real processes only: the holder is a separate Python process that takes the store lock
shared through the store's own API, exactly as a build or `spore run` does. No VM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sporevm.spore.chunks import ChunkStore
from sporevm.store import Store, StoreBusy
from tests import crashharness as H

_HOLDER = (
    "import sys\nfrom sporevm.store import Store\n"
    "with Store().lock():\n print('held', flush=True)\n sys.stdin.readline()"
)


def _files(home: Path) -> set[str]:
    return {str(p.relative_to(home)) for p in home.rglob("*")}


def _seed(home: Path) -> list[str]:
    store = Store(home)
    chunks = ChunkStore(store)
    ids = [chunks.put(f"entry {i}".encode() * 100) for i in range(3)]
    store.put_key("step", "ab" * 32, {"manifest": ids[0]})
    return ids


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A store with entries, and a process holding its lock shared until told to go."""
    home = tmp_path / "store"
    _seed(home)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER],
        env=H.spore_env(home),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == "held\n"
        yield home, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(10) == 0


def test_prune_gives_up_after_wait_and_removes_nothing(
    holder: tuple[Path, subprocess.Popen[str]],
) -> None:
    home, proc = holder
    before = _files(home)
    started = time.monotonic()
    r = H.run_spore(home, "cache", "prune", "--all", "--wait", "1s", timeout=60)
    took = time.monotonic() - started
    assert r.returncode == 1, r
    assert 1.0 <= took < 3.5, took
    lines = r.stderr.splitlines()
    assert lines == [
        f"spore: cache prune: waiting up to 1s for 1 running spore command to release the "
        f"store lock ({home / 'lock'})",
        f"spore: error: cache prune: the store {home} is still in use after 1s (running "
        "builds or VMs hold it); nothing was removed; retry later or pass --wait LONGER",
    ], r.stderr
    assert r.stdout == ""
    assert _files(home) == before  # every entry kept, no staging left behind
    assert not list((home / "tmp").iterdir())

    _release(proc)
    r = H.run_spore(home, "cache", "prune", "--all", "--wait", "1s", timeout=60)
    assert r.returncode == 0 and r.stderr == "", r
    assert r.stdout.startswith("removed 4 entries, ")
    assert Store(home).entries() == []


@pytest.mark.parametrize("flags", [("--wait", "0"), ("--wait", "0s"), ("--no-wait",)])
def test_prune_no_wait_fails_at_once(
    holder: tuple[Path, subprocess.Popen[str]], flags: tuple[str, ...]
) -> None:
    home, _ = holder
    before = _files(home)
    started = time.monotonic()
    r = H.run_spore(home, "cache", "prune", "--all", *flags, timeout=60)
    assert time.monotonic() - started < 3.0
    assert r.returncode == 1
    assert r.stderr == (
        f"spore: error: cache prune: the store {home} is in use (running "
        "builds or VMs hold it); nothing was removed; retry later or pass "
        "--wait LONGER\n"
    )
    assert _files(home) == before


def test_prune_waits_then_succeeds_when_the_holder_leaves_in_time(
    holder: tuple[Path, subprocess.Popen[str]],
) -> None:
    home, proc = holder
    prune = subprocess.Popen(
        H.spore_argv("cache", "prune", "--all", "--wait", "30s"),
        env=H.spore_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    assert prune.poll() is None  # waiting
    _release(proc)
    out, err = prune.communicate(timeout=30)
    assert prune.returncode == 0, err
    assert "waiting up to 30s for 1 running spore command" in err
    assert out.startswith("removed 4 entries, ")


def test_wait_and_no_wait_exclude_each_other(tmp_path: Path) -> None:
    r = H.run_spore(tmp_path / "s", "cache", "prune", "--wait", "1s", "--no-wait", timeout=60)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_bad_wait_is_a_usage_error(tmp_path: Path) -> None:
    r = H.run_spore(tmp_path / "s", "cache", "prune", "--wait", "soon", timeout=60)
    assert r.returncode != 0 and r.stderr.startswith("spore: error: ") and "soon" in r.stderr
    assert len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("zero", ["0", "0s", "0m0s"])
def test_older_than_zero_removes_every_entry(tmp_path: Path, zero: str) -> None:
    home = tmp_path / "store"
    _seed(home)
    now = time.time()
    # One entry used just now, with a clock a little ahead: still removed, as with --all.
    for e in Store(home).entries():
        os.utime(e.path, (now + 5, now + 5))
    (home / "tmp" / "leftover").write_bytes(b"partial")
    r = H.run_spore(home, "cache", "prune", "--older-than", zero, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("removed 4 entries, ")
    assert Store(home).entries() == [] and not list((home / "tmp").iterdir())


def test_older_than_zero_and_all_exclude_each_other(tmp_path: Path) -> None:
    r = H.run_spore(tmp_path / "s", "cache", "prune", "--all", "--older-than", "0", timeout=60)
    assert r.returncode == 2 and "exclude each other" in r.stderr


def test_lock_timeout_in_the_store_api(holder: tuple[Path, subprocess.Popen[str]]) -> None:
    """The bound lives in Store.lock: shared takers are not blocked, exclusive ones time out
    without ever holding the lock, and the holder count comes from /proc/locks."""
    home, proc = holder
    store = Store(home)
    with store.lock(timeout=0):
        pass  # shared with the holder: no wait
    assert store.lock_holders() == 1
    waits: list[int] = []
    started = time.monotonic()
    with pytest.raises(StoreBusy, match="still in use after 0.3s"):
        with store.lock(exclusive=True, on_wait=lambda: waits.append(1), timeout=0.3):
            raise AssertionError("must not get the lock")
    assert 0.3 <= time.monotonic() - started < 2.0 and waits == [1]
    _release(proc)
    assert store.lock_holders() is None
    with store.lock(exclusive=True, timeout=0):
        pass
