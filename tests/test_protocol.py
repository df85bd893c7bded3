"""The typed monitor protocol (sporevm/runtime/protocol.py): events, commands, strategies."""

from __future__ import annotations

import io
import json

import pytest

from sporevm.runtime import protocol
from sporevm.runtime.protocol import (
    Booting,
    Command,
    ExitClass,
    Exited,
    ExitReason,
    MonitorError,
    ProtocolError,
    Restored,
    RestoreStrategy,
    SnapshotFailed,
    SnapshotTaken,
    StateRef,
    decode_command,
    decode_event,
    encode_command,
    encode_event,
    read_events,
)
from sporevm.spore.chunks import CHUNK
from sporevm.vmm.machine import StopReason

ID = "blake3:" + "ab" * 32
EVENTS: list[protocol.Event] = [
    Booting("console=ttyS0 spore.root=/dev/vda"),
    Restored("/spores/a.spore/manifest.json"),
    SnapshotTaken(StateRef(ID, 12167), CHUNK, (None, ID, ID), 2, 0.031, 0.2, True),
    SnapshotFailed("no store root in the monitor config"),
    MonitorError("monitor: /k: No such file or directory"),
    Exited(ExitReason.POWEROFF, 0, 0xFFFFFFFF81000000, None, ""),
    Exited(ExitReason.SHUTDOWN, None, 0x100000, bytes.fromhex("0f0b"), "triple fault"),
    Exited(
        ExitReason.POWEROFF,
        0,
        None,
        None,
        "",
        (
            ExitClass("MMIO", 3, 1500),
            ExitClass("mmio:notify", 1, 40),
            ExitClass("in_kvm_run", 9, 0),
        ),
    ),
]


@pytest.mark.parametrize("ev", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips(ev: protocol.Event) -> None:
    line = encode_event(ev)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_event(line) == ev


def test_exit_reasons_are_the_machines_stop_reasons() -> None:
    assert {r.value for r in ExitReason} == {r.name for r in StopReason}


def test_a_stream_of_events_and_its_bounds() -> None:
    data = b"".join(encode_event(e) for e in EVENTS)
    assert list(read_events(io.BytesIO(data))) == EVENTS
    with pytest.raises(ProtocolError, match="more than 3 events"):
        list(read_events(io.BytesIO(data), max_events=3))
    with pytest.raises(ProtocolError, match="line over 64 bytes"):
        list(read_events(io.BytesIO(data), max_line=64))


def _snapshot(**over: object) -> bytes:
    doc = json.loads(encode_event(EVENTS[2]))
    return json.dumps({**doc, **over}).encode()


def _exit(**over: object) -> bytes:
    doc = json.loads(encode_event(EVENTS[-1]))
    return json.dumps({**doc, **over}).encode()


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (_snapshot(chunk_size=4096), "chunk_size"),
        (_snapshot(chunks=[]), "chunks"),
        (_snapshot(chunks=["blake3:../../etc/passwd"]), r"chunks\[0\]"),
        (_snapshot(chunks=[None] * (protocol.MAX_CHUNKS + 1)), "chunks"),
        (_snapshot(hashed=4), "hashed"),
        (_snapshot(seconds=-1), "seconds"),
        (_snapshot(seconds=True), "seconds"),
        (_snapshot(settled=1), "settled"),
        (_snapshot(state={"digest": ID}), "state"),
        (_snapshot(state={"digest": ID, "size": 0}), "state.size"),
        (_snapshot(state={"digest": "sha256:" + "0" * 64, "size": 1}), "state.digest"),
        (
            b'{"event": "exit", "reason": "EXPLODED", "status": null, "rip": null, "code": null, '
            b'"detail": "", "exits": []}',
            "reason",
        ),
        (
            b'{"event": "exit", "reason": "POWEROFF", "status": -1, "rip": null, "code": null, '
            b'"detail": "", "exits": []}',
            "status",
        ),
        (
            b'{"event": "exit", "reason": "POWEROFF", "status": null, "rip": null, "code": "", '
            b'"detail": "", "exits": []}',
            "code",
        ),
        (_exit(exits={}), "exits"),
        (_exit(exits=[["IO", 1]]), r"exits\[0\]"),
        (_exit(exits=[["IO\u001b", 1, 1]]), r"exits\[0\]"),
        (_exit(exits=[["IO", -1, 1]]), r"exits\[0\].count"),
        (_exit(exits=[["IO", 1, 1 << 63]]), r"exits\[0\].ns"),
        (_exit(exits=[["IO", 1, 1], ["IO", 1, 1]]), "named twice"),
        (_exit(exits=[[f"c{i}", 1, 1] for i in range(protocol.MAX_EXIT_CLASSES + 1)]), "exits"),
        (b'{"event": "error", "message": "\\u0007bell"}', "control characters"),
        (b'{"event": "error", "message": "' + b"x" * (protocol.MAX_TEXT + 1) + b'"}', "message"),
        (b'{"event": "error", "message": 1}', "message"),
        (b'{"event": "error", "message": "a", "event": "exit"}', "not JSON"),
        (b'{"event": "snapshot", "seconds": Infinity}', "not JSON"),
        (b'"error"', "not a JSON object"),
        (b"\xff", "not JSON"),
    ],
)
def test_hostile_events_are_refused(line: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode_event(line)


def test_text_sent_is_text_accepted() -> None:
    """What the monitor puts in an event always decodes: control characters replaced,
    lone surrogates replaced, over-long text cut."""
    for raw in ("a\x1b[2Jb\tc\n", "\ud800x", "y" * (protocol.MAX_TEXT + 10)):
        ev = MonitorError(protocol.text(raw))
        assert decode_event(encode_event(ev)) == ev
        assert len(ev.message) <= protocol.MAX_TEXT


def test_commands() -> None:
    for cmd in Command:
        assert decode_command(encode_command(cmd)) is cmd
    for bad in (b'{"cmd": "reboot"}', b'{"cmd": "stop", "now": true}', b"stop", b"[]"):
        with pytest.raises(ProtocolError):
            decode_command(bad)


def test_restore_strategy_names() -> None:
    assert [s.value for s in RestoreStrategy] == ["eager", "lazy", "local"]
    assert RestoreStrategy("lazy") is RestoreStrategy.LAZY
