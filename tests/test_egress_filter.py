"""The gateway's logic without I/O: guest frames in, verdicts out; the resolver; the log."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sporevm.egress import dns, packets
from sporevm.egress.decisionlog import DecisionLog
from sporevm.egress.filter import FORWARD, MAX_FLOWS, DnsTask, Drop, EgressFilter, Reply
from sporevm.egress.policy import Policy, aton, floor_reason
from sporevm.egress.resolver import (
    MAX_PENDING,
    Resolver,
    nameservers,
    parse_server,
    read_hosts,
)
from tests import egress_guest as g

HOST = aton("192.0.2.2")
NOW = 100.0


def make(*entries: str) -> tuple[EgressFilter, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    policy = Policy.parse(entries, g.LINK.gateway_ip, [HOST])
    return EgressFilter(g.LINK, policy, events.append), events


def reply_of(v: object) -> g.Seen:
    assert isinstance(v, Reply), v
    return g.seen(v.frame)


def test_arp_for_the_gateway_is_answered() -> None:
    f, _ = make()
    rep = packets.parse_arp(reply_of(f.from_guest(g.arp_who_has_gateway(), NOW)).frame)
    assert (rep.op, rep.spa, rep.sha) == (2, g.LINK.gateway_ip, g.LINK.gateway_mac)
    other = packets.arp_request(g.GUEST_MAC, g.LINK.guest_ip, aton("10.0.2.3"))
    assert f.from_guest(other, NOW) == Drop("arp-ignored")


def test_unlisted_name_is_refused_at_dns_and_logged() -> None:
    f, events = make("mirror.example")
    r = reply_of(f.from_guest(g.dns_query("other.example"), NOW)).dns
    assert r.rcode == dns.REFUSED and r.id == 0x1234 and not r.answers
    assert events[-1] == {
        "event": "dns",
        "name": "other.example",
        "qtype": 1,
        "allow": False,
        "reason": "name-not-allowed",
    }


def test_allowed_name_goes_to_the_resolver_and_teaches_its_addresses() -> None:
    f, events = make("mirror.example")
    task = f.from_guest(g.dns_query("Mirror.Example"), NOW)
    assert isinstance(task, DnsTask) and task.name == "mirror.example"
    chain = dns.Chain(("mirror.example", "cdn.example"), (aton("198.51.100.2"),), 120)
    r = g.seen(f.dns_answer(task, chain, NOW).frame)
    assert r.udp is not None and r.udp.dport == 40053
    assert [a.address for a in r.dns.answers] == [aton("198.51.100.2")]
    assert r.dns.questions[0].name == "Mirror.Example"  # the question is echoed as asked
    assert events[-1]["allow"] and events[-1]["cname"] == ["cdn.example"]
    assert f.from_guest(g.syn("198.51.100.2", 443), NOW) is FORWARD
    assert events[-1]["reason"] == "dns" and events[-1]["rule"] == "mirror.example"
    assert isinstance(f.from_guest(g.syn("198.51.100.3", 443), NOW), Reply)  # not learned


def test_rebinding_answer_is_refused() -> None:
    f, events = make("mirror.example")
    task = f.from_guest(g.dns_query("mirror.example"), NOW)
    assert isinstance(task, DnsTask)
    chain = dns.Chain(("mirror.example",), (aton("127.0.0.1"), HOST, g.LINK.gateway_ip), 60)
    r = g.seen(f.dns_answer(task, chain, NOW).frame).dns
    assert r.rcode == dns.REFUSED and not r.answers
    assert events[-1]["reason"] == "rebinding"
    assert {x["reason"] for x in events[-1]["refused"]} == {
        "floor:127.0.0.0/8",
        "floor:host-address",
        "floor:gateway",
    }
    assert not f.learned.lookup(aton("127.0.0.1"), NOW)
    # a mixed answer keeps only what is outside the floor
    task2 = f.from_guest(g.dns_query("mirror.example", ident=9), NOW)
    assert isinstance(task2, DnsTask)
    mixed = dns.Chain(("mirror.example",), (aton("10.1.1.1"), aton("198.51.100.4")), 60)
    r2 = g.seen(f.dns_answer(task2, mixed, NOW).frame).dns
    assert [a.address for a in r2.answers] == [aton("198.51.100.4")]


def test_other_query_types_get_no_data_and_failures_servfail() -> None:
    f, _ = make("mirror.example")
    r = reply_of(f.from_guest(g.dns_query("mirror.example", dns.TYPE_AAAA), NOW)).dns
    assert (r.rcode, r.answers) == (dns.NOERROR, ())
    task = f.from_guest(g.dns_query("mirror.example"), NOW)
    assert isinstance(task, DnsTask)
    assert g.seen(f.dns_answer(task, "timeout", NOW).frame).dns.rcode == dns.SERVFAIL
    assert g.seen(f.dns_answer(task, "nxdomain", NOW).frame).dns.rcode == dns.NXDOMAIN


def test_malformed_dns_is_dropped() -> None:
    f, events = make("public")
    assert f.from_guest(g.dns_query("x", payload=b"\0" * 5), NOW) == Drop("dns-header-short")
    assert events[-1] == {"event": "drop", "reason": "dns-header-short", "count": 1}
    two = dns.build_query(1, "a.example")[:4] + b"\0\2" + dns.build_query(1, "a.example")[6:]
    assert isinstance(f.from_guest(g.dns_query("x", payload=two), NOW), Drop)


def test_syn_to_refused_addresses_gets_rst_and_is_logged() -> None:
    f, events = make("198.51.100.0/24")
    for dst, reason in (
        ("127.0.0.1", "floor:127.0.0.0/8"),
        ("10.0.2.2", "floor:gateway"),
        ("192.0.2.2", "floor:host-address"),
        ("203.0.113.9", "default"),
    ):
        rst = reply_of(f.from_guest(g.syn(dst, 8080, seq=77), NOW))
        assert rst.tcp is not None and rst.ip is not None
        assert rst.tcp.flags == packets.TCP_RST | packets.TCP_ACK and rst.tcp.ack == 78
        assert rst.ip.src == aton(dst) and rst.ip.dst == g.LINK.guest_ip
        assert events[-1]["allow"] is False and events[-1]["reason"] == reason
    assert f.from_guest(g.udp("127.0.0.1", 53), NOW) == Drop("floor:127.0.0.0/8")
    assert f.from_guest(g.syn("198.51.100.2", 80), NOW) is FORWARD


def test_a_flow_is_logged_once() -> None:
    f, events = make("198.51.100.0/24")
    for _ in range(5):
        f.from_guest(g.syn("198.51.100.2", 80), NOW)
    assert sum(e["event"] == "flow" for e in events) == 1


def test_flow_cache_is_bounded() -> None:
    f, _ = make("198.51.100.0/24")
    for port in range(MAX_FLOWS + 10):
        f.from_guest(g.syn("198.51.100.2", 80, sport=1024 + port), NOW)
    assert len(f.flows) == MAX_FLOWS


@pytest.mark.parametrize(
    "frame,reason",
    [
        (packets.ether(g.LINK.gateway_mac, g.GUEST_MAC, 0x86DD, b"\0" * 40), "ethertype-0x86dd"),
        (
            packets.tcp_frame(
                g.LINK.gateway_mac,
                g.GUEST_MAC,
                aton("10.0.2.99"),
                aton("198.51.100.2"),
                1,
                80,
                0,
                0,
                packets.TCP_SYN,
            ),
            "ipv4-source-not-guest",
        ),
        (
            packets.ether(
                g.LINK.gateway_mac,
                g.GUEST_MAC,
                0x0800,
                packets.ipv4(g.LINK.guest_ip, aton("198.51.100.2"), 1, b"\x08\0\0\0"),
            ),
            "ipv4-protocol-1",
        ),
        (b"\0" * 10, "ether-short"),
    ],
)
def test_unsupported_frames_are_dropped(frame: bytes, reason: str) -> None:
    f, _ = make("public")
    assert f.from_guest(frame, NOW) == Drop(reason)


def test_fragments_are_dropped() -> None:
    f, _ = make("public")
    frame = bytearray(g.udp("198.51.100.2", 9))
    frame[20:22] = b"\x20\x00"  # more fragments
    frame[24:26] = b"\0\0"
    frame[24:26] = packets.checksum(bytes(frame[14:34])).to_bytes(2, "big")
    assert f.from_guest(bytes(frame), NOW) == Drop("ipv4-fragment")


def test_drop_log_is_thinned() -> None:
    f, events = make()
    for _ in range(150):
        f.from_guest(b"\0" * 3, NOW)
    assert [e["count"] for e in events] == [1, 10, 100] and f.drops["ether-short"] == 150


# --- resolver -------------------------------------------------------------------------


class FakeServer:
    """A datagram socketpair: the resolver's side and the test's 'server' side."""

    def __init__(self) -> None:
        self.client, self.server = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.client.setblocking(False)

    def query(self) -> dns.Message:
        return dns.parse(self.server.recv(4096))


def _task(f: EgressFilter, name: str = "mirror.example") -> DnsTask:
    t = f.from_guest(g.dns_query(name), NOW)
    assert isinstance(t, DnsTask)
    return t


def test_resolver_round_trip_with_cname_chain() -> None:
    f, _ = make("mirror.example")
    srv = FakeServer()
    res = Resolver([srv.client], {})
    assert res.submit(_task(f), NOW) == [] and res.pending == 1
    q = srv.query()
    assert q.questions[0].name == "mirror.example" and q.flags & dns.FLAG_RD
    wrong_id = g.answer("mirror.example", [("mirror.example", "A", "198.51.100.1")], ident=q.id ^ 1)
    assert res.answer(wrong_id, NOW) == []
    srv.server.send(
        g.answer(
            "mirror.example",
            [("mirror.example", "CNAME", "cdn.example"), ("cdn.example", "A", "198.51.100.8")],
            ident=q.id,
        )
    )
    ((task, result),) = res.readable(srv.client, NOW)
    assert isinstance(result, dns.Chain) and result.addresses == (aton("198.51.100.8"),)
    assert res.pending == 0


@pytest.mark.parametrize(
    "kw,expect",
    [
        ({"rcode": dns.NXDOMAIN}, "nxdomain"),
        ({"rcode": dns.SERVFAIL}, "upstream-rcode-2"),
        ({"tc": True}, "upstream-truncated"),
    ],
)
def test_resolver_failures(kw: dict[str, Any], expect: str) -> None:
    f, _ = make("mirror.example")
    srv = FakeServer()
    res = Resolver([srv.client], {})
    res.submit(_task(f), NOW)
    q = srv.query()
    assert res.answer(g.answer("mirror.example", [], ident=q.id, **kw), NOW)[0][1] == expect


def test_resolver_times_out_over_servers_and_is_bounded() -> None:
    f, _ = make("mirror.example")
    a, b = FakeServer(), FakeServer()
    res = Resolver([a.client, b.client], {})
    res.submit(_task(f), NOW)
    deadline = res.next_deadline()
    assert deadline is not None
    t, results = deadline, []
    for _ in range(10):
        results += res.expire(t)
        if results:
            break
        t += 2.0
    assert results[0][1] == "timeout"
    assert a.query() and b.query()  # both servers were asked
    for _ in range(MAX_PENDING):
        res.submit(_task(f), NOW)
    assert res.submit(_task(f), NOW)[0][1] == "resolver-busy"


def test_hosts_file_first_and_config_parsing(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n198.51.100.2 Mirror.Example mirror2.example # c\n"
        "::1 ip6-localhost\nbogus line\n198.51.100.3 mirror.example\n"
    )
    table = read_hosts(hosts)
    assert table["mirror.example"] == (aton("198.51.100.2"), aton("198.51.100.3"))
    f, _ = make("mirror.example")
    ((_, chain),) = Resolver([], table).submit(_task(f), NOW)
    assert isinstance(chain, dns.Chain) and chain.addresses[0] == aton("198.51.100.2")
    assert Resolver([], {}).submit(_task(f), NOW)[0][1] == "no-resolver"
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "search x\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bad\n"
        "nameserver 1.1.1.1\nnameserver 8.8.8.8\n"
    )
    assert nameservers(conf) == [("192.0.2.53", 53), ("fe80::1", 53), ("1.1.1.1", 53)]
    assert parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_server("[::1]:53") == ("::1", 53)
    with pytest.raises(ValueError):
        parse_server("127.0.0.1:0")


# --- decision log -----------------------------------------------------------------------


def test_decision_log_is_json_lines_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "net.log"
    log = DecisionLog.open(str(path))
    log.limit = 300
    for i in range(10):
        log({"event": "flow", "n": i})
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["event"] == "flow" and "ts" in lines[0]
    assert lines[-1]["event"] == "log-full" and log.suppressed > 0
    assert path.stat().st_size <= 300 + 100


@settings(max_examples=500)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 65535),
    st.sampled_from([6, 17, 1]),
    st.binary(max_size=40),
    st.booleans(),
)
def test_property_filter_never_forwards_into_the_floor(
    dst: int, port: int, proto: int, tail: bytes, to_gateway: bool
) -> None:
    f, _ = make("public", "198.51.100.0/24", "a.example")
    if to_gateway:
        dst = g.LINK.gateway_ip
    if proto == packets.PROTO_TCP:
        seg = packets.tcp(g.LINK.guest_ip, dst, 40000, port, 1, 0, packets.TCP_SYN, tail)
    else:
        seg = packets.udp(g.LINK.guest_ip, dst, 40000, port, tail) if proto == 17 else tail
    frame = packets.ether(
        g.LINK.gateway_mac,
        g.GUEST_MAC,
        packets.ETHERTYPE_IPV4,
        packets.ipv4(g.LINK.guest_ip, dst, proto, seg),
    )
    v = f.from_guest(frame, NOW)
    if v is FORWARD:
        assert floor_reason(f.policy, dst) is None and proto in (6, 17)
    else:
        assert isinstance(v, (Drop, Reply, DnsTask))
