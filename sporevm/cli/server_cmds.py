"""spore server start|stop|status: this user's resident server (docs/server.md)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import select
import signal
import subprocess
import time
from pathlib import Path

from sporevm.cli import serverwire as wire
from sporevm.cli.common import emit_json, parse_duration
from sporevm.errors import SporeError, SporefileError, UsageError
from sporevm.pyspawn import module_argv
from sporevm.units import parse_size

START_TIMEOUT = 120.0  # its imports, where host code is emulated, take seconds


class ServerError(SporeError):
    exit_code = 69  # EX_UNAVAILABLE


def _paths() -> tuple[str, str, str, str]:
    base = wire.runtime_dir()
    return base, *wire.server_files(base, wire.install_id())


def running_pid(lock_path: str) -> int | None:
    """The pid of the server holding this install's lock, or None."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return wire.lock_holder(fd)
        return None
    finally:
        os.close(fd)


def default_ram_cache() -> int:
    """A quarter of this machine's memory, at most 4 GiB."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(4 << 30, total // 4)


def cmd_server_start(args: argparse.Namespace) -> int:
    idle = parse_duration(args.idle)
    if idle <= 0:
        raise UsageError(f"--idle {args.idle}: give a positive duration, e.g. 3h")
    if args.ram_cache is None:
        ram_cache = default_ram_cache()
    elif args.ram_cache.strip() == "0":
        ram_cache = 0
    else:
        try:
            ram_cache = parse_size(args.ram_cache)
        except SporefileError as exc:
            raise UsageError(f"--ram-cache {args.ram_cache}: {exc}") from None
    own = ("--idle", str(idle), "--install", wire.install_id(), "--ram-cache", str(ram_cache))
    if args.foreground:
        from sporevm.cli import server

        return server.main(list(own))
    base, sock, lock, log = _paths()
    problem = wire.check_runtime_dir(base, create=True)
    if problem is not None:
        raise ServerError(f"cannot run a server: {problem}")
    r, w = os.pipe()
    logfd = os.open(
        log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        subprocess.Popen(
            module_argv("sporevm.cli.server", *own, "--ready-fd", str(w)),
            stdin=subprocess.DEVNULL,
            stdout=logfd,
            stderr=logfd,
            pass_fds=(w,),
            start_new_session=True,
            cwd="/",
        )
    finally:
        os.close(w)
        os.close(logfd)
    try:
        answer = _read_all(r, START_TIMEOUT).decode("utf-8", "replace").strip()
    finally:
        os.close(r)
    word, _, rest = answer.partition(" ")
    if word == "ready" or word == "running":
        pid = int(rest) if rest.isdigit() else 0
        doc = {
            "pid": pid,
            "socket": sock,
            "log": log,
            "idle_seconds": idle,
            "ram_cache_bytes": ram_cache,
            "started": word == "ready",
        }
        if args.json:
            return emit_json(doc)
        what = "started" if word == "ready" else "already running"
        print(f"spore server {what}: pid {pid}, socket {sock}, log {log}")
        return 0
    detail = rest if word == "error:" else (answer or "it exited without a word")
    raise ServerError(f"the server did not start: {detail} (log: {log})")


def _read_all(fd: int, timeout: float) -> bytes:
    out = b""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise ServerError(f"the server did not report within {timeout:.0f} s")
        data = os.read(fd, 4096)
        if not data:
            return out
        out += data


def cmd_server_stop(args: argparse.Namespace) -> int:
    _, sock, lock, _ = _paths()
    wait = parse_duration(args.wait)
    pid = running_pid(lock)
    if pid is None:
        print("spore server: not running")
        return 0
    if not pid:
        raise ServerError(f"{lock} is held but names no pid; stop the server by hand")
    os.kill(pid, signal.SIGTERM)
    if args.now:  # a second SIGTERM also ends the runs in progress
        time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + wait
    while running_pid(lock) is not None:
        if time.monotonic() > end:
            raise ServerError(
                f"the server (pid {pid}) still runs after {args.wait}: it waits for the runs "
                "in progress; `spore server stop --now` ends them"
            )
        time.sleep(0.05)
    print(f"spore server stopped (pid {pid})")
    return 0


def cmd_server_status(args: argparse.Namespace) -> int:
    base, sock, lock, log = _paths()
    pid = running_pid(lock)
    doc = {
        "running": pid is not None,
        "pid": pid,
        "socket": sock,
        "log": log,
        "accepting": pid is not None and Path(sock).exists(),
    }
    if args.json:
        return emit_json(doc)
    if pid is None:
        print(f"spore server: not running (socket would be {sock})")
    else:
        state = "accepting runs" if doc["accepting"] else "stopping"
        print(f"spore server: pid {pid}, {state}, socket {sock}, log {log}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sv = sub.add_parser(
        "server", help="this user's resident server, which makes `spore run` start fast"
    )
    ssub = sv.add_subparsers(dest="server_command", required=True, metavar="ACTION")
    st = ssub.add_parser("start", help="start it in the background (no-op if it runs)")
    st.add_argument(
        "--idle", default="3h", metavar="DURATION", help="stop after this long without a run"
    )
    st.add_argument(
        "--ram-cache",
        metavar="SIZE",
        help="keep verified RAM images of restored spores up to this size "
        "(default: a quarter of memory, at most 4GiB; 0: none)",
    )
    st.add_argument(
        "--foreground", action="store_true", help="serve from this process (for a service unit)"
    )
    st.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    st.set_defaults(func=cmd_server_start)
    sp = ssub.add_parser("stop", help="stop it once its runs in progress end")
    sp.add_argument("--wait", default="5m", metavar="DURATION", help="how long to wait for that")
    sp.add_argument("--now", action="store_true", help="end the runs in progress too")
    sp.set_defaults(func=cmd_server_stop)
    ss = ssub.add_parser("status", help="whether it runs, its pid, socket and log")
    ss.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    ss.set_defaults(func=cmd_server_status)
