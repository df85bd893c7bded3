"""The VM monitor process: one VM, spawned by `spore run` / `spore build`.

It opens what it needs (kernel, initrd, rootfs read-only), builds the board,
boots, and bridges the guest agent's virtio-console port to a socket its
caller holds. Events go to stdout as JSON lines; nothing here parses OCI, tar
or Sporefiles. (The seccomp jail is the hardening issue's.)

    caller ──stdin: one JSON config line──► monitor
    caller ◄─stdout: {"event": ...} lines── monitor
    caller ◄═agent socket (fd in config)══► monitor ◄═virtio-console═► guest agent
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from sporevm.errors import SporeError
from sporevm.vmm.board import BoardConfig, build_board
from sporevm.vmm.machine import ExitResult, StopReason

MAX_CONFIG = 64 * 1024
MAX_IMAGE = 256 << 20


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

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> MonitorConfig:
        if len(line) > MAX_CONFIG:
            raise SporeError("monitor: config line too long")
        doc = json.loads(line)
        if not isinstance(doc, dict) or set(doc) != set(cls.__dataclass_fields__):
            raise SporeError("monitor: config has unexpected or missing fields")
        return cls(**doc)


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
    kernel = _read_file(cfg.kernel, "kernel")
    initrd = _read_file(cfg.initrd, "initrd")
    rootfs_fd = os.open(cfg.rootfs, os.O_RDONLY | os.O_CLOEXEC)
    serial_fd = os.open(cfg.serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                        0o600)
    room = threading.Event()
    hung_up = threading.Event()

    def agent_output(data: bytes) -> None:
        try:
            _write_all(cfg.agent_fd, data)
        except OSError:
            hung_up.set()  # the caller went away; the pump thread stops the VM

    board = build_board(
        BoardConfig(cfg.memory, cfg.vcpus, cfg.cmdline, rootfs_fd, os.fstat(rootfs_fd).st_size),
        on_agent_output=agent_output,
        on_agent_writable=room.set,
        serial_output=lambda b: _write_all(serial_fd, b),
    )
    machine = board.machine

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

    signal.signal(signal.SIGTERM, lambda _s, _f: machine.pause())
    try:
        machine.load_kernel(kernel, board.cmdline, initrd, rng_seed=os.urandom(32))
        threading.Thread(target=pump, name="agent-pump", daemon=True).start()
        _emit("booting", cmdline=board.cmdline)
        deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
        return machine.run(deadline)
    finally:
        machine.close()
        os.close(rootfs_fd)
        os.close(serial_fd)


def main() -> int:
    try:
        cfg = MonitorConfig.decode(sys.stdin.buffer.readline())
        result = serve(cfg)
    except SporeError as exc:
        _emit("error", message=str(exc))
        return 1
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
