"""Distribution: pull + restore of a spore from a registry vs moving a raw memory dump.

One run, one spore (busybox, 256 MiB guest RAM, one step), one local
docker-registry (tools/registry.py) on loopback:

1. spore path — ``spore pack`` the spore, ``spore push`` the bundle to
   ``oci://127.0.0.1:PORT/bench/spore``, then on a *clean node store* (only
   the managed kernel and initrd hard-linked in, no chunks, no rootfs)
   ``spore pull`` it and ``spore run --from`` it (restore + one exec). Bytes
   are what the pull received over the wire (``bytes_received``).
2. raw path — the same VM's full memory as one flat file (the spore's
   materialized memfile, 256 MiB, ``sporevm/spore/backing.py``) pushed through
   the same registry as one blob and pulled back (sha256-verified), with the
   same transport code. No restore is timed for it: this is the floor a
   "ship the RAM dump" design pays before it can even start restoring.

Prints bytes, wall times and the raw/spore ratios. Run:

    SPORE_HOME=~/.cache/spore-tests/kernel-store python bench/bench_pull.py

(SPORE_HOME must hold the managed kernel, or the first run builds it.) The
spore is built once under ``--work`` and reused (an unchanged Sporefile starts
no VM). See docs/bench.md ("Distribution").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ociimage  # noqa: E402
from registry import LocalRegistry  # noqa: E402

from sporevm.dist.transports import open_sink, open_source  # noqa: E402
from sporevm.dist.uri import parse_pull_uri, parse_push_uri  # noqa: E402
from sporevm.spore import backing  # noqa: E402
from sporevm.spore.chunks import ChunkStore  # noqa: E402
from sporevm.spore.sporedir import open_spore  # noqa: E402
from sporevm.store import Store, sha256_file  # noqa: E402

MARKER = "spore-pull-bench-marker"
SPOREFILE = f"""\
sporefile: 1
name: bench-pull
base:
  image: oci-layout:{{layout}}:latest
machine: {{{{memory: 256MiB}}}}
steps:
  - name: marker
    run: echo {MARKER} > /tmp/marker
"""
# What a node needs besides the bundle: the managed kernel and guest initrd.
NODE_BASE = (
    "kernels",
    "guest",
    "keys/kernel",
    "keys/source-sha256",
    "keys/initrd",
    "keys/guest-agent",
)


def spore_cli(*args: str, home: Path, timeout: float = 600) -> tuple[str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sporevm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
        env={**os.environ, "SPORE_HOME": str(home)},
    )
    took = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"spore {args[0]} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout, took


def build_spore(work: Path, home: Path) -> Path:
    layout = work / "layout"
    if not (layout / "index.json").exists():
        ociimage.write_layout(layout, list(ociimage.busybox_layers()), tag="latest")
    src = work / "sporefile"
    src.mkdir(parents=True, exist_ok=True)
    (src / "Sporefile").write_text(SPOREFILE.format(layout=layout))
    out, took = spore_cli("build", "--json", str(src / "Sporefile"), home=home, timeout=1800)
    print(f"spore build: {took:.1f} s (cached after the first run)")
    return Path(json.loads(out)["spore"])


def clean_node(base: Path, dest: Path) -> Path:
    """A store with the kernel and initrd (hard links) and nothing of the spore."""
    for sub in NODE_BASE:
        if (base / sub).exists():
            (dest / sub).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(base / sub), str(dest / sub)], check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", type=Path, default=Path.home() / ".cache" / "spore-tests" / "bench-pull"
    )
    args = ap.parse_args()
    home = Path(os.environ.get("SPORE_HOME", Path.home() / ".cache" / "spore"))
    args.work.mkdir(parents=True, exist_ok=True)
    spore = build_spore(args.work, home)

    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp_name:
        tmp = Path(tmp_name)
        reg = LocalRegistry(tmp / "registry")
        try:
            # -- 1. the spore: pack, push, pull on a clean node, restore + exec ----------
            bundle = tmp / "bundle"
            out, t_pack = spore_cli("pack", "--json", str(spore), "--out", str(bundle), home=home)
            packed = json.loads(out)
            out, t_push = spore_cli(
                "push", "--json", str(bundle), f"oci://{reg.host}/bench/spore", home=home
            )
            ref = json.loads(out)["reference"]
            node = clean_node(home, tmp / "node")
            out, t_pull = spore_cli(
                "pull", "--json", ref, "--out", str(tmp / "pulled.spore"), home=node
            )
            pulled = json.loads(out)
            out, t_run = spore_cli(
                "run", "--from", str(tmp / "pulled.spore"), "--", "cat", "/tmp/marker", home=node
            )
            if MARKER not in out:
                raise SystemExit(f"restored spore printed {out[:200]!r}, not the marker")
            spore_bytes = int(pulled["bytes_received"])
            _, t_cli = spore_cli("--help", home=node)  # the CLI's own start-up, for scale

            # -- 2. the raw memory dump of the same VM, as one blob ----------------------
            store = Store(home)
            m, _, _ = open_spore(spore, store)
            memfile = backing.ensure_memfile(m.memory, ChunkStore(store), store)
            digest, size = sha256_file(memfile)
            started = time.monotonic()
            sink = open_sink(parse_push_uri(f"oci://{reg.host}/bench/raw"))
            sink.put("memory.raw", memfile, size, digest)
            raw_ref = sink.finish(digest, [])
            t_raw_push = time.monotonic() - started
            started = time.monotonic()
            source = open_source(parse_pull_uri(raw_ref))
            source.fetch("memory.raw", tmp / "memory.raw", size, digest)
            t_raw_pull = time.monotonic() - started
            raw_bytes = source.bytes_received
        finally:
            reg.stop()

    print(
        f"spore: {packed['objects']} objects in {packed['packs']} pack(s), bundle "
        f"{packed['bytes'] / 2**20:.1f} MiB; guest RAM {m.platform.memory >> 20} MiB"
    )
    print(
        f"spore path: pack {t_pack:.2f} s, push {t_push:.2f} s, pull {t_pull:.2f} s "
        f"({spore_bytes / 2**20:.1f} MiB received), run --from (restore + exec) "
        f"{t_run:.2f} s; pull+restore {t_pull + t_run:.2f} s"
    )
    print(
        f"(each spore step is one CLI process; its start-up alone is {t_cli:.2f} s; "
        "the raw path runs in this process)"
    )
    print(
        f"raw path:   push {t_raw_push:.2f} s, pull {t_raw_pull:.2f} s "
        f"({raw_bytes / 2**20:.1f} MiB received)"
    )
    print(
        f"ratio raw/spore: bytes {raw_bytes / spore_bytes:.1f}x, "
        f"wall (raw pull vs spore pull+restore) {t_raw_pull / (t_pull + t_run):.2f}x, "
        f"(raw pull vs spore pull) {t_raw_pull / t_pull:.2f}x"
    )


if __name__ == "__main__":
    main()
