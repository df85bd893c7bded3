"""Egress throughput: a large download through the gateway + passt vs straight from the host.

Three network namespaces made for the run (tests/egress_netns.py), nothing leaves them:

* ``server`` — an HTTP server at 198.51.100.2 (outside the floor: the internet's
  stand-in) serving one file of ``--mib`` MiB of random bytes;
* ``client`` — this machine's stand-in: the gateway (jailed, ``--allow
  198.51.100.0/24``) and its passt run here, and the *direct* download runs here;
* ``guest`` — a tap device (10.0.2.15/24, default route via the gateway's 10.0.2.2,
  MTU ``--mtu``) whose frames a small relay copies to and from the gateway's VM
  socket, length-prefixed: it stands in for the VM's virtio-net device and monitor
  (phase 2), so the *gateway* download is a real Linux TCP stack on both ends.

Both downloads use the same client (curl if present, else Python) in the same run.
Prints MB/s each way, the ratio, and CPU seconds per MB of the gateway, passt and the
relay (from /proc/PID/stat). Run as root: ``.venv/bin/python bench/bench_egress.py``.
See docs/network.md ("Throughput").
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sporevm.egress import frames, launch  # noqa: E402
from tests import egress_netns as nets  # noqa: E402

PORT = 8080
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def relay(fd: int, mtu: int) -> None:
    """In the guest namespace: tap0 ⇄ the gateway's VM socket (4-byte length + frame)."""
    tap: int = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH", b"tap0", IFF_TAP | IFF_NO_PI))
    for cmd in (
        f"link set tap0 mtu {mtu} address 02:00:00:00:00:0f up",
        "addr add 10.0.2.15/24 dev tap0",
        "link set lo up",
        "route add default via 10.0.2.2",
    ):
        subprocess.run(["ip", *cmd.split()], check=True)
    sock = socket.socket(fileno=fd)
    reader = frames.FrameReader()
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([tap, sock.fileno()], [], [])
        if tap in ready:
            sock.sendall(frames.encode(os.read(tap, 65536 + 14)))
        if sock.fileno() in ready:
            data = sock.recv(1 << 20)
            if not data:
                return
            for frame in reader.feed(data):
                os.write(tap, frame)


def download(net_exec: list[str], url: str, expect: int) -> float:
    """Seconds to fetch ``url`` to /dev/null; the size must be ``expect`` bytes."""
    if shutil.which("curl"):
        argv = [
            "curl",
            "-sS",
            "--max-time",
            "600",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
            url,
        ]
        out = subprocess.run([*net_exec, *argv], check=True, capture_output=True, text=True)
        size, secs = out.stdout.split()
        assert int(size) == expect, f"got {size} of {expect} bytes"
        return float(secs)
    code = (
        "import sys,time,urllib.request as u; t=time.monotonic(); r=u.urlopen(sys.argv[1]);"
        "n=0\nwhile (b:=r.read(1<<20)): n+=len(b)\nprint(n, time.monotonic()-t)"
    )
    out = subprocess.run(
        [*net_exec, sys.executable, "-c", code, url], check=True, capture_output=True, text=True
    )
    size, secs = out.stdout.split()
    assert int(size) == expect
    return float(secs)


def one_mtu(net: nets.Net, guest_ns: str, size: int, mtu: int, runs: int) -> dict[str, float]:
    url = f"http://{nets.SERVER_ADDR}:{PORT}/blob"
    ours, theirs = socket.socketpair()
    gw = launch.start(theirs.fileno(), ["198.51.100.0/24"], prefix=net.exec(net.client))
    theirs.close()
    rel = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            guest_ns,
            sys.executable,
            __file__,
            "relay",
            str(ours.fileno()),
            str(mtu),
        ],
        pass_fds=(ours.fileno(),),
        stdout=subprocess.PIPE,
    )
    ours.close()
    try:
        assert nets.wait_for_line(rel) == b"ready\n"
        download(["ip", "netns", "exec", guest_ns], url, size)  # warm-up (ARP, caches)
        direct, via, cpu = [], [], {"gateway": 0.0, "passt": 0.0, "relay": 0.0}
        pids = {"gateway": gw.proc.pid, "passt": gw.passt_pid, "relay": rel.pid}
        for _ in range(runs):
            direct.append(download(net.exec(net.client), url, size))
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            via.append(download(["ip", "netns", "exec", guest_ns], url, size))
            for k, p in pids.items():
                cpu[k] += cpu_seconds(p) - before[k]
        mb = size / 1e6
        res = {
            "direct_MBps": mb / statistics.median(direct),
            "gateway_MBps": mb / statistics.median(via),
        }
        res["ratio"] = res["gateway_MBps"] / res["direct_MBps"]
        for k, secs in cpu.items():
            res[f"{k}_cpu_ms_per_MB"] = 1000 * secs / (mb * runs)
        for k in ("gateway", "passt"):
            res[f"{k}_rss_MiB"] = rss_mib(pids[k])
        return res
    finally:
        rel.kill()
        rel.wait()
        gw.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mtu", type=int, action="append", help="guest MTU (default: 1500, 65520)")
    args = p.parse_args()
    why = nets.available()
    if why:
        print(f"bench_egress: {why}", file=sys.stderr)
        return 2
    size = args.mib << 20
    with tempfile.TemporaryDirectory() as www, nets.namespaces() as net:
        with open(Path(www) / "blob", "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        guest_ns = net.client.removesuffix("-c") + "-g"
        subprocess.run(["ip", "netns", "add", guest_ns], check=True)
        http = nets.spawn(
            net,
            net.server,
            [
                sys.executable,
                "-m",
                "http.server",
                str(PORT),
                "--bind",
                nets.SERVER_ADDR,
                "--directory",
                www,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            print(
                f"bench_egress: {args.mib} MiB over HTTP from {nets.SERVER_ADDR}, "
                f"median of {args.runs}; CPU per MB of the gateway-side processes"
            )
            for mtu in args.mtu or [1500, 65520]:
                r = one_mtu(net, guest_ns, size, mtu, args.runs)
                print(
                    f"  guest MTU {mtu:5d}: direct {r['direct_MBps']:7.1f} MB/s, via gateway "
                    f"{r['gateway_MBps']:7.1f} MB/s, ratio {r['ratio']:.2f}; CPU ms/MB: "
                    f"gateway {r['gateway_cpu_ms_per_MB']:.2f}, passt "
                    f"{r['passt_cpu_ms_per_MB']:.2f}, relay {r['relay_cpu_ms_per_MB']:.2f}; "
                    f"RSS MiB: gateway {r['gateway_rss_MiB']:.1f}, passt "
                    f"{r['passt_rss_MiB']:.1f}",
                    flush=True,
                )
        finally:
            nets.stop(http)
            subprocess.run(["ip", "netns", "del", guest_ns], capture_output=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "relay":
        relay(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
