"""Typed messages of the guest agent protocol (payload layouts: docs/agent-protocol.md).

Each message encodes its payload with ``Writer`` and decodes with ``Reader``;
decoding consumes the payload exactly and raises AgentProtocolError otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sporevm.runtime.agent import (
    EXEC_BACKGROUND,
    EXEC_CLEAR_ENV,
    EXEC_FLAGS,
    MAX_ENTROPY,
    MAX_ERROR_MESSAGE,
    MAX_GENERATION_ID,
    MAX_HOSTNAME,
    MAX_PATH,
    AgentProtocolError,
    ExecMode,
    Frame,
    MsgType,
    ProbeKind,
    Reader,
    Writer,
    encode_frame,
)


class Message:
    TYPE: ClassVar[MsgType]

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: bytes) -> Message:
        raise NotImplementedError


@dataclass(frozen=True)
class Hello(Message):
    TYPE = MsgType.HELLO
    nonce: int
    host_caps: int = 0

    def encode(self) -> bytes:
        return Writer().u64(self.nonce).u32(self.host_caps).done()

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        r = Reader(payload, "HELLO")
        m = cls(r.u64(), r.u32())
        r.end()
        return m


@dataclass(frozen=True)
class Command:
    """What to run: an argv list, or one shell string for /bin/sh -c."""

    argv: tuple[str, ...]
    shell: bool = False
    env: tuple[str, ...] = ()  # KEY=VALUE, added to (overriding) the agent's defaults
    cwd: str = "/"

    def write(self, w: Writer) -> None:
        w.u8(ExecMode.SHELL if self.shell else ExecMode.ARGV)
        w.text(self.cwd).texts(list(self.argv)).texts(list(self.env))

    @classmethod
    def read(cls, r: Reader) -> Command:
        mode = r.u8()
        if mode not in (ExecMode.ARGV, ExecMode.SHELL):
            raise r.error(f"unknown exec mode {mode}")
        cwd = r.text()
        argv = tuple(r.texts())
        env = tuple(r.texts())
        return cls(argv, mode == ExecMode.SHELL, env, cwd)

    def check(self) -> None:
        """Refuse what the guest would refuse, before sending it."""
        if not self.argv or (self.shell and len(self.argv) != 1):
            raise ValueError("a command needs a non-empty argv, or exactly one shell string")
        if not self.cwd.startswith("/"):
            raise ValueError(f"working directory {self.cwd!r} is not absolute")
        for e in self.env:
            if "=" not in e or e.startswith("="):
                raise ValueError(f"environment entry {e!r} is not KEY=VALUE")


@dataclass(frozen=True)
class Exec(Message):
    TYPE = MsgType.EXEC
    command: Command
    timeout_ms: int = 0  # 0: no guest-side timeout
    background: bool = False
    clear_env: bool = False

    def encode(self) -> bytes:
        self.command.check()
        flags = (EXEC_BACKGROUND if self.background else 0) | (
            EXEC_CLEAR_ENV if self.clear_env else 0
        )
        w = Writer().u8(flags).u32(self.timeout_ms)
        self.command.write(w)
        return w.done()

    @classmethod
    def decode(cls, payload: bytes) -> Exec:
        r = Reader(payload, "EXEC")
        flags = r.u8()
        if flags & ~EXEC_FLAGS:
            raise r.error(f"unknown exec flags 0x{flags:02x}")
        timeout = r.u32()
        m = cls(
            Command.read(r), timeout, bool(flags & EXEC_BACKGROUND), bool(flags & EXEC_CLEAR_ENV)
        )
        r.end()
        return m


@dataclass(frozen=True)
class Signal(Message):
    TYPE = MsgType.SIGNAL
    signo: int

    def encode(self) -> bytes:
        return Writer().u32(self.signo).done()

    @classmethod
    def decode(cls, payload: bytes) -> Signal:
        r = Reader(payload, "SIGNAL")
        m = cls(r.u32())
        r.end()
        return m


@dataclass(frozen=True)
class Probe(Message):
    TYPE = MsgType.PROBE
    kind: ProbeKind
    timeout_ms: int
    interval_ms: int = 100
    path: str = ""  # FILE
    port: int = 0  # TCP
    command: Command | None = None  # COMMAND

    def encode(self) -> bytes:
        w = Writer().u8(self.kind).u32(self.timeout_ms).u32(self.interval_ms)
        if self.kind == ProbeKind.FILE:
            w.text(self.path)
        elif self.kind == ProbeKind.TCP:
            w.u16(self.port)
        else:
            if self.command is None:
                raise ValueError("a command probe needs a command")
            self.command.check()
            self.command.write(w)
        return w.done()

    @classmethod
    def decode(cls, payload: bytes) -> Probe:
        r = Reader(payload, "PROBE")
        kind = r.u8()
        timeout, interval = r.u32(), r.u32()
        if kind == ProbeKind.FILE:
            m = cls(ProbeKind.FILE, timeout, interval, path=r.text())
        elif kind == ProbeKind.TCP:
            m = cls(ProbeKind.TCP, timeout, interval, port=r.u16())
        elif kind == ProbeKind.COMMAND:
            m = cls(ProbeKind.COMMAND, timeout, interval, command=Command.read(r))
        else:
            raise r.error(f"unknown probe kind {kind}")
        r.end()
        return m


@dataclass(frozen=True)
class SetTime(Message):
    TYPE = MsgType.SET_TIME
    sec: int
    nsec: int = 0

    def encode(self) -> bytes:
        return Writer().i64(self.sec).u32(self.nsec).done()

    @classmethod
    def decode(cls, payload: bytes) -> SetTime:
        r = Reader(payload, "SET_TIME")
        m = cls(r.i64(), r.u32())
        r.end()
        return m


@dataclass(frozen=True)
class Generation(Message):
    """Fork identity applied before any user command of a restored child runs."""

    TYPE = MsgType.GENERATION
    generation_id: str
    parent_id: str = ""
    index: int = 0
    count: int = 1
    hostname: str = ""  # empty: leave the hostname alone
    entropy: bytes = b""
    time: tuple[int, int] | None = None  # (sec, nsec) wall clock to set

    def encode(self) -> bytes:
        w = Writer().text(self.generation_id).text(self.parent_id)
        w.u32(self.index).u32(self.count).text(self.hostname).blob(self.entropy)
        sec, nsec = self.time or (0, 0)
        return w.u8(self.time is not None).i64(sec).u32(nsec).done()

    @classmethod
    def decode(cls, payload: bytes) -> Generation:
        r = Reader(payload, "GENERATION")
        gid, parent = r.text(MAX_GENERATION_ID), r.text(MAX_GENERATION_ID)
        index, count = r.u32(), r.u32()
        hostname, entropy = r.text(MAX_HOSTNAME), r.blob(MAX_ENTROPY)
        has_time, sec, nsec = r.u8(), r.i64(), r.u32()
        r.end()
        return cls(gid, parent, index, count, hostname, entropy, (sec, nsec) if has_time else None)


@dataclass(frozen=True)
class NetConfig(Message):
    """The NIC's static setup (docs/network.md): IPv4 address/prefix, default route via
    ``gateway``, ``/etc/resolv.conf`` naming ``nameserver``, the MTU. Addresses are
    host-order u32."""

    TYPE = MsgType.NET_CONFIG
    address: int
    prefix: int
    gateway: int
    nameserver: int
    mtu: int

    def encode(self) -> bytes:
        w = Writer().u32(self.address).u8(self.prefix).u32(self.gateway)
        return w.u32(self.nameserver).u32(self.mtu).done()

    @classmethod
    def decode(cls, payload: bytes) -> NetConfig:
        r = Reader(payload, "NET_CONFIG")
        m = cls(r.u32(), r.u8(), r.u32(), r.u32(), r.u32())
        r.end()
        return m


@dataclass(frozen=True)
class Shutdown(Message):
    TYPE = MsgType.SHUTDOWN
    reboot: bool = False

    def encode(self) -> bytes:
        return Writer().u8(1 if self.reboot else 0).done()

    @classmethod
    def decode(cls, payload: bytes) -> Shutdown:
        r = Reader(payload, "SHUTDOWN")
        action = r.u8()
        if action > 1:
            raise r.error(f"unknown shutdown action {action}")
        r.end()
        return cls(action == 1)


@dataclass(frozen=True)
class Ready(Message):
    TYPE = MsgType.READY
    protocol: int
    agent_version: str
    caps: int
    pid: int
    uptime_ns: int
    cpus: int = 1  # CPUs online in the guest when the agent started

    def encode(self) -> bytes:
        w = Writer().u32(self.protocol).text(self.agent_version).u64(self.caps)
        return w.u32(self.pid).u64(self.uptime_ns).u32(self.cpus).done()

    @classmethod
    def decode(cls, payload: bytes) -> Ready:
        r = Reader(payload, "READY")
        m = cls(r.u32(), r.text(256), r.u64(), r.u32(), r.u64(), r.u32())
        r.end()
        return m


@dataclass(frozen=True)
class Ack(Message):
    TYPE = MsgType.ACK
    nonce: int
    agent_version: str
    caps: int

    def encode(self) -> bytes:
        return Writer().u64(self.nonce).text(self.agent_version).u64(self.caps).done()

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        r = Reader(payload, "ACK")
        m = cls(r.u64(), r.text(256), r.u64())
        r.end()
        return m


@dataclass(frozen=True)
class Started(Message):
    TYPE = MsgType.STARTED
    pid: int

    def encode(self) -> bytes:
        return Writer().u32(self.pid).done()

    @classmethod
    def decode(cls, payload: bytes) -> Started:
        r = Reader(payload, "STARTED")
        m = cls(r.u32())
        r.end()
        return m


@dataclass(frozen=True)
class Output(Message):
    """A STDOUT or STDERR chunk; the payload is the raw bytes."""

    TYPE = MsgType.STDOUT
    data: bytes
    stderr: bool = False

    def encode(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, payload: bytes) -> Output:
        return cls(payload)


@dataclass(frozen=True)
class Exit(Message):
    TYPE = MsgType.EXIT
    signaled: bool
    value: int  # exit code, or the signal number when signaled
    timed_out: bool
    elapsed_ns: int
    utime_us: int
    stime_us: int

    def encode(self) -> bytes:
        w = Writer().u8(self.signaled).u8(self.timed_out).i32(self.value)
        return w.u64(self.elapsed_ns).u64(self.utime_us).u64(self.stime_us).done()

    @classmethod
    def decode(cls, payload: bytes) -> Exit:
        r = Reader(payload, "EXIT")
        how, timed_out, value = r.u8(), r.u8(), r.i32()
        if how > 1 or timed_out > 1:
            raise r.error(f"bad exit kind {how}/{timed_out}")
        if not (0 <= value <= 255 if how == 0 else 1 <= value <= 128):
            raise r.error(f"exit {'signal' if how else 'code'} {value} out of range")
        m = cls(how == 1, value, timed_out == 1, r.u64(), r.u64(), r.u64())
        r.end()
        return m


@dataclass(frozen=True)
class Error(Message):
    TYPE = MsgType.ERROR
    code: int
    errno: int
    message: str

    def encode(self) -> bytes:
        return Writer().u16(self.code).i32(self.errno).text(self.message).done()

    @classmethod
    def decode(cls, payload: bytes) -> Error:
        r = Reader(payload, "ERROR")
        m = cls(r.u16(), r.i32(), r.text(MAX_ERROR_MESSAGE))
        r.end()
        return m


@dataclass(frozen=True)
class ProbeResult(Message):
    TYPE = MsgType.PROBE_RESULT
    ok: bool
    attempts: int
    elapsed_ns: int
    last: int  # errno (file, tcp) or wait status summary (command) of the last attempt

    def encode(self) -> bytes:
        w = Writer().u8(self.ok).u32(self.attempts).u64(self.elapsed_ns)
        return w.i32(self.last).done()

    @classmethod
    def decode(cls, payload: bytes) -> ProbeResult:
        r = Reader(payload, "PROBE_RESULT")
        ok = r.u8()
        if ok > 1:
            raise r.error(f"bad ok flag {ok}")
        m = cls(ok == 1, r.u32(), r.u64(), r.i32())
        r.end()
        return m


@dataclass(frozen=True)
class Done(Message):
    TYPE = MsgType.DONE

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> Done:
        Reader(payload, "DONE").end()
        return cls()


@dataclass(frozen=True)
class CopyIn(Message):
    """Unpack the tar archive that follows (COPY_DATA frames) at ``dest``."""

    TYPE = MsgType.COPY_IN
    dest: str  # absolute guest path; the archive's root member lands there
    uid: int = 0  # owner of every entry created
    gid: int = 0

    def encode(self) -> bytes:
        if not self.dest.startswith("/"):
            raise ValueError(f"copy-in destination {self.dest!r} is not absolute")
        for v in (self.uid, self.gid):
            if not 0 <= v < 0xFFFFFFFF:
                raise ValueError(f"owner id {v} out of range")
        return Writer().text(self.dest).u32(self.uid).u32(self.gid).done()

    @classmethod
    def decode(cls, payload: bytes) -> CopyIn:
        r = Reader(payload, "COPY_IN")
        m = cls(r.text(MAX_PATH), r.u32(), r.u32())
        r.end()
        return m


@dataclass(frozen=True)
class CopyOut(Message):
    """Send ``path`` as a tar archive (COPY_OUT_DATA frames, then DONE)."""

    TYPE = MsgType.COPY_OUT
    path: str
    max_bytes: int  # the host's bounds, so an honest guest stops before sending
    max_entries: int

    def encode(self) -> bytes:
        if not self.path.startswith("/"):
            raise ValueError(f"copy-out path {self.path!r} is not absolute")
        return Writer().text(self.path).u64(self.max_bytes).u64(self.max_entries).done()

    @classmethod
    def decode(cls, payload: bytes) -> CopyOut:
        r = Reader(payload, "COPY_OUT")
        m = cls(r.text(MAX_PATH), r.u64(), r.u64())
        r.end()
        return m


@dataclass(frozen=True)
class CopyData(Message):
    """Archive bytes: host to guest (COPY_DATA, empty = end) or guest to host."""

    TYPE = MsgType.COPY_DATA
    data: bytes

    def encode(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, payload: bytes) -> CopyData:
        return cls(payload)


@dataclass(frozen=True)
class CopyOutData(CopyData):
    TYPE = MsgType.COPY_OUT_DATA

    @classmethod
    def decode(cls, payload: bytes) -> CopyOutData:
        return cls(payload)


_DECODERS: dict[int, type[Message]] = {
    m.TYPE: m
    for m in (
        Hello,
        Exec,
        Signal,
        Probe,
        SetTime,
        Generation,
        NetConfig,
        Shutdown,
        Ready,
        Ack,
        Started,
        Exit,
        Error,
        ProbeResult,
        Done,
        CopyIn,
        CopyOut,
        CopyData,
        CopyOutData,
    )
}


def decode_message(frame: Frame) -> Message:
    """Typed message for a frame; AgentProtocolError for malformed payloads."""
    if frame.type in (MsgType.STDOUT, MsgType.STDERR):
        return Output(frame.payload, frame.type == MsgType.STDERR)
    cls = _DECODERS.get(frame.type)
    if cls is None:
        raise AgentProtocolError(f"guest agent sent unknown frame type 0x{frame.type:02x}")
    return cls.decode(frame.payload)


def message_frame(msg: Message, stream: int) -> bytes:
    if isinstance(msg, Output):
        return encode_frame(MsgType.STDERR if msg.stderr else MsgType.STDOUT, stream, msg.data)
    return encode_frame(msg.TYPE, stream, msg.encode())
