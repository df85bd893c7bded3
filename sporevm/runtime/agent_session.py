"""A host-side session with the guest agent over one duplex byte channel.

The session is single-threaded: whoever waits (``ExecHandle.wait``, ``probe``,
``hello`` ...) pumps the channel, and frames for every stream are dispatched as
they arrive, so background commands keep streaming while a later step runs.
Every wait has a host-side deadline: a guest that stops answering is an error,
never a hang.
"""

from __future__ import annotations

import os
import queue
import select
import signal as _signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sporevm.errors import SporeError
from sporevm.runtime.agent import (
    VERSION,
    AgentProtocolError,
    ErrorCode,
    Frame,
    FrameDecoder,
    MsgType,
    ProbeKind,
)
from sporevm.runtime.agent_messages import (
    Ack,
    Command,
    Done,
    Error,
    Exec,
    Exit,
    Generation,
    Hello,
    Message,
    NetConfig,
    Output,
    Probe,
    ProbeResult,
    Ready,
    SetTime,
    Shutdown,
    Signal,
    Started,
    decode_message,
    message_frame,
)

DEFAULT_GRACE = 10.0  # seconds the host waits beyond a guest-side timeout
CAPTURE_LIMIT = 1 << 20  # output tail kept per stream when no callback is given

OutputCallback = Callable[[bytes], None]


class AgentError(SporeError):
    """The guest agent refused or failed a request."""

    def __init__(self, message: str, code: int = 0, errno: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.errno = errno


class AgentExecError(AgentError):
    """A command could not be started (chdir or exec failed in the guest)."""


class AgentTimeoutError(SporeError):
    """The guest agent did not answer within the host-side deadline."""


class AgentClosedError(SporeError):
    """The agent channel closed (the guest powered off, crashed or was stopped)."""


class Channel(Protocol):
    def send(self, data: bytes) -> None:
        """Write all of ``data`` (may block; host requests are small)."""

    def recv(self, timeout: float | None) -> bytes | None:
        """Some bytes; ``b""`` at end of stream; ``None`` if nothing came within ``timeout``."""


class FdChannel:
    """A Channel over file descriptors (a socketpair end, or a pipe pair)."""

    def __init__(self, rfd: int, wfd: int | None = None) -> None:
        self.rfd = rfd
        self.wfd = rfd if wfd is None else wfd

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def wait_writable(self, timeout: float) -> bool:
        """Whether a write would not block within ``timeout`` (copies stream many frames
        and must not hang on a guest that stopped reading)."""
        _, ready, _ = select.select([], [self.wfd], [], timeout)
        return bool(ready)

    def recv(self, timeout: float | None) -> bytes | None:
        ready, _, _ = select.select([self.rfd], [], [], timeout)
        if not ready:
            return None
        try:
            return os.read(self.rfd, 1 << 16)
        except ConnectionResetError:
            return b""  # the peer (monitor) is gone: end of stream


class QueueChannel:
    """A Channel over a device with callbacks (e.g. the virtio-console port).

    The device thread calls ``feed`` with guest bytes (``b""`` for hang-up);
    ``write`` is a non-blocking writer that returns how many bytes it accepted;
    the device calls ``writable`` when it has room again.
    """

    def __init__(self, write: Callable[[bytes], int], *, stall: float = 30.0) -> None:
        self._write = write
        self._stall = stall
        self._incoming: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._room = threading.Event()

    def feed(self, data: bytes) -> None:
        self._incoming.put(bytes(data))

    def writable(self) -> None:
        self._room.set()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._room.clear()
            n = self._write(bytes(view))
            view = view[n:]
            if view and not n and not self._room.wait(self._stall):
                raise AgentTimeoutError(
                    f"guest agent has not read its channel for {self._stall:.0f} s"
                )

    def recv(self, timeout: float | None) -> bytes | None:
        try:
            return self._incoming.get(timeout=timeout)
        except queue.Empty:
            return None


class StreamHandler(Protocol):
    """Whatever owns a stream: every frame of it is handed over, in order."""

    def _on(self, msg: Message) -> None: ...


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    timed_out: bool
    elapsed: float  # seconds, measured by the guest from fork to reap
    user_time: float
    system_time: float

    @property
    def returncode(self) -> int:
        """Shell convention: the exit code, or 128 + signal number."""
        return self.exit_code if self.exit_code is not None else 128 + (self.signal or 0)

    def describe(self) -> str:
        if self.timed_out:
            return f"timed out after {self.elapsed:.1f} s (killed by signal {self.signal})"
        if self.signal is not None:
            name = _signal.Signals(self.signal).name if self.signal in _SIGNALS else "?"
            return f"killed by signal {self.signal} ({name})"
        return f"exited with code {self.exit_code}"


_SIGNALS = {s.value for s in _signal.Signals}


class _Tail:
    """The last ``limit`` bytes written."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk
        over = len(self.data) - self.limit
        if over > 0:
            del self.data[:over]
            self.dropped += over


@dataclass
class _Request:
    """A request answered by one ACK/DONE/PROBE_RESULT or ERROR frame."""

    what: str
    reply: Message | None = None


@dataclass(eq=False)
class ExecHandle:
    session: AgentSession
    stream: int
    what: str
    guest_timeout: float | None
    on_stdout: OutputCallback
    on_stderr: OutputCallback
    pid: int | None = None
    status: ExitStatus | None = None
    error: AgentError | None = None
    captured: tuple[_Tail | None, _Tail | None] = field(default=(None, None))

    @property
    def done(self) -> bool:
        return self.status is not None or self.error is not None

    @property
    def stdout(self) -> bytes:
        """Captured stdout tail (only when no on_stdout callback was given)."""
        return bytes(self.captured[0].data) if self.captured[0] else b""

    @property
    def stderr(self) -> bytes:
        return bytes(self.captured[1].data) if self.captured[1] else b""

    def wait_started(self, timeout: float = 30.0) -> int:
        """Block until the guest confirmed the exec; the pid in the guest."""
        self.session._pump_until(
            lambda: self.pid is not None or self.done, timeout, f"start of {self.what}"
        )
        if self.error:
            raise self.error
        if self.pid is None:  # exited before STARTED cannot happen; be explicit anyway
            raise AgentProtocolError(f"guest agent finished {self.what} without STARTED")
        return self.pid

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Block until the command exits. Default deadline: guest timeout + grace, else none."""
        if timeout is None and self.guest_timeout is not None:
            timeout = self.guest_timeout + self.session.grace
        self.session._pump_until(lambda: self.done, timeout, self.what)
        if self.error:
            raise self.error
        assert self.status is not None
        return self.status

    def signal(self, signo: int) -> None:
        """Send a signal to the command's process group (fire and forget)."""
        if not self.done:
            self.session._send(Signal(signo), self.stream)

    def kill(self) -> None:
        self.signal(_signal.SIGKILL)

    def _on(self, msg: Message) -> None:
        if isinstance(msg, Started):
            self.pid = msg.pid
        elif isinstance(msg, Output):
            (self.on_stderr if msg.stderr else self.on_stdout)(msg.data)
        elif isinstance(msg, Exit):
            self.status = ExitStatus(
                None if msg.signaled else msg.value,
                msg.value if msg.signaled else None,
                msg.timed_out,
                msg.elapsed_ns / 1e9,
                msg.utime_us / 1e6,
                msg.stime_us / 1e6,
            )
            self.session._streams.pop(self.stream, None)
        elif isinstance(msg, Error):
            if self.pid is not None and msg.code in (ErrorCode.BAD_STREAM, ErrorCode.SYSTEM):
                return  # a SIGNAL raced with the exit; harmless
            cls = AgentExecError if msg.code == ErrorCode.EXEC_FAILED else AgentError
            self.error = cls(f"{self.what}: {msg.message}", msg.code, msg.errno)
            self.session._streams.pop(self.stream, None)
        elif isinstance(msg, Done):
            pass  # acknowledgement of a SIGNAL
        else:
            raise AgentProtocolError(
                f"guest agent sent {type(msg).__name__} on command stream {self.stream}"
            )


def _command(
    run: Command | Sequence[str] | str, env: Mapping[str, str] | None, cwd: str
) -> Command:
    if isinstance(run, Command):
        return run
    env_list = tuple(f"{k}={v}" for k, v in (env or {}).items())
    if isinstance(run, str):
        return Command((run,), True, env_list, cwd)
    return Command(tuple(run), False, env_list, cwd)


class AgentSession:
    def __init__(self, channel: Channel, *, grace: float = DEFAULT_GRACE) -> None:
        self.channel = channel
        self.grace = grace
        self.ready: Ready | None = None
        self.orphan_frames = 0  # output/exit for streams this session does not know
        self._decoder = FrameDecoder()
        self._streams: dict[int, StreamHandler | _Request] = {}
        self.caps: int | None = None  # request types the agent understands (READY/ACK)
        self._next = 1
        self._closed = False

    # -- plumbing ------------------------------------------------------------
    def _alloc(self) -> int:
        sid = self._next
        self._next = self._next + 1 if self._next < 0xFFFFFFFF else 1
        return sid

    def _send(self, msg: Message, stream: int) -> None:
        if self._closed:
            raise AgentClosedError("guest agent channel is closed")
        try:
            self.channel.send(message_frame(msg, stream))
        except (BrokenPipeError, ConnectionResetError):
            # The other end (the VM monitor) is gone: as when a read finds it gone.
            raise AgentClosedError("guest agent channel is closed") from None

    def _pump_until(self, cond: Callable[[], bool], timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not cond():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise AgentTimeoutError(f"guest agent: no answer for {what} within {timeout:.1f} s")
            self.pump(left)

    def pump(self, timeout: float | None) -> bool:
        """Receive once (waiting at most ``timeout``) and dispatch every complete frame;
        False if nothing arrived."""
        if self._closed:
            raise AgentClosedError("guest agent channel is closed")
        data = self.channel.recv(timeout)
        if data is None:
            return False
        if data == b"":
            self._closed = True
            raise AgentClosedError(
                "guest agent channel closed (the guest stopped, crashed or powered off)"
            )
        for frame in self._decoder.feed(data):
            self._dispatch(frame)
        return True

    def _dispatch(self, frame: Frame) -> None:
        msg = decode_message(frame)
        if isinstance(msg, Ready):
            if msg.protocol != VERSION:
                raise AgentProtocolError(
                    f"guest agent {msg.agent_version} speaks protocol {msg.protocol}, "
                    f"this host speaks {VERSION}; rebuild the initramfs"
                )
            self.ready = msg
            self.caps = msg.caps
            return
        target = self._streams.get(frame.stream)
        if target is None:
            if isinstance(msg, Error) and msg.code in (
                ErrorCode.BAD_FRAME,
                ErrorCode.UNKNOWN_TYPE,
                ErrorCode.BAD_PAYLOAD,
            ):
                raise AgentProtocolError(f"guest agent rejected a host frame: {msg.message}")
            # Output/exit of streams from before a restore, or a SIGNAL reply after EXIT.
            self.orphan_frames += 1
            return
        if not isinstance(target, _Request):
            target._on(msg)
            return
        if isinstance(msg, Output | Started | Exit):
            raise AgentProtocolError(
                f"guest agent sent {type(msg).__name__} for request stream {frame.stream}"
            )
        target.reply = msg
        del self._streams[frame.stream]

    def _request(self, msg: Message, what: str, timeout: float) -> Message:
        return self._requests([(msg, what)], timeout)[0]

    def _requests(self, msgs: Sequence[tuple[Message, str]], timeout: float) -> list[Message]:
        """Send every request at once, then wait for all their replies: one round trip.
        The agent handles requests in the order they arrive, one at a time."""
        reqs = [(self._alloc(), _Request(what)) for _, what in msgs]
        try:
            for (sid, req), (msg, _) in zip(reqs, msgs, strict=True):
                self._streams[sid] = req
                self._send(msg, sid)
            what = " and ".join(req.what for _, req in reqs)
            self._pump_until(lambda: all(r.reply is not None for _, r in reqs), timeout, what)
        finally:
            for sid, _ in reqs:
                self._streams.pop(sid, None)
        replies = []
        for _, req in reqs:
            reply = req.reply
            if isinstance(reply, Error):
                raise AgentError(
                    f"guest agent: {req.what} failed: {reply.message}", reply.code, reply.errno
                )
            assert reply is not None
            replies.append(reply)
        return replies

    # -- streams of other modules (copies: copyio.py) ---------------------------
    def open_stream(self, handler: StreamHandler) -> int:
        """A fresh stream id whose frames go to ``handler._on``."""
        sid = self._alloc()
        self._streams[sid] = handler
        return sid

    def close_stream(self, sid: int) -> None:
        """Forget a stream: later frames for it are counted and dropped."""
        self._streams.pop(sid, None)

    def send(self, msg: Message, stream: int) -> None:
        self._send(msg, stream)

    def wait_for(self, cond: Callable[[], bool], timeout: float | None, what: str) -> None:
        self._pump_until(cond, timeout, what)

    # -- API -----------------------------------------------------------------
    def wait_ready(self, timeout: float) -> Ready:
        """Wait for the agent's unsolicited READY (sent once, when it starts)."""
        self._pump_until(lambda: self.ready is not None, timeout, "agent READY")
        assert self.ready is not None
        return self.ready

    def hello(self, timeout: float = 10.0, *, generation: Generation | None = None) -> Ack:
        """Handshake that also works after a restore, when no READY will come.

        ``generation``: sent right behind HELLO, so a restore costs one round trip for
        both; it must be DONE too before this returns (and so before any command)."""
        nonce = int.from_bytes(os.urandom(8), "little")
        msgs: list[tuple[Message, str]] = [(Hello(nonce), "HELLO")]
        if generation is not None:
            msgs.append((generation, "GENERATION"))
        reply, *rest = self._requests(msgs, timeout)
        if not isinstance(reply, Ack) or reply.nonce != nonce:
            raise AgentProtocolError("guest agent answered HELLO without a matching ACK")
        if rest and not isinstance(rest[0], Done):
            raise AgentProtocolError(
                f"guest agent answered GENERATION with {type(rest[0]).__name__}"
            )
        self.caps = reply.caps
        return reply

    def exec(
        self,
        run: Command | Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        timeout: float | None = None,
        background: bool = False,
        clear_env: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        capture_limit: int = CAPTURE_LIMIT,
    ) -> ExecHandle:
        """Start a command (argv list, or one shell string run by /bin/sh -c).

        Returns at once; output goes to the callbacks (or a bounded capture)
        while anything pumps the session. ``timeout`` is enforced by the guest
        (the process group is killed) and, with a grace period, by the host.
        """
        cmd = _command(run, env, cwd)
        if timeout is not None and not 0 < timeout <= 0xFFFFFFFF / 1000:
            raise ValueError(f"timeout {timeout} s out of range")
        out_tail = None if on_stdout else _Tail(capture_limit)
        err_tail = None if on_stderr else _Tail(capture_limit)
        sid = self._alloc()
        what = "command " + (cmd.argv[0] if cmd.shell else " ".join(cmd.argv))[:80]
        handle = ExecHandle(
            self,
            sid,
            what,
            timeout,
            on_stdout or out_tail or (lambda b: None),
            on_stderr or err_tail or (lambda b: None),
            captured=(out_tail, err_tail),
        )
        msg = Exec(
            cmd, 0 if timeout is None else max(1, round(timeout * 1000)), background, clear_env
        )
        payload = msg.encode()  # validate before registering the stream
        del payload
        self._streams[sid] = handle
        self._send(msg, sid)
        return handle

    def probe(self, probe: Probe, *, timeout: float | None = None) -> ProbeResult:
        """Poll a readiness condition in the guest until it holds or its timeout passes."""
        if probe.kind == ProbeKind.COMMAND and probe.command is None:
            raise ValueError("a command probe needs a command")
        wait = timeout if timeout is not None else probe.timeout_ms / 1000 + self.grace
        reply = self._request(probe, f"ready probe ({probe.kind.name.lower()})", wait)
        if not isinstance(reply, ProbeResult):
            raise AgentProtocolError(f"guest agent answered PROBE with {type(reply).__name__}")
        return reply

    def set_time(self, when: float | None = None, timeout: float = 10.0) -> None:
        t = time.time_ns() if when is None else int(when * 1e9)
        self._expect_done(SetTime(t // 10**9, t % 10**9), "SET_TIME", timeout)

    def apply_generation(self, gen: Generation, timeout: float = 10.0) -> None:
        self._expect_done(gen, "GENERATION", timeout)

    def configure_network(self, cfg: NetConfig, timeout: float = 10.0) -> None:
        """Address, route and resolv.conf of the guest's NIC (before the first command,
        and again after every restore)."""
        self._expect_done(cfg, "NET_CONFIG", timeout)

    def shutdown(self, reboot: bool = False, timeout: float = 10.0) -> None:
        """Ask the guest to sync and power off; returns once it acknowledged."""
        self._expect_done(Shutdown(reboot), "SHUTDOWN", timeout)

    def _expect_done(self, msg: Message, what: str, timeout: float) -> None:
        reply = self._request(msg, what, timeout)
        if not isinstance(reply, Done):
            raise AgentProtocolError(f"guest agent answered {what} with {type(reply).__name__}")


__all__ = [
    "AgentClosedError",
    "AgentError",
    "AgentExecError",
    "AgentSession",
    "AgentTimeoutError",
    "Channel",
    "Command",
    "ExecHandle",
    "ExitStatus",
    "FdChannel",
    "Generation",
    "MsgType",
    "Probe",
    "ProbeKind",
    "ProbeResult",
    "QueueChannel",
]
