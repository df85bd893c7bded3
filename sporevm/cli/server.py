"""The resident server: one warm, single-threaded process per user and install that
forks a handler for each `spore run` a thin client hands it (docs/server.md).

Where host Python is slow (the hardware-KVM lane emulates it), a `spore run --from`
spent most of its time starting an interpreter and importing the CLI, the runner
and the VM monitor; natively those imports are still ~0.2 s of a ~0.5 s run. The
server imports them once. Each request gets a fresh fork: the handler takes the
client's stdin/stdout/stderr, working directory, umask and environment, joins the
client's cgroup, and runs ``sporevm.cli.main`` exactly as the client would have
(the VM monitor is then forked from the handler, jailed as always). Nothing of one
run stays in the server: the server itself never parses a Sporefile, reads a
credential or touches a VM.

What the server checks before it runs anything, and refuses otherwise (the client
then runs the command itself, saying why):
- the peer is this user (SO_PEERCRED), through a socket in a 0700 directory;
- the request decodes strictly (serverwire) with exactly three descriptors;
- the client is the same install (interpreter and package directory);
- the client lives in the server's mount, pid, network, user, UTS, IPC and cgroup
  namespaces (paths, pids and addresses in the command mean the same thing here);
- the code the server imported is unchanged on disk (else it also stops).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import os
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sporevm.cli import serverwire as wire
from sporevm.runtime import ramimage

REQUEST_TIMEOUT = 10.0  # to send a whole request after connecting
KILL_GRACE = 10.0  # SIGTERM to SIGKILL for a handler whose client went away
NAMESPACES = ("mnt", "pid", "net", "user", "uts", "ipc", "cgroup")
CGROUP_ROOT = "/sys/fs/cgroup"


LOG_MAX = 4 << 20  # the log (stderr) starts over past this: it lives in a tmpfs


def log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with contextlib.suppress(OSError, ValueError):
        if os.fstat(2).st_size > LOG_MAX and not os.isatty(2):
            os.ftruncate(2, 0)  # opened O_APPEND by `spore server start`
            print(
                f"{stamp} [{os.getpid()}] log over {LOG_MAX} bytes; started over", file=sys.stderr
            )
        print(f"{stamp} [{os.getpid()}] {msg}", file=sys.stderr, flush=True)


def warm_imports() -> None:
    """What `spore run` imports before its VM runs: imported once, here."""
    import sporevm.build.progress  # noqa: F401
    import sporevm.build.runner  # noqa: F401
    import sporevm.cli.parser  # noqa: F401
    import sporevm.runtime.agent_session  # noqa: F401
    import sporevm.runtime.monitor  # noqa: F401
    import sporevm.runtime.zygote  # noqa: F401
    import sporevm.units  # noqa: F401
    from sporevm.cli.parser import shared_parser
    from sporevm.vmm import jail

    shared_parser()
    # libseccomp too, as the zygote does: each run's monitor is forked from a handler
    # and would load it again (~4 ms natively, ~40 ms where host code is emulated).
    with contextlib.suppress(jail.JailError):  # a monitor that needs it reports it
        jail.load_seccomp()
    # The guest platform of this user's default store, if built: handlers restoring
    # from that store with this PATH start with it resolved (guest_for_restore).
    from sporevm.build.guest import remember_for_restore
    from sporevm.store import Store, default_root

    if default_root().is_dir():
        with contextlib.suppress(Exception):  # a run resolves it itself and says why
            remember_for_restore(Store())


def code_files() -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file the server imported outside the standard
    library: spore's own package and its dependencies."""
    stdlib = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    out: dict[str, tuple[int, int]] = {}
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if not isinstance(path, str) or not os.path.isabs(path):
            continue
        real = os.path.realpath(path)
        if any(real.startswith(s + os.sep) for s in stdlib) and "-packages" not in real:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(real)
            out[real] = (st.st_mtime_ns, st.st_size)
    return out


def changed_code(files: dict[str, tuple[int, int]]) -> str | None:
    for path, ident in files.items():
        try:
            st = os.stat(path)
        except OSError:
            return f"{path} is gone"
        if (st.st_mtime_ns, st.st_size) != ident:
            return f"{path} changed"
    return None


def own_namespaces() -> dict[str, tuple[int, int]]:
    """This process's namespaces (device, inode), of each type the kernel has."""
    out = {}
    for ns in NAMESPACES:
        with contextlib.suppress(FileNotFoundError):  # a kernel without that type
            st = os.stat(f"/proc/self/ns/{ns}")
            out[ns] = (st.st_dev, st.st_ino)
    return out


def namespace_mismatch(pid: int, ours: dict[str, tuple[int, int]]) -> str | None:
    for ns, ident in ours.items():
        try:
            theirs = os.stat(f"/proc/{pid}/ns/{ns}")
        except OSError as exc:
            return f"cannot read the client's {ns} namespace: {exc.strerror}"
        if (theirs.st_dev, theirs.st_ino) != ident:
            return (
                f"the client runs in another {ns} namespace than the server; start a "
                "server there, or set SPORE_SERVER=off"
            )
    return None


def cgroup_of(pid: int | str) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def cgroup_dir(text: str) -> str | None:
    """The cgroup v2 directory a ``/proc/PID/cgroup`` names, or None (v1 or mixed)."""
    lines = text.splitlines()
    if len(lines) != 1 or not lines[0].startswith("0::/"):
        return None
    rel = lines[0][3:]
    if "/.." in rel + "/" or "\0" in rel:
        return None
    return CGROUP_ROOT + rel.rstrip("/")


@dataclass
class Conn:
    sock: socket.socket
    peer_pid: int
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    handler: int = 0  # pid once the run started
    kill_at: float = 0.0  # for a handler whose client hung up


class Server:
    def __init__(self, base: str, install: str, idle: float) -> None:
        self.install = install
        self.idle = idle
        self.sock_path, self.lock_path, _ = wire.server_files(base, install)
        self.namespaces = own_namespaces()
        self.lock_fd = -1
        self.listener: socket.socket | None = None
        self.listener_ino = 0
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}  # by socket fd
        self.handlers: dict[int, Conn] = {}  # by handler pid
        self.stopping = False
        self.last_active = time.monotonic()
        self.code: dict[str, tuple[int, int]] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.served = 0
        # Each handler's channel for offering back a RAM image it filled (ramimage.py).
        self.offers: dict[int, socket.socket] = {}  # by socket fd

    # -- start and stop ------------------------------------------------------------------

    def lock(self) -> int | None:
        """Take the install's lock; None, or the pid of the server holding it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = wire.lock_holder(fd)
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd
        return None

    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # a dead server's: we hold the lock
            os.unlink(self.sock_path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(self.sock_path)
        finally:
            os.umask(old)
        s.listen(64)
        s.setblocking(False)
        self.listener = s
        self.listener_ino = os.stat(self.sock_path).st_ino
        self.sel.register(s, selectors.EVENT_READ, "accept")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")

    def stop_listening(self) -> None:
        if self.listener is None:
            return
        self.sel.unregister(self.listener)
        with contextlib.suppress(OSError):
            if os.stat(self.sock_path).st_ino == self.listener_ino:
                os.unlink(self.sock_path)
        self.listener.close()
        self.listener = None

    def on_signal(self, signo: int, _frame: object) -> None:
        if signo in (signal.SIGTERM, signal.SIGINT):
            if self.stopping:  # a second request: end the runs too
                for pid in self.handlers:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGTERM)
            self.stopping = True

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> None:
        self.code = code_files()
        for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signo, self.on_signal)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        gc.freeze()  # what is imported now stays shared with every handler
        self.last_active = time.monotonic()
        while True:
            if self.stopping:
                self.stop_listening()
                for c in [c for c in self.conns.values() if not c.handler]:
                    self.refuse(c, "the server is stopping")
            if self.stopping and not self.conns:
                return
            now = time.monotonic()
            if not self.conns and now - self.last_active > self.idle:
                log(f"idle for {self.idle:.0f} s; stopping")
                self.stop_listening()
                return
            for key, _ in self.sel.select(self.timeout(now)):
                if key.data == "accept":
                    self.accept()
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 512)
                elif key.data == "offer":
                    self.take_offer(key.fd)
                else:
                    conn = self.conns.get(key.fd)
                    if conn is not None and conn.sock is key.fileobj:  # not closed meanwhile
                        self.readable(conn)
            self.reap()
            self.expire(time.monotonic())

    def timeout(self, now: float) -> float:
        """Until the next deadline: the idle timeout, a request's, a hung-up run's kill
        (a run in progress has none: the loop sleeps until a reply or a signal)."""
        ends = [self.last_active + self.idle]
        for c in self.conns.values():
            if not c.handler:
                ends.append(c.deadline)
            elif c.kill_at:
                ends.append(c.kill_at)
        return max(0.0, min(min(ends) - now, 60.0))

    def accept(self) -> None:
        assert self.listener is not None
        try:
            s, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.last_active = time.monotonic()
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid = (
            int.from_bytes(creds[0:4], sys.byteorder),
            int.from_bytes(creds[4:8], sys.byteorder),
        )
        if uid != os.getuid():
            log(f"refused a client of uid {uid} (pid {pid})")
            with contextlib.suppress(OSError):
                s.sendall(wire.refused(f"this server belongs to uid {os.getuid()}"))
            s.close()
            return
        s.setblocking(False)
        c = Conn(s, pid, time.monotonic() + REQUEST_TIMEOUT)
        self.conns[s.fileno()] = c
        self.sel.register(s, selectors.EVENT_READ, "conn")

    def readable(self, c: Conn) -> None:
        try:
            data, anc, flags, _ = c.sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 8))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc, flags = b"", [], 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(payload) - len(payload) % 4
                c.fds += [int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, n, 4)]
        if c.handler:  # a client only ever sends its request: anything else is a hang-up
            self.hang_up(c)
            return
        if not data:
            self.close(c)
            return
        if flags & socket.MSG_CTRUNC:
            self.refuse(c, "too many descriptors with the request")
            return
        c.buf += data
        if len(c.buf) < wire.HEADER:
            return
        try:
            want = wire.HEADER + wire.frame_length(bytes(c.buf[: wire.HEADER]))
            if len(c.buf) < want:
                return
            if len(c.buf) > want:
                raise wire.WireError("bytes after the request")
            req = wire.decode_request(bytes(c.buf))
        except wire.WireError as exc:
            self.refuse(c, f"bad request: {exc}")
            return
        self.start(c, req)

    def start(self, c: Conn, req: wire.Request) -> None:
        if len(c.fds) != wire.FDS:
            self.refuse(c, f"a request carries {wire.FDS} descriptors, not {len(c.fds)}")
            return
        if req.install != self.install:
            self.refuse(c, "the client is another install of spore than this server's")
            return
        if self.stopping:
            self.refuse(c, "the server is stopping")
            return
        why = changed_code(self.code)
        if why is not None:
            self.stopping = True
            self.refuse(
                c,
                f"the server's code changed on disk ({why}); it stops now — "
                "start it again with `spore server start`",
            )
            return
        why = namespace_mismatch(c.peer_pid, self.namespaces)
        if why is not None:
            self.refuse(c, why)
            return
        try:
            theirs = cgroup_of(c.peer_pid)
            same = theirs == cgroup_of("self")
        except OSError as exc:
            self.refuse(c, f"cannot read the client's cgroup: {exc.strerror}")
            return
        target = None if same else cgroup_dir(theirs)
        if not same and target is None:
            self.refuse(c, "the client is in another cgroup (v1) than the server")
            return
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        offer_r, offer_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            offer_r.close()
            self.become_handler(c, req, go_r, offer_w)  # never returns
        os.close(go_r)
        offer_w.close()
        offer_r.setblocking(False)
        self.offers[offer_r.fileno()] = offer_r
        self.sel.register(offer_r, selectors.EVENT_READ, "offer")
        if target is not None:
            try:
                Path(target, "cgroup.procs").write_text(f"{pid}\n")
            except OSError as exc:
                os.close(go_w)  # the child sees EOF and exits without running anything
                os.waitpid(pid, 0)
                self.refuse(
                    c, f"cannot move the run into the client's cgroup {target}: {exc.strerror}"
                )
                return
        os.write(go_w, b"g")
        os.close(go_w)
        for fd in c.fds:
            os.close(fd)
        c.fds = []
        c.handler = pid
        self.handlers[pid] = c
        self.served += 1
        log(f"run {self.served}: {' '.join(req.argv[:1])} for pid {c.peer_pid} in handler {pid}")
        self.send(c, wire.started(pid))

    def become_handler(self, c: Conn, req: wire.Request, go_r: int, offer: socket.socket) -> None:
        code = 70
        try:
            os.setsid()  # its own group: the client's signals and a hang-up reach all of it
            signal.set_wakeup_fd(-1)
            for signo in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(signo, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            go = os.read(go_r, 1)
            for i, fd in enumerate(c.fds):
                os.dup2(fd, i, inheritable=True)
            for fd in [go_r, self.wake_r, self.wake_w, self.lock_fd, *c.fds]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for conn in self.conns.values():
                conn.sock.close()
            for other in self.offers.values():
                other.close()
            cache = ramimage.installed()
            if cache is not None:
                cache.offer_to = offer
            if self.listener is not None:
                self.listener.close()
            self.sel.close()
            if go != b"g":
                os._exit(70)
            os.chdir(req.cwd)
            os.umask(req.umask)
            os.environ.clear()
            os.environ.update(req.env)
            sys.argv = ["spore", *req.argv]
            from sporevm.cli import run_here

            code = run_here(req.argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException as exc:  # noqa: BLE001 - the handler must never return
            with contextlib.suppress(BaseException):
                print(f"spore: internal error in the server's handler: {exc!r}", file=sys.stderr)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(BaseException):
                    stream.flush()
            os._exit(code if 0 <= code <= 255 else 70)

    def take_offer(self, fd: int) -> None:
        """A handler offers a RAM image it filled, or its channel ended."""
        sock = self.offers[fd]
        cache = ramimage.installed()
        said = ramimage.receive_offer(sock, cache) if cache is not None else None
        if said is None:
            self.sel.unregister(sock)
            del self.offers[fd]
            sock.close()
        elif said != ramimage.NO_OFFER:
            log(said)

    def send(self, c: Conn, data: bytes) -> None:
        try:
            c.sock.setblocking(True)
            c.sock.settimeout(5.0)
            c.sock.sendall(data)
        except OSError:
            pass
        finally:
            c.sock.setblocking(False)

    def refuse(self, c: Conn, reason: str) -> None:
        log(f"refused pid {c.peer_pid}: {reason}")
        self.send(c, wire.refused(reason))
        self.close(c)

    def close(self, c: Conn) -> None:
        for fd in c.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        c.fds = []
        fd = c.sock.fileno()
        if fd in self.conns:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(c.sock)
            del self.conns[fd]
        c.sock.close()
        self.last_active = time.monotonic()

    def hang_up(self, c: Conn) -> None:
        """The client went away mid-run: end the run (its VM with it)."""
        if not c.kill_at:
            log(f"client pid {c.peer_pid} hung up; ending handler {c.handler}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.handler, signal.SIGTERM)
            c.kill_at = time.monotonic() + KILL_GRACE
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)

    def reap(self) -> None:
        for pid in list(self.handlers):
            try:  # WNOWAIT: the pid stays ours (a zombie) until its group is ended below
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
            if info is None:
                continue
            with contextlib.suppress(ProcessLookupError):  # what the run left behind
                os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            c = self.handlers.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                code = 128 - code
            if not c.kill_at:
                self.send(c, wire.exited(min(code, 255)))
            self.close(c)

    def expire(self, now: float) -> None:
        for c in list(self.conns.values()):
            if c.handler and c.kill_at and now > c.kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.handler, signal.SIGKILL)
            elif not c.handler and now > c.deadline:
                self.refuse(c, f"no whole request within {REQUEST_TIMEOUT:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="spore-server")
    ap.add_argument("--idle", type=float, required=True)
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--install", required=True, help="serverwire.install_id() of the starter")
    ap.add_argument("--ram-cache", type=int, default=0, help="bytes of RAM images to keep")
    args = ap.parse_args(argv)

    def ready(msg: str) -> None:
        if args.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(args.ready_fd, msg.encode() + b"\n")
                os.close(args.ready_fd)

    install = args.install
    base = wire.runtime_dir()
    problem = wire.check_runtime_dir(base, create=True)
    if problem is not None:
        ready(f"error: {problem}")
        return 1
    server = Server(base, install, args.idle)
    holder = server.lock()
    if holder is not None:
        ready(f"running {holder}")
        return 0
    try:
        warm_imports()
        if args.ram_cache > 0:
            ramimage.install(ramimage.RamImageCache(args.ram_cache))
        if threading.active_count() != 1:
            raise RuntimeError("importing spore started a thread; the server forks handlers")
        server.listen()
    except Exception as exc:  # noqa: BLE001 - reported to `spore server start`
        ready(f"error: {type(exc).__name__}: {exc}")
        return 1
    images = f"RAM images up to {args.ram_cache >> 20} MiB" if args.ram_cache else "no RAM images"
    log(f"serving {server.sock_path} (idle timeout {args.idle:.0f} s, {images})")
    ready(f"ready {os.getpid()}")
    server.serve()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
