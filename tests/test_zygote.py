"""The monitor zygote: forked monitors behave like spawned ones (events, exit codes, stop)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from sporevm.runtime.zygote import (
    CHILD_AGENT_FD,
    CHILD_NET_FD,
    CHILD_RAM_FD,
    ForkedMonitor,
    Zygote,
    ZygoteError,
)


def _events(proc: object) -> list[dict[str, object]]:
    stdout = proc.stdout  # type: ignore[attr-defined]
    return [json.loads(line) for line in stdout]


def end(child: ForkedMonitor, sock: socket.socket) -> None:
    """EOF on the child's config line (it refuses and exits), then let go of it."""
    assert child.stdin is not None
    child.stdin.close()
    child.wait(10)
    sock.close()
    child.close()


def test_forked_monitor_reports_a_bad_config_and_its_exit_code() -> None:
    child, sock = Zygote.shared().spawn(jail=True)
    try:
        assert child.stdin is not None
        child.stdin.write(b'{"not": "a config"}\n')
        child.stdin.close()
        events = _events(child)
        assert events and events[-1]["event"] == "error"
        assert "unexpected or missing fields" in str(events[-1]["message"])
        assert child.wait(10) == 1
    finally:
        sock.close()
        child.close()


def test_children_are_independent_and_stoppable() -> None:
    zygote = Zygote.shared()
    kids = [zygote.spawn(jail=True) for _ in range(3)]
    try:
        assert len({k.pid for k, _ in kids}) == 3
        for k, _ in kids:
            assert k.poll() is None  # waiting for its config line on stdin
            # A fork, not an exec: the child runs the zygote's interpreter image.
            assert os.readlink(f"/proc/{k.pid}/exe") == os.readlink(f"/proc/{zygote.proc.pid}/exe")
        victim = kids[0][0]
        victim.terminate()
        assert victim.wait(10) == -signal.SIGTERM
        victim.terminate()  # after exit: a no-op, never a signal to a reused pid
        for k, _ in kids[1:]:
            assert k.poll() is None
            assert k.stdin is not None
            k.stdin.close()  # EOF on the config line: the monitor refuses and exits
            assert k.wait(10) == 1
    finally:
        for k, s in kids:
            s.close()
            k.close()


def test_agent_socket_reaches_the_child_at_the_fixed_fd() -> None:
    child, sock = Zygote.shared().spawn(jail=True)
    try:
        # The child sets its descriptors up after the zygote answered: poll briefly.
        # Only 0, 1, 2 and the agent socket: the zygote's control socket and wake
        # pipe are not inherited by monitors.
        deadline = time.monotonic() + 5
        while True:
            fds = sorted(int(n) for n in os.listdir(f"/proc/{child.pid}/fd"))
            try:
                target = os.readlink(f"/proc/{child.pid}/fd/{CHILD_AGENT_FD}")
            except FileNotFoundError:
                target = ""
            if (
                fds == [0, 1, 2, CHILD_AGENT_FD] and target.startswith("socket:")
            ) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert fds == [0, 1, 2, CHILD_AGENT_FD], fds
        assert target.startswith("socket:"), target
    finally:
        end(child, sock)


@pytest.mark.parametrize("net", [False, True], ids=["ram", "net+ram"])
def test_ram_image_reaches_the_child_at_its_fixed_fd(net: bool) -> None:
    """A sealed RAM image lands at CHILD_RAM_FD, with or without a NIC channel at 4."""
    ram = os.memfd_create("spore-ram", os.MFD_CLOEXEC)
    a, b = socket.socketpair()
    child, sock = Zygote.shared().spawn(jail=True, net_fd=a.fileno() if net else None, ram_fd=ram)
    try:
        want = [0, 1, 2, CHILD_AGENT_FD] + ([CHILD_NET_FD] if net else []) + [CHILD_RAM_FD]
        deadline = time.monotonic() + 5
        while True:
            fds = sorted(int(n) for n in os.listdir(f"/proc/{child.pid}/fd"))
            if fds == want or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert fds == want, fds
        assert os.readlink(f"/proc/{child.pid}/fd/{CHILD_RAM_FD}").startswith("/memfd:spore-ram")
    finally:
        end(child, sock)
        a.close()
        b.close()
        os.close(ram)


def test_wait_times_out_like_popen() -> None:
    child, sock = Zygote.shared().spawn(jail=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(0.05)
    finally:
        child.kill()
        assert child.wait(10) == -signal.SIGKILL
        sock.close()
        child.close()


def test_a_dead_zygote_is_replaced_and_reported() -> None:
    old = Zygote.shared()
    old.proc.kill()
    old.proc.wait(10)
    with pytest.raises(ZygoteError):
        old.spawn(jail=True, timeout=5)
    fresh = Zygote.shared()
    assert fresh is not old
    child, sock = fresh.spawn(jail=True)
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(10) == 1
    sock.close()
    child.close()
