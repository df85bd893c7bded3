"""Fuzz the agent frame decoder and every message decoder: only AgentProtocolError may escape.

The first input byte picks how the rest is split into feed() calls, so partial
headers and payloads at every boundary are exercised. Decoded messages must
re-encode to bytes that decode to the same message. Then the same bytes reach
a host AgentSession (agent_session.py) with a command running on stream 1, as
if the guest had sent them: only SporeError may escape, captured output stays
within its bound.
"""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.errors import SporeError
    from sporevm.runtime.agent import GUEST_TYPES, AgentProtocolError, FrameDecoder, MsgType
    from sporevm.runtime.agent_messages import decode_message, message_frame
    from sporevm.runtime.agent_session import AgentSession, QueueChannel

ALL = frozenset(MsgType)
CAPTURE = 4096


def _session(body: bytes, step: int) -> None:
    channel = QueueChannel(len)  # the guest reads everything the host sends
    session = AgentSession(channel)
    handle = session.exec(["x"], capture_limit=CAPTURE)
    for i in range(0, len(body), step):
        channel.feed(body[i : i + step])
    try:
        for _ in range(0, len(body), step):
            session.pump(0)
    except SporeError:
        return
    assert len(handle.stdout) <= CAPTURE and len(handle.stderr) <= CAPTURE


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    step = data[0] + 1
    body = data[1:]
    for accept in (GUEST_TYPES, ALL):
        decoder = FrameDecoder(accept)
        try:
            for i in range(0, len(body), step):
                for frame in decoder.feed(body[i : i + step]):
                    assert frame.type in accept
                    msg = decode_message(frame)
                    try:
                        again = message_frame(msg, frame.stream)
                    except ValueError:
                        continue  # decodable but not something the host would send
                    (echo,) = FrameDecoder(ALL).feed(again)
                    assert decode_message(echo) == msg, (frame, msg)
        except AgentProtocolError:
            continue
    _session(body, step)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
