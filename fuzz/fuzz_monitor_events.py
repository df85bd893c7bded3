"""Fuzz the monitor's event stream as its caller reads it (sporevm/runtime/protocol.py).

Events come from the process that runs guest code: hostile input to the caller.
Only ProtocolError may escape ``decode_event`` and ``read_events``; an accepted
event must hold only in-range values and text without control characters, and
survive an encode/decode round trip unchanged. The same bytes are also tried as
a command line (``decode_command``, the monitor's side).
"""

import io
import sys

import atheris

with atheris.instrument_imports():
    from sporevm.runtime import protocol
    from sporevm.runtime.protocol import (
        Exited,
        ProtocolError,
        SnapshotTaken,
        decode_command,
        decode_event,
        encode_event,
        read_events,
    )
    from sporevm.spore.chunks import CHUNK

MAX_INPUT = 1 << 20


def _check(ev: protocol.Event) -> None:
    assert decode_event(encode_event(ev)) == ev, ev
    for value in vars(ev).values():
        if isinstance(value, str):
            assert value == protocol.text(value), "control characters got through"
    if isinstance(ev, SnapshotTaken):
        assert ev.chunk_size == CHUNK and 1 <= len(ev.chunks) <= protocol.MAX_CHUNKS
        assert 0 <= ev.hashed <= len(ev.chunks)
        assert all(c is None or protocol.DIGEST.fullmatch(c) for c in ev.chunks)
    if isinstance(ev, Exited):
        assert ev.code is None or 1 <= len(ev.code) <= protocol.MAX_CODE
        assert len(ev.exits) <= protocol.MAX_EXIT_CLASSES
        assert len({e.name for e in ev.exits}) == len(ev.exits)
        for e in ev.exits:
            assert protocol.EXIT_CLASS.fullmatch(e.name), e.name
            assert 0 <= e.count <= protocol.MAX_COUNT and 0 <= e.ns <= protocol.MAX_COUNT


def TestOneInput(data: bytes) -> None:
    if len(data) > MAX_INPUT:
        return
    try:
        _check(decode_event(data))
    except ProtocolError:
        pass
    try:
        for ev in read_events(io.BytesIO(data), max_line=64 * 1024, max_events=64):
            _check(ev)
    except ProtocolError:
        pass
    try:
        cmd = decode_command(data)
    except ProtocolError:
        return
    assert decode_command(protocol.encode_command(cmd)) is cmd


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
