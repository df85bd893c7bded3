"""The VM monitor process: one VM, spawned by `spore run` / `spore build`.

It opens what it needs (kernel, initrd, rootfs read-only), builds the board,
boots, and bridges the guest agent's virtio-console port to a socket its
caller holds. Events go to stdout as JSON lines; nothing here parses OCI, tar
or Sporefiles. (The seccomp jail is the hardening issue's.) When serving the VM
fails, the monitor's last word is one ``{"event": "error", "message": ...}`` line,
for an I/O error or a bug too, never a traceback: that line is what the user reads.

    caller ──stdin: one JSON config line──► monitor
    caller ◄─stdout: {"event": ...} lines── monitor
    caller ◄═agent socket (fd in config)══► monitor ◄═virtio-console═► guest agent
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import blake3

from sporevm.errors import SporeError
from sporevm.spore import manifest, vmstate
from sporevm.spore.backing import open_local
from sporevm.spore.capture import capture
from sporevm.spore.chunks import ChunkStore, snapshot_memory
from sporevm.spore.confine import MonitorJail, release_staging
from sporevm.spore.restore import eager_ram, restore_board
from sporevm.strictjson import no_duplicate_keys
from sporevm.vmm import kvm
from sporevm.vmm.board import DEVICE_MODEL, Board, BoardConfig, build_board
from sporevm.vmm.machine import ExitResult, Machine, StopReason
from sporevm.vmm.memory import GuestMemory
from sporevm.vmm.quiesce import Settle, wait_until_idle

MAX_CONFIG = 64 * 1024
MAX_IMAGE = 256 << 20
MAX_SERIAL_LOG = 16 << 20


@dataclass(frozen=True)
class MonitorConfig:
    kernel: str
    initrd: str
    rootfs: str
    cmdline: str
    memory: int
    vcpus: int
    agent_fd: int
    serial_log: str
    timeout: float | None  # wall-clock safety net for the whole VM
    store: str = ""  # store root holding memory chunks and state objects ("" : no spores)
    restore: str | None = None  # manifest.json of a spore to resume instead of booting
    ram: str = "eager"  # restore strategy: "eager" | "lazy" | "local" (docs/restore.md)
    # The id of the manifest the caller decoded and checked in full; the monitor accepts
    # only bytes with this id, so it can skip the schema pass (and importing jsonschema).
    restore_id: str | None = None
    # On a restore, the caller's verified digests of the host's kernel and initrd (the
    # platform contract's); the restored RAM already holds the kernel, so the monitor
    # neither reads nor re-hashes the two files (~25 ms and ~16 MiB of heap per VM).
    kernel_digest: str | None = None
    initrd_digest: str | None = None

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> MonitorConfig:
        """Parse and check the config line; any defect is a one-line SporeError."""
        if len(line) > MAX_CONFIG:
            raise SporeError("monitor: config line too long")
        try:
            doc = json.loads(line, object_pairs_hook=no_duplicate_keys)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise SporeError(f"monitor: config line is not JSON ({type(e).__name__})") from None
        if isinstance(doc, dict):
            doc.setdefault("ram", "eager")  # optional fields: older callers omit them
            doc.setdefault("restore_id", None)
            doc.setdefault("kernel_digest", None)
            doc.setdefault("initrd_digest", None)
        if not isinstance(doc, dict) or set(doc) != set(cls.__dataclass_fields__):
            raise SporeError("monitor: config has unexpected or missing fields")
        for name in ("kernel", "initrd", "rootfs", "serial_log"):
            _check_str(doc, name, path=True)
        if doc["store"] != "":
            _check_str(doc, "store", path=True)
        if doc["restore"] is not None:
            _check_str(doc, "restore", path=True)
        rid = doc["restore_id"]
        if (rid is None) != (doc["restore"] is None) or (
            rid is not None and not (isinstance(rid, str) and _MANIFEST_ID.fullmatch(rid))
        ):
            raise SporeError("monitor: config restore_id must be the restored manifest's "
                             "blake3:<64 hex> id, exactly when restore is set")
        for name in ("kernel_digest", "initrd_digest"):
            value = doc[name]
            if (value is None) != (doc["restore"] is None) or (
                value is not None
                and not (isinstance(value, str) and _MANIFEST_ID.fullmatch(value))
            ):
                raise SporeError(f"monitor: config {name} must be a blake3:<64 hex> digest, "
                                 "exactly when restore is set")
        _check_str(doc, "cmdline", path=False)
        if doc["ram"] not in RAM_STRATEGIES:
            raise SporeError(f"monitor: config ram must be one of {', '.join(RAM_STRATEGIES)}")
        _check_int(doc, "memory", MIN_MEMORY, MAX_MEMORY)
        if doc["memory"] % PAGE:
            raise SporeError(f"monitor: config memory {doc['memory']} is not a multiple of {PAGE}")
        _check_int(doc, "vcpus", 1, MAX_VCPUS)
        _check_int(doc, "agent_fd", 3, MAX_FD)
        timeout = doc["timeout"]
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_TIMEOUT
        ):
            raise SporeError("monitor: config timeout must be null or a number in (0, 1e9]")
        return cls(**doc)


RAM_STRATEGIES = ("eager", "lazy", "local")
_MANIFEST_ID = re.compile(r"blake3:[0-9a-f]{64}")
MIN_MEMORY = 2 << 20  # boot.e820_map's minimum
MAX_MEMORY = 3 << 30  # Machine: RAM stops at the 3 GiB MMIO hole
PAGE = 4096
MAX_VCPUS = 64
MAX_FD = (1 << 31) - 1
MAX_TIMEOUT = 1e9  # seconds; NaN and infinities fail the range check


def _check_str(doc: dict[str, Any], name: str, *, path: bool) -> None:
    value = doc[name]
    if not isinstance(value, str) or "\0" in value or (path and not value):
        what = "a non-empty string" if path else "a string"
        raise SporeError(f"monitor: config {name} must be {what} without NUL")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise SporeError(f"monitor: config {name} is not valid UTF-8 (lone surrogate)") from None


def _check_int(doc: dict[str, Any], name: str, lo: int, hi: int) -> None:
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SporeError(f"monitor: config {name} must be an integer in [{lo}, {hi}]")


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _read_file(path: str, what: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(MAX_IMAGE + 1)
    if len(data) > MAX_IMAGE:
        raise SporeError(f"monitor: {what} {path} is larger than {MAX_IMAGE >> 20} MiB")
    return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(cfg: MonitorConfig) -> ExitResult:
    # Held only until loaded: a vmlinux is ~15 MiB, per VM, for nothing. A restore
    # never loads them (the caller vouches for their digests: MonitorConfig).
    images: dict[str, bytes] = {} if cfg.restore is not None else {
        "kernel": _read_file(cfg.kernel, "kernel"), "initrd": _read_file(cfg.initrd, "initrd")}
    rootfs_fd = os.open(cfg.rootfs, os.O_RDONLY | os.O_CLOEXEC)
    serial_fd = os.open(cfg.serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                        0o600)
    room = threading.Event()
    hung_up = threading.Event()
    written = 0

    def serial_sink(data: bytes) -> None:
        """The boot log, capped: a guest spinning on the UART must not fill the host disk."""
        nonlocal written
        if written >= MAX_SERIAL_LOG:
            return
        data = data[: MAX_SERIAL_LOG - written]
        written += len(data)
        _write_all(serial_fd, data)
        if written >= MAX_SERIAL_LOG:
            _write_all(serial_fd, b"\n[spore: serial log capped here]\n")

    def agent_output(data: bytes) -> None:
        try:
            _write_all(cfg.agent_fd, data)
        except OSError:
            hung_up.set()  # the caller went away; the pump thread stops the VM

    board_cfg = BoardConfig(cfg.memory, cfg.vcpus, cfg.cmdline, rootfs_fd,
                            os.fstat(rootfs_fd).st_size)
    wiring: dict[str, Any] = dict(
        on_agent_output=agent_output, on_agent_writable=room.set, serial_output=serial_sink,
        dirty_log=True,  # snapshots hash only chunks written since the last one (dirty.py)
    )
    # The jail (docs/jail.md), stage 1: files, while no thread exists (Landlock covers
    # only threads started after it). Stage 2 (syscalls) comes before the first KVM_RUN.
    jailed = MonitorJail(cfg.store, cfg.restore)
    chunks = ChunkStore(jailed.store) if jailed.store is not None else None
    jailed.files()
    if cfg.restore is not None:
        if chunks is None:
            raise SporeError("monitor: restoring a spore needs the store root in the config")
        assert cfg.kernel_digest is not None and cfg.initrd_digest is not None  # decode()
        board = _restored_board(cfg, cfg.kernel_digest, cfg.initrd_digest, rootfs_fd,
                                board_cfg, chunks, wiring)
    else:
        board = build_board(board_cfg, **wiring)
    machine = board.machine
    commands: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    def pump() -> None:
        """Caller → guest: feed the console, waiting for room when the guest is slow."""
        while True:
            try:
                data = os.read(cfg.agent_fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                hung_up.set()
                machine.pause()
                return
            while data:
                room.clear()
                data = data[board.console.send(data) :]
                if data:
                    room.wait(0.5)

    def control() -> None:
        """Caller → monitor commands, one JSON object per line on stdin."""
        # Raw reads on fd 0: a daemon thread blocked inside sys.stdin's buffered reader
        # aborts the interpreter at exit ("could not acquire lock ... at shutdown").
        pending = b""
        while True:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            pending = pending[-MAX_CONFIG:]
            for line in lines:
                try:
                    cmd = json.loads(line[:MAX_CONFIG])
                except ValueError:
                    continue
                if isinstance(cmd, dict) and cmd.get("cmd") in ("snapshot", "resume", "stop"):
                    if cmd["cmd"] == "snapshot":
                        # Let the guest finish its queued work first, or every restore
                        # of this snapshot would redo it before answering (quiesce.py).
                        settle = wait_until_idle(machine.vcpu_threads)
                        cmd = {"cmd": "snapshot", "settle": settle}
                    commands.put(cmd)
                    machine.pause()
        commands.put({"cmd": "stop"})

    signal.signal(signal.SIGTERM, lambda _s, _f: machine.pause())
    try:
        if cfg.restore is None:
            machine.load_kernel(images.pop("kernel"), board.cmdline, images.pop("initrd"),
                                rng_seed=os.urandom(32))
            _emit("booting", cmdline=board.cmdline)
        else:
            _emit("restored", manifest=cfg.restore)
        release_freed_heap()
        jailed.syscalls()  # the jail, stage 2: seccomp on every thread from here on
        threading.Thread(target=pump, name="agent-pump", daemon=True).start()
        threading.Thread(target=control, name="control", daemon=True).start()
        deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
        while True:
            result = machine.run(deadline)
            if result.reason is not StopReason.PAUSED or hung_up.is_set():
                return result
            try:
                cmd = commands.get_nowait()
            except queue.Empty:
                return result  # SIGTERM
            while cmd["cmd"] == "snapshot":
                if chunks is None:
                    _emit("snapshot-error", message="no store root in the monitor config")
                else:
                    _snapshot(machine, board, chunks, cmd.get("settle"))
                cmd = commands.get()  # stay paused until told to resume or stop
            if cmd["cmd"] == "stop":
                return result
    finally:
        machine.close()
        os.close(rootfs_fd)
        os.close(serial_fd)
        jailed.close()


def _snapshot(machine: Machine, board: Board, chunks: ChunkStore,
              settle: Settle | None) -> None:
    """Capture the paused VM: state object + memory chunks into the store; report ids.

    Memory: only chunks written since this VM's previous snapshot (or its restore) are
    hashed (sporevm.spore.dirty); ``hashed`` in the event says how many. Every device
    lock is held throughout, so no host thread (the console pump) writes RAM between
    reading the dirty logs and reading RAM.
    """
    import contextlib

    from sporevm.spore import dirty

    started = time.monotonic()
    with contextlib.ExitStack() as locks:
        for t in board.transports:
            locks.enter_context(t.lock)
        captured = capture(machine, board.transports)
        previous, todo = dirty.plan(machine, captured, chunks)
        index = snapshot_memory(machine.ram, chunks, previous, todo)
        dirty.set_base(machine, index)
    hashed = len(index.chunks) if todo is None else len(todo)
    state = vmstate.encode(captured)
    state_id = chunks.put(state)
    _emit("snapshot", state={"digest": state_id, "size": len(state)},
          chunk_size=index.chunk_size, chunks=list(index.chunks), hashed=hashed,
          seconds=round(time.monotonic() - started, 3),
          settle_seconds=round(settle.seconds, 3) if settle else 0.0,
          settled=settle.settled if settle else True)


def _restored_board(cfg: MonitorConfig, kernel: str, initrd: str, rootfs_fd: int,
                    board_cfg: BoardConfig, chunks: ChunkStore, wiring: dict[str, Any]) -> Board:
    """Check the spore against this host and these files, then rebuild the VM from it."""
    assert cfg.restore is not None
    assert cfg.restore_id is not None
    with open(cfg.restore, "rb") as fh:
        m = manifest.decode_vouched(fh.read(manifest.MAX_MANIFEST + 1), cfg.restore_id,
                                    cfg.restore)
    host = manifest.PlatformContract(
        arch="x86_64", cpu_profile=cpu_profile(), device_model=DEVICE_MODEL,
        memory=cfg.memory, vcpus=cfg.vcpus, kernel=kernel, initrd=initrd,
        cmdline=cfg.cmdline,
    )
    manifest.check_platform(m, host)  # before any VM exists
    # The rootfs is verified on the very fd the VM will read.
    digest, size = _blake3_fd(rootfs_fd)
    if (digest, size) != (m.rootfs.digest, m.rootfs.size):
        raise SporeError(f"monitor: rootfs {cfg.rootfs} is {digest} ({size} B); the spore "
                         f"needs {m.rootfs.digest} ({m.rootfs.size} B)")
    vm_obj = m.state.get("vm")
    if vm_obj is None:
        raise SporeError(f"{cfg.restore}: the spore has no 'vm' state object")
    state = vmstate.decode(chunks.get(vm_obj.digest, size=vm_obj.size))
    # Every chunk and state object must be there. Eager then reads each chunk into the
    # guest RAM and hashes it there, in one pass, before any VM exists (that memory
    # becomes the VM's only once all of it matched); local re-hashes the memfile
    # against the index (backing.py), also before any VM exists; lazy hashes each chunk
    # as it is faulted in.
    manifest.verify_chunks(m, chunks, rehash=False)
    ram = eager_ram(m.memory, chunks, cfg.memory) if cfg.ram == "eager" else None
    memfile = open_local(m.memory, chunks, chunks.store) if cfg.ram == "local" else -1

    def load(mem: GuestMemory) -> None:
        if cfg.ram == "local":
            mem.map_file_private(memfile)
        elif cfg.ram == "lazy":
            from sporevm.spore.lazy import start_pager

            def fail_closed(exc: BaseException) -> None:
                # A vCPU may sit in the kernel waiting for this chunk forever; the only
                # closed way out is ending the VM process, after saying why. Whatever
                # happens while saying it, the process ends.
                try:
                    _report_error(f"lazy restore: {exc}")
                    release_staging()
                finally:
                    os._exit(1)

            start_pager(mem, m.memory, chunks, on_error=fail_closed)
        # eager: ``ram`` was filled and verified above and is this machine's memory

    try:
        return restore_board(state, board_cfg, load, memory_index=m.memory, memory=ram,
                             **wiring)
    finally:
        if memfile >= 0:
            os.close(memfile)  # the mapping keeps the file


def release_freed_heap() -> None:
    """Hand the heap pages that booting or restoring used and freed back to the host.

    glibc keeps freed memory resident; in a monitor forked from the zygote those
    pages are private to this VM, ~2 MiB per idle VM measured (docs/bench.md). The
    memory a fleet of live VMs costs is what this is about, so it runs once the
    VM is built. Not glibc (no malloc_trim): nothing to do.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def cpu_profile() -> str:
    """The CPU profile a spore records: the host's KVM class (kvm_pvm needs its own fix-ups)."""
    return f"{kvm.host_class()}/v1"


def _blake3_fd(fd: int) -> tuple[str, int]:
    """BLAKE3 and size of the file behind ``fd``, read through that fd.

    Mapped and hashed on every core: this runs on every restore and rootfs images
    can be GiBs (16 MiB here: ~6 ms instead of ~9-25 ms read in 1 MiB blocks). A file
    truncated under the mapping would end this process with SIGBUS: no VM either way.
    """
    size = os.fstat(fd).st_size
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if size:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
            h.update(mapped)
    return "blake3:" + h.hexdigest(), size


def _read_config_line() -> bytes:
    """The first stdin line, byte by byte: later bytes are control commands (raw fd 0)."""
    line = bytearray()
    while len(line) <= MAX_CONFIG:
        b = os.read(0, 1)
        if not b or b == b"\n":
            break
        line += b
    return bytes(line)


def _report_error(message: str) -> None:
    """The one-line error event the caller reports; best effort (the caller may be gone)."""
    with contextlib.suppress(OSError, ValueError):
        _emit("error", message=" ".join(message.splitlines()))  # one line, whatever it holds


def _describe_failure(exc: BaseException) -> str:
    """One line for an error that is not a SporeError: an I/O failure, or a bug."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"monitor: {where}{exc.strerror or exc}"
    return (f"monitor: internal error ({type(exc).__name__}: {exc}); this is a bug — run "
            "again with SPORE_TRACEBACK=1 and report what it prints")


def main() -> int:
    try:
        cfg = MonitorConfig.decode(_read_config_line())
        result = serve(cfg)
    except SporeError as exc:
        _report_error(str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - reported as the one-line error event
        # The caller reports only the error event; a traceback on the user's terminal
        # instead of it (and exit 70 from the zygote) told them nothing they could act on.
        _report_error(_describe_failure(exc))
        if os.environ.get("SPORE_TRACEBACK"):  # as the CLI: the traceback on request only
            import traceback

            traceback.print_exc()
        return 1
    finally:
        release_staging()  # the jail's staging dir, also when serve() failed early
    _emit(
        "exit",
        reason=result.reason.name,
        status=result.status,
        rip=result.rip,
        code=result.code.hex() if result.code else None,
        detail=result.detail,
    )
    return 0 if result.reason in (StopReason.POWEROFF, StopReason.PAUSED) else 3


if __name__ == "__main__":
    sys.exit(main())
