"""One guest frame in, one verdict out: the gateway's logic without any I/O.

``EgressFilter.from_guest`` classifies a frame the guest sent: forward it to passt
(a flow the policy allows), answer it here (ARP for the gateway's address, DNS sent
to the gateway), hand a DNS question to the resolver, or drop it. ``dns_answer``
turns the resolver's result into the guest's reply and learns the addresses it
grants. Every decision is reported to ``log`` as a dict (``decisionlog`` writes it
as a JSON line). Frames from passt are not classified: passt only carries flows the
guest opened through this filter (it forwards no ports), and ``frames`` bounds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sporevm.egress import dns, packets
from sporevm.egress.learned import Learned
from sporevm.egress.packets import PacketError
from sporevm.egress.policy import (
    Decision,
    Flow,
    Policy,
    Proto,
    aton,
    decide,
    floor_reason,
    normalize_name,
    ntoa,
)

MAX_FLOWS = 4096  # flow decisions cached (an evicted flow is simply decided again)
MAX_DNS_TTL = 300  # the longest TTL handed to the guest
DNS_PORT = 53

Event = dict[str, Any]


@dataclass(frozen=True)
class Link:
    """The virtual link between guest and gateway (the guest is configured statically)."""

    guest_ip: int = aton("10.0.2.15")
    gateway_ip: int = aton("10.0.2.2")
    prefix: int = 24
    gateway_mac: bytes = bytes.fromhex("025350524501")  # locally administered, unicast


@dataclass(frozen=True)
class DnsTask:
    """A guest's A question for an allowed name, waiting for the host resolver."""

    query: dns.Message
    name: str  # normalized
    guest_mac: bytes
    guest_port: int


# Verdicts: what the gateway does with a guest frame.
FORWARD = "forward"


@dataclass(frozen=True)
class Reply:
    frame: bytes  # to the guest


@dataclass(frozen=True)
class Drop:
    reason: str


Verdict = str | Reply | Drop | DnsTask


@dataclass
class EgressFilter:
    link: Link
    policy: Policy
    log: Callable[[Event], None]
    learned: Learned = field(default_factory=Learned)
    flows: dict[tuple[int, int, int, int], Decision] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)

    # --- guest → gateway ---------------------------------------------------------------

    def from_guest(self, frame: bytes, now: float) -> Verdict:
        try:
            eth = packets.parse_ether(frame)
            if eth.ethertype == packets.ETHERTYPE_IPV4:
                return self._ipv4(frame, eth.src, now)
            if eth.ethertype == packets.ETHERTYPE_ARP:
                return self._arp(frame)
            return self._drop(f"ethertype-{eth.ethertype:#06x}")
        except PacketError as e:
            return self._drop(str(e))

    def _arp(self, frame: bytes) -> Verdict:
        arp = packets.parse_arp(frame)
        if arp.op == 1 and arp.tpa == self.link.gateway_ip and arp.spa == self.link.guest_ip:
            return Reply(packets.arp_reply(self.link.gateway_mac, self.link.gateway_ip, arp))
        return self._drop("arp-ignored")  # probes, gratuitous ARP, other targets

    def _ipv4(self, frame: bytes, src_mac: bytes, now: float) -> Verdict:
        ip = packets.parse_ipv4(frame)
        if ip.src != self.link.guest_ip:
            return self._drop("ipv4-source-not-guest")
        if ip.fragment:
            return self._drop("ipv4-fragment")  # no ports to decide on; the guest uses PMTU
        if ip.options:
            return self._drop("ipv4-options")
        if ip.proto == packets.PROTO_UDP:
            udp = packets.parse_udp(frame, ip)
            if ip.dst == self.link.gateway_ip and udp.dport == DNS_PORT:
                return self._dns_query(frame[udp.payload : udp.end], src_mac, udp.sport, now)
            proto: Proto = "udp"
            sport, dport, flags, seq = udp.sport, udp.dport, 0, 0
        elif ip.proto == packets.PROTO_TCP:
            tcp = packets.parse_tcp(frame, ip)
            proto = "tcp"
            sport, dport, flags, seq = tcp.sport, tcp.dport, tcp.flags, tcp.seq
        else:
            return self._drop(f"ipv4-protocol-{ip.proto}")
        key = (ip.proto, sport, ip.dst, dport)
        decision = self.flows.get(key)
        if decision is None:
            decision = decide(self.policy, self.learned, Flow(proto, ip.dst, dport), now)
            if len(self.flows) >= MAX_FLOWS:
                del self.flows[next(iter(self.flows))]  # the oldest decision
            self.flows[key] = decision
            self.log(
                {
                    "event": "flow",
                    "proto": proto,
                    "sport": sport,
                    "dst": ntoa(ip.dst),
                    "dport": dport,
                    "allow": decision.allow,
                    "reason": decision.reason,
                    "rule": decision.rule,
                }
            )
        if decision.allow:
            return FORWARD
        if flags & packets.TCP_SYN and not flags & packets.TCP_ACK:
            # Refuse a connection at once (RST) rather than let the guest retry for minutes.
            seg = packets.tcp(
                ip.dst,
                ip.src,
                dport,
                sport,
                0,
                seq + 1,
                packets.TCP_RST | packets.TCP_ACK,
                window=0,
            )
            return Reply(
                packets.ether(
                    src_mac,
                    self.link.gateway_mac,
                    packets.ETHERTYPE_IPV4,
                    packets.ipv4(ip.dst, ip.src, packets.PROTO_TCP, seg),
                )
            )
        return Drop(decision.reason)

    def _drop(self, reason: str) -> Drop:
        n = self.drops.get(reason, 0) + 1
        self.drops[reason] = n
        if math.log10(n).is_integer():  # 1, 10, 100, …: a flood costs a few lines
            self.log({"event": "drop", "reason": reason, "count": n})
        return Drop(reason)

    # --- DNS ---------------------------------------------------------------------------

    def _dns_query(self, payload: bytes, guest_mac: bytes, guest_port: int, now: float) -> Verdict:
        try:
            query = dns.parse(payload)
        except dns.DnsError as e:
            return self._drop(f"dns-{e}")
        if query.is_response:
            return self._drop("dns-not-a-query")
        if query.opcode != 0 or len(query.questions) != 1:
            rcode = dns.NOTIMP if query.opcode != 0 else dns.FORMERR
            return self._dns_reply(query, guest_mac, guest_port, rcode)
        q = query.questions[0]
        name = normalize_name(q.name)
        if name is None or q.qclass != dns.CLASS_IN or not self.policy.resolves(name):
            self.log(
                {
                    "event": "dns",
                    "name": q.name.lower()[:253],
                    "qtype": q.qtype,
                    "allow": False,
                    "reason": "name-not-allowed",
                }
            )
            return self._dns_reply(query, guest_mac, guest_port, dns.REFUSED)
        if q.qtype != dns.TYPE_A:
            return self._dns_reply(query, guest_mac, guest_port, dns.NOERROR)  # no data: IPv4 only
        return DnsTask(query, name, guest_mac, guest_port)

    def dns_answer(self, task: DnsTask, result: dns.Chain | str, now: float) -> Reply:
        """The reply to ``task`` given the resolver's chain, or the reason it failed."""
        event: Event = {"event": "dns", "name": task.name, "qtype": dns.TYPE_A}
        if isinstance(result, str):
            self.log({**event, "allow": False, "reason": result})
            rcode = dns.NXDOMAIN if result == "nxdomain" else dns.SERVFAIL
            return self._dns_reply(task.query, task.guest_mac, task.guest_port, rcode)
        good: list[int] = []
        refused: list[dict[str, str]] = []
        for addr in result.addresses:
            why = floor_reason(self.policy, addr)
            if why is None:
                good.append(addr)
            else:  # rebinding: an allowed name pointing into the floor
                refused.append({"address": ntoa(addr), "reason": why})
        ttl = min(result.ttl, MAX_DNS_TTL)
        for e in self.policy.name_rules(task.name):
            for addr in good:
                self.learned.learn(addr, e.text, e.port, ttl, now)
        event.update(
            cname=list(result.names[1:]), addresses=[ntoa(a) for a in good], refused=refused
        )
        if refused and not good:
            self.log({**event, "allow": False, "reason": "rebinding"})
            return self._dns_reply(task.query, task.guest_mac, task.guest_port, dns.REFUSED)
        rules = [e.text for e in self.policy.name_rules(task.name)] or ["public"]
        self.log({**event, "allow": True, "reason": "name-allowed", "rule": rules})
        return self._dns_reply(
            task.query, task.guest_mac, task.guest_port, dns.NOERROR, tuple(good), ttl
        )

    def _dns_reply(
        self,
        query: dns.Message,
        guest_mac: bytes,
        guest_port: int,
        rcode: int,
        addresses: tuple[int, ...] = (),
        ttl: int = 0,
    ) -> Reply:
        payload = dns.build_response(query, rcode, addresses, ttl)
        return Reply(
            packets.udp_frame(
                guest_mac,
                self.link.gateway_mac,
                self.link.gateway_ip,
                self.link.guest_ip,
                DNS_PORT,
                guest_port,
                payload,
            )
        )
