"""The gateway process for real: jailed, in front of a real passt, with a fake VM side.

The test holds the VM end of the socketpair and writes Ethernet frames as a guest
would (``tests/egress_guest.py``). Everything runs in two namespaces the test makes
(``tests/egress_netns.py``): the gateway and passt in ``client`` (this machine's stand-
in, with a fake DNS server on its loopback and a trap listener on its loopback and its
own address), an HTTP server at 198.51.100.2 in ``server`` (the internet's stand-in).
No packet leaves those namespaces.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sporevm.egress import EgressError, dns, frames, launch, packets
from sporevm.egress.policy import aton
from tests import egress_guest as g
from tests import egress_netns as nets

pytestmark = pytest.mark.skipif(nets.available() is not None, reason=str(nets.available()))

ROOT = Path(__file__).resolve().parent.parent
DNS_PORT = 5353
HTTP_PORT = 8080
BODY = b"hello from the test server\n"


class FakeVM:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = frames.FrameReader()
        self.backlog: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frames.encode(frame))

    def expect(self, match: Callable[[g.Seen], bool], timeout: float = 5.0) -> g.Seen:
        deadline = time.monotonic() + timeout
        while True:
            while self.backlog:
                s = g.seen(self.backlog.pop(0))
                if match(s):
                    return s
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the guest saw no matching frame")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            assert data, "the gateway closed the VM channel"
            self.backlog += self.reader.feed(data)

    def quiet(self, match: Callable[[g.Seen], bool], seconds: float) -> None:
        with pytest.raises(AssertionError, match="no matching frame"):
            self.expect(match, seconds)


def _dns_reply(vm: FakeVM, ident: int) -> dns.Message:
    s = vm.expect(lambda s: s.udp is not None and s.udp.sport == 53 and s.dns.id == ident)
    return s.dns


class Rig:
    def __init__(
        self, vm: FakeVM, gw: launch.GatewayProcess, log: Path, trap: subprocess.Popen[bytes]
    ) -> None:
        self.vm, self.gw, self.log, self.trap = vm, gw, log, trap

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_text().splitlines()]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("egress")
    (tmp / "www").mkdir()
    (tmp / "www" / "hello.txt").write_bytes(BODY)
    py = [sys.executable, "-m"]
    with nets.namespaces() as net:
        procs = []
        try:
            kw: dict[str, Any] = {"stdout": subprocess.PIPE, "cwd": ROOT}
            dnsd = nets.spawn(
                net, net.client, [*py, "tests.egress_netns", "dnsd", str(DNS_PORT)], **kw
            )
            trap = nets.spawn(
                net,
                net.client,
                [*py, "tests.egress_netns", "trap", str(HTTP_PORT), "127.0.0.1", nets.CLIENT_ADDR],
                **kw,
            )
            http = nets.spawn(
                net,
                net.server,
                [
                    *py,
                    "http.server",
                    str(HTTP_PORT),
                    "--bind",
                    nets.SERVER_ADDR,
                    "--directory",
                    str(tmp / "www"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs += [dnsd, trap, http]
            assert nets.wait_for_line(dnsd) == b"ready\n"
            assert nets.wait_for_line(trap) == b"ready\n"
            ours, theirs = socket.socketpair()
            log = tmp / "net.log"
            gw = launch.start(
                theirs.fileno(),
                ["mirror.test", "rebind.test"],
                prefix=net.exec(net.client),
                log=log,
                resolvers=[f"127.0.0.1:{DNS_PORT}"],
                hosts="",
            )
            theirs.close()
            _wait_http(net)
            yield Rig(FakeVM(ours), gw, log, trap)
            ours.close()
            assert gw.stop() == 0
        finally:
            for p in procs:
                nets.stop(p)


def _wait_http(net: nets.Net) -> None:
    for _ in range(100):
        r = subprocess.run(
            [
                *net.exec(net.server),
                sys.executable,
                "-c",
                f"import socket; socket.create_connection(('{nets.SERVER_ADDR}', {HTTP_PORT}), 1)",
            ],
            capture_output=True,
        )
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the test HTTP server did not start")


def test_gateway_is_jailed_and_passt_is_configured(rig: Rig) -> None:
    assert rig.gw.jail.startswith("landlock-abi-") and rig.gw.jail.endswith("+seccomp")
    cmdline = Path(f"/proc/{rig.gw.passt_pid}/cmdline").read_bytes().split(b"\0")
    for flag in (b"--no-map-gw", b"--one-off", b"--no-dhcp"):
        assert flag in cmdline
    assert cmdline[cmdline.index(b"--tcp-ports") + 1] == b"none"
    assert cmdline[cmdline.index(b"--udp-ports") + 1] == b"none"
    start = rig.events()[0]
    assert start["event"] == "start" and start["policy"] == ["mirror.test", "rebind.test"]
    assert nets.CLIENT_ADDR in start["host_addresses"]


def test_arp_for_the_gateway(rig: Rig) -> None:
    rig.vm.send(g.arp_who_has_gateway())
    s = rig.vm.expect(lambda s: s.ip is None and len(s.frame) >= 42)
    assert packets.parse_arp(s.frame).spa == g.LINK.gateway_ip


def test_allowed_name_is_answered_through_a_cname_chain(rig: Rig) -> None:
    rig.vm.send(g.dns_query("mirror.test", ident=101))
    r = _dns_reply(rig.vm, 101)
    assert r.rcode == dns.NOERROR and [a.address for a in r.answers] == [aton(nets.SERVER_ADDR)]
    ev = [e for e in rig.events() if e["event"] == "dns" and e["name"] == "mirror.test"][-1]
    assert ev["allow"] and ev["cname"] == ["cdn.mirror.test", "edge.cdn.test"]


def test_unlisted_name_is_refused(rig: Rig) -> None:
    rig.vm.send(g.dns_query("direct.test", ident=102))
    assert _dns_reply(rig.vm, 102).rcode == dns.REFUSED
    assert any(
        e.get("name") == "direct.test" and e["reason"] == "name-not-allowed" for e in rig.events()
    )


def test_rebinding_answer_is_refused(rig: Rig) -> None:
    rig.vm.send(g.dns_query("rebind.test", ident=103))
    assert _dns_reply(rig.vm, 103).rcode == dns.REFUSED
    ev = [e for e in rig.events() if e.get("name") == "rebind.test"][-1]
    assert ev["reason"] == "rebinding"
    assert {r["address"] for r in ev["refused"]} == {"127.0.0.1", nets.CLIENT_ADDR}
    assert all(r["reason"].startswith("floor:") for r in ev["refused"])


@pytest.mark.parametrize("dst", ["127.0.0.1", nets.CLIENT_ADDR, "10.0.2.2"])
def test_syn_to_refused_address_is_dropped_and_logged(rig: Rig, dst: str) -> None:
    sport = 41000 + int(aton(dst) & 0xFF)
    rig.vm.send(g.syn(dst, HTTP_PORT, sport=sport))
    rst = rig.vm.expect(lambda s: s.tcp is not None and s.tcp.dport == sport)
    assert rst.tcp is not None and rst.tcp.flags & packets.TCP_RST  # answered here, not by dst
    ev = [e for e in rig.events() if e["event"] == "flow" and e["sport"] == sport][-1]
    assert ev["allow"] is False and ev["reason"].startswith("floor:") and ev["dst"] == dst
    rig.vm.quiet(
        lambda s: (
            s.tcp is not None and s.tcp.dport == sport and bool(s.tcp.flags & packets.TCP_SYN)
        ),
        0.5,
    )


def test_tcp_to_allowed_address_reaches_the_http_server(rig: Rig) -> None:
    rig.vm.send(g.dns_query("mirror.test", ident=104))
    assert _dns_reply(rig.vm, 104).answers  # learned (again)
    sport, seq = 42000, 5000
    rig.vm.send(g.syn(nets.SERVER_ADDR, HTTP_PORT, sport=sport, seq=seq))
    synack = rig.vm.expect(lambda s: s.tcp is not None and s.tcp.dport == sport)
    assert synack.tcp is not None
    assert (
        synack.tcp.flags & (packets.TCP_SYN | packets.TCP_ACK) == packets.TCP_SYN | packets.TCP_ACK
        and synack.tcp.ack == seq + 1
    )
    theirs = synack.tcp.seq + 1
    request = b"GET /hello.txt HTTP/1.0\r\nHost: mirror.test\r\n\r\n"

    def send(flags: int, payload: bytes = b"") -> None:
        rig.vm.send(
            packets.tcp_frame(
                g.LINK.gateway_mac,
                g.GUEST_MAC,
                g.LINK.guest_ip,
                aton(nets.SERVER_ADDR),
                sport,
                HTTP_PORT,
                seq + 1,
                theirs,
                flags,
                payload,
            )
        )

    send(packets.TCP_ACK)
    send(packets.TCP_ACK | packets.TCP_PSH, request)
    seq += len(request)
    got = b""
    while BODY not in got:
        s = rig.vm.expect(lambda s: s.tcp is not None and s.tcp.dport == sport)
        assert s.tcp is not None and not s.tcp.flags & packets.TCP_RST
        if s.payload:
            got += s.payload
            theirs = s.tcp.seq + len(s.payload)
            send(packets.TCP_ACK)
    assert got.startswith(b"HTTP/1.0 200") and got.endswith(BODY)
    ev = [e for e in rig.events() if e["event"] == "flow" and e["sport"] == sport][-1]
    assert ev["allow"] and ev["reason"] == "dns" and ev["rule"] == "mirror.test"


def test_trap_listener_saw_nothing(rig: Rig) -> None:
    """Last: no refused connection reached this machine's loopback or its own address."""
    with pytest.raises(AssertionError, match="no line"):
        nets.wait_for_line(rig.trap, timeout=0.5)


@pytest.mark.parametrize("prefix", [["false"], ["sh", "-c", "exit 3", "gateway"]])
def test_a_gateway_that_dies_at_start_is_named_in_the_error(prefix: list[str]) -> None:
    # The whole process group is gone by the time spore cleans up: that must not turn
    # into ESRCH ("No such process") in place of the gateway's own failure.
    ours, theirs = socket.socketpair()
    with ours, theirs, pytest.raises(EgressError, match=r"egress gateway exited with"):
        launch.start(theirs.fileno(), [], prefix=prefix)
