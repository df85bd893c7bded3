"""Fuzz the agent frame decoder and every message decoder: only AgentProtocolError may escape.

The first input byte picks how the rest is split into feed() calls, so partial
headers and payloads at every boundary are exercised. Decoded messages must
re-encode to bytes that decode to the same message.
"""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.vmm.agent import GUEST_TYPES, AgentProtocolError, FrameDecoder, MsgType
    from sporevm.vmm.agent_messages import decode_message, message_frame

ALL = frozenset(MsgType)


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


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
