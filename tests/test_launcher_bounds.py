"""The caller's reader of monitor events is bounded (the monitor runs guest code)."""

from __future__ import annotations

import subprocess
import sys
import threading

from sporevm.spore import launcher
from sporevm.spore.launcher import VmProcess


def _reader_over(script: str) -> VmProcess:
    vm = VmProcess.__new__(VmProcess)  # only the event reader's state
    vm.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    vm.events = []
    vm._event = threading.Condition()
    vm._exited = threading.Event()
    return vm


def test_an_over_long_event_line_stops_the_monitor() -> None:
    vm = _reader_over(f"import sys, time; sys.stdout.write('x' * {launcher.MAX_EVENT_LINE + 10});"
                      "sys.stdout.flush(); time.sleep(60)")
    vm._read_events()
    assert vm.proc.wait(10) != 0  # killed, not left running
    assert vm.events[-1]["event"] == "error"
    assert "event line over" in str(vm.events[-1]["message"])


def test_a_flood_of_events_stops_the_monitor() -> None:
    launcher_max = launcher.MAX_EVENTS
    try:
        launcher.MAX_EVENTS = 50
        vm = _reader_over("import time\nfor i in range(10**6): print('{\"event\": \"x\"}')\n"
                          "time.sleep(60)")
        vm._read_events()
    finally:
        launcher.MAX_EVENTS = launcher_max
    assert vm.proc.wait(10) != 0
    assert len(vm.events) == 51 and vm.events[-1]["event"] == "error"


def test_exactly_the_bound_is_accepted() -> None:
    pad = launcher.MAX_EVENT_LINE - len('{"event": "ok", "pad": ""}\n')
    vm = _reader_over(f"import sys; sys.stdout.write('{{\"event\": \"ok\", \"pad\": \"'"
                      f" + 'y' * {pad} + '\"}}\\n')")
    vm._read_events()
    assert vm.proc.wait(10) == 0
    assert [e["event"] for e in vm.events] == ["ok"]
