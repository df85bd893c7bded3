"""The typed protocol between a VM monitor and its caller (docs/vmm.md, "The monitor process").

    caller ──stdin: one config line (MonitorConfig), then Command lines──► monitor
    caller ◄─stdout: Event lines──────────────────────────────────────────  monitor

Both ends use only this module: the launcher never imports the monitor, and a
second backend's monitor (QEMU TCG, docs/vmm.md "Backends") speaks the same
lines. Every line is one JSON object.

Trust. The config and the commands come from the caller, which the monitor
still checks strictly (``MonitorConfig.decode``). The events come from the
process that runs guest code: jailed, but if a guest ever escaped into it, what
it writes is hostile input to the caller. So ``read_events`` bounds the line
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
from pathlib import Path
from typing import IO, Any, Literal

from sporevm.errors import SporeError
from sporevm.spore.chunks import CHUNK, MAX_OBJECT
from sporevm.strictjson import no_duplicate_keys, reject_constant

MAX_CONFIG = 64 * 1024  # the config line, and each command line
# A snapshot event lists every chunk id: ~75 B x 131072 chunks for the largest guest.
MAX_EVENT_LINE = 16 << 20
MAX_EVENTS = 100_000  # a build emits a few per step
MAX_TEXT = 64 * 1024  # an event's free text: a message, the cmdline, a path
MIN_MEMORY = 2 << 20  # boot.e820_map's minimum
MAX_MEMORY = 3 << 30  # Machine: RAM stops at the 3 GiB MMIO hole
MAX_CHUNKS = MAX_MEMORY // CHUNK
PAGE = 4096
MAX_VCPUS = 64
MAX_FD = (1 << 31) - 1
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


# --- the config line ------------------------------------------------------------------------


@dataclass(frozen=True)
class Restore:
    """A spore to resume instead of booting: its manifest, as the caller checked it."""

    manifest: Path  # the spore's manifest.json
    # The id of the manifest the caller decoded and checked in full; the monitor accepts
    # only bytes with this id, so it can skip the schema pass (and importing jsonschema).
    manifest_id: str
    # The caller's verified digests of the host's kernel and initrd (the platform
    # contract's); the restored RAM already holds the kernel, so the monitor neither reads
    # nor re-hashes the two files (~25 ms and ~16 MiB of heap per VM).
    kernel_digest: str
    initrd_digest: str
    ram: RestoreStrategy = RestoreStrategy.EAGER


@dataclass(frozen=True)
class VmConfig:
    """One VM: what to boot (or resume) and on what. The caller's ``VmSpec`` holds one."""

    kernel: Path
    initrd: Path
    rootfs: Path  # opened read-only by the monitor
    cmdline: str  # the kernel's own options; the board appends its device declarations
    memory: int
    vcpus: int = 1
    timeout: float | None = None  # wall-clock safety net for the whole VM
    store: Path | None = None  # store root: memory chunks and state objects (spores)
    restore: Restore | None = None
    # False: this VM is never snapshotted (a one-off `spore run`): KVM's dirty log is never
    # turned on (its RAM keeps 2 MiB mappings after a restore) and the jail refuses
    # KVM_SET_USER_MEMORY_REGION from its stage 2 on. A VM without a store cannot be
    # snapshotted either way.
    snapshots: bool = True


@dataclass(frozen=True)
class NetWiring:
    """The VM's NIC: the monitor's end of the frame channel to its egress gateway (an
    already-open socket; the monitor creates none), the guest's MAC and MTU."""

    fd: int
    mac: bytes
    mtu: int


@dataclass(frozen=True)
class MonitorConfig:
    """The config line: the VM, plus what the launcher wired for this monitor process."""

    vm: VmConfig
    agent_fd: int  # the monitor's end of the agent socket
    serial_log: Path  # where the serial console goes (a private runtime directory)
    net: NetWiring | None = None  # None: the VM has no NIC

    def wire(self) -> dict[str, Any]:
        """The flat JSON object of the config line (the field names are the protocol's)."""
        vm, r = self.vm, self.vm.restore
        return {
            "kernel": str(vm.kernel),
            "initrd": str(vm.initrd),
            "rootfs": str(vm.rootfs),
            "cmdline": vm.cmdline,
            "memory": vm.memory,
            "vcpus": vm.vcpus,
            "agent_fd": self.agent_fd,
            "serial_log": str(self.serial_log),
            "timeout": vm.timeout,
            "store": str(vm.store) if vm.store is not None else "",
            "restore": str(r.manifest) if r else None,
            "ram": (r.ram if r else RestoreStrategy.EAGER).value,
            "restore_id": r.manifest_id if r else None,
            "kernel_digest": r.kernel_digest if r else None,
            "initrd_digest": r.initrd_digest if r else None,
            "net_fd": self.net.fd if self.net else None,
            "net_mac": self.net.mac.hex() if self.net else None,
            "net_mtu": self.net.mtu if self.net else None,
            "snapshots": vm.snapshots,
        }

    def encode(self) -> bytes:
        return json.dumps(self.wire(), sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> MonitorConfig:
        """Parse and check the config line; any defect is a one-line SporeError."""
        if len(line) > MAX_CONFIG:
            raise ProtocolError("monitor: config line too long")
        try:
            doc = json.loads(line, object_pairs_hook=no_duplicate_keys)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ProtocolError(f"monitor: config line is not JSON ({type(e).__name__})") from None
        if isinstance(doc, dict):
            doc.setdefault("ram", "eager")  # optional fields: older callers omit them
            doc.setdefault("restore_id", None)
            doc.setdefault("kernel_digest", None)
            doc.setdefault("initrd_digest", None)
            for name in ("net_fd", "net_mac", "net_mtu"):
                doc.setdefault(name, None)
            doc.setdefault("snapshots", True)
        if not isinstance(doc, dict) or set(doc) != _CONFIG_FIELDS:
            raise ProtocolError("monitor: config has unexpected or missing fields")
        paths = {
            name: _config_str(doc, name, path=True)
            for name in ("kernel", "initrd", "rootfs", "serial_log")
        }
        store = _config_str(doc, "store", path=True) if doc["store"] != "" else None
        restoring = doc["restore"] is not None
        manifest = _config_str(doc, "restore", path=True) if restoring else None
        rid = doc["restore_id"]
        if (rid is None) == restoring or (rid is not None and not _digest(rid)):
            raise ProtocolError(
                "monitor: config restore_id must be the restored manifest's "
                "blake3:<64 hex> id, exactly when restore is set"
            )
        for name in ("kernel_digest", "initrd_digest"):
            value = doc[name]
            if (value is None) == restoring or (value is not None and not _digest(value)):
                raise ProtocolError(
                    f"monitor: config {name} must be a blake3:<64 hex> digest, "
                    "exactly when restore is set"
                )
        cmdline = _config_str(doc, "cmdline", path=False)
        if doc["ram"] not in _STRATEGIES:
            raise ProtocolError(f"monitor: config ram must be one of {', '.join(_STRATEGIES)}")
        memory = _config_int(doc, "memory", MIN_MEMORY, MAX_MEMORY)
        if memory % PAGE:
            raise ProtocolError(f"monitor: config memory {memory} is not a multiple of {PAGE}")
        vcpus = _config_int(doc, "vcpus", 1, MAX_VCPUS)
        agent_fd = _config_int(doc, "agent_fd", 3, MAX_FD)
        timeout = doc["timeout"]
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_TIMEOUT
        ):
            raise ProtocolError("monitor: config timeout must be null or a number in (0, 1e9]")
        if not isinstance(doc["snapshots"], bool):
            raise ProtocolError("monitor: config snapshots must be true or false")
        restore = None
        if manifest is not None:
            restore = Restore(
                Path(manifest),
                rid,
                doc["kernel_digest"],
                doc["initrd_digest"],
                RestoreStrategy(doc["ram"]),
            )
        vm = VmConfig(
            kernel=Path(paths["kernel"]),
            initrd=Path(paths["initrd"]),
            rootfs=Path(paths["rootfs"]),
            cmdline=cmdline,
            memory=memory,
            vcpus=vcpus,
            timeout=None if timeout is None else float(timeout),
            store=Path(store) if store is not None else None,
            restore=restore,
            snapshots=doc["snapshots"],
        )
        return cls(vm, agent_fd, Path(paths["serial_log"]), _config_net(doc, agent_fd))


_CONFIG_FIELDS = {
    "kernel",
    "initrd",
    "rootfs",
    "cmdline",
    "memory",
    "vcpus",
    "agent_fd",
    "serial_log",
    "timeout",
    "store",
    "restore",
    "ram",
    "restore_id",
    "kernel_digest",
    "initrd_digest",
    "net_fd",
    "net_mac",
    "net_mtu",
    "snapshots",
}
MIN_MTU, MAX_MTU = 68, 65522  # virtio-net's bounds (a frame <= 64 KiB with its header)
_MAC = re.compile(r"[0-9a-f]{12}")
_STRATEGIES = tuple(s.value for s in RestoreStrategy)


def _config_net(doc: dict[str, Any], agent_fd: int) -> NetWiring | None:
    """net_fd, net_mac, net_mtu: all null (no NIC) or all set."""
    names = ("net_fd", "net_mac", "net_mtu")
    if all(doc[n] is None for n in names):
        return None
    if any(doc[n] is None for n in names):
        raise ProtocolError(
            "monitor: config net_fd, net_mac and net_mtu must be all set or all null"
        )
    fd = _config_int(doc, "net_fd", 3, MAX_FD)
    if fd == agent_fd:
        raise ProtocolError("monitor: config net_fd must differ from agent_fd")
    mac = doc["net_mac"]
    if not isinstance(mac, str) or not _MAC.fullmatch(mac):
        raise ProtocolError("monitor: config net_mac must be 12 lowercase hex digits")
    raw = bytes.fromhex(mac)
    if raw[0] & 1 or raw == bytes(6):
        raise ProtocolError("monitor: config net_mac must be a unicast, non-zero MAC")
    return NetWiring(fd, raw, _config_int(doc, "net_mtu", MIN_MTU, MAX_MTU))


def _digest(value: object) -> bool:
    return isinstance(value, str) and DIGEST.fullmatch(value) is not None


def _config_str(doc: dict[str, Any], name: str, *, path: bool) -> str:
    value = doc[name]
    if not isinstance(value, str) or "\0" in value or (path and not value):
        what = "a non-empty string" if path else "a string"
        raise ProtocolError(f"monitor: config {name} must be {what} without NUL")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ProtocolError(f"monitor: config {name} is not valid UTF-8 (lone surrogate)") from None
    return value


def _config_int(doc: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"monitor: config {name} must be an integer in [{lo}, {hi}]")
    return value


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
