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
MAX_PATH = 4096  # a copy's guest path


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
    COPY_IN = 0x08
    COPY_DATA = 0x09  # archive bytes of a COPY_IN; an empty payload ends the archive
    COPY_OUT = 0x0A
    NET_CONFIG = 0x0E  # 0x08-0x0D: the copy messages (issue 17)
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
    COPY_OUT_DATA = 0x8A  # archive bytes of a COPY_OUT


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
    COPY_REFUSED = 9  # a copy broke its rules or bounds (a member name, a limit)


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

    def error(self, why: str) -> AgentProtocolError:
        return AgentProtocolError(f"guest agent sent a malformed {self._what}: {why}")

    def _take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise self.error(f"truncated at byte {self._pos} (needs {n} more)")
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
            raise self.error(f"field of {n} bytes exceeds {limit}")
        return self._take(n)

    def text(self, limit: int = MAX_STR) -> str:
        raw = self.blob(limit)
        if b"\0" in raw:
            raise self.error("string contains NUL")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Guest text is shown to the user; undecodable bytes are escaped, not fatal.
            return raw.decode("utf-8", "backslashreplace")

    def texts(self) -> list[str]:
        n = self.u32()
        if n > len(self._data) // 4:  # each entry needs at least its length prefix
            raise self.error(f"list of {n} entries cannot fit the payload")
        return [self.text() for _ in range(n)]

    def rest(self) -> bytes:
        return self._take(len(self._data) - self._pos)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise self.error(f"{len(self._data) - self._pos} trailing bytes")


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
