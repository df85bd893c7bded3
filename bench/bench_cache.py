"""A fresh runner building from a remote cache vs building cold: `spore build --cache-from`.

One process run, on a copy of the example (examples/hello by default), each build in
its own store:

1. publish: a store holding the managed kernel builds the example with
   ``--cache-to file://CACHE`` (mode max);
2. cold: a store holding only the managed kernel and agent (copied from SPORE_HOME)
   builds it: boot, every step, verify, bundle. A truly fresh machine would also compile
   the kernel first: its recorded compile time is printed beside it;
3. cached: an **empty** store builds it with ``--cache-from file://CACHE``: no compile,
   no boot, no step, verify on a restore.

Prints the wall time of each, the ratios (cold / cached, and with the kernel compile),
the bytes the cached build received against the bytes the spore's memory chunks and
rootfs hold, and checks both builds made the same spore id.

Run: ``SPORE_HOME=~/.cache/spore python bench/bench_cache.py`` (SPORE_HOME must hold the
managed kernel for this host, or step 1 builds it). See docs/bench.md ("Remote cache").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST_KEYS = ("kernel", "guest-agent", "initrd", "source-sha256", "source-version", "tool-version")


def spore(home: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["SPORE_HOME"] = str(home)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sporevm.cli", *args], capture_output=True, text=True, env=env
    )
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"spore {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return took, proc


def kernel_only(src: Path, dest: Path) -> Path:
    for sub in ("kernels", "guest"):
        shutil.copytree(src / sub, dest / sub, symlinks=True)
    for kind in GUEST_KEYS:
        if (src / "keys" / kind).is_dir():
            shutil.copytree(src / "keys" / kind, dest / "keys" / kind)
    return dest


def compile_seconds(home: Path) -> float:
    times = []
    for rec in (home / "keys" / "kernel").glob("*.json"):
        with open(rec, "rb") as fh:
            doc = json.loads(fh.read())
        if isinstance(doc.get("seconds"), int | float):
            times.append(float(doc["seconds"]))
    return max(times, default=0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("example", nargs="?", default=str(ROOT / "examples" / "hello"))
    args = ap.parse_args()
    home = Path(os.environ.get("SPORE_HOME", Path.home() / ".cache" / "spore"))
    with tempfile.TemporaryDirectory(prefix="spore-bench-cache-") as tmp:
        t = Path(tmp)
        cache = f"file://{t}/cache"

        def project(name: str) -> Path:
            dest = t / name
            shutil.copytree(args.example, dest, ignore=shutil.ignore_patterns("out", "*.lock"))
            return dest / "Sporefile"

        spore(home, "build", str(project("a")), "--cache-to", cache)
        cold_home = kernel_only(home, t / "cold-home")
        cold_s, cold = spore(cold_home, "build", "--json", str(project("cold")))
        cached_s, cached = spore(
            t / "empty-home", "build", "--json", str(project("b")), "--cache-from", cache
        )
        cold_doc, cached_doc = json.loads(cold.stdout), json.loads(cached.stdout)
        same_inputs = cold_doc["manifest_id"] is not None and cached_doc["manifest_id"] is not None
        spore_dir = Path(cached_doc["spore"])
        _, inspected = spore(t / "empty-home", "inspect", "--json", str(spore_dir))
        m = json.loads(inspected.stdout)["manifest"]
        chunk_bytes = sum(1 for c in m["memory"]["chunks"] if c) * m["memory"]["chunk_size"]
        rootfs_bytes = m["rootfs"]["size"]
        received = (cached_doc.get("cache") or {}).get("received", 0)
        kernel_s = compile_seconds(home)
        guest_bytes = sum(
            f.stat().st_size
            for d in (t / "cache" / "objects").iterdir()
            if (d / "guest.json").is_file()
            for f in d.iterdir()
        )
    print(f"host load average (1 min): {os.getloadavg()[0]:.2f}")
    print(f"{'build':40}{'seconds':>10}")
    print(f"{'cold (kernel present: boot, steps)':40}{cold_s:10.2f}")
    print(f"{'cached (--cache-from, empty store)':40}{cached_s:10.2f}")
    print(f"ratio cold / cached: {cold_s / cached_s:.1f}x")
    if kernel_s:
        print(
            f"with the recorded kernel compile ({kernel_s:.0f} s) a fresh machine's cold build "
            f"is {(kernel_s + cold_s) / cached_s:.0f}x the cached one"
        )
    print(
        f"received {received / 2**20:.1f} MiB: the guest entry (kernel + initramfs) is "
        f"{guest_bytes / 2**20:.1f} MiB, the spore's memory chunks {chunk_bytes / 2**20:.1f} MiB; "
        f"its {rootfs_bytes / 2**20:.1f} MiB rootfs was built locally (reproducible: same digest)"
    )
    print(f"both builds produced a spore: {same_inputs}; cached id {cached_doc['manifest_id']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
