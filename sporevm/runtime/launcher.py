"""The caller's side of a VM: spawn the monitor process, talk to the guest agent, stop it.

Each VM gets a private runtime directory (mode 0700) for its serial log; the
agent channel is one end of a socketpair whose other end the monitor holds.
Config, commands and events are the typed protocol's (``monitor_config.py``,
``protocol.py``); this module never imports the monitor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from sporevm.errors import SporeError
from sporevm.pyspawn import module_argv
from sporevm.runtime.agent_session import AgentSession, FdChannel
from sporevm.runtime.monitor_config import MonitorConfig, RamImageWiring, VmConfig
from sporevm.runtime.protocol import (
    Booting,
    Command,
    CommandName,
    Event,
    Exited,
    ExitReason,
    MonitorError,
    ProtocolError,
    Restored,
    SnapshotFailed,
    SnapshotTaken,
    encode_command,
    read_events,
)
from sporevm.runtime.zygote import (
    CHILD_AGENT_FD,
    CHILD_NET_FD,
    CHILD_RAM_FD,
    ForkedMonitor,
    monitor_popen,
)

if TYPE_CHECKING:  # the egress code is loaded only for a VM with a NIC
    from sporevm.runtime.network import Network, NetworkSpec
    from sporevm.runtime.ramimage import RamImage

SERIAL_TAIL = 4000


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
    """A VM to start: what it is (the config line's ``VmConfig``) and how its monitor runs."""

    vm: VmConfig
    # False only to debug: the monitor runs without its seccomp/Landlock jail and says so
    # (SPORE_NO_JAIL=1 in the environment has the same effect; docs/jail.md).
    jail: bool = True
    # Fork the monitor from this process's zygote (shared, pre-imported; zygote.py)
    # rather than exec a fresh interpreter for each VM.
    zygote: bool | None = None  # None: yes, unless SPORE_ZYGOTE=0 in the environment
    # With the zygote on: fork the monitor from this very process instead, if it has a
    # single thread (zygote.fork_monitor_here). Only for a one-off caller that holds
    # nothing secret (`spore run --from`): the monitor starts with a copy of its memory.
    fork_here: bool = False
    # The VM's network: its egress gateway starts before the monitor, which gets a NIC
    # wired to it. None: no gateway, no NIC (docs/network.md).
    network: NetworkSpec | None = None
    # An eager restore's RAM, read and verified into a sealed memfd by this process
    # (ramimage.py): the monitor maps it instead of reading the chunks. The caller
    # still owns (and closes) the fd.
    ram_image: RamImage | None = None


class VmProcess:
    def __init__(self, spec: VmSpec) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="spore-vm-", dir=base))
        os.chmod(self.runtime_dir, 0o700)
        self.serial_log = self.runtime_dir / "serial.log"
        self.proc: MonitorProcess
        zygote = (
            spec.zygote if spec.zygote is not None else os.environ.get("SPORE_ZYGOTE", "1") != "0"
        )
        self.spec = spec
        # The gateway first: a policy or passt that cannot start fails before any VM.
        self.network: Network | None = None
        if spec.network is not None:
            from sporevm.runtime.network import Network

            self.network = Network(spec.network)
        try:
            net_fd = self.network.monitor_fd if self.network is not None else None
            ram_fd = spec.ram_image.fd if spec.ram_image is not None else None

            def config(agent_fd: int, net_in_monitor: int, ram_in_monitor: int) -> bytes:
                return MonitorConfig(
                    spec.vm,
                    agent_fd,
                    self.serial_log,
                    self.network.wiring(net_in_monitor) if self.network is not None else None,
                    (
                        RamImageWiring(ram_in_monitor, spec.ram_image.index)
                        if spec.ram_image is not None
                        else None
                    ),
                ).encode()

            if zygote:
                # The zygote's env is fixed at its start; say the jail choice per child.
                jail = spec.jail and os.environ.get("SPORE_NO_JAIL", "") in ("", "0")
                # Its descriptors sit at fixed numbers: the config line goes into its
                # stdin before the fork, so the monitor starts reading it at once.
                line = config(CHILD_AGENT_FD, CHILD_NET_FD, CHILD_RAM_FD)
                self.proc, ours, _ = monitor_popen(
                    jail, net_fd, ram_fd=ram_fd, config=line, fork_here=spec.fork_here
                )
            else:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                line = config(
                    theirs.fileno(),
                    net_fd if net_fd is not None else -1,
                    ram_fd if ram_fd is not None else -1,
                )
            self._sock = ours
            if not zygote:
                passed = (theirs.fileno(),) + tuple(fd for fd in (net_fd, ram_fd) if fd is not None)
                self.proc = subprocess.Popen(
                    module_argv("sporevm.runtime.monitor"),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    pass_fds=passed,
                    env=None if spec.jail else {**os.environ, "SPORE_NO_JAIL": "1"},
                )
                theirs.close()
        except BaseException:
            if self.network is not None:
                self.network.stop()
            raise
        if self.network is not None:
            self.network.handed_over()  # the monitor holds the channel now
        assert self.proc.stdin is not None
        if not zygote:  # a zygote's or forked child has its config line already
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        # stdin stays open: the control channel (snapshot, resume, stop)
        self.events: list[Event] = []
        self._event = threading.Condition()
        self._exited = threading.Event()
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()
        self.session = AgentSession(FdChannel(ours.fileno()))

    def _read_events(self) -> None:
        """Collect the monitor's events, bounded and checked (protocol.read_events): a
        monitor is the process that runs guest code, so a compromised one must neither
        exhaust this process nor feed it anything but well-formed events."""
        assert self.proc.stdout is not None
        try:
            for event in read_events(self.proc.stdout):
                with self._event:
                    self.events.append(event)
                    self._event.notify_all()
        except ProtocolError as exc:
            with self._event:
                self.events.append(MonitorError(f"the VM monitor sent {exc}; stopped it"))
                self._event.notify_all()
            self.proc.kill()
        self._exited.set()
        with self._event:
            self._event.notify_all()

    def command(self, cmd: Command | CommandName) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(encode_command(Command(cmd)))
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise VmError(f"the VM monitor is gone: {self.describe_exit()}") from None

    def snapshot(self, timeout: float = 600.0) -> SnapshotTaken:
        """Pause the VM and capture it into the store; the VM stays paused."""
        seen = len(self.events)
        self.command(Command.SNAPSHOT)
        ends = (SnapshotTaken, SnapshotFailed, Exited, MonitorError)
        with self._event:
            self._event.wait_for(
                lambda: (
                    any(isinstance(e, ends) for e in self.events[seen:]) or self._exited.is_set()
                ),
                timeout,
            )
        for e in self.events[seen:]:
            if isinstance(e, SnapshotTaken):
                if len(e.chunks) * e.chunk_size != self.spec.vm.memory:
                    raise VmError(
                        f"snapshot failed: the monitor indexed {len(e.chunks)} chunks "
                        f"of {e.chunk_size} B for {self.spec.vm.memory} B of RAM"
                    )
                return e
            if isinstance(e, SnapshotFailed):
                raise VmError(f"snapshot failed: {e.message}")
        raise VmError(f"snapshot failed: {self.describe_exit()}")

    def wait_started(self, timeout: float) -> None:
        """Until the monitor says its VM is about to run (Booting or Restored), or it
        ended; either way the agent session says what happened next."""
        with self._event:
            self._event.wait_for(
                lambda: (
                    any(isinstance(e, Booting | Restored) for e in self.events)
                    or self._exited.is_set()
                ),
                timeout,
            )

    def serial_tail(self) -> str:
        try:
            with open(self.serial_log, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - SERIAL_TAIL))
                data = fh.read(SERIAL_TAIL)
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace")

    def exit_event(self) -> Exited | MonitorError | None:
        for event in self.events:
            if isinstance(event, Exited | MonitorError):
                return event
        return None

    def describe_exit(self) -> str:
        ev = self.exit_event()
        if ev is None:
            return f"the VM monitor ended (exit code {self.proc.poll()}) without a report"
        if isinstance(ev, MonitorError):
            return ev.message
        text = f"the VM stopped: {ev.reason.value}"
        if ev.status is not None:
            text += f" (status {ev.status})"
        if ev.rip is not None and ev.reason is not ExitReason.POWEROFF:
            text += f" at RIP {ev.rip:#x}"
            if ev.code:
                text += f" [{ev.code.hex()}]"
        if ev.detail:
            text += f": {ev.detail}"
        return text

    def wait_exit(self, timeout: float) -> Exited | MonitorError | None:
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
        if self.network is not None:
            self.network.stop()  # after the monitor: the gateway sees its channel end
        self._sock.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> VmProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
