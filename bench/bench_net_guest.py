"""In-guest download throughput: a real VM's virtio-net, the gateway and passt vs the host.

Two network namespaces made for the run (tests/egress_netns.py), nothing leaves them:
``server`` holds an HTTP server at 198.51.100.2 (outside the floor: the internet's
stand-in) serving ``--mib`` MiB of random bytes; ``client`` is this machine's
stand-in, where `spore run` (monitor, gateway, passt) and the *direct* download run.

In the same run, alternating, ``--runs`` times each:

* guest — ``spore run --rootfs R --net-allow 198.51.100.0/24 -- sh -c '…wget…'``, a
  fresh busybox VM fetching the file to /dev/null; the time is the guest's own
  (``/proc/uptime`` around ``wget``, 10 ms resolution), so boot is not counted;
* host — the same URL fetched in ``client`` by curl (or Python).

Prints MB/s each way (medians), the ratio, and the CPU milliseconds per MB of the
gateway and of passt during the guest's runs (sampled from /proc while they live; the
figure includes their start-up, so it is an upper bound).

Run as root: ``SPORE_HOME=~/.cache/spore-tests/kernel-store .venv/bin/python
bench/bench_net_guest.py`` (SPORE_HOME must hold the managed kernel, or the first
run builds it). See docs/network.md ("Throughput") and docs/bench.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

import ociimage  # noqa: E402
from bench_egress import cpu_seconds, download  # noqa: E402

from tests import egress_netns as nets  # noqa: E402

PORT = 8080
# Guest side: uptime before and after, then wget's status, on one line.
GUEST_SCRIPT = (
    "read a _ < /proc/uptime; wget -q -O /dev/null {url}; s=$?; "
    'read b _ < /proc/uptime; echo "spore-bench $a $b $s"'
)


def spore(*args: str, prefix: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "sporevm.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def make_rootfs(work: Path) -> Path:
    layout = work / "layout"
    ociimage.write_layout(layout, list(ociimage.busybox_layers()), tag="latest")
    out = work / "busybox.ext4"
    proc = spore("rootfs", f"oci-layout:{layout}:latest", "-o", str(out), prefix=[], timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"bench_net_guest: spore rootfs failed: {proc.stderr.strip()[-800:]}")
    return out


class CpuSampler:
    """The CPU seconds of the gateway and passt processes seen while sampling, in the
    namespace ``netns`` only (another job's passt is not ours)."""

    def __init__(self, netns: str) -> None:
        self.netns = f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]"
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid_s in os.listdir("/proc"):
                if not pid_s.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid_s}/cmdline").read_bytes().split(b"\0")
                    what = (
                        "gateway"
                        if b"sporevm.egress.gateway" in cmd
                        else "passt"
                        if cmd and cmd[0].endswith(b"passt")
                        else None
                    )
                    if what is not None and os.readlink(f"/proc/{pid_s}/ns/net") == self.netns:
                        self.last[int(pid_s)] = (what, cpu_seconds(int(pid_s)))
                except OSError:
                    continue  # gone between listdir and read

    def total(self, what: str) -> float:
        return sum(secs for kind, secs in self.last.values() if kind == what)


def guest_download(rootfs: Path, net: nets.Net, url: str, timeout: float) -> float:
    proc = spore(
        "run",
        "-q",
        "--rootfs",
        str(rootfs),
        "--net-allow",
        f"{nets.SERVER_ADDR.rsplit('.', 1)[0]}.0/24",
        "--",
        "sh",
        "-c",
        GUEST_SCRIPT.format(url=url),
        prefix=net.exec(net.client),
        timeout=timeout,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("spore-bench ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(
            f"bench_net_guest: the guest run failed (exit {proc.returncode}): "
            f"{proc.stdout.strip()[-400:]} {proc.stderr.strip()[-800:]}"
        )
    _, a, b, status = line.split()
    if status != "0":
        raise SystemExit(f"bench_net_guest: wget in the guest exited {status}")
    return max(float(b) - float(a), 0.01)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=8, help="download size (default 8 MiB)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rootfs", type=Path, help="a busybox ext4 (default: built here)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per guest run")
    args = p.parse_args()
    why = nets.available()
    if why:
        print(f"bench_net_guest: {why}", file=sys.stderr)
        return 2
    size = args.mib << 20
    url = f"http://{nets.SERVER_ADDR}:{PORT}/blob"
    with tempfile.TemporaryDirectory() as tmp, nets.namespaces() as net:
        work = Path(tmp)
        rootfs = args.rootfs or make_rootfs(work)
        www = work / "www"
        www.mkdir()
        with open(www / "blob", "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        http = nets.spawn(
            net,
            net.server,
            [sys.executable, "-m", "http.server", str(PORT), "--bind", nets.SERVER_ADDR],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=www,
        )
        try:
            time.sleep(1.0)
            download(net.exec(net.client), url, size)  # warm the server's page cache
            host, guest = [], []
            with CpuSampler(net.client) as cpu:
                for _ in range(args.runs):
                    host.append(download(net.exec(net.client), url, size))
                    guest.append(guest_download(rootfs, net, url, args.timeout))
        finally:
            nets.stop(http)
    mb = size / 1e6
    host_rate, guest_rate = mb / statistics.median(host), mb / statistics.median(guest)
    print(
        f"bench_net_guest: {args.mib} MiB over HTTP from {nets.SERVER_ADDR}, median of "
        f"{args.runs} alternating runs\n"
        f"  host (client namespace): {host_rate:8.2f} MB/s\n"
        f"  guest (virtio-net, gateway, passt): {guest_rate:8.2f} MB/s "
        f"(runs: {', '.join(f'{g:.2f} s' for g in guest)})\n"
        f"  ratio guest/host: {guest_rate / host_rate:.4f}\n"
        f"  CPU ms per MB during the guest runs: gateway "
        f"{1000 * cpu.total('gateway') / (mb * args.runs):.1f}, passt "
        f"{1000 * cpu.total('passt') / (mb * args.runs):.1f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
