"""Fuzz DNS messages (sporevm/egress/dns.py): as an upstream answer to a pending question
(resolver.Resolver.answer) and as a guest's query through the filter. Only DnsError may
escape the parser; a parsed message's chain never yields more addresses than it has A
records; a reply to the guest always parses and fits 512 bytes; no floor address is
ever learned."""

import socket
import sys

import atheris

with atheris.instrument_imports():
    from sporevm.egress import dns, packets
    from sporevm.egress.filter import DnsTask, EgressFilter, Link, Reply
    from sporevm.egress.policy import Policy, aton, floor_reason
    from sporevm.egress.resolver import Resolver

LINK = Link()
GUEST_MAC = bytes.fromhex("02000000000f")
CLIENT, SERVER = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
POLICY = Policy.parse(["a.example", "b.example:443"], LINK.gateway_ip, [aton("192.0.2.2")])


def _task(filt: EgressFilter, name: str) -> DnsTask:
    frame = packets.udp_frame(
        LINK.gateway_mac,
        GUEST_MAC,
        LINK.guest_ip,
        LINK.gateway_ip,
        5353,
        53,
        dns.build_query(1, name),
    )
    t = filt.from_guest(frame, 0.0)
    assert isinstance(t, DnsTask)
    return t


def TestOneInput(data: bytes) -> None:
    try:
        msg = dns.parse(data)
    except dns.DnsError:
        msg = None
    if msg is not None:
        for q in msg.questions:
            try:
                c = dns.chain(msg, q.name)
                assert len(c.addresses) <= sum(r.address is not None for r in msg.answers)
            except dns.DnsError:
                pass
    filt = EgressFilter(LINK, POLICY, lambda e: None)
    qid = int.from_bytes(data[:2].ljust(2, b"\0"), "big")
    res = Resolver([CLIENT], {}, random16=lambda: qid)
    assert res.submit(_task(filt, "a.example"), 0.0) == []
    SERVER.recv(4096)  # the query the resolver sent; the input answers it
    for t, result in res.answer(data, 0.0):
        reply = filt.dns_answer(t, result, 0.0)
        assert len(reply.frame) <= 14 + 20 + 8 + 512
        ip = packets.parse_ipv4(reply.frame)
        dns.parse(reply.frame[ip.payload + 8 : ip.end])
    for addr in filt.learned.addresses():
        assert floor_reason(POLICY, addr) is None
    frame = packets.udp_frame(
        LINK.gateway_mac, GUEST_MAC, LINK.guest_ip, LINK.gateway_ip, 5353, 53, data
    )
    v = filt.from_guest(frame, 0.0)
    if isinstance(v, Reply):
        ip = packets.parse_ipv4(v.frame)
        assert len(dns.parse(v.frame[ip.payload + 8 : ip.end]).answers) == 0


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
