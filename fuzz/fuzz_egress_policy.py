"""Fuzz network allow entries and decisions (sporevm/egress/policy.py, learned.py): the
input's lines are allow entries; only PolicyError may escape parsing; canonical entries
parse to themselves; then flows drawn from the input are decided with DNS-learned
grants drawn from it too, and a floor address is never allowed, whatever the rules."""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.egress import PolicyError
    from sporevm.egress.learned import Learned
    from sporevm.egress.policy import (
        FLOOR,
        Flow,
        Policy,
        aton,
        decide,
        floor_reason,
        parse_entry,
    )

GW = aton("10.0.2.2")


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 2048))
    lines = text.split("\n")[:300]
    try:
        policy = Policy.parse(lines, GW, [aton("192.0.2.2")])
    except PolicyError:
        policy = None
    for line in lines[:20]:
        try:
            e = parse_entry(line)
        except PolicyError:
            continue
        assert parse_entry(e.text) == e
    if policy is None:
        return
    assert Policy.parse(policy.canonical(), GW).canonical() == policy.canonical()
    learned = Learned(capacity=8)
    for _ in range(fdp.ConsumeIntInRange(0, 16)):
        learned.learn(
            fdp.ConsumeIntInRange(0, 2**32 - 1),
            "a.example",
            fdp.PickValueInList([None, 80, 443]),
            fdp.ConsumeIntInRange(0, 10**6),
            float(fdp.ConsumeIntInRange(0, 1000)),
        )
    assert len(learned) <= 8
    for _ in range(fdp.ConsumeIntInRange(1, 16)):
        addr = fdp.ConsumeIntInRange(0, 2**32 - 1)
        if fdp.ConsumeBool():
            f = FLOOR[fdp.ConsumeIntInRange(0, len(FLOOR) - 1)]
            addr = f.net | (addr & ~f.mask & 0xFFFFFFFF)
        flow = Flow(fdp.PickValueInList(["tcp", "udp"]), addr, fdp.ConsumeIntInRange(1, 65535))
        now = float(fdp.ConsumeIntInRange(0, 2000))
        d = decide(policy, learned, flow, now)
        if floor_reason(policy, addr) is not None:
            assert not d.allow and d.reason.startswith("floor:")
        assert d == decide(policy, learned, flow, now)  # a function of its arguments
    if policy.public:
        assert decide(policy, learned, Flow("tcp", aton("198.51.100.1"), 1), 0.0).allow


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
