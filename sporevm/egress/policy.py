"""The egress policy: allow entries, the hard floor, and the per-flow decision.

Default deny. A flow (protocol, destination address, destination port) is decided
in this order, and the first step that speaks wins:

1. the hard floor: private, loopback, link-local, shared, benchmark, multicast and
   reserved ranges, the gateway's own address and every address of this machine —
   refused even when an allow rule covers the address or a DNS answer points there;
2. CIDR rules (``public`` is every address outside the floor);
3. addresses learned from DNS answers for allowed host names;
4. exact host:port rules (an address literal, or a learned address of a named
   ``host:port`` entry, on that port only).

``decide`` is a pure function of (policy, learned DNS state, flow, time): no I/O,
so every case is a unit or property test (tests/test_egress_policy.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from sporevm.egress import PolicyError

MAX_RULES = 256  # allow entries per policy
MAX_ENTRY_LEN = 260  # a 253-character name, ':' and a port
MAX_FLOOR_ADDRESSES = 1024  # this machine's own addresses kept in the floor


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")


def aton(text: str) -> int:
    """A dotted-quad IPv4 address, strictly (no octal, hex, short forms or zeros padding)."""
    m = _IPV4.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a dotted-quad IPv4 address")
    a, b, c, d = (int(g) for g in m.groups())
    return (a << 24) | (b << 16) | (c << 8) | d


def ntoa(addr: int) -> str:
    return f"{addr >> 24 & 255}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}"


@dataclass(frozen=True, order=True)
class Cidr:
    net: int
    prefix: int

    @property
    def mask(self) -> int:
        return (0xFFFFFFFF << (32 - self.prefix)) & 0xFFFFFFFF

    def contains(self, addr: int) -> bool:
        return (addr & self.mask) == self.net

    def covers(self, other: Cidr) -> bool:
        return self.prefix <= other.prefix and self.contains(other.net)

    def __str__(self) -> str:
        return f"{ntoa(self.net)}/{self.prefix}"


def cidr(text: str) -> Cidr:
    addr, _, bits = text.partition("/")
    return Cidr(aton(addr), int(bits))


# The floor (issue 14). Each range is named in the decision log.
FLOOR = (
    cidr("0.0.0.0/8"),
    cidr("10.0.0.0/8"),
    cidr("127.0.0.0/8"),
    cidr("169.254.0.0/16"),
    cidr("172.16.0.0/12"),
    cidr("192.168.0.0/16"),
    cidr("100.64.0.0/10"),
    cidr("192.0.0.0/24"),
    cidr("198.18.0.0/15"),
    cidr("224.0.0.0/3"),
)


def normalize_name(text: str) -> str | None:
    """Lowercase host name without the trailing dot, or None if it is not one.

    Letters, digits, '-' and '_' (service labels), labels of 1..63, ≤ 253 in all, at
    least two labels, and not all-numeric (that would read as an address).
    """
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if all(label.isdigit() for label in labels):
        return None
    return name


Kind = Literal["public", "cidr", "host", "hostport", "addrport"]


@dataclass(frozen=True)
class Entry:
    """One allow entry, canonical: ``text`` is what the log and the manifest show."""

    kind: Kind
    text: str
    net: Cidr | None = None  # cidr
    name: str | None = None  # host, hostport
    addr: int | None = None  # addrport
    port: int | None = None  # hostport, addrport


def in_fixed_floor(net: Cidr) -> Cidr | None:
    """The floor range that contains all of ``net``, if one does."""
    return next((f for f in FLOOR if f.covers(net)), None)


def parse_entry(text: str) -> Entry:
    """``public``, an IPv4 CIDR or address, ``ADDR:PORT``, a host name, or ``HOST:PORT``."""
    where = f"network allow entry {text[:80]!r}"
    if not isinstance(text, str) or not text or len(text) > MAX_ENTRY_LEN:
        raise PolicyError(f"{where}: must be 1..{MAX_ENTRY_LEN} characters")
    if text == "public":
        return Entry("public", "public")
    if "/" in text:
        addr, _, bits = text.partition("/")
        if not bits.isdigit() or len(bits) > 2 or int(bits) > 32 or bits != str(int(bits)):
            raise PolicyError(f"{where}: the prefix length must be 0..32")
        net = _address(addr, where)
        prefix = int(bits)
        block = Cidr(net, prefix)
        if block.net & ~block.mask & 0xFFFFFFFF:
            raise PolicyError(
                f"{where}: host bits are set; did you mean {ntoa(net & block.mask)}/{prefix}?"
            )
        return Entry("cidr", str(block), net=_outside_floor(block, where))
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    port = None
    if sep:
        if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
            raise PolicyError(f"{where}: the port must be 1..65535")
        port = int(port_text)
    if _IPV4.fullmatch(host):
        ip = aton(host)
        _outside_floor(Cidr(ip, 32), where)
        if port is None:
            return Entry("cidr", f"{host}/32", net=Cidr(ip, 32))
        return Entry("addrport", f"{host}:{port}", addr=ip, port=port)
    name = normalize_name(host)
    if name is None:
        raise PolicyError(
            f"{where}: not a host name, IPv4 address or CIDR, host:port, "
            "or 'public' (IPv6 is not supported yet)"
        )
    if port is None:
        return Entry("host", name, name=name)
    return Entry("hostport", f"{name}:{port}", name=name, port=port)


def _address(text: str, where: str) -> int:
    try:
        return aton(text)
    except ValueError:
        raise PolicyError(f"{where}: {text!r} is not a dotted-quad IPv4 address") from None


def _outside_floor(block: Cidr, where: str) -> Cidr:
    floor = in_fixed_floor(block)
    if floor is not None:
        raise PolicyError(
            f"{where}: lies inside the floor ({floor}); guests never reach "
            "private, loopback, link-local or reserved addresses"
        )
    return block


@dataclass(frozen=True)
class Policy:
    """Allow entries plus the floor's per-host part (the gateway's address, this machine's)."""

    entries: tuple[Entry, ...]
    gateway: int
    host_addresses: frozenset[int] = frozenset()
    public: bool = field(init=False)
    cidrs: tuple[Entry, ...] = field(init=False)
    addrports: frozenset[tuple[int, int]] = field(init=False)
    names: dict[str, tuple[Entry, ...]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.entries) > MAX_RULES:
            raise PolicyError(f"network: {len(self.entries)} allow entries; at most {MAX_RULES}")
        if len(self.host_addresses) > MAX_FLOOR_ADDRESSES:
            raise PolicyError(
                f"network: this machine has {len(self.host_addresses)} "
                f"addresses; the floor keeps at most {MAX_FLOOR_ADDRESSES}"
            )
        names: dict[str, list[Entry]] = {}
        for e in self.entries:
            if e.name is not None:
                names.setdefault(e.name, []).append(e)
        set_ = object.__setattr__  # frozen: derived fields are computed once, here
        set_(self, "public", any(e.kind == "public" for e in self.entries))
        set_(self, "cidrs", tuple(e for e in self.entries if e.kind == "cidr"))
        set_(
            self,
            "addrports",
            frozenset(
                (e.addr, e.port)
                for e in self.entries
                if e.kind == "addrport" and e.addr is not None and e.port is not None
            ),
        )
        set_(self, "names", {k: tuple(v) for k, v in names.items()})

    @classmethod
    def parse(
        cls, texts: Iterable[str], gateway: int, host_addresses: Iterable[int] = ()
    ) -> Policy:
        texts = list(texts)
        if len(texts) > MAX_RULES:
            raise PolicyError(f"network: {len(texts)} allow entries; at most {MAX_RULES}")
        entries: dict[str, Entry] = {}
        for t in texts:
            e = parse_entry(t)
            entries.setdefault(e.text, e)  # duplicates collapse
        return cls(tuple(entries.values()), gateway, frozenset(host_addresses))

    def with_host_addresses(self, addrs: Iterable[int]) -> Policy:
        return Policy(self.entries, self.gateway, self.host_addresses | frozenset(addrs))

    def name_rules(self, name: str) -> tuple[Entry, ...]:
        """The entries that let ``name`` (normalized) resolve; empty → refused at DNS."""
        return self.names.get(name, ())

    def resolves(self, name: str) -> bool:
        return self.public or name in self.names

    def canonical(self) -> list[str]:
        """The entries in canonical form, sorted: what a cache key or manifest records."""
        return sorted(e.text for e in self.entries)


def floor_reason(policy: Policy, addr: int) -> str | None:
    """Why ``addr`` is in the floor, or None. Checked before anything else, always."""
    if addr == policy.gateway:
        return "floor:gateway"
    if addr in policy.host_addresses:
        return "floor:host-address"
    for f in FLOOR:
        if f.contains(addr):
            return f"floor:{f}"
    return None


class LearnedView(Protocol):
    def lookup(self, addr: int, now: float) -> Sequence[tuple[str, int | None]]:
        """(entry text, port or None) for every live DNS-learned grant of ``addr``."""
        ...


Proto = Literal["tcp", "udp"]


@dataclass(frozen=True)
class Flow:
    proto: Proto
    dst: int
    dport: int


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str  # floor:<range>|floor:gateway|floor:host-address|public|cidr|dns|host:port|default
    rule: str | None = None  # the entry that allowed it


def decide(policy: Policy, learned: LearnedView, flow: Flow, now: float) -> Decision:
    floor = floor_reason(policy, flow.dst)
    if floor is not None:
        return Decision(False, floor)
    if policy.public:
        return Decision(True, "public", "public")
    for e in policy.cidrs:
        if e.net is not None and e.net.contains(flow.dst):
            return Decision(True, "cidr", e.text)
    grants = learned.lookup(flow.dst, now)
    for rule, port in grants:
        if port is None:
            return Decision(True, "dns", rule)
    if (flow.dst, flow.dport) in policy.addrports:
        return Decision(True, "host:port", f"{ntoa(flow.dst)}:{flow.dport}")
    for rule, port in grants:
        if port == flow.dport:
            return Decision(True, "host:port", rule)
    return Decision(False, "default")
