"""Image → ext4 rootfs: spore vs skopeo + umoci + mke2fs, side by side, one process run.

Both sides start from the same Debian minbase image in a loopback
docker-registry and end with an ext4 file of the image's tree:

  spore:  `spore rootfs REF -o FILE` (resolve + fetch + verify + path-safe apply
          + reproducible mkfs) with an empty store
  peer:   `skopeo copy docker://REF oci:DIR:TAG` + `umoci unpack` +
          `mke2fs -t ext4 -b 4096 -d ROOTFS` (same image size as ours)

Prints the median wall time of each side over ``--runs`` runs and the ratio
(goal: spore/peer ≤ 1.0). Run: `python bench/bench_rootfs.py [--runs 3]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import ociimage  # noqa: E402
from registry import LocalRegistry  # noqa: E402

CACHE = Path.home() / ".cache" / "spore-tests"
TAG = "bookworm-minbase"


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spore-bench-"))
    reg = LocalRegistry(work / "registry")
    try:
        layout = work / "layout"
        print("preparing the Debian minbase image (debootstrap is cached) …", file=sys.stderr)
        ociimage.write_layout(layout, list(ociimage.minbase_layers(CACHE)), tag=TAG)
        ref = reg.push(layout, f"library/debian:{TAG}", tag=TAG)
        spore_bin = [sys.executable, "-m", "sporevm.cli"]
        ours: list[float] = []
        peer: list[float] = []
        size = 0
        for i in range(args.runs):
            home = work / f"home{i}"
            out = work / f"spore{i}.ext4"
            env = {**os.environ, "SPORE_HOME": str(home)}

            def spore_side(home: Path = home, out: Path = out, env: dict[str, str] = env) -> None:
                run([*spore_bin, "rootfs", ref, "-o", str(out), "--json"], env)

            ours.append(timed(spore_side))
            size = out.stat().st_size
            digest = json.loads(run([*spore_bin, "rootfs", ref, "-o", str(out), "--json"], env))[
                "digest"
            ]
            shutil.rmtree(home)
            out.unlink()

            pdir = work / f"peer{i}"

            def peer_side(pdir: Path = pdir, size: int = size) -> None:
                pdir.mkdir()
                run(
                    [
                        "skopeo",
                        "copy",
                        "-q",
                        "--src-tls-verify=false",
                        f"docker://{ref}",
                        f"oci:{pdir / 'oci'}:{TAG}",
                    ]
                )
                run(["umoci", "unpack", "--image", f"{pdir / 'oci'}:{TAG}", str(pdir / "bundle")])
                run(
                    [
                        "mke2fs",
                        "-q",
                        "-F",
                        "-t",
                        "ext4",
                        "-b",
                        "4096",
                        "-d",
                        str(pdir / "bundle" / "rootfs"),
                        str(pdir / "peer.ext4"),
                        f"{size // 1024}k",
                    ]
                )

            peer.append(timed(peer_side))
            shutil.rmtree(pdir)
            print(f"run {i + 1}: spore {ours[-1]:.2f} s   peer {peer[-1]:.2f} s", file=sys.stderr)
        o, p = statistics.median(ours), statistics.median(peer)
        print(f"image: Debian bookworm minbase, rootfs {size >> 20} MiB, {digest}")
        print(f"spore rootfs (resolve+fetch+apply+mkfs): {o:.2f} s (median of {args.runs})")
        print(f"skopeo copy + umoci unpack + mke2fs -d:  {p:.2f} s (median of {args.runs})")
        print(f"ratio spore/peer: {o / p:.2f}x  (goal <= 1.0x)")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
