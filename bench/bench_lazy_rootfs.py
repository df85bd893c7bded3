"""Lazy rootfs verification: restore → first output, image hashed whole vs block table.

A restore of a spore with a block table (``rootfs.table``) reads nothing of the
rootfs image before the VM starts: the blk device checks each 64 KiB block on
the guest's first read of it. A spore sealed before tables has its whole image
hashed first. This bench builds the bench spore twice, on the busybox rootfs
(16 MiB) and on one with a ``--big-mib`` (1024) MiB file added (a rootfs the size
of a small distro image), and restores each of them as it is (lazy: table) and
as the same manifest without its table (eager: whole-image hash), alternating,
``--runs`` times each: seconds from ``resume_vm`` (what ``spore run --from``
does after parsing its arguments) to the first stdout byte of ``cat /tmp/marker``
in the guest. Medians, and the ratio eager / lazy. Twice per image: with the
image in the host's page cache (``warm``: a CI runner restoring the same spore
again) and evicted from it first (``cold``: posix_fadvise DONTNEED on that one
file, so the eager hash reads it from disk; other files stay cached).

Run: ``SPORE_HOME=~/.cache/spore-tests/kernel-store python bench/bench_lazy_rootfs.py``
(SPORE_HOME must hold the managed kernel, or the first run builds it; the big
rootfs, the same bytes every run, stays in that store until ``spore cache prune``).
Figures: docs/restore.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import blake3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ociimage  # noqa: E402
from sporebuild import build_spore_from  # noqa: E402

from sporevm.build.progress import Reporter  # noqa: E402
from sporevm.build.runner import resume_vm  # noqa: E402
from sporevm.errors import SporeError  # noqa: E402
from sporevm.runtime.protocol import RestoreStrategy  # noqa: E402
from sporevm.spore import manifest  # noqa: E402
from sporevm.spore.sporedir import write_spore  # noqa: E402
from sporevm.store import Store  # noqa: E402

MARKER = "spore-bench-marker"
SPOREFILE = """\
sporefile: 1
name: bench-lazy-rootfs-{name}
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB}}
{files}steps:
  - name: marker
    run: echo {marker} > /tmp/marker
"""


def build(work: Path, name: str, big_mib: int, timeout: float) -> Path:
    src = work / name
    src.mkdir()
    files = ""
    if big_mib:
        # Fixed bytes (so a second run finds the rootfs cached), distinct per MiB.
        piece = blake3.blake3(b"spore bench-lazy-rootfs").digest(length=1 << 20)
        with open(src / "blob", "wb") as fh:
            for i in range(big_mib):
                fh.write(i.to_bytes(8, "little") + piece[8:])
        files = "files:\n  - {src: blob, dst: /data/blob}\n"
    text = SPOREFILE.format(name=name, layout=work / "layout", files=files, marker=MARKER)
    (src / "Sporefile").write_text(text)
    spore = build_spore_from(src / "Sporefile", timeout)
    (src / "blob").unlink(missing_ok=True)
    return spore


def without_table(spore: Path, out: Path) -> None:
    """The same spore as one sealed before block tables: its image is hashed whole."""
    m = manifest.decode((spore / "manifest.json").read_bytes())
    write_spore(dataclasses.replace(m, rootfs=dataclasses.replace(m.rootfs, table=None)), out)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def restore_once(spore: Path, store: Store, ram: RestoreStrategy, timeout: float) -> float:
    start = time.perf_counter()
    vm = resume_vm(spore, store, Reporter.quiet(), ram=ram)
    try:
        first: list[float] = []
        out = bytearray()

        def on_stdout(data: bytes) -> None:
            if not first:
                first.append(time.perf_counter())
            out.extend(data)

        status = vm.session.exec(["cat", "/tmp/marker"], on_stdout=on_stdout, timeout=timeout)
        done = status.wait(timeout + 5)
        if done.returncode != 0 or MARKER.encode() not in out or not first:
            raise SystemExit(f"restore of {spore}: {done.describe()}, stdout {bytes(out)!r}")
        return first[0] - start
    finally:
        try:
            vm.session.shutdown(timeout=10.0)
        except SporeError:
            pass
        vm.wait_exit(10.0)
        vm.close()


def pre_vm_checks(m: manifest.Manifest, image: Path, runs: int) -> tuple[float, float, float]:
    """In this process, page cache warm: the monitor's check before the VM for a spore
    without a table (BLAKE3 of the whole image, as monitor._blake3_fd does it) and with
    one (fetch, re-hash and decode the table); and the blk device's cost of checking
    every block once (what a guest reading the whole image pays, spread over its reads)."""
    from sporevm.runtime.monitor import _blake3_fd
    from sporevm.spore.chunks import ChunkStore

    chunks = ChunkStore(Store())
    fd = os.open(image, os.O_RDONLY)
    try:
        whole, table, blocks = [], [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            _blake3_fd(fd)
            t1 = time.perf_counter()
            t = manifest.rootfs_table(m, chunks)
            t2 = time.perf_counter()
            assert t is not None
            for b in range(t.blocks):
                start, size = t.span(b)
                if not t.check(b, os.pread(fd, size, start)):
                    raise SystemExit(f"{image}: block {b} does not match its table")
            blocks.append(time.perf_counter() - t2)
            whole.append(t1 - t0)
            table.append(t2 - t1)
    finally:
        os.close(fd)
    return statistics.median(whole), statistics.median(table), statistics.median(blocks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--ram", choices=[s.value for s in RestoreStrategy], default="lazy")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    store = Store()
    ram = RestoreStrategy(args.ram)
    rows = []
    checks = []
    with tempfile.TemporaryDirectory(prefix="bench-lazy-rootfs-") as tmp:
        work = Path(tmp)
        ociimage.write_layout(work / "layout", list(ociimage.busybox_layers()), tag="latest")
        for name, mib in (("busybox", 0), (f"big{args.big_mib}", args.big_mib)):
            lazy = build(work, name, mib, args.timeout)
            eager = work / f"{name}-eager.spore"
            without_table(lazy, eager)
            m = manifest.decode((lazy / "manifest.json").read_bytes())
            image = store.rootfs_path(m.rootfs.digest)
            os.sync()  # the build's GiBs of writeback would otherwise slow the first runs
            checks.append((name, m.rootfs.size, *pre_vm_checks(m, image, args.runs)))
            for cache in ("warm", "cold"):
                times: dict[str, list[float]] = {"eager": [], "lazy": []}
                restore_once(lazy, store, ram, args.timeout)  # warm the zygote and page cache
                for _ in range(args.runs):
                    for kind, spore in (("eager", eager), ("lazy", lazy)):
                        if cache == "cold":
                            evict(image)
                        times[kind].append(restore_once(spore, store, ram, args.timeout))
                e, z = statistics.median(times["eager"]), statistics.median(times["lazy"])
                rows.append((name, m.rootfs.size, cache, e, z, times))
                print(
                    f"{name:>10} {m.rootfs.size >> 20:6d} MiB {cache:>4}: eager {e * 1e3:8.1f} ms"
                    f"  lazy {z * 1e3:8.1f} ms  eager/lazy {e / z:5.2f}x",
                    flush=True,
                )
    load = os.getloadavg()[0]
    print(
        f"\nrestore → first output, --restore {args.ram} RAM, medians of {args.runs} "
        f"alternating runs, load average {load:.2f}"
    )
    print("| rootfs | page cache | eager (hash whole image) ms | lazy (block table) ms | ratio |")
    print("|---|---|---|---|---|")
    for name, size, cache, e, z, times in rows:
        print(
            f"| {name} ({size >> 20} MiB) | {cache} | {e * 1e3:.1f} "
            f"({', '.join(f'{t * 1e3:.0f}' for t in times['eager'])}) | {z * 1e3:.1f} "
            f"({', '.join(f'{t * 1e3:.0f}' for t in times['lazy'])}) | {e / z:.2f}× |"
        )
    print("\nbefore the VM (in-process, page cache warm, medians):")
    print("| rootfs | hash whole image ms | fetch + check table ms | check every block once ms |")
    print("|---|---|---|---|")
    for name, size, whole, table, blocks in checks:
        print(
            f"| {name} ({size >> 20} MiB) | {whole * 1e3:.1f} | {table * 1e3:.2f} | "
            f"{blocks * 1e3:.1f} ({size / blocks / 1e9:.2f} GB/s) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
