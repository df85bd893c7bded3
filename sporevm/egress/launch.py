"""Starting a gateway for one VM: what the caller (the CLI, the build) uses.

The caller makes a socketpair, keeps one end for the VM monitor (which creates no
sockets) and passes the other here. The gateway runs in its own session, so
``GatewayProcess.stop`` (or killing the process group) also reaches passt if the
gateway dies before passt has a client; once connected, passt leaves by itself
when the gateway goes (``--one-off``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sporevm.egress import EgressError
from sporevm.pyspawn import module_argv

READY_TIMEOUT_S = 10.0
MAX_READY_LINE = 4096


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    jail: str
    passt_pid: int

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL to the whole group after ``timeout``; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc.pid)
                self.proc.wait()
        return self.proc.returncode


def command(
    vm_fd: int,
    allow: Sequence[str],
    log: Path | None = None,
    resolvers: Sequence[str] = (),
    hosts: str | None = None,
    runtime_dir: Path | None = None,
    jail: bool = True,
) -> list[str]:
    argv = module_argv("sporevm.egress.gateway", "--vm-fd", str(vm_fd))
    for entry in allow:
        argv += ["--allow", entry]
    for r in resolvers:
        argv += ["--resolver", r]
    if log is not None:
        argv += ["--log", str(log)]
    if hosts is not None:
        argv += ["--hosts", hosts]
    if runtime_dir is not None:
        argv += ["--runtime-dir", str(runtime_dir)]
    if not jail:
        argv.append("--no-jail")
    return argv


def start(
    vm_fd: int, allow: Sequence[str], *, prefix: Sequence[str] = (), **kwargs: object
) -> GatewayProcess:
    """Start a gateway on ``vm_fd`` and wait for its ready line. ``prefix`` wraps the
    command (tests: ``ip netns exec NAME``); keyword arguments go to ``command``."""
    argv = [*prefix, *command(vm_fd, allow, **kwargs)]  # type: ignore[arg-type]
    proc = subprocess.Popen(
        argv,
        pass_fds=(vm_fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
        chunk = os.read(proc.stdout.fileno(), MAX_READY_LINE) if ready else b""
        if not chunk:
            code = proc.poll()
            if code is None and left > 0:
                continue
            _kill_group(proc.pid)
            proc.wait()
            why = f"exited with {proc.returncode}" if code is not None else "never became ready"
            raise EgressError(f"egress gateway {why} (its message is on stderr)")
        line += chunk
        if len(line) > MAX_READY_LINE:
            break
    try:
        jail, passt_pid = parse_ready(line)
    except EgressError:
        _kill_group(proc.pid)
        proc.wait()
        raise
    return GatewayProcess(proc, jail, passt_pid)


def _kill_group(pid: int) -> None:
    # A gateway that exited at start may have taken its whole group with it: ESRCH then
    # means there is nothing left to kill, not a failure (it once surfaced as the run's
    # error, in place of the gateway's own message).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def parse_ready(line: bytes) -> tuple[str, int]:
    """The gateway's ready line: ``{"event": "ready", "jail": str, "passt_pid": int}``.

    The gateway handles guest traffic, so what it prints is checked like any outside
    input: one line ≤ ``MAX_READY_LINE`` bytes, exactly these keys and types."""
    first = line.split(b"\n", 1)[0]
    try:
        if len(first) > MAX_READY_LINE:
            raise ValueError("too long")
        msg = json.loads(first)
        if not isinstance(msg, dict) or set(msg) != {"event", "jail", "passt_pid"}:
            raise ValueError("keys")
        jail, pid = msg["jail"], msg["passt_pid"]
        if (
            msg["event"] != "ready"
            or not isinstance(jail, str)
            or len(jail) > 64
            or type(pid) is not int
            or not 0 < pid < 1 << 22
        ):
            raise ValueError("values")
    except (ValueError, RecursionError):
        raise EgressError(f"egress gateway: unexpected ready line {first[:200]!r}") from None
    return jail, pid
