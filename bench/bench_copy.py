"""Copy-in and copy-out through a resumed spore vs a host tar pipe.

One run (the host is shared; the figures are a ratio, not a distribution):

1. copy-in: ``copies.copy_in`` (the `spore run --copy-in` path: the host tar
   writer over the no-follow walker, COPY_DATA frames over the agent channel,
   the guest agent unpacking into the overlay's tmpfs) of a tree of random
   files (``--file-kib`` each, 16 per directory) totalling ``--in-mib`` MiB into
   a spore resumed with ``resume_vm``, from the first frame to the guest's DONE;
   against ``tar -C SRC -c . | tar -C DST -x`` on the host into a fresh directory
   (page cache warm for both: the source was just written). The tree is then
   copied back out and compared with the source (``diff -r``).
2. copy-out: ``copies.copy_out`` (the agent's tar writer, COPY_OUT_DATA frames,
   the host's path-safe extractor with its fsyncs and the final rename) of a
   ``--out-mib`` MiB tree of the same shape made in the guest (``dd`` from
   /dev/zero, so its size does not depend on the copy-in rate), against the
   host tar pipe of the same shape plus ``sync -f`` on the destination (our
   copy-out fsyncs every file); the plain pipe is printed as well.

On kvm_pvm the guest kernel is emulated: with the agent on a named virtio port
(one page per read) a 100 MiB copy-in takes a few minutes there (it took hours
through hvc, 16 bytes per poll); ``--in-mib`` sizes it separately.

Run: ``SPORE_HOME=~/.cache/spore-tests/kernel-store python bench/bench_copy.py``
(defaults: 100 MiB each way; SPORE_HOME must hold the managed kernel, or the
build boots after building it). See docs/bench.md ("Copies").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ociimage  # noqa: E402
from sporebuild import build_spore_from  # noqa: E402

from sporevm.build.copies import CopyIn, CopyOut, CopyPlan, copy_in, copy_out  # noqa: E402
from sporevm.build.progress import Reporter  # noqa: E402
from sporevm.build.runner import resume_vm, shutdown_vm  # noqa: E402
from sporevm.store import Store  # noqa: E402

SPOREFILE = """\
sporefile: 1
name: bench-copy
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 512MiB}}
steps:
  - name: ready
    run: mkdir -p /work
"""


def build_spore(work: Path, timeout: float) -> Path:
    layout = work / "layout"
    ociimage.write_layout(layout, list(ociimage.busybox_layers()), tag="latest")
    (work / "Sporefile").write_text(SPOREFILE.format(layout=layout))
    spore = build_spore_from(work / "Sporefile", timeout)
    return spore


def make_tree(root: Path, mib: int, files: int) -> int:
    size = (mib << 20) // files  # random bytes: nothing on the way can take a shortcut
    for i in range(files):
        d = root / f"d{i // 16:03d}" / "sub"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04d}.bin").write_bytes(os.urandom(size))
    return size * files


def host_tar(src: Path, dst: Path, sync: bool) -> float:
    dst.mkdir()
    started = time.monotonic()
    subprocess.run(
        f"tar -C {src} -c . | tar -C {dst} -x" + (f" && sync -f {dst}" if sync else ""),
        shell=True,
        check=True,
    )
    return time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-mib", type=int, default=100, help="size of the copied-in tree")
    ap.add_argument("--out-mib", type=int, default=100, help="size of the copied-out tree")
    ap.add_argument("--file-kib", type=int, default=256, help="size of each file")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-copy-"))
    quiet = Reporter(enabled=False)
    try:
        spore = build_spore(work, args.timeout)
        src = work / "src"
        n_in = max(1, (args.in_mib << 10) // args.file_kib)
        mib_in = make_tree(src, n_in * args.file_kib >> 10, n_in) / (1 << 20)
        n_out = max(1, (args.out_mib << 10) // args.file_kib)
        load0 = os.getloadavg()[0]
        host_in = host_tar(src, work / "host-in", sync=False)
        vm = resume_vm(spore, Store(), quiet)
        try:
            plan = CopyPlan(ins=(CopyIn(src, "/work/in"),))
            started = time.monotonic()
            copy_in(vm.session, plan, quiet)
            ours_in = time.monotonic() - started
            print(f"copy-in: {ours_in:.2f} s", file=sys.stderr, flush=True)
            # The copy-out tree is made in the guest (user-space dd from /dev/zero), so its
            # size does not depend on how fast data goes in.
            gen = (
                f"i=0; while [ $i -lt {n_out} ]; do d=/work/out/d$((i / 16))/sub; "
                f"mkdir -p $d; dd if=/dev/zero of=$d/f$i.bin bs={args.file_kib}k count=1 "
                "2>/dev/null; i=$((i + 1)); done"
            )
            status = vm.session.exec(["sh", "-c", gen], timeout=args.timeout).wait()
            if status.returncode != 0:
                raise SystemExit(f"making the guest tree failed: {status.describe()}")
            out_plan = CopyPlan(outs=(CopyOut("/work/out", work / "copied-out"),))
            started = time.monotonic()
            failed = copy_out(vm.session, out_plan, quiet)
            ours_out = time.monotonic() - started
            print(f"copy-out: {ours_out:.2f} s", file=sys.stderr, flush=True)
            back_plan = CopyPlan(outs=(CopyOut("/work/in", work / "copied-back"),))
            failed += copy_out(vm.session, back_plan, quiet)
            if failed:
                raise SystemExit("copy-out failed")
            shutdown_vm(vm)
        finally:
            vm.close()
        same = subprocess.run(
            ["diff", "-r", str(src), str(work / "copied-back")], capture_output=True
        )
        if same.returncode != 0:
            raise SystemExit(f"the tree copied in and out differs: {same.stdout[:400]!r}")
        zeros = work / "zeros"  # the host peer of the guest-made tree: same shape, zeros
        for i in range(n_out):
            d = zeros / f"d{i // 16}" / "sub"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}.bin").write_bytes(bytes(args.file_kib << 10))
        mib_out = n_out * args.file_kib / 1024
        host_out = host_tar(zeros, work / "host-out", sync=True)
        host_plain = host_tar(zeros, work / "host-plain", sync=False)
        load1 = os.getloadavg()[0]

        def row(name: str, mib: float, ours: float, peer: float, peer_name: str) -> str:
            return (
                f"| {name} ({mib:.0f} MiB) | {ours:.2f} s ({mib / ours:.2f} MiB/s) | "
                f"{peer_name} {peer:.2f} s ({mib / peer:.0f} MiB/s) | {ours / peer:.0f}× |"
            )

        print(f"\nfiles of {args.file_kib} KiB, 16 per directory; load {load0:.1f} → {load1:.1f}\n")
        print("| | spore | host tar pipe | ratio (spore / tar) |")
        print("|---|---|---|---|")
        print(row("copy-in, resumed spore", mib_in, ours_in, host_in, "`tar | tar -x`"))
        print(row("copy-out", mib_out, ours_out, host_out, "`tar | tar -x && sync -f`"))
        print(row("copy-out, peer without sync", mib_out, ours_out, host_plain, "`tar | tar -x`"))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
