"""Fuzz the egress frame stream (sporevm/egress/frames.py) as the gateway reads it from
the VM side and from passt: the input, cut into chunks at points it chooses, is fed to a
FrameReader and to the bulk splitter; only FrameError may escape, the two must agree on
where frames end, nothing is held beyond one frame, and every frame goes through the
guest-frame filter. The same bytes are also a ready line from a gateway process
(launch.parse_ready) and passt's messages (passt._messages)."""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.egress import EgressError, frames, launch, passt
    from sporevm.egress.filter import EgressFilter, Link
    from sporevm.egress.policy import Policy

LINK = Link()
FILTER = EgressFilter(LINK, Policy.parse(["public"], LINK.gateway_ip), lambda e: None)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cuts = sorted(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 8), 0, 1 << 17))
    stream = fdp.ConsumeBytes(1 << 17)
    reader, splitter = frames.FrameReader(), frames.FrameReader()
    got, whole, broken = [], b"", False
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        try:
            got += reader.feed(stream[a:b])
            whole += splitter.split(stream[a:b])[0]
        except frames.FrameError:
            broken = True
            break
        assert reader.pending <= frames.MAX_FRAME + 4
    if not broken:
        assert whole == b"".join(frames.encode(f) for f in got)
    FILTER.flows.clear()
    for f in got[:64]:
        FILTER.from_guest(f, 0.0)
    try:
        jail, pid = launch.parse_ready(stream)
        assert isinstance(jail, str) and pid > 0
    except EgressError:
        pass
    assert len(passt._messages(stream)) <= len(stream.decode(errors="replace"))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
