"""Network namespaces for egress tests and the bench: a stand-in host and a stand-in internet.

``client`` plays this machine for the gateway and passt: 198.51.100.1/24 on a veth
(its own address, so in the floor) and a default route to ``server``, which holds
198.51.100.2/24 — outside the floor, the "public internet". Traffic never leaves the
two namespaces this makes; deleting them removes veth, addresses and routes together.
Also runnable: ``python -m tests.egress_netns dnsd PORT`` (a fake DNS server answering
from a fixed table) and ``… trap PORT ADDR…`` (a listener that must see nothing).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sporevm.egress import dns
from tests import egress_guest

PREFIX = "spore-egt-"
CLIENT_ADDR, SERVER_ADDR = "198.51.100.1", "198.51.100.2"

# name → records the fake DNS server answers with (CNAME chains, and rebinding).
ZONE: dict[str, list[tuple[str, str, int | str]]] = {
    "mirror.test": [
        ("mirror.test", "CNAME", "cdn.mirror.test"),
        ("cdn.mirror.test", "CNAME", "edge.cdn.test"),
        ("edge.cdn.test", "A", SERVER_ADDR),
    ],
    "rebind.test": [("rebind.test", "A", "127.0.0.1"), ("rebind.test", "A", CLIENT_ADDR)],
    "direct.test": [("direct.test", "A", SERVER_ADDR)],
}


def available() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "passt"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup installs passt)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def sweep() -> None:
    """Remove namespaces left by test runs whose process is gone."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            pid = name[len(PREFIX) :].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass(frozen=True)
class Net:
    client: str
    server: str

    def exec(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


@contextmanager
def namespaces() -> Iterator[Net]:
    sweep()
    tag = f"{PREFIX}{os.getpid()}-{os.urandom(3).hex()}"
    net = Net(tag + "-c", tag + "-s")
    try:
        _ip("netns", "add", net.client)
        _ip("netns", "add", net.server)
        _ip(
            "link",
            "add",
            "egt0",
            "netns",
            net.client,
            "type",
            "veth",
            "peer",
            "name",
            "egt1",
            "netns",
            net.server,
        )
        _ip("-n", net.client, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "egt0")
        _ip("-n", net.server, "addr", "add", f"{SERVER_ADDR}/24", "dev", "egt1")
        for ns, dev in ((net.client, "egt0"), (net.server, "egt1")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", net.client, "route", "add", "default", "via", SERVER_ADDR)
        yield net
    finally:
        for ns in (net.client, net.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def spawn(net: Net, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """A process inside ``ns``, in its own session (so the whole group can be killed)."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        [*net.exec(ns), *argv], start_new_session=True, **kw
    )
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_line(proc: subprocess.Popen[bytes], timeout: float = 60) -> bytes:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    import select

    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if r:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    raise AssertionError(f"{proc.args!r}: no line within {timeout} s")


# --- helpers run inside a namespace -----------------------------------------------------


def _dnsd(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(4096)
        q = dns.parse(data)
        name = q.questions[0].name.lower()
        records = ZONE.get(name)
        rcode = dns.NOERROR if records is not None else dns.NXDOMAIN
        print(f"query {name}", flush=True)
        s.sendto(egress_guest.answer(name, records or [], ident=q.id, rcode=rcode), peer)


def _trap(port: int, addrs: list[str]) -> None:
    socks = []
    for a in addrs:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a, port))
        s.listen()
        socks.append(s)
    print("ready", flush=True)
    import select

    while True:
        r, _, _ = select.select(socks, [], [])
        for s in r:
            _, peer = s.accept()
            print(f"SAW {peer}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "dnsd":
        _dnsd(int(sys.argv[2]))
    elif sys.argv[1] == "trap":
        _trap(int(sys.argv[2]), sys.argv[3:])
