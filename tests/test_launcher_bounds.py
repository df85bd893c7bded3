"""The caller's reader of monitor events is bounded and strict (the monitor runs guest code)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from sporevm.runtime import protocol
from sporevm.runtime.launcher import VmProcess
from sporevm.runtime.protocol import MonitorError


def _reader_over(script: str) -> VmProcess:
    vm = VmProcess.__new__(VmProcess)  # only the event reader's state
    vm.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    vm.events = []
    vm._event = threading.Condition()
    vm._exited = threading.Event()
    return vm


def _stopped_with(vm: VmProcess, words: str) -> None:
    assert vm.proc.wait(10) != 0  # killed, not left running
    last = vm.events[-1]
    assert isinstance(last, MonitorError) and words in last.message, last
    assert last.message.startswith("the VM monitor sent") and "stopped it" in last.message


def test_an_over_long_event_line_stops_the_monitor() -> None:
    vm = _reader_over(
        f"import sys, time; sys.stdout.write('x' * {protocol.MAX_EVENT_LINE + 10});"
        "sys.stdout.flush(); time.sleep(60)"
    )
    vm._read_events()
    _stopped_with(vm, "event line over")


def test_a_flood_of_events_stops_the_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_EVENTS", 50)
    vm = _reader_over(
        'import time\nfor i in range(10**6): print(\'{"event": "error", '
        '"message": "x"}\')\ntime.sleep(60)'
    )
    vm._read_events()
    assert len(vm.events) == 51
    _stopped_with(vm, "more than 50 events")


def test_exactly_the_bound_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_EVENT_LINE", 4096)
    pad = 4096 - len('{"event": "error", "message": ""}\n')
    vm = _reader_over(
        f'import sys; sys.stdout.write(\'{{"event": "error", "message": "\''
        f" + 'y' * {pad} + '\"}}\\n')"
    )
    vm._read_events()
    assert vm.proc.wait(10) == 0
    assert vm.events == [MonitorError("y" * pad)]


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": "ok"}',  # an unknown event
        b'{"event": "error", "message": "x", "extra": 1}',  # a field too many
        b'{"event": "error"}',  # a field too few
        b'{"event": "error", "message": "\\u001b[2Jgotcha"}',  # a terminal escape
        b"[1, 2]",
        b"not json",
    ],
)
def test_a_malformed_event_stops_the_monitor(line: bytes) -> None:
    vm = _reader_over(
        f"import sys, time; sys.stdout.buffer.write({line!r} + b'\\n'); "
        "sys.stdout.flush(); time.sleep(60)"
    )
    vm._read_events()
    _stopped_with(vm, "malformed event line 1")
    assert len(vm.events) == 1  # nothing of it was taken as an event
