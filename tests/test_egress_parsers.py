"""The gateway's parsers: the frame stream, packet headers, DNS messages, netlink.

Each is fed well-formed input (round trips with the builders), each bound at the
limit and one past it, and random bytes (hypothesis): only the parser's own error
may come out, never another exception.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sporevm.egress import dns, frames, hostaddrs, packets
from sporevm.egress.packets import PacketError
from sporevm.egress.policy import aton
from tests import egress_guest as g

# --- frame stream -----------------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(st.binary(min_size=0, max_size=300), max_size=20), st.data())
def test_frames_survive_any_chunking(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frames.encode(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader, got = frames.FrameReader(), []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += reader.feed(stream[a:b])
    assert got == payloads and reader.pending == 0
    split_reader, whole = frames.FrameReader(), b""
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        whole += split_reader.split(stream[a:b])[0]
    assert whole == stream


def test_frame_length_bound_poisons_the_stream() -> None:
    at = frames.MAX_FRAME
    assert frames.FrameReader().feed(struct.pack("!I", at) + b"x" * at) == [b"x" * at]
    reader = frames.FrameReader()
    with pytest.raises(frames.FrameError, match="65537"):
        reader.feed(struct.pack("!I", at + 1))
    with pytest.raises(frames.FrameError):
        reader.feed(frames.encode(b"fine"))  # nothing after a broken framing is trusted
    with pytest.raises(frames.FrameError):
        frames.encode(b"x" * (at + 1))
    assert frames.FrameReader().feed(b"\0\0\0\0") == [b""]  # delimited; the filter drops it


def test_reader_holds_at_most_one_partial_frame() -> None:
    reader = frames.FrameReader()
    reader.feed(struct.pack("!I", frames.MAX_FRAME) + b"y" * 1000)
    assert reader.pending == 1004


# --- packet headers ---------------------------------------------------------------------


def test_tcp_and_udp_frames_round_trip() -> None:
    f = g.syn("198.51.100.2", 80, sport=40000, seq=7)
    s = g.seen(f)
    assert s.ip is not None and s.tcp is not None
    assert (s.ip.src, s.ip.dst, s.tcp.sport, s.tcp.dport, s.tcp.seq) == (
        g.LINK.guest_ip,
        aton("198.51.100.2"),
        40000,
        80,
        7,
    )
    assert s.tcp.flags == packets.TCP_SYN and not s.ip.fragment and not s.ip.options
    u = g.seen(g.udp("198.51.100.2", 9, b"hello"))
    assert u.udp is not None and u.payload == b"hello"


def test_checksums_verify() -> None:
    f = bytearray(g.udp("198.51.100.2", 9))
    ip = packets.parse_ipv4(bytes(f))
    pseudo = (
        ip.src.to_bytes(4, "big")
        + ip.dst.to_bytes(4, "big")
        + b"\0\x11"
        + (ip.end - ip.payload).to_bytes(2, "big")
    )
    assert packets.checksum(pseudo + bytes(f[ip.payload : ip.end])) == 0
    f[packets.ETH_HLEN + 8] ^= 1  # TTL changed, header checksum now wrong
    with pytest.raises(PacketError, match="ipv4-checksum"):
        packets.parse_ipv4(bytes(f))


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda f: f[:13], "ether-short"),
        (lambda f: f[: 14 + 19], "ipv4-short"),
        (lambda f: f[:14] + bytes([0x65]) + f[15:], "ipv4-version"),
        (lambda f: f[:14] + bytes([0x44]) + f[15:], "ipv4-header-length"),
        (lambda f: f[:-1], "ipv4-total-length"),
    ],
)
def test_malformed_headers(mutate: object, reason: str) -> None:
    frame = g.syn("198.51.100.2", 80)
    assert callable(mutate)
    with pytest.raises(PacketError, match=reason):
        bad = mutate(frame)
        packets.parse_ether(bad)
        packets.parse_tcp(bad, packets.parse_ipv4(bad))


def test_arp_round_trip() -> None:
    req = packets.parse_arp(g.arp_who_has_gateway())
    assert (req.op, req.spa, req.tpa) == (1, g.LINK.guest_ip, g.LINK.gateway_ip)
    rep = packets.parse_arp(packets.arp_reply(g.LINK.gateway_mac, g.LINK.gateway_ip, req))
    assert (rep.op, rep.sha, rep.spa, rep.tha) == (
        2,
        g.LINK.gateway_mac,
        g.LINK.gateway_ip,
        g.GUEST_MAC,
    )
    with pytest.raises(PacketError, match="arp-short"):
        packets.parse_arp(g.arp_who_has_gateway()[:40])


@settings(max_examples=1000)
@given(st.binary(max_size=120))
def test_property_headers_raise_only_packet_error(data: bytes) -> None:
    for frame in (data, g.syn("198.51.100.2", 80)[:14] + data):
        try:
            eth = packets.parse_ether(frame)
            if eth.ethertype == packets.ETHERTYPE_ARP:
                packets.parse_arp(frame)
            ip = packets.parse_ipv4(frame)
            assert ip.payload <= ip.end <= len(frame)
            for parse in (packets.parse_udp, packets.parse_tcp):
                seg = parse(frame, ip)
                assert ip.payload <= seg.payload <= seg.end <= ip.end
        except PacketError:
            pass


# --- DNS --------------------------------------------------------------------------------


def test_query_round_trip_and_response() -> None:
    q = dns.parse(dns.build_query(42, "Mirror.Example"))
    assert (q.id, q.questions, q.edns_payload) == (
        42,
        (dns.Question("Mirror.Example", dns.TYPE_A, 1),),
        dns.EDNS_PAYLOAD,
    )
    r = dns.parse(dns.build_response(q, dns.NOERROR, (aton("198.51.100.2"),), 60))
    assert r.is_response and r.id == 42 and r.questions[0].name == "Mirror.Example"
    assert [a.address for a in r.answers] == [aton("198.51.100.2")]
    assert dns.chain(r, "mirror.example").addresses == (aton("198.51.100.2"),)


def test_response_fits_512_bytes() -> None:
    name = ".".join(["a" * 63] * 3) + ".example"
    q = dns.parse(dns.build_query(1, name))
    many = tuple(aton("198.51.100.0") + i for i in range(64))
    out = dns.build_response(q, dns.NOERROR, many, 60)
    assert len(out) <= 512 and 0 < len(dns.parse(out).answers) < 64


def test_cname_chain_in_order() -> None:
    msg = dns.parse(
        g.answer(
            "deb.example",
            [
                ("deb.example", "CNAME", "cdn.example"),
                ("cdn.example", "CNAME", "edge.example"),
                ("edge.example", "A", "198.51.100.5"),
                ("edge.example", "A", "198.51.100.6"),
                ("other.example", "A", "198.51.100.66"),
            ],
        )
    )
    c = dns.chain(msg, "DEB.example")
    assert c.names == ("deb.example", "cdn.example", "edge.example")
    assert c.addresses == (aton("198.51.100.5"), aton("198.51.100.6")) and c.ttl == 120


def test_cname_chain_ignores_other_owners_and_out_of_order_links() -> None:
    msg = dns.parse(
        g.answer(
            "deb.example",
            [
                ("cdn.example", "A", "198.51.100.9"),  # before the CNAME that leads there
                ("deb.example", "CNAME", "cdn.example"),
            ],
        )
    )
    assert dns.chain(msg, "deb.example").addresses == ()
    msg = dns.parse(g.answer("deb.example", [("evil.example", "A", "198.51.100.1")]))
    assert dns.chain(msg, "deb.example").addresses == ()


@pytest.mark.parametrize(
    "records,reason",
    [
        ([("a.example", "CNAME", "b.example"), ("b.example", "CNAME", "a.example")], "cname-loop"),
        (
            [("a.example", "CNAME", "b.example"), ("a.example", "CNAME", "c.example")],
            "cname-conflict",
        ),
        (
            [
                (f"n{i}.example", "CNAME", f"n{i + 1}.example")
                for i in range(dns.MAX_CNAME_CHAIN + 1)
            ],
            "cname-chain-too-long",
        ),
    ],
)
def test_cname_chain_refusals(records: list[tuple[str, str, int | str]], reason: str) -> None:
    first = records[0][0]
    with pytest.raises(dns.DnsError, match=reason):
        dns.chain(dns.parse(g.answer(first, records)), first)


def test_cname_chain_at_the_limit() -> None:
    recs: list[tuple[str, str, int | str]] = [
        (f"n{i}.example", "CNAME", f"n{i + 1}.example") for i in range(dns.MAX_CNAME_CHAIN)
    ]
    recs.append((f"n{dns.MAX_CNAME_CHAIN}.example", "A", "198.51.100.3"))
    assert dns.chain(dns.parse(g.answer("n0.example", recs)), "n0.example").addresses


def _header(qd: int = 1, an: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 1, 0, qd, an, 0, 0)


@pytest.mark.parametrize(
    "data,reason",
    [
        (_header() + b"\xc0\x0c\0\x01\0\x01", "name-pointer-forward"),  # points at itself
        (_header() + b"\x01a\xc0\x0c\0\x01\0\x01", "name-pointer-forward"),  # a loop via a label
        (_header() + b"\x01a\xc0\x0e\0\x01\0\x01", "name-pointer-forward"),  # points ahead
        (_header() + b"\x40a\0\0\x01\0\x01", "name-label-type"),
        (_header() + b"\x03a\0\0\0\x01\0\x01", "name-characters"),
        (_header() + b"\x05abcd", "name-truncated"),
        (_header() + b"\x01a\0\0\x01", "question-truncated"),
        (_header(qd=5) + b"\0" * 40, "too-many-entries"),
        (_header(an=3) + b"\x01a\0\0\x01\0\x01", "counts-exceed"),
        (_header() + b"\x01a\0\0\x01\0\x01\0", "trailing-bytes"),
        (b"\0" * 11, "header-short"),
        (_header() + b"\0" * (dns.MAX_MESSAGE - 12 + 1), "message-too-long"),
    ],
)
def test_malformed_messages(data: bytes, reason: str) -> None:
    with pytest.raises(dns.DnsError, match=reason):
        dns.parse(data)


def test_backward_pointer_chain_is_bounded() -> None:
    # Each name points to the one before: legal, and bounded by MAX_POINTER_HOPS.
    body = b"\x01a\0"
    offsets = [12]
    for _ in range(dns.MAX_POINTER_HOPS + 2):
        offsets.append(12 + len(body))
        body += b"\x01a" + struct.pack("!H", 0xC000 | offsets[-2])
    tail = struct.pack("!H", 0xC000 | offsets[-1])
    data = _header(qd=1) + body + tail + b"\0\x01\0\x01"
    with pytest.raises(dns.DnsError, match="name-too-long|name-pointer-hops|trailing"):
        dns.parse(data)


def test_name_length_limit() -> None:
    name_253 = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert dns.read_name(dns.encode_name(name_253), 0)[0] == name_253
    with pytest.raises(dns.DnsError, match="name-too-long"):
        dns.encode_name(name_253 + "c")


@settings(max_examples=1500)
@given(st.binary(max_size=600))
def test_property_dns_raises_only_dns_error(data: bytes) -> None:
    for blob in (data, _header(qd=1, an=2) + data):
        try:
            msg = dns.parse(blob)
        except dns.DnsError:
            continue
        assert len(msg.questions) <= dns.MAX_QUESTIONS
        if msg.questions:
            try:
                dns.chain(msg, msg.questions[0].name)
            except dns.DnsError:
                pass
            assert len(dns.build_response(msg, dns.NOERROR, (1, 2, 3))) <= 512


# --- netlink (this machine's addresses) -------------------------------------------------


def _newaddr(addr: str, rta_type: int = hostaddrs.IFA_LOCAL) -> bytes:
    rta = struct.pack("=HH", 8, rta_type) + aton(addr).to_bytes(4, "big")
    body = struct.pack("=BBBBI", 2, 24, 0, 0, 1) + rta
    return struct.pack("=IHHII", 16 + len(body), hostaddrs.RTM_NEWADDR, 0, 1, 0) + body


def test_netlink_parse() -> None:
    done = struct.pack("=IHHII", 20, hostaddrs.NLMSG_DONE, 0, 1, 0) + b"\0" * 4
    found, end = hostaddrs.parse(_newaddr("192.0.2.2") + _newaddr("198.51.100.1") + done)
    assert found == {aton("192.0.2.2"), aton("198.51.100.1")} and end
    assert hostaddrs.parse(_newaddr("192.0.2.2")[:-3]) == (set(), False)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_property_netlink_never_raises(data: bytes) -> None:
    hostaddrs.parse(data)
    hostaddrs.parse(_newaddr("192.0.2.9") + data)


def test_this_machine_has_addresses() -> None:
    h = hostaddrs.HostAddresses()
    try:
        assert aton("127.0.0.1") in h.addresses
        assert h.readable() == set()
    finally:
        h.close()
