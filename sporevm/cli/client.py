"""The thin client: hand a `spore run` to this user's resident server, if one runs.

``main`` calls ``serve_remotely`` before it imports anything else of spore. The
command line, working directory, umask, environment and the three standard
descriptors go to the server (sporevm.cli.serverwire); its handler runs the
command exactly as this process would have, writing straight into our stdout and
stderr, and the server sends back the exit code. Signals we get (Ctrl-C, SIGTERM,
SIGHUP) are passed on to the handler's process group. docs/server.md says when a
run goes to the server and what it guarantees.

It imports ``_socket`` and ``_signal`` (the C modules), not ``socket`` and ``signal``,
whose ``selectors``, ``enum`` and ``typing`` imports cost more than the rest of this
path where host code is emulated.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stubs; see the docstring
import _socket
import os
import sys

from sporevm.cli import serverwire as wire

TYPE_CHECKING = False  # as in sporevm.cli: no typing import on this path
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

ENV = "SPORE_SERVER"  # off: never; require: fail rather than run here; else: when running
COMMANDS = frozenset({"run"})


def wanted(argv: list[str]) -> bool:
    """Whether to try the server for this command line."""
    mode = os.environ.get(ENV, "")
    return bool(argv) and argv[0] in COMMANDS and mode != "off"


def serve_remotely(argv: list[str]) -> int | None:
    """The exit code of ``spore ARGV`` run by the server; None when no server took it
    (the caller runs the command itself). With SPORE_SERVER=require that is an error
    instead (exit 69)."""
    require = os.environ.get(ENV, "") == "require"
    try:
        return _serve(argv)
    except _NotServed as why:
        if why.say or require:
            level = "error" if require else "note"
            print(
                f"spore: {level}: the resident server did not take this run: {why}", file=sys.stderr
            )
        if require:
            return 69  # EX_UNAVAILABLE
        return None


class _NotServed(Exception):
    def __init__(self, reason: str, *, say: bool = False) -> None:
        super().__init__(reason)
        self.say = say  # worth a note even when the server is optional


def _serve(argv: list[str]) -> int:
    base = wire.runtime_dir()
    install = wire.install_id()
    path = wire.server_files(base, install)[0]
    if not os.path.exists(path):
        raise _NotServed(f"no server is running (no {path}; start one with `spore server start`)")
    problem = wire.check_runtime_dir(base, create=False)
    if problem is not None:
        raise _NotServed(problem, say=True)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        cwd = os.getcwd()
    except OSError as exc:  # e.g. a working directory deleted under us
        raise _NotServed(f"no working directory to hand over: {exc.strerror}") from None
    req = wire.Request(install, cwd, umask, list(argv), dict(os.environ))
    try:
        frame = wire.encode_request(req)
    except wire.WireError as exc:
        raise _NotServed(str(exc), say=True) from None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError as exc:  # a stale socket: the server is gone
            raise _NotServed(f"cannot connect to {path}: {exc.strerror}") from None
        fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in range(wire.FDS))
        try:
            sent = sock.sendmsg([frame], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        except OSError as exc:  # e.g. a closed stdin: EBADF
            raise _NotServed(f"cannot hand over stdin/stdout/stderr: {exc.strerror}") from None
        if sent < len(frame):  # the descriptors went with the first part
            sock.sendall(frame[sent:])
        return _wait(sock)
    finally:
        sock.close()


def _wait(sock: _socket.socket) -> int:
    buf = b""
    pid = 0
    forwarded: dict[int, object] = {}
    try:
        while True:
            try:
                rec = wire.decode_reply(buf)
            except wire.WireError as exc:
                if pid:
                    os.killpg(pid, _signal.SIGTERM)
                raise SystemExit(
                    f"spore: error: the resident server sent a bad reply: {exc}"
                ) from None
            if rec is None:
                data = sock.recv(4096)
                if not data:
                    if not pid:
                        raise _NotServed(
                            "the server closed the connection before starting the run", say=True
                        )
                    _outlive(pid)  # it still writes into our stdout: not before it ends
                    print(
                        "spore: error: the resident server went away during the run; its "
                        "outcome is unknown (see `spore server status`)",
                        file=sys.stderr,
                    )
                    return 70
                buf += data
                continue
            kind, value, used = rec
            buf = buf[used:]
            if kind == "R":
                raise _NotServed(str(value), say=True)
            if kind == "X":
                return int(value)
            if pid:
                raise SystemExit("spore: error: the resident server started the run twice")
            pid = int(value)
            for signo in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
                forwarded[signo] = _signal.signal(signo, _forward_to(pid))
    finally:
        for num, previous in forwarded.items():
            _signal.signal(num, previous)


def _outlive(pid: int) -> None:
    """Wait for the handler (not our child) to end; signals are still forwarded."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except OSError:  # already gone
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def _forward_to(pid: int) -> Callable[[int, FrameType | None], None]:
    def forward(signo: int, _frame: FrameType | None) -> None:
        try:
            os.killpg(pid, signo)
        except ProcessLookupError:
            pass

    return forward
