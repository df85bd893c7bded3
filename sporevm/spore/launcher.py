"""The caller's side of a VM: spawn the monitor process, talk to the guest agent, stop it.

Each VM gets a private runtime directory (mode 0700) for its serial log; the
agent channel is one end of a socketpair whose other end the monitor holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from sporevm.errors import SporeError
from sporevm.spore.monitor import MonitorConfig
from sporevm.spore.zygote import ForkedMonitor, monitor_popen
from sporevm.vmm.agent_session import AgentSession, FdChannel

SERIAL_TAIL = 4000
# A snapshot event lists every chunk id: ~75 B x 131072 chunks for the largest guest.
MAX_EVENT_LINE = 16 << 20
MAX_EVENTS = 100_000  # a build emits a few per step


class Stoppable(Protocol):
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class MonitorProcess(Stoppable, Protocol):
    """What VmProcess needs of its monitor: a Popen, or a zygote's ForkedMonitor."""

    pid: int
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None


def stop_process(proc: Stoppable, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns once the process is reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class VmError(SporeError):
    """The VM failed to boot, crashed, or stopped unexpectedly."""


@dataclass(frozen=True)
class VmSpec:
    kernel: Path
    initrd: Path
    rootfs: Path
    cmdline: str
    memory: int
    vcpus: int = 1
    timeout: float | None = None
    store: Path | None = None  # store root: chunks and state objects (snapshots, restores)
    restore: Path | None = None  # a spore's manifest.json to resume instead of booting
    ram: str = "eager"  # how a restore fills RAM: eager | lazy | local (docs/restore.md)
    restore_id: str | None = None  # id of that manifest, as the caller checked it
    # With ``restore``: the verified digests of ``kernel`` and ``initrd`` that the caller
    # checked the spore's platform contract against (the monitor does not re-read them).
    kernel_digest: str | None = None
    initrd_digest: str | None = None
    # False only to debug: the monitor runs without its seccomp/Landlock jail and says so
    # (SPORE_NO_JAIL=1 in the environment has the same effect; docs/jail.md).
    jail: bool = True
    # Fork the monitor from this process's zygote (shared, pre-imported; zygote.py)
    # rather than exec a fresh interpreter for each VM.
    zygote: bool | None = None  # None: yes, unless SPORE_ZYGOTE=0 in the environment


class VmProcess:
    def __init__(self, spec: VmSpec) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="spore-vm-", dir=base))
        os.chmod(self.runtime_dir, 0o700)
        self.serial_log = self.runtime_dir / "serial.log"
        self.proc: MonitorProcess
        zygote = spec.zygote if spec.zygote is not None else \
            os.environ.get("SPORE_ZYGOTE", "1") != "0"
        if zygote:
            # The zygote's env is fixed at its start; say the jail choice per child.
            jail = spec.jail and os.environ.get("SPORE_NO_JAIL", "") in ("", "0")
            self.proc, ours, agent_fd = monitor_popen(jail)
        else:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            agent_fd = theirs.fileno()
        self._sock = ours
        cfg = MonitorConfig(
            kernel=str(spec.kernel), initrd=str(spec.initrd), rootfs=str(spec.rootfs),
            cmdline=spec.cmdline, memory=spec.memory, vcpus=spec.vcpus,
            agent_fd=agent_fd, serial_log=str(self.serial_log), timeout=spec.timeout,
            store=str(spec.store) if spec.store else "",
            restore=str(spec.restore) if spec.restore else None, ram=spec.ram,
            restore_id=spec.restore_id, kernel_digest=spec.kernel_digest,
            initrd_digest=spec.initrd_digest,
        )
        if not zygote:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sporevm.spore.monitor"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(theirs.fileno(),),
                env=None if spec.jail else {**os.environ, "SPORE_NO_JAIL": "1"},
            )
            theirs.close()
        assert self.proc.stdin is not None
        self.proc.stdin.write(cfg.encode())
        self.proc.stdin.flush()  # stays open: the control channel (snapshot, resume, stop)
        self.events: list[dict[str, Any]] = []
        self._event = threading.Condition()
        self._exited = threading.Event()
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()
        self.session = AgentSession(FdChannel(ours.fileno()))

    def _read_events(self) -> None:
        """Collect the monitor's event lines, bounded: a monitor is the process that runs
        guest code, so a compromised one must not be able to exhaust this process."""
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline(MAX_EVENT_LINE + 1):
            violation = None
            if len(line) > MAX_EVENT_LINE:
                violation = f"an event line over {MAX_EVENT_LINE} bytes"
            elif len(self.events) >= MAX_EVENTS:
                violation = f"more than {MAX_EVENTS} events"
            if violation is not None:
                with self._event:
                    self.events.append({"event": "error",
                                        "message": f"the VM monitor sent {violation}; stopped it"})
                    self._event.notify_all()
                self.proc.kill()
                break
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(event, dict):
                with self._event:
                    self.events.append(event)
                    self._event.notify_all()
        self._exited.set()
        with self._event:
            self._event.notify_all()

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd}).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise VmError(f"the VM monitor is gone: {self.describe_exit()}") from None

    def snapshot(self, timeout: float = 600.0) -> dict[str, Any]:
        """Pause the VM and capture it into the store; the VM stays paused."""
        seen = len(self.events)
        self.command("snapshot")
        with self._event:
            self._event.wait_for(
                lambda: any(e.get("event") in ("snapshot", "snapshot-error", "exit", "error")
                            for e in self.events[seen:]) or self._exited.is_set(), timeout)
        for e in self.events[seen:]:
            if e.get("event") == "snapshot":
                return e
            if e.get("event") == "snapshot-error":
                raise VmError(f"snapshot failed: {e.get('message')}")
        raise VmError(f"snapshot failed: {self.describe_exit()}")

    def serial_tail(self) -> str:
        try:
            with open(self.serial_log, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - SERIAL_TAIL))
                data = fh.read(SERIAL_TAIL)
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace")

    def exit_event(self) -> dict[str, Any] | None:
        for event in self.events:
            if event.get("event") in ("exit", "error"):
                return event
        return None

    def describe_exit(self) -> str:
        ev = self.exit_event()
        if ev is None:
            return f"the VM monitor ended (exit code {self.proc.poll()}) without a report"
        if ev["event"] == "error":
            return str(ev.get("message"))
        text = f"the VM stopped: {ev['reason']}"
        if ev.get("status") is not None:
            text += f" (status {ev['status']})"
        if ev.get("rip") is not None and ev["reason"] not in ("POWEROFF",):
            text += f" at RIP {ev['rip']:#x}"
            if ev.get("code"):
                text += f" [{ev['code']}]"
        if ev.get("detail"):
            text += f": {ev['detail']}"
        return text

    def wait_exit(self, timeout: float) -> dict[str, Any] | None:
        """Wait for the monitor to finish; stop it (TERM, then KILL) if it does not."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
        self._exited.wait(5)
        return self.exit_event()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop_process(self.proc)
        if isinstance(self.proc, ForkedMonitor):
            self.proc.close()
        self._sock.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> VmProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
