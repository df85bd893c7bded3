"""Ethernet, ARP, IPv4, UDP and TCP headers: parsed just far enough to decide a flow,
built just far enough to answer ARP and DNS.

Every parser takes the whole frame and an offset, checks each length against what
is actually there before reading it, and raises ``PacketError`` with a short stable
reason (the decision log counts drops by it). Nothing here allocates in proportion
to a length field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
BROADCAST = b"\xff" * 6

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")


class PacketError(ValueError):
    """A frame that cannot be classified; ``str(e)`` is a short reason, e.g. ``ipv4-short``."""


@dataclass(frozen=True)
class Ether:
    dst: bytes
    src: bytes
    ethertype: int


@dataclass(frozen=True)
class Arp:
    op: int  # 1 request, 2 reply
    sha: bytes
    spa: int
    tha: bytes
    tpa: int


@dataclass(frozen=True)
class IPv4:
    src: int
    dst: int
    proto: int
    ttl: int
    fragment: bool  # more-fragments set or a non-zero offset
    options: bool  # header longer than 20 bytes
    payload: int  # offset of the payload in the frame
    end: int  # offset just past the packet (frames may carry padding after it)


@dataclass(frozen=True)
class Udp:
    sport: int
    dport: int
    payload: int
    end: int


@dataclass(frozen=True)
class Tcp:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: int
    end: int


TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def parse_ether(frame: bytes) -> Ether:
    if len(frame) < ETH_HLEN:
        raise PacketError("ether-short")
    dst, src, ethertype = _ETH.unpack_from(frame, 0)
    return Ether(dst, src, ethertype)


def parse_arp(frame: bytes, off: int = ETH_HLEN) -> Arp:
    if len(frame) - off < _ARP.size:
        raise PacketError("arp-short")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, off)
    if (htype, ptype, hlen, plen) != (1, ETHERTYPE_IPV4, 6, 4) or op not in (1, 2):
        raise PacketError("arp-unsupported")
    return Arp(op, sha, int.from_bytes(spa, "big"), tha, int.from_bytes(tpa, "big"))


def parse_ipv4(frame: bytes, off: int = ETH_HLEN) -> IPv4:
    avail = len(frame) - off
    if avail < _IPV4.size:
        raise PacketError("ipv4-short")
    vihl, _tos, total, _ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(frame, off)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4:
        raise PacketError("ipv4-version")
    if ihl < 20 or ihl > avail:
        raise PacketError("ipv4-header-length")
    if total < ihl or total > avail:
        raise PacketError("ipv4-total-length")
    if checksum(frame[off : off + ihl]) != 0:
        raise PacketError("ipv4-checksum")
    return IPv4(
        int.from_bytes(src, "big"),
        int.from_bytes(dst, "big"),
        proto,
        ttl,
        fragment=bool(frag & 0x3FFF),
        options=ihl > 20,
        payload=off + ihl,
        end=off + total,
    )


def parse_udp(frame: bytes, ip: IPv4) -> Udp:
    if ip.end - ip.payload < _UDP.size:
        raise PacketError("udp-short")
    sport, dport, length, _csum = _UDP.unpack_from(frame, ip.payload)
    if length < _UDP.size or length > ip.end - ip.payload:
        raise PacketError("udp-length")
    return Udp(sport, dport, ip.payload + _UDP.size, ip.payload + length)


def parse_tcp(frame: bytes, ip: IPv4) -> Tcp:
    if ip.end - ip.payload < _TCP.size:
        raise PacketError("tcp-short")
    sport, dport, seq, ack, doff, flags, _win, _csum, _urg = _TCP.unpack_from(frame, ip.payload)
    hlen = (doff >> 4) * 4
    if hlen < _TCP.size or hlen > ip.end - ip.payload:
        raise PacketError("tcp-header-length")
    return Tcp(sport, dport, seq, ack, flags, ip.payload + hlen, ip.end)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``; 0 when a header's own field is right."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --- builders: the gateway's own answers (ARP, DNS) and test traffic ------------------------


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return _ETH.pack(dst, src, ethertype) + payload


def arp_reply(our_mac: bytes, our_ip: int, request: Arp) -> bytes:
    """The answer to ``request``: ``our_ip`` is at ``our_mac``."""
    body = _ARP.pack(
        1,
        ETHERTYPE_IPV4,
        6,
        4,
        2,
        our_mac,
        our_ip.to_bytes(4, "big"),
        request.sha,
        request.spa.to_bytes(4, "big"),
    )
    return ether(request.sha, our_mac, ETHERTYPE_ARP, body)


def arp_request(src_mac: bytes, src_ip: int, target_ip: int) -> bytes:
    body = _ARP.pack(
        1,
        ETHERTYPE_IPV4,
        6,
        4,
        1,
        src_mac,
        src_ip.to_bytes(4, "big"),
        b"\0" * 6,
        target_ip.to_bytes(4, "big"),
    )
    return ether(BROADCAST, src_mac, ETHERTYPE_ARP, body)


def ipv4(src: int, dst: int, proto: int, payload: bytes, ident: int = 0, ttl: int = 64) -> bytes:
    header = bytearray(
        _IPV4.pack(
            0x45,
            0,
            20 + len(payload),
            ident & 0xFFFF,
            0x4000,
            ttl,
            proto,
            0,
            src.to_bytes(4, "big"),
            dst.to_bytes(4, "big"),
        )
    )
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + payload


def _pseudo(src: int, dst: int, proto: int, length: int) -> bytes:
    return (
        src.to_bytes(4, "big")
        + dst.to_bytes(4, "big")
        + bytes((0, proto))
        + length.to_bytes(2, "big")
    )


def udp(src: int, dst: int, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram (header + payload) with its checksum over the pseudo-header."""
    length = _UDP.size + len(payload)
    seg = _UDP.pack(sport, dport, length, 0) + payload
    csum = checksum(_pseudo(src, dst, PROTO_UDP, length) + seg) or 0xFFFF
    return seg[:6] + csum.to_bytes(2, "big") + seg[8:]


def tcp(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    window: int = 65535,
    mss: int | None = None,
) -> bytes:
    options = b"" if mss is None else struct.pack("!BBH", 2, 4, mss)
    doff = (_TCP.size + len(options)) // 4
    seg = (
        _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, doff << 4, flags, window, 0, 0)
        + options
        + payload
    )
    csum = checksum(_pseudo(src, dst, PROTO_TCP, len(seg)) + seg)
    return seg[:16] + csum.to_bytes(2, "big") + seg[18:]


def udp_frame(
    dst_mac: bytes,
    src_mac: bytes,
    src: int,
    dst: int,
    sport: int,
    dport: int,
    payload: bytes,
    ident: int = 0,
) -> bytes:
    return ether(
        dst_mac,
        src_mac,
        ETHERTYPE_IPV4,
        ipv4(src, dst, PROTO_UDP, udp(src, dst, sport, dport, payload), ident),
    )


def tcp_frame(
    dst_mac: bytes,
    src_mac: bytes,
    src: int,
    dst: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    mss: int | None = None,
) -> bytes:
    seg = tcp(src, dst, sport, dport, seq, ack, flags, payload, mss=mss)
    return ether(dst_mac, src_mac, ETHERTYPE_IPV4, ipv4(src, dst, PROTO_TCP, seg))


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address")
    return bytes(int(p, 16) for p in parts)
