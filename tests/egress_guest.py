"""A fake guest for the egress gateway: frames built with ``struct`` as a guest kernel would.

Used by the unit tests of the filter and by the integration test, which writes these
frames into the VM side of the gateway's socketpair.
"""

from __future__ import annotations

from dataclasses import dataclass

from sporevm.egress import dns, packets
from sporevm.egress.filter import Link
from sporevm.egress.policy import aton

GUEST_MAC = bytes.fromhex("02000000000f")
LINK = Link()


def dns_query(
    name: str,
    qtype: int = dns.TYPE_A,
    ident: int = 0x1234,
    sport: int = 40053,
    payload: bytes | None = None,
) -> bytes:
    body = payload if payload is not None else dns.build_query(ident, name, qtype)
    return packets.udp_frame(
        LINK.gateway_mac, GUEST_MAC, LINK.guest_ip, LINK.gateway_ip, sport, 53, body
    )


def syn(dst: str, dport: int, sport: int = 40000, seq: int = 1000) -> bytes:
    return packets.tcp_frame(
        LINK.gateway_mac,
        GUEST_MAC,
        LINK.guest_ip,
        aton(dst),
        sport,
        dport,
        seq,
        0,
        packets.TCP_SYN,
        mss=1460,
    )


def udp(dst: str, dport: int, payload: bytes = b"x", sport: int = 40001) -> bytes:
    return packets.udp_frame(
        LINK.gateway_mac, GUEST_MAC, LINK.guest_ip, aton(dst), sport, dport, payload
    )


def arp_who_has_gateway() -> bytes:
    return packets.arp_request(GUEST_MAC, LINK.guest_ip, LINK.gateway_ip)


@dataclass(frozen=True)
class Seen:
    """A frame the guest received, parsed."""

    frame: bytes
    ip: packets.IPv4 | None
    udp: packets.Udp | None
    tcp: packets.Tcp | None

    @property
    def dns(self) -> dns.Message:
        assert self.udp is not None and self.udp.sport == 53
        return dns.parse(self.frame[self.udp.payload : self.udp.end])

    @property
    def payload(self) -> bytes:
        if self.tcp is not None:
            return self.frame[self.tcp.payload : self.tcp.end]
        assert self.udp is not None
        return self.frame[self.udp.payload : self.udp.end]


def seen(frame: bytes) -> Seen:
    eth = packets.parse_ether(frame)
    if eth.ethertype != packets.ETHERTYPE_IPV4:
        return Seen(frame, None, None, None)
    ip = packets.parse_ipv4(frame)
    if ip.proto == packets.PROTO_UDP:
        return Seen(frame, ip, packets.parse_udp(frame, ip), None)
    if ip.proto == packets.PROTO_TCP:
        return Seen(frame, ip, None, packets.parse_tcp(frame, ip))
    return Seen(frame, ip, None, None)


def answer(
    query_name: str,
    records: list[tuple[str, str, int | str]],
    ident: int = 7,
    rcode: int = dns.NOERROR,
    tc: bool = False,
) -> bytes:
    """An upstream answer: records are (owner, 'A' or 'CNAME', address or target), TTL 120."""
    import struct

    flags = dns.FLAG_QR | dns.FLAG_RD | dns.FLAG_RA | rcode | (dns.FLAG_TC if tc else 0)
    out = struct.pack("!HHHHHH", ident, flags, 1, len(records), 0, 0)
    out += dns.encode_name(query_name) + struct.pack("!HH", dns.TYPE_A, dns.CLASS_IN)
    for owner, rtype, value in records:
        if rtype == "A":
            assert isinstance(value, str)
            rdata = aton(value).to_bytes(4, "big")
            out += dns.encode_name(owner) + struct.pack("!HHIH", dns.TYPE_A, 1, 120, 4) + rdata
        else:
            assert isinstance(value, str)
            rdata = dns.encode_name(value)
            out += (
                dns.encode_name(owner)
                + struct.pack("!HHIH", dns.TYPE_CNAME, 1, 120, len(rdata))
                + rdata
            )
    return out
