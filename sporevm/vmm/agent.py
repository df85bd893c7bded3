"""Host side of the guest agent protocol: frames, messages and a streaming decoder.

Wire format (docs/agent-protocol.md): a 16-byte little-endian header
``magic "SPAG" | version u8 = 1 | type u8 | flags u16 = 0 | stream u32 | length u32``
followed by ``length`` (≤ 64 KiB) payload bytes. Payload fields are fixed-size
integers, ``str`` = u32 length + bytes (no NUL), ``list`` = u32 count + strs.

Every byte from the guest is hostile: the decoder checks magic, version, type,
flags and length before buffering a payload, never buffers more than one frame,
and once it has rejected input it refuses everything after it (the stream is
no longer trustworthy, there is no resynchronisation on the host side).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from sporevm.errors import SporeError

MAGIC = b"SPAG"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")
HEADER_SIZE = HEADER.size  # 16
MAX_PAYLOAD = 64 * 1024
MAX_STR = MAX_PAYLOAD  # a single field can never exceed the payload anyway
MAX_ERROR_MESSAGE = 1024
MAX_ENTROPY = 1024
MAX_GENERATION_ID = 128
MAX_HOSTNAME = 64


class AgentProtocolError(SporeError):
    """The guest agent sent bytes that violate the protocol; the run cannot continue."""


class MsgType(IntEnum):
    # host -> guest
    HELLO = 0x01
    EXEC = 0x02
    SIGNAL = 0x03
    PROBE = 0x04
    SET_TIME = 0x05
    GENERATION = 0x06
    SHUTDOWN = 0x07
    # guest -> host
    READY = 0x81
    ACK = 0x82
    STARTED = 0x83
    STDOUT = 0x84
    STDERR = 0x85
    EXIT = 0x86
    ERROR = 0x87
    PROBE_RESULT = 0x88
    DONE = 0x89


HOST_TYPES = frozenset(t for t in MsgType if t < 0x80)
GUEST_TYPES = frozenset(t for t in MsgType if t >= 0x80)


class ErrorCode(IntEnum):
    BAD_FRAME = 1  # magic, version, flags or length wrong; the guest resynchronises on magic
    UNKNOWN_TYPE = 2
    BAD_PAYLOAD = 3
    BAD_STREAM = 4  # stream id in use, unknown, or 0 where an id is required
    EXEC_FAILED = 5  # errno says why (ENOENT, EACCES, chdir failure ...)
    SYSTEM = 6  # a syscall the agent needed failed
    BUSY = 7  # too many live streams
    UNSUPPORTED = 8


class ExecMode(IntEnum):
    ARGV = 0
    SHELL = 1  # argv holds exactly one string, run as /bin/sh -c STRING


class ProbeKind(IntEnum):
    FILE = 1
    TCP = 2
    COMMAND = 3


EXEC_BACKGROUND = 0x01
EXEC_CLEAR_ENV = 0x02  # do not start from the agent's default PATH/HOME/TERM
EXEC_FLAGS = EXEC_BACKGROUND | EXEC_CLEAR_ENV


@dataclass(frozen=True)
class Frame:
    type: int
    stream: int
    payload: bytes


def encode_frame(msg_type: int, stream: int, payload: bytes) -> bytes:
    if not 0 <= msg_type <= 0xFF or not 0 <= stream <= 0xFFFFFFFF:
        raise ValueError(f"frame type {msg_type} / stream {stream} out of range")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, VERSION, msg_type, 0, stream, len(payload)) + payload


class FrameDecoder:
    """Incremental frame parser; ``feed`` returns complete frames in order.

    ``accept`` is the set of types this side may receive (GUEST_TYPES on the
    host). Buffering is bounded by one header plus one maximal payload.
    """

    def __init__(self, accept: frozenset[MsgType] = GUEST_TYPES) -> None:
        self._accept = frozenset(int(t) for t in accept)
        self._buf = bytearray()
        self._need: tuple[int, int, int] | None = None  # (type, stream, length) of current frame
        self._failed: str | None = None
        self.frames = 0

    @property
    def failed(self) -> str | None:
        return self._failed

    def _fail(self, why: str) -> AgentProtocolError:
        self._failed = why
        self._buf.clear()
        return AgentProtocolError(f"guest agent protocol violation: {why}")

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed is not None:
            raise AgentProtocolError(
                f"guest agent channel already rejected ({self._failed}); no further input accepted"
            )
        out: list[Frame] = []
        view = memoryview(data)
        while True:
            if self._need is None:
                take = min(HEADER_SIZE - len(self._buf), len(view))
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < HEADER_SIZE:
                    return out
                self._need = self._check_header(bytes(self._buf))
                self._buf.clear()
            msg_type, stream, length = self._need
            take = min(length - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < length:
                return out
            out.append(Frame(msg_type, stream, bytes(self._buf)))
            self.frames += 1
            self._buf.clear()
            self._need = None

    def _check_header(self, raw: bytes) -> tuple[int, int, int]:
        magic, version, msg_type, flags, stream, length = HEADER.unpack(raw)
        at = f"frame {self.frames}"
        if magic != MAGIC:
            raise self._fail(f"{at}: bad magic {magic!r} (expected {MAGIC!r})")
        if version != VERSION:
            raise self._fail(f"{at}: protocol version {version}, this host speaks {VERSION}")
        if msg_type not in self._accept:
            raise self._fail(f"{at}: unknown or unexpected frame type 0x{msg_type:02x}")
        if flags != 0:
            raise self._fail(f"{at}: reserved flags 0x{flags:04x} set")
        if length > MAX_PAYLOAD:
            raise self._fail(f"{at}: payload length {length} exceeds {MAX_PAYLOAD}")
        return msg_type, stream, length


# -- payload fields -----------------------------------------------------------


class Reader:
    """Bounded cursor over one payload; every read is length-checked."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _err(self, why: str) -> AgentProtocolError:
        return AgentProtocolError(f"guest agent sent a malformed {self._what}: {why}")

    def _take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise self._err(f"truncated at byte {self._pos} (needs {n} more)")
        b = self._data[self._pos : self._pos + n]
        self._pos += n
        return b

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self._take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "little")

    def i32(self) -> int:
        return int.from_bytes(self._take(4), "little", signed=True)

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "little")

    def i64(self) -> int:
        return int.from_bytes(self._take(8), "little", signed=True)

    def blob(self, limit: int) -> bytes:
        n = self.u32()
        if n > limit:
            raise self._err(f"field of {n} bytes exceeds {limit}")
        return self._take(n)

    def text(self, limit: int = MAX_STR) -> str:
        raw = self.blob(limit)
        if b"\0" in raw:
            raise self._err("string contains NUL")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Guest text is shown to the user; undecodable bytes are escaped, not fatal.
            return raw.decode("utf-8", "backslashreplace")

    def texts(self) -> list[str]:
        n = self.u32()
        if n > len(self._data) // 4:  # each entry needs at least its length prefix
            raise self._err(f"list of {n} entries cannot fit the payload")
        return [self.text() for _ in range(n)]

    def rest(self) -> bytes:
        return self._take(len(self._data) - self._pos)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise self._err(f"{len(self._data) - self._pos} trailing bytes")


class Writer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(1, "little"))
        return self

    def u16(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(2, "little"))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(4, "little"))
        return self

    def i32(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(4, "little", signed=True))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(8, "little"))
        return self

    def i64(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(8, "little", signed=True))
        return self

    def blob(self, b: bytes) -> Writer:
        self.u32(len(b))
        self._parts.append(b)
        return self

    def text(self, s: str) -> Writer:
        raw = s.encode("utf-8", "surrogateescape")
        if b"\0" in raw:
            raise ValueError(f"string {s[:40]!r} contains NUL, which the guest cannot pass on")
        return self.blob(raw)

    def texts(self, items: list[str]) -> Writer:
        self.u32(len(items))
        for s in items:
            self.text(s)
        return self

    def raw(self, b: bytes) -> Writer:
        self._parts.append(b)
        return self

    def done(self) -> bytes:
        out = b"".join(self._parts)
        if len(out) > MAX_PAYLOAD:
            raise ValueError(
                f"message of {len(out)} bytes exceeds the {MAX_PAYLOAD}-byte frame limit "
                "(command, environment or path too long)"
            )
        return out


# -- messages -----------------------------------------------------------------


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
            raise r._err(f"unknown exec mode {mode}")
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
            raise r._err(f"unknown exec flags 0x{flags:02x}")
        timeout = r.u32()
        m = cls(Command.read(r), timeout, bool(flags & EXEC_BACKGROUND),
                bool(flags & EXEC_CLEAR_ENV))
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
            raise r._err(f"unknown probe kind {kind}")
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
            raise r._err(f"unknown shutdown action {action}")
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

    def encode(self) -> bytes:
        w = Writer().u32(self.protocol).text(self.agent_version).u64(self.caps)
        return w.u32(self.pid).u64(self.uptime_ns).done()

    @classmethod
    def decode(cls, payload: bytes) -> Ready:
        r = Reader(payload, "READY")
        m = cls(r.u32(), r.text(256), r.u64(), r.u32(), r.u64())
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
            raise r._err(f"bad exit kind {how}/{timed_out}")
        if not (0 <= value <= 255 if how == 0 else 1 <= value <= 128):
            raise r._err(f"exit {'signal' if how else 'code'} {value} out of range")
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
            raise r._err(f"bad ok flag {ok}")
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


_DECODERS: dict[int, type[Message]] = {
    m.TYPE: m
    for m in (Hello, Exec, Signal, Probe, SetTime, Generation, Shutdown,
              Ready, Ack, Started, Exit, Error, ProbeResult, Done)
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
