"""The egress policy: entries, the floor, and the order of a flow decision (issue 14)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sporevm.egress import PolicyError
from sporevm.egress.learned import MAX_HOLD_S, MIN_HOLD_S, Learned
from sporevm.egress.policy import (
    FLOOR,
    MAX_RULES,
    Decision,
    Flow,
    Policy,
    aton,
    decide,
    floor_reason,
    normalize_name,
    ntoa,
    parse_entry,
)

GW = aton("10.0.2.2")
HOST = aton("192.0.2.2")  # this machine's own address, stands for any of them
PUBLIC = aton("198.51.100.7")
NOW = 1000.0


def policy(*entries: str, host: tuple[int, ...] = (HOST,)) -> Policy:
    return Policy.parse(entries, GW, host)


def flow(addr: str | int, port: int = 443, proto: str = "tcp") -> Flow:
    return Flow(proto, aton(addr) if isinstance(addr, str) else addr, port)  # type: ignore[arg-type]


# --- entries ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,kind,canonical",
    [
        ("public", "public", "public"),
        ("198.51.100.0/24", "cidr", "198.51.100.0/24"),
        ("198.51.100.7", "cidr", "198.51.100.7/32"),
        ("198.51.100.7:8080", "addrport", "198.51.100.7:8080"),
        ("Mirror.Example.", "host", "mirror.example"),
        ("mirror.example:443", "hostport", "mirror.example:443"),
        ("_http._tcp.example.org", "host", "_http._tcp.example.org"),
        ("0.0.0.0/0", "cidr", "0.0.0.0/0"),
    ],
)
def test_entries_parse_to_canonical_form(text: str, kind: str, canonical: str) -> None:
    e = parse_entry(text)
    assert (e.kind, e.text) == (kind, canonical)
    assert parse_entry(e.text) == e  # canonical text parses to itself


@pytest.mark.parametrize(
    "text,why",
    [
        ("", "1..260"),
        ("x" * 261, "1..260"),
        ("198.51.100.1/24", "host bits"),
        ("198.51.100.0/33", "prefix"),
        ("1.2.3.0/024", "prefix"),
        ("10.1.2.3", "inside the floor"),
        ("10.0.0.0/8", "inside the floor"),
        ("127.0.0.1:80", "inside the floor"),
        ("169.254.169.254", "inside the floor"),
        ("224.0.0.0/4", "inside the floor"),
        ("mirror.example:0", "port"),
        ("mirror.example:65536", "port"),
        ("mirror.example:http", "port"),
        ("localhost", "not a host name"),
        ("1.2.3", "not a host name"),
        ("01.2.3.4", "not a host"),
        ("::1", "IPv6"),
        ("[2001:db8::1]:80", "IPv6"),
        ("*.example.org", "not a host name"),
        ("a..b", "not a host name"),
        ("-a.example", "not a host name"),
    ],
)
def test_bad_entries_are_one_line_errors(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why) as info:
        parse_entry(text)
    assert "\n" not in str(info.value)


def test_rule_count_is_bounded_and_duplicates_collapse() -> None:
    ok = [f"198.51.{i // 256}.{i % 256}" for i in range(MAX_RULES)]
    assert len(Policy.parse(ok, GW).entries) == MAX_RULES
    with pytest.raises(PolicyError, match=f"at most {MAX_RULES}"):
        Policy.parse([*ok, "public"], GW)
    assert policy("a.example", "A.example.", "a.example").canonical() == ["a.example"]


def test_names_normalize() -> None:
    assert normalize_name("Deb.Example.ORG.") == "deb.example.org"
    assert normalize_name("a" * 64 + ".example") is None
    assert normalize_name(".".join(["a" * 63] * 4)) is None  # 255 > 253
    assert normalize_name("1.2.3.4") is None


# --- the floor ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr",
    [
        "0.1.2.3",
        "10.9.9.9",
        "127.0.0.53",
        "169.254.169.254",
        "172.31.255.255",
        "192.168.1.1",
        "100.100.100.200",
        "192.0.0.170",
        "198.19.0.1",
        "224.0.0.251",
        "239.255.255.250",
        "255.255.255.255",
        "240.0.0.1",
    ],
)
def test_floor_ranges(addr: str) -> None:
    assert floor_reason(policy("public"), aton(addr)) is not None


def test_floor_boundaries() -> None:
    p = policy("public", host=())
    for just_outside in (
        "11.0.0.0",
        "9.255.255.255",
        "172.15.255.255",
        "172.32.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "192.0.1.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "1.0.0.0",
    ):
        assert floor_reason(p, aton(just_outside)) is None, just_outside


def test_gateway_and_host_addresses_are_floor() -> None:
    p = policy("public")
    assert decide(p, Learned(), flow(GW, 53, "udp"), NOW) == Decision(False, "floor:gateway")
    assert decide(p, Learned(), flow(HOST, 22), NOW) == Decision(False, "floor:host-address")
    later = p.with_host_addresses([PUBLIC])
    assert decide(later, Learned(), flow(PUBLIC), NOW).reason == "floor:host-address"


def test_floor_overrides_cidr_and_public() -> None:
    p = policy("0.0.0.0/0", "public")
    for f in FLOOR:
        assert not decide(p, Learned(), flow(f.net | 1), NOW).allow
    assert decide(p, Learned(), flow("198.51.100.1"), NOW).allow


def test_floor_overrides_dns_learned_and_hostport() -> None:
    """Rebinding: even if learned state somehow held a floor address, the floor wins."""
    learned = Learned()
    learned.learn(aton("127.0.0.1"), "mirror.example", None, 300, NOW)
    learned.learn(HOST, "mirror.example:443", 443, 300, NOW)
    p = policy("mirror.example", "mirror.example:443")
    assert decide(p, learned, flow("127.0.0.1"), NOW).reason == "floor:127.0.0.0/8"
    assert decide(p, learned, flow(HOST), NOW).reason == "floor:host-address"


@settings(max_examples=400)
@given(
    st.sampled_from(FLOOR),
    st.integers(0, 2**32 - 1),
    st.lists(
        st.sampled_from(
            ["public", "0.0.0.0/0", "8.0.0.0/7", "a.example", "a.example:80", "198.51.100.0/24"]
        ),
        max_size=6,
    ),
    st.integers(1, 65535),
)
def test_property_floor_always_wins(
    block: object, bits: int, entries: list[str], port: int
) -> None:
    from sporevm.egress.policy import Cidr

    assert isinstance(block, Cidr)
    addr = block.net | (bits & ~block.mask & 0xFFFFFFFF)
    learned = Learned()
    learned.learn(addr, "a.example", None, 300, NOW)
    learned.learn(addr, "a.example:80", 80, 300, NOW)
    d = decide(policy(*entries), learned, flow(addr, port), NOW)
    assert not d.allow and d.reason.startswith("floor:")


@settings(max_examples=300)
@given(st.integers(0, 2**32 - 1), st.integers(1, 65535))
def test_property_public_is_exactly_outside_the_floor(addr: int, port: int) -> None:
    p = policy("public", host=())
    d = decide(p, Learned(), flow(addr, port), NOW)
    assert d.allow == (floor_reason(p, addr) is None)
    assert decide(policy(host=()), Learned(), flow(addr, port), NOW).allow is False  # default


# --- the order of the steps -----------------------------------------------------------------


def test_default_deny() -> None:
    assert decide(policy(), Learned(), flow(PUBLIC), NOW) == Decision(False, "default")


def test_cidr_rule() -> None:
    p = policy("198.51.100.0/24")
    assert decide(p, Learned(), flow(PUBLIC), NOW) == Decision(True, "cidr", "198.51.100.0/24")
    assert not decide(p, Learned(), flow("198.51.101.1"), NOW).allow


def test_cidr_comes_before_dns_and_hostport() -> None:
    learned = Learned()
    learned.learn(PUBLIC, "a.example", None, 60, NOW)
    p = policy("a.example", "198.51.100.0/24", "198.51.100.7:443")
    assert decide(p, learned, flow(PUBLIC), NOW).reason == "cidr"


def test_dns_learned_host_any_port_then_expiry() -> None:
    learned = Learned()
    learned.learn(PUBLIC, "a.example", None, 30, NOW)
    p = policy("a.example")
    assert decide(p, learned, flow(PUBLIC, 1234), NOW) == Decision(True, "dns", "a.example")
    hold = 30 + MIN_HOLD_S
    assert decide(p, learned, flow(PUBLIC), NOW + hold - 1).allow
    assert decide(p, learned, flow(PUBLIC), NOW + hold + 1) == Decision(False, "default")


def test_learned_hold_is_clamped() -> None:
    learned = Learned()
    learned.learn(PUBLIC, "a.example", None, 10**9, NOW)
    assert learned.lookup(PUBLIC, NOW + MAX_HOLD_S - 1)
    assert not learned.lookup(PUBLIC, NOW + MAX_HOLD_S + 1)


def test_hostport_rules_only_their_port() -> None:
    learned = Learned()
    learned.learn(PUBLIC, "a.example:443", 443, 60, NOW)
    p = policy("a.example:443", "198.51.100.9:8080")
    assert decide(p, learned, flow(PUBLIC, 443), NOW) == Decision(
        True, "host:port", "a.example:443"
    )
    assert not decide(p, learned, flow(PUBLIC, 80), NOW).allow
    assert decide(p, learned, flow("198.51.100.9", 8080, "udp"), NOW).reason == "host:port"
    assert not decide(p, learned, flow("198.51.100.9", 8081), NOW).allow


def test_dns_step_comes_before_hostport_step() -> None:
    learned = Learned()
    learned.learn(PUBLIC, "a.example:443", 443, 60, NOW)
    learned.learn(PUBLIC, "b.example", None, 60, NOW)
    p = policy("a.example:443", "b.example")
    assert decide(p, learned, flow(PUBLIC, 443), NOW) == Decision(True, "dns", "b.example")


def test_learned_is_bounded_and_evicts_soonest_expiry() -> None:
    learned = Learned(capacity=3)
    for i, ttl in enumerate((100, 10, 50)):
        learned.learn(PUBLIC + i, "a.example", None, ttl, NOW)
    learned.learn(PUBLIC + 9, "a.example", None, 100, NOW)
    assert len(learned) == 3
    assert not learned.lookup(PUBLIC + 1, NOW)  # the one with ttl 10 went
    assert learned.lookup(PUBLIC + 9, NOW)
    learned.learn(PUBLIC + 10, "a.example", None, 100, NOW + 10**6)  # all expired by then
    assert len(learned) == 1


def test_decide_is_pure() -> None:
    learned = Learned()
    learned.learn(PUBLIC, "a.example", None, 60, NOW)
    p = policy("a.example", "198.51.100.9:80")
    before = (p, learned.lookup(PUBLIC, NOW))
    results = {decide(p, learned, flow(PUBLIC, 80), NOW) for _ in range(3)}
    assert len(results) == 1 and before == (p, learned.lookup(PUBLIC, NOW))


def test_resolves() -> None:
    assert policy("a.example").resolves("a.example")
    assert policy("a.example:443").resolves("a.example")
    assert not policy("a.example", "198.51.100.0/24").resolves("b.example")
    assert policy("public").resolves("anything.example")


def test_address_text_round_trip() -> None:
    for text in ("0.0.0.0", "255.255.255.255", "198.51.100.7"):
        assert ntoa(aton(text)) == text
    for bad in ("1.2.3", "1.2.3.4.5", "256.1.1.1", "0x7f.0.0.1", "1.2.3.04", " 1.2.3.4"):
        with pytest.raises(ValueError):
            aton(bad)
