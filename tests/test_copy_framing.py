"""Properties of the copy streams' framing (copyio.py), over a real session and channel.

Copy-in: whatever the pattern of writes, the guest receives COPY_DATA frames of
at most FRAME_DATA bytes whose payloads concatenate to exactly the bytes
written, then one empty frame. Copy-out: however the guest's COPY_OUT_DATA
frames are cut and however the reader asks, it reads exactly the bytes sent,
never more than the limit, and nothing after DONE.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sporevm.errors import CopyError
from sporevm.runtime.agent import (
    AgentProtocolError,
    FrameDecoder,
    MsgType,
    encode_frame,
)
from sporevm.runtime.agent_messages import CopyIn, CopyOut
from sporevm.runtime.agent_session import AgentSession, QueueChannel
from sporevm.runtime.copyio import FRAME_DATA, CopyInStream, CopyOutStream

HOST = frozenset(MsgType)


class Guest:
    """The host's channel with the guest's end written by the test."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.channel = QueueChannel(self._take)
        self.session = AgentSession(self.channel, grace=1)

    def _take(self, data: bytes) -> int:
        self.sent += data
        # the guest answers the end of an archive with DONE, as the agent does
        if len(data) == 16 and data[5] == MsgType.COPY_DATA:
            self.reply(MsgType.DONE, int.from_bytes(data[8:12], "little"))
        return len(data)

    def frames(self) -> list[tuple[int, int, bytes]]:
        return [(f.type, f.stream, f.payload) for f in FrameDecoder(HOST).feed(bytes(self.sent))]

    def reply(self, msg_type: MsgType, stream: int, payload: bytes = b"") -> None:
        self.channel.feed(encode_frame(msg_type, stream, payload))


@settings(max_examples=200, deadline=None)
@given(writes=st.lists(st.integers(0, 3 * FRAME_DATA), max_size=12), seed=st.integers(0, 255))
def test_copy_in_frames_carry_exactly_the_bytes(writes: list[int], seed: int) -> None:
    g = Guest()
    stream = CopyInStream(g.session, "/dest", 1, 2)
    data = bytearray()
    for i, n in enumerate(writes):
        chunk = bytes([(seed + i) % 256]) * n
        assert stream.write(chunk) == n
        data += chunk
    stream.finish(1)
    frames = g.frames()
    assert frames[0] == (MsgType.COPY_IN, stream.sid, CopyIn("/dest", 1, 2).encode())
    body = frames[1:]
    assert all(t == MsgType.COPY_DATA and s == stream.sid for t, s, _ in body)
    assert all(0 < len(p) <= FRAME_DATA for _, _, p in body[:-1])
    assert body[-1][2] == b""  # the end of the archive
    assert b"".join(p for _, _, p in body) == bytes(data)


def test_copy_in_stops_at_the_guests_error() -> None:
    g = Guest()
    stream = CopyInStream(g.session, "/dest")
    g.reply(MsgType.ERROR, stream.sid, b"\x09\x00" + b"\0" * 4 + b"\x04\x00\x00\x00nope")
    with pytest.raises(CopyError, match="nope"):
        stream.write(b"x" * (2 * FRAME_DATA))
    assert g.frames()[-1][:2] == (MsgType.COPY_DATA, stream.sid)
    assert g.frames()[-1][2] == b""  # ended, so the guest frees the stream


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=3000), max_size=10),
    cut=st.integers(1, 70000),
    asks=st.lists(st.one_of(st.just(-1), st.integers(1, 5000)), min_size=1, max_size=8),
    orphans=st.booleans(),
)
def test_copy_out_reads_exactly_what_was_sent(
    payloads: list[bytes], cut: int, asks: list[int], orphans: bool
) -> None:
    g = Guest()
    stream = CopyOutStream(g.session, "/src", 10, 20, limit=1 << 30)
    assert g.frames()[0] == (MsgType.COPY_OUT, stream.sid, CopyOut("/src", 10, 20).encode())
    wire = bytearray()
    for p in payloads:
        wire += encode_frame(MsgType.COPY_OUT_DATA, stream.sid, p)
        if orphans:  # another stream's leftovers (e.g. from before a restore) interleave
            wire += encode_frame(MsgType.STDOUT, stream.sid + 99, b"noise")
    wire += encode_frame(MsgType.DONE, stream.sid, b"")
    for i in range(0, len(wire), cut):
        g.channel.feed(bytes(wire[i : i + cut]))
    got = bytearray()
    i = 0
    while block := stream.read(asks[i % len(asks)]):
        got += block
        i += 1
    assert bytes(got) == b"".join(payloads)
    assert stream.read() == b""


def test_copy_out_limit_and_late_data() -> None:
    g = Guest()
    stream = CopyOutStream(g.session, "/src", 10, 20, limit=100)
    g.reply(MsgType.COPY_OUT_DATA, stream.sid, b"x" * 101)
    with pytest.raises(CopyError, match="more than 100 archive bytes"):
        stream.read()
    # the guest was told to stop (SIGNAL on the stream), and its leftovers are dropped
    assert (MsgType.SIGNAL, stream.sid) in [(t, s) for t, s, _ in g.frames()]
    g.reply(MsgType.COPY_OUT_DATA, stream.sid, b"late")
    g.session.pump(0.1)
    assert g.session.orphan_frames == 1

    g2 = Guest()
    s2 = CopyOutStream(g2.session, "/src", 10, 20, limit=100)
    g2.reply(MsgType.EXIT, s2.sid, b"\0" * 30)
    with pytest.raises(AgentProtocolError):
        s2.read()
