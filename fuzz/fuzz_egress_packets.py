"""Fuzz guest frames through the egress filter (sporevm/egress/filter.py over packets.py):
the input is one Ethernet frame, raw and also behind a valid Ethernet+IPv4 prefix, under
policies of every kind; only a verdict may come out (never an exception), a refused flow
is never forwarded, and any reply is a frame the header parsers accept. The same bytes
are also parsed as an rtnetlink datagram (hostaddrs.parse)."""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.egress import hostaddrs, packets
    from sporevm.egress.filter import FORWARD, DnsTask, Drop, EgressFilter, Link, Reply
    from sporevm.egress.policy import Policy, aton, floor_reason

LINK = Link()
GUEST_MAC = bytes.fromhex("02000000000f")
POLICIES = [
    Policy.parse(p, LINK.gateway_ip, [aton("192.0.2.2")])
    for p in (["public"], ["198.51.100.0/24", "a.example:443"], [], ["a.example"])
]
PREFIX = packets.tcp_frame(
    LINK.gateway_mac,
    GUEST_MAC,
    LINK.guest_ip,
    aton("198.51.100.2"),
    40000,
    80,
    1,
    0,
    packets.TCP_SYN,
)[:14]


def _ip_frame(body: bytes) -> bytes:
    """A valid IPv4 header around fuzzed transport bytes (checksums right, fields chosen)."""
    fdp = atheris.FuzzedDataProvider(body)
    proto = fdp.PickValueInList([6, 17, 1, 6, 17])
    dst = fdp.ConsumeIntInRange(0, 2**32 - 1)
    if fdp.ConsumeBool():
        dst = LINK.gateway_ip
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    return packets.ether(
        LINK.gateway_mac,
        GUEST_MAC,
        packets.ETHERTYPE_IPV4,
        packets.ipv4(LINK.guest_ip, dst, proto, rest),
    )


def TestOneInput(data: bytes) -> None:
    for i, frame in enumerate((data, PREFIX + data, _ip_frame(data))):
        filt = EgressFilter(LINK, POLICIES[i % len(POLICIES)], lambda e: None)
        v = filt.from_guest(frame, 0.0)
        assert v is FORWARD or isinstance(v, (Drop, Reply, DnsTask))
        if v is FORWARD:
            ip = packets.parse_ipv4(frame)
            assert floor_reason(filt.policy, ip.dst) is None
        if isinstance(v, Reply):
            eth = packets.parse_ether(v.frame)
            if eth.ethertype == packets.ETHERTYPE_IPV4:
                packets.parse_ipv4(v.frame)
            else:
                packets.parse_arp(v.frame)
    found, _ = hostaddrs.parse(data)
    assert all(0 <= a < 2**32 for a in found)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
