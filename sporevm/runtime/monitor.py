"""The VM monitor process: one VM, spawned by `spore run` / `spore build`.

It opens what it needs (kernel, initrd, rootfs read-only), builds the board,
boots, and bridges the guest agent's virtio-console port to a socket its
caller holds. It speaks the typed protocol (``protocol.py``; the config line is
``monitor_config.py``): the config line and commands on stdin, events on stdout;
nothing here parses OCI, tar or Sporefiles. It jails itself (``confine.py``,
docs/jail.md). When serving the VM fails, the monitor's last word is one
``MonitorError`` event, for an I/O error or a bug too, never a traceback: that
line is what the user reads.

    caller ──stdin: config line, then commands──► monitor
    caller ◄─stdout: event lines───────────────── monitor
    caller ◄═agent socket (fd in config)══► monitor ◄═virtio-console═► guest agent
    gateway ◄═NIC channel (net_fd in config)═► monitor ◄═virtio-net═► guest eth0
                                    (a VM with a network only; the caller made it)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import blake3

from sporevm.errors import SporeError
from sporevm.runtime import dirty
from sporevm.runtime.capture import capture
from sporevm.runtime.confine import MonitorJail, release_staging
from sporevm.runtime.host import host_contract
from sporevm.runtime.monitor_config import MonitorConfig, Restore
from sporevm.runtime.protocol import (
    MAX_CONFIG,
    Booting,
    Command,
    Event,
    ExitClass,
    Exited,
    ExitReason,
    MonitorError,
    ProtocolError,
    Restored,
    RestoreStrategy,
    SnapshotFailed,
    SnapshotTaken,
    StateRef,
    decode_command,
    encode_event,
    text,
)
from sporevm.runtime.ramimage import check_sealed, image_id
from sporevm.runtime.restore import eager_ram, restore_board
from sporevm.spore import manifest, platform, vmstate
from sporevm.spore.backing import open_local
from sporevm.spore.chunks import ChunkStore, snapshot_memory
from sporevm.vmm.board import Board, BoardConfig, BoardWiring, NetConfig, build_board
from sporevm.vmm.machine import ExitResult, Machine, StopReason
from sporevm.vmm.memory import GuestMemory
from sporevm.vmm.quiesce import Settle, wait_until_idle

MAX_IMAGE = 256 << 20
MAX_SERIAL_LOG = 16 << 20
# SPORE_EXIT_STATS=1: the monitor prints its VM's exits by class and host time on stderr
# when the VM ends (docs/bench.md); the same counts are always in the exit event.
EXIT_STATS_ENV = "SPORE_EXIT_STATS"


@dataclass(frozen=True)
class _Queued:
    """A command on its way from the control thread to the run loop."""

    cmd: Command
    settle: Settle | None = None  # a snapshot's: how the guest settled first


def emit(ev: Event) -> None:
    sys.stdout.write(encode_event(ev).decode())
    sys.stdout.flush()


def _read_file(path: Path, what: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(MAX_IMAGE + 1)
    if len(data) > MAX_IMAGE:
        raise SporeError(f"monitor: {what} {path} is larger than {MAX_IMAGE >> 20} MiB")
    return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(cfg: MonitorConfig) -> tuple[ExitResult, tuple[ExitClass, ...]]:
    """Run the VM to its end; how it stopped and its exit counts (``exit_classes``)."""
    vm = cfg.vm
    # Held only until loaded: a vmlinux is ~15 MiB, per VM, for nothing. A restore
    # never loads them (the caller vouches for their digests: monitor_config.Restore).
    images: dict[str, bytes] = (
        {}
        if vm.restore is not None
        else {"kernel": _read_file(vm.kernel, "kernel"), "initrd": _read_file(vm.initrd, "initrd")}
    )
    rootfs_fd = os.open(vm.rootfs, os.O_RDONLY | os.O_CLOEXEC)
    serial_fd = os.open(
        cfg.serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
    )
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

    # The NIC's channel is a descriptor the caller opened (the gateway's socketpair end):
    # the monitor only reads and writes it, and creates no sockets (docs/network.md).
    net = None if cfg.net is None else NetConfig(cfg.net.fd, cfg.net.mac, cfg.net.mtu)
    board_cfg = BoardConfig(
        vm.memory, vm.vcpus, vm.cmdline, rootfs_fd, os.fstat(rootfs_fd).st_size, net=net
    )
    wiring = BoardWiring(
        on_agent_output=agent_output,
        on_agent_writable=room.set,
        serial_output=serial_sink,
        # Snapshots hash only chunks written since the last one (dirty.py); a VM that is
        # never snapshotted has no log at all (monitor_config.VmConfig.snapshots).
        dirty_log=vm.snapshots and vm.store is not None,
    )
    # The jail (docs/jail.md), stage 1: files, while no thread exists (Landlock covers
    # only threads started after it). Stage 2 (syscalls) comes before the first KVM_RUN.
    jailed = MonitorJail(vm.store, vm.restore.manifest if vm.restore else None)
    chunks = ChunkStore(jailed.store) if jailed.store is not None else None
    jailed.files()
    if vm.restore is not None:
        if chunks is None:
            raise SporeError("monitor: restoring a spore needs the store root in the config")
        board = _restored_board(cfg, vm.restore, rootfs_fd, board_cfg, chunks, wiring)
    else:
        board = build_board(board_cfg, wiring)
    machine = board.machine
    commands: queue.SimpleQueue[_Queued] = queue.SimpleQueue()

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
        """Caller → monitor commands, one per line on stdin (protocol.decode_command)."""
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
                    cmd = decode_command(line[:MAX_CONFIG])
                except ProtocolError:
                    continue  # not a command: ignored, as the caller's stray bytes always were
                settle = None
                if cmd is Command.SNAPSHOT:
                    # Let the guest finish its queued work first, or every restore
                    # of this snapshot would redo it before answering (quiesce.py).
                    settle = wait_until_idle(machine.vcpu_threads)
                commands.put(_Queued(cmd, settle))
                # RESUME needs no pause: it only ever follows a snapshot, which left the
                # VM paused. Pausing for it raced the main loop: a pause landing in the run
                # that RESUME had just started ended the VM (an empty queue means SIGTERM).
                if cmd is not Command.RESUME:
                    machine.pause()
        commands.put(_Queued(Command.STOP))

    def on_sigterm(_sig: int, _frame: object) -> None:
        terminated.set()
        machine.pause()

    terminated = threading.Event()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if vm.restore is None:
            machine.load_kernel(
                images.pop("kernel"), board.cmdline, images.pop("initrd"), rng_seed=os.urandom(32)
            )
            emit(Booting(text(board.cmdline)))
        else:
            emit(Restored(text(str(vm.restore.manifest))))
        release_freed_heap()
        jailed.syscalls(machine)  # the jail, stage 2: seccomp on every thread from here on
        if board.net is not None:
            board.net.start()  # its channel threads: jailed like the rest
        threading.Thread(target=pump, name="agent-pump", daemon=True).start()
        threading.Thread(target=control, name="control", daemon=True).start()
        deadline = None if vm.timeout is None else time.monotonic() + vm.timeout
        while True:
            result = machine.run(deadline)
            if result.reason is not StopReason.PAUSED or hung_up.is_set():
                return result, exit_classes(machine)
            try:
                queued = commands.get_nowait()
                while queued.cmd is Command.RESUME:  # sent while running: nothing to resume
                    queued = commands.get_nowait()
            except queue.Empty:
                if terminated.is_set():
                    return result, exit_classes(machine)
                continue  # a pause no command asked for: run on
            while queued.cmd is Command.SNAPSHOT:
                if chunks is None:
                    emit(SnapshotFailed("no store root in the monitor config"))
                elif not machine.dirty_log:
                    emit(SnapshotFailed("this VM was started without snapshots"))
                else:
                    _snapshot(machine, board, chunks, queued.settle)
                queued = commands.get()  # stay paused until told to resume or stop
            if queued.cmd is Command.STOP:
                return result, exit_classes(machine)
    finally:
        if board.net is not None:
            board.net.close()
        machine.close()
        os.close(rootfs_fd)
        os.close(serial_fd)
        jailed.close()


def exit_classes(machine: Machine) -> tuple[ExitClass, ...]:
    """The machine's exit counts and host nanoseconds per class, largest time first."""
    st = machine.stats
    names = sorted(st.exits, key=lambda k: (-st.exit_ns[k], k))
    return tuple(ExitClass(k, st.exits[k], st.exit_ns[k]) for k in names)


def format_exits(classes: tuple[ExitClass, ...]) -> str:
    """A table for a person: class, count, total host ms, µs per exit."""
    lines = [f"{'exit class':16} {'count':>9} {'host ms':>10} {'us/exit':>9}"]
    for e in classes:
        per = e.ns / e.count / 1000 if e.count else 0.0
        lines.append(f"{e.name:16} {e.count:9} {e.ns / 1e6:10.1f} {per:9.1f}")
    return "\n".join(lines)


def _snapshot(machine: Machine, board: Board, chunks: ChunkStore, settle: Settle | None) -> None:
    """Capture the paused VM: state object + memory chunks into the store; report ids.

    Memory: only chunks written since this VM's previous snapshot (or its restore) are
    hashed (sporevm.runtime.dirty); ``hashed`` in the event says how many. Every device
    lock is held throughout, so no host thread (the console pump) writes RAM between
    reading the dirty logs and reading RAM.
    """
    started = time.monotonic()
    with contextlib.ExitStack() as locks:
        for t in board.transports:
            locks.enter_context(t.lock)
        captured = capture(machine, board.transports)
        previous, todo = dirty.plan(machine, captured, chunks)
        index = snapshot_memory(machine.ram.view(0, machine.ram.size), chunks, previous, todo)
        dirty.set_base(machine, index)
    hashed = len(index.chunks) if todo is None else len(todo)
    state = vmstate.encode(captured)
    state_id = chunks.put(state)
    emit(
        SnapshotTaken(
            state=StateRef(state_id, len(state)),
            chunk_size=index.chunk_size,
            chunks=index.chunks,
            hashed=hashed,
            seconds=round(time.monotonic() - started, 3),
            settle_seconds=round(settle.seconds, 3) if settle else 0.0,
            settled=settle.settled if settle else True,
        )
    )


def _restored_board(
    cfg: MonitorConfig,
    restore: Restore,
    rootfs_fd: int,
    board_cfg: BoardConfig,
    chunks: ChunkStore,
    wiring: BoardWiring,
) -> Board:
    """Check the spore against this host and these files, then rebuild the VM from it."""
    vm = cfg.vm
    with open(restore.manifest, "rb") as fh:
        m = manifest.decode_vouched(
            fh.read(manifest.MAX_MANIFEST + 1), restore.manifest_id, str(restore.manifest)
        )
    host = host_contract(
        memory=vm.memory,
        vcpus=vm.vcpus,
        kernel=restore.kernel_digest,
        initrd=restore.initrd_digest,
        cmdline=vm.cmdline,
        net=cfg.net is not None,
    )
    manifest.check_platform(m, host)  # before any VM exists
    # The board of the spore's own device model (a /1 spore gets the /1 console).
    model = platform.BOARD_MODELS[m.platform.device_model]
    board_cfg = dataclasses.replace(board_cfg, legacy_console=model.legacy_console)
    # The rootfs is verified on the very fd the VM will read: block by block on the
    # guest's first read against the spore's block table (itself re-hashed here), or,
    # for a spore sealed before tables, whole, now (docs/restore.md, "The rootfs").
    table = manifest.rootfs_table(m, chunks)
    if table is None:
        digest, size = _blake3_fd(rootfs_fd)
        found = f"{digest} ({size} B)"
    else:
        digest, size = m.rootfs.digest, os.fstat(rootfs_fd).st_size
        found = f"{size} B"
        board_cfg = dataclasses.replace(board_cfg, rootfs_table=table)
        wiring = dataclasses.replace(wiring, on_bad_block=_report_bad_block)
    if (digest, size) != (m.rootfs.digest, m.rootfs.size):
        raise SporeError(
            f"monitor: rootfs {vm.rootfs} is {found}; the spore "
            f"needs {m.rootfs.digest} ({m.rootfs.size} B)"
        )
    vm_obj = m.state.get("vm")
    if vm_obj is None:
        raise SporeError(f"{restore.manifest}: the spore has no 'vm' state object")
    state = vmstate.decode(chunks.get(vm_obj.digest, size=vm_obj.size))
    # Every chunk and state object must be there. Eager then reads each chunk into the
    # guest RAM and hashes it there, in one pass, before any VM exists (that memory
    # becomes the VM's only once all of it matched); local re-hashes the memfile
    # against the index (backing.py), also before any VM exists; lazy hashes each chunk
    # as it is faulted in.
    manifest.verify_chunks(m, chunks, rehash=False)
    image = cfg.ram_image  # eager, already read and verified by the caller: sealed
    if image is not None:
        check_sealed(image.fd, vm.memory)
        if image.index != image_id(m.memory):
            raise SporeError(
                f"monitor: the RAM image handed over holds memory index {image.index}; "
                f"the spore's is {image_id(m.memory)}"
            )
    eager = restore.ram is RestoreStrategy.EAGER and image is None
    ram = eager_ram(m.memory, chunks, vm.memory) if eager else None
    memfile = (
        open_local(m.memory, chunks, chunks.store) if restore.ram is RestoreStrategy.LOCAL else -1
    )

    def load(mem: GuestMemory) -> None:
        if image is not None:
            mem.map_file_private(image.fd)
        elif restore.ram is RestoreStrategy.LOCAL:
            mem.map_file_private(memfile)
        elif restore.ram is RestoreStrategy.LAZY:
            from sporevm.runtime.lazy import start_pager

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
        # (or the caller's sealed image, verified when it was filled, is mapped above)

    try:
        return restore_board(state, board_cfg, load, wiring, memory_index=m.memory, memory=ram)
    finally:
        for fd in (memfile, image.fd if image is not None else -1):
            if fd >= 0:
                os.close(fd)  # the mapping keeps the file


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


def _report_bad_block(line: str) -> None:
    """A rootfs block that failed its check: one line on stderr (the user's terminal);
    the VM runs on and the guest sees an I/O error for that read."""
    with contextlib.suppress(OSError):
        os.write(2, f"spore: warning: {line}; run `spore verify` on the spore\n".encode())


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
        emit(MonitorError(text(" ".join(message.splitlines()))))  # one line, whatever it holds


def _describe_failure(exc: BaseException) -> str:
    """One line for an error that is not a SporeError: an I/O failure, or a bug."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"monitor: {where}{exc.strerror or exc}"
    return (
        f"monitor: internal error ({type(exc).__name__}: {exc}); this is a bug — run "
        "again with SPORE_TRACEBACK=1 and report what it prints"
    )


def main() -> int:
    try:
        cfg = MonitorConfig.decode(_read_config_line())
        result, exits = serve(cfg)
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
    emit(
        Exited(
            reason=ExitReason(result.reason.name),
            status=result.status,
            rip=result.rip,
            code=result.code or None,
            detail=text(result.detail),
            exits=exits,
        )
    )
    if os.environ.get(EXIT_STATS_ENV) == "1":
        with contextlib.suppress(OSError, ValueError):
            print(f"spore: VM exits\n{format_exits(exits)}", file=sys.stderr, flush=True)
    return 0 if result.reason in (StopReason.POWEROFF, StopReason.PAUSED) else 3


if __name__ == "__main__":
    sys.exit(main())
