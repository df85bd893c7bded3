"""The typed protocol between a VM monitor and its caller (docs/vmm.md, "The spore
microVM and the monitor process").

    caller ──stdin: one config line (MonitorConfig), then Command lines──► monitor
    caller ◄─stdout: Event lines──────────────────────────────────────────  monitor

Both ends use only this module and ``monitor_config.py`` (the config line): the
launcher never imports the monitor, and a second backend's monitor (QEMU TCG,
docs/vmm.md "Backends") speaks the same lines. Every line is one JSON object.

Trust. The config and the commands come from the caller, which the monitor
still checks strictly (``MonitorConfig.decode``, ``decode_command``). The events
come from the process that runs guest code: jailed, but if a guest ever escaped
into it, what it writes is hostile input to the caller. So ``read_events`` bounds the line
size and count, and ``decode_event`` accepts only an object with exactly the
fields of one known event, each in range (ids are ``blake3:<64 hex>``, counts
and sizes bounded, text without control characters or lone surrogates, so an
event printed to the user's terminal cannot steer it). Any violation is one
ProtocolError; the caller stops the monitor.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal

from sporevm.errors import SporeError
from sporevm.spore.chunks import CHUNK, MAX_OBJECT
from sporevm.strictjson import no_duplicate_keys, reject_constant

MAX_CONFIG = 64 * 1024  # the config line, and each command line
# A snapshot event lists every chunk id: ~75 B x 131072 chunks for the largest guest.
MAX_EVENT_LINE = 16 << 20
MAX_EVENTS = 100_000  # a build emits a few per step
MAX_TEXT = 64 * 1024  # an event's free text: a message, the cmdline, a path
MAX_MEMORY = 3 << 30  # Machine: RAM stops at the 3 GiB MMIO hole
MAX_CHUNKS = MAX_MEMORY // CHUNK
MAX_TIMEOUT = 1e9  # seconds; NaN and infinities fail the range check
MAX_CODE = 16  # instruction bytes at RIP in an exit event
MAX_EXIT_CLASSES = 64  # exit classes in an exit event (the VMM has ~20)
MAX_COUNT = (1 << 63) - 1
EXIT_CLASS = re.compile(r"[a-z0-9_:]{1,32}", re.IGNORECASE)
DIGEST = re.compile(r"blake3:[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ProtocolError(SporeError):
    """A config, command or event line that is not exactly what the protocol allows."""


class RestoreStrategy(enum.StrEnum):
    """How a restore fills guest RAM (docs/restore.md)."""

    EAGER = "eager"  # every chunk read and verified before the VM exists
    LAZY = "lazy"  # faulted in, one verified chunk at a time (userfaultfd)
    LOCAL = "local"  # a verified memory file in the store, mapped MAP_PRIVATE


# --- commands (caller → monitor) -------------------------------------------------------------


class Command(enum.StrEnum):
    """What the caller asks of a running monitor, one per line after the config."""

    SNAPSHOT = "snapshot"  # pause, capture into the store (the VM stays paused)
    RESUME = "resume"  # run again after a snapshot
    STOP = "stop"  # end the VM


CommandName = Literal["snapshot", "resume", "stop"]


def encode_command(cmd: Command) -> bytes:
    return json.dumps({"cmd": cmd.value}).encode() + b"\n"


def decode_command(line: bytes) -> Command:
    """A command line: exactly ``{"cmd": <name>}``; anything else is a ProtocolError."""
    doc = _load(line, MAX_CONFIG, "command")
    if set(doc) != {"cmd"} or doc["cmd"] not in _COMMANDS:
        raise ProtocolError(f"not a command (one of {', '.join(_COMMANDS)})")
    return Command(doc["cmd"])


_COMMANDS = tuple(c.value for c in Command)


# --- events (monitor → caller: untrusted) ----------------------------------------------------


class ExitReason(enum.StrEnum):
    """Why the VM stopped (the names of ``sporevm.vmm.machine.StopReason``)."""

    POWEROFF = "POWEROFF"
    RESET = "RESET"
    SHUTDOWN = "SHUTDOWN"
    HALTED = "HALTED"
    DEADLINE = "DEADLINE"
    PAUSED = "PAUSED"


@dataclass(frozen=True)
class Booting:
    """The kernel is loaded; the guest starts with this command line."""

    cmdline: str


@dataclass(frozen=True)
class Restored:
    """The spore's state is applied; the guest resumes."""

    manifest: str


@dataclass(frozen=True)
class StateRef:
    digest: str  # blake3:<64 hex>, in the store's chunk CAS
    size: int


@dataclass(frozen=True)
class SnapshotTaken:
    """The paused VM is in the store: its state object and its memory index."""

    state: StateRef
    chunk_size: int
    chunks: tuple[str | None, ...]  # one per 2 MiB of RAM; None: all zeros
    hashed: int  # chunks read and hashed (the rest were clean since the last snapshot)
    seconds: float
    settle_seconds: float  # how long the guest was given to go idle first (quiesce.py)
    settled: bool


@dataclass(frozen=True)
class SnapshotFailed:
    message: str


@dataclass(frozen=True)
class MonitorError:
    """The monitor's last word when serving the VM failed: one line for the user."""

    message: str


@dataclass(frozen=True)
class ExitClass:
    """VM exits of one class over the VM's life and the host time spent handling them
    (sporevm/vmm/vcpu_loop.py names the classes; docs/bench.md, bench_exits.py)."""

    name: str  # EXIT_CLASS
    count: int
    ns: int


@dataclass(frozen=True)
class Exited:
    """The VM stopped: why, the power-off status, where vCPU 0 was, and its exit counts."""

    reason: ExitReason
    status: int | None
    rip: int | None
    code: bytes | None  # instruction bytes at rip, best effort
    detail: str
    exits: tuple[ExitClass, ...] = ()


Event = Booting | Restored | SnapshotTaken | SnapshotFailed | MonitorError | Exited


def text(value: str, limit: int = MAX_TEXT) -> str:
    """``value`` as an event may carry it: control characters and lone surrogates replaced,
    at most ``limit`` characters (what the monitor sends always decodes)."""
    value = value.encode("utf-8", "replace").decode("utf-8")
    value = _CONTROL.sub("?", value)
    return value if len(value) <= limit else value[: limit - 1] + "…"


def encode_event(ev: Event) -> bytes:
    """One event line (the monitor's side); ``decode_event`` reads it back unchanged."""
    doc: dict[str, Any]
    if isinstance(ev, Booting):
        doc = {"event": "booting", "cmdline": ev.cmdline}
    elif isinstance(ev, Restored):
        doc = {"event": "restored", "manifest": ev.manifest}
    elif isinstance(ev, SnapshotTaken):
        doc = {
            "event": "snapshot",
            "state": {"digest": ev.state.digest, "size": ev.state.size},
            "chunk_size": ev.chunk_size,
            "chunks": list(ev.chunks),
            "hashed": ev.hashed,
            "seconds": ev.seconds,
            "settle_seconds": ev.settle_seconds,
            "settled": ev.settled,
        }
    elif isinstance(ev, SnapshotFailed):
        doc = {"event": "snapshot-error", "message": ev.message}
    elif isinstance(ev, MonitorError):
        doc = {"event": "error", "message": ev.message}
    else:
        doc = {
            "event": "exit",
            "reason": ev.reason.value,
            "status": ev.status,
            "rip": ev.rip,
            "code": ev.code.hex() if ev.code else None,
            "detail": ev.detail,
            "exits": [[e.name, e.count, e.ns] for e in ev.exits],
        }
    return json.dumps(doc).encode() + b"\n"


def decode_event(line: bytes) -> Event:
    """One event line from a monitor, checked in full (module docstring)."""
    doc = _load(line, MAX_EVENT_LINE, "event")
    name = doc.get("event")
    decoder = _EVENTS.get(name) if isinstance(name, str) else None
    if decoder is None:
        raise ProtocolError(f"an unknown event {str(name)[:40]!r}")
    fields, build = decoder
    if set(doc) != fields | {"event"}:
        missing, extra = sorted(fields - set(doc)), sorted(set(doc) - fields - {"event"})
        raise ProtocolError(
            f"a {name!r} event with missing fields {missing}, "
            f"unknown fields {[e[:40] for e in extra[:5]]}"
        )
    return build(doc)


def read_events(
    stream: IO[bytes], *, max_line: int | None = None, max_events: int | None = None
) -> Iterator[Event]:
    """The events on ``stream`` until EOF; ProtocolError at the first line over the size
    bound, beyond the count bound, or not a valid event (the caller stops the monitor)."""
    max_line = MAX_EVENT_LINE if max_line is None else max_line
    max_events = MAX_EVENTS if max_events is None else max_events
    count = 0
    while line := stream.readline(max_line + 1):
        if len(line) > max_line:
            raise ProtocolError(f"an event line over {max_line} bytes")
        if count >= max_events:
            raise ProtocolError(f"more than {max_events} events")
        count += 1
        try:
            yield decode_event(line)
        except ProtocolError as e:
            raise ProtocolError(f"a malformed event line {count}: {e}") from None


def _load(line: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(line) > limit:
        raise ProtocolError(f"{what}: over {limit} bytes")
    try:
        doc = json.loads(
            line.decode("utf-8"),
            object_pairs_hook=no_duplicate_keys,
            parse_constant=reject_constant,
        )
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"{what}: not JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what}: not a JSON object")
    return doc


def _digest(value: object) -> bool:
    return isinstance(value, str) and DIGEST.fullmatch(value) is not None


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc[name]
    if not isinstance(value, str) or len(value) > MAX_TEXT or _CONTROL.search(value):
        raise ProtocolError(
            f"{name}: expected text of <= {MAX_TEXT} characters without control characters"
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ProtocolError(f"{name}: a lone surrogate") from None
    return value


def _int(value: object, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{name}: expected an integer in [{lo}, {hi}]")
    return value


def _opt_int(value: object, name: str, lo: int, hi: int) -> int | None:
    return None if value is None else _int(value, name, lo, hi)


def _seconds(value: object, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and 0 <= value <= MAX_TIMEOUT)
    ):
        raise ProtocolError(f"{name}: expected a number of seconds in [0, {MAX_TIMEOUT:g}]")
    return float(value)


def _snapshot(doc: dict[str, Any]) -> SnapshotTaken:
    state = doc["state"]
    if not isinstance(state, dict) or set(state) != {"digest", "size"}:
        raise ProtocolError("state: expected exactly {digest, size}")
    if not _digest(state["digest"]):
        raise ProtocolError("state.digest: expected blake3:<64 hex>")
    _int(doc["chunk_size"], "chunk_size", CHUNK, CHUNK)
    chunks = doc["chunks"]
    if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_CHUNKS:
        raise ProtocolError(f"chunks: expected a list of 1..{MAX_CHUNKS} chunk ids")
    for i, c in enumerate(chunks):
        if c is not None and not _digest(c):
            raise ProtocolError(f"chunks[{i}]: expected null or blake3:<64 hex>")
    settled = doc["settled"]
    if not isinstance(settled, bool):
        raise ProtocolError("settled: expected a boolean")
    return SnapshotTaken(
        state=StateRef(state["digest"], _int(state["size"], "state.size", 1, MAX_OBJECT)),
        chunk_size=CHUNK,
        chunks=tuple(chunks),
        hashed=_int(doc["hashed"], "hashed", 0, len(chunks)),
        seconds=_seconds(doc["seconds"], "seconds"),
        settle_seconds=_seconds(doc["settle_seconds"], "settle_seconds"),
        settled=settled,
    )


def _exited(doc: dict[str, Any]) -> Exited:
    reason = doc["reason"]
    if reason not in _REASONS:
        raise ProtocolError(f"reason: expected one of {', '.join(_REASONS)}")
    code = doc["code"]
    if code is not None and not (isinstance(code, str) and _CODE.fullmatch(code)):
        raise ProtocolError(f"code: expected null or 1..{MAX_CODE} bytes of lowercase hex")
    return Exited(
        reason=ExitReason(reason),
        status=_opt_int(doc["status"], "status", 0, 0xFFFF_FFFF),
        rip=_opt_int(doc["rip"], "rip", 0, (1 << 64) - 1),
        code=bytes.fromhex(code) if code is not None else None,
        detail=_text(doc, "detail"),
        exits=_exit_classes(doc["exits"]),
    )


def _exit_classes(value: object) -> tuple[ExitClass, ...]:
    if not isinstance(value, list) or len(value) > MAX_EXIT_CLASSES:
        raise ProtocolError(f"exits: expected a list of at most {MAX_EXIT_CLASSES} classes")
    out: list[ExitClass] = []
    for i, item in enumerate(value):
        if not (isinstance(item, list) and len(item) == 3):
            raise ProtocolError(f"exits[{i}]: expected [name, count, ns]")
        name = item[0]
        if not (isinstance(name, str) and EXIT_CLASS.fullmatch(name)):
            raise ProtocolError(f"exits[{i}]: expected a name of 1..32 of [A-Za-z0-9_:]")
        count = _int(item[1], f"exits[{i}].count", 0, MAX_COUNT)
        out.append(ExitClass(name, count, _int(item[2], f"exits[{i}].ns", 0, MAX_COUNT)))
    if len({e.name for e in out}) != len(out):
        raise ProtocolError("exits: a class named twice")
    return tuple(out)


_REASONS = tuple(r.value for r in ExitReason)
_CODE = re.compile(f"(?:[0-9a-f]{{2}}){{1,{MAX_CODE}}}")
_EVENTS: dict[str, tuple[set[str], Callable[[dict[str, Any]], Event]]] = {
    "booting": ({"cmdline"}, lambda d: Booting(_text(d, "cmdline"))),
    "restored": ({"manifest"}, lambda d: Restored(_text(d, "manifest"))),
    "snapshot": (
        {"state", "chunk_size", "chunks", "hashed", "seconds", "settle_seconds", "settled"},
        _snapshot,
    ),
    "snapshot-error": ({"message"}, lambda d: SnapshotFailed(_text(d, "message"))),
    "error": ({"message"}, lambda d: MonitorError(_text(d, "message"))),
    "exit": ({"reason", "status", "rip", "code", "detail", "exits"}, _exited),
}
