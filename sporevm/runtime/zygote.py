"""A pre-imported VM monitor that forks monitors on request.

A monitor started with ``python -m sporevm.runtime.monitor`` pays the interpreter's
start and ~12 MiB of freshly imported modules, per VM. The zygote imports the
monitor once, freezes its objects out of the garbage collector's reach, and then
forks one child per VM: a child starts in milliseconds and shares the imported
pages with its siblings copy-on-write, so N live VMs cost one interpreter plus
what each VM really owns (its device state, its diverged guest pages).

The zygote is an ``exec``'d interpreter of its own, started by the caller before
its first VM: it never holds the caller's memory (registry credentials, build
state), and it stays single-threaded so that ``fork`` is safe. Each child runs
``monitor.main`` exactly as a spawned monitor would, and jails itself the same
way (docs/jail.md). The protocol is private to one caller: a SOCK_SEQPACKET
socketpair, one datagram per message.

    caller ── "spawn" + [stdin, stdout, agent socket(, NIC channel)(, RAM image)] ──► zygote
              ("spawn jail|nojail [net] [ram]", the descriptors by SCM_RIGHTS)
    caller ◄── "pid N" + [pidfd] ── zygote          (fork done, child running)
    caller ◄── "exit N CODE" ── zygote              (child reaped)
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO

from sporevm.errors import SporeError
from sporevm.pyspawn import module_argv

CHILD_AGENT_FD = 3  # where a child finds its agent socket (the config line says so)
CHILD_NET_FD = 4  # and its NIC's frame channel, when the VM has a network
CHILD_RAM_FD = 5  # and its sealed RAM image, for an eager restore handed one (ramimage.py)
_SLOTS = (0, 1, CHILD_AGENT_FD, CHILD_NET_FD, CHILD_RAM_FD)
_EXTRAS = (b"net", b"ram")  # the optional words of a spawn request, in this order
_MAX_MSG = 256
_CTL_FD_ENV = "SPORE_ZYGOTE_FD"


class ZygoteError(SporeError):
    pass


# -- the zygote process ------------------------------------------------------------------------


def _recv_fds(sock: socket.socket, count: int) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(_MAX_MSG, socket.CMSG_SPACE(count * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def _child(ctl: socket.socket, fds: list[int | None], no_jail: bool, wake: tuple[int, int]) -> None:
    """In the forked child: become a monitor with its descriptors at ``_SLOTS``."""
    try:
        ctl.close()
        for fd in wake:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote loop
        os._exit(70)
    _become_monitor(fds, no_jail)


def _become_monitor(fds: list[int | None], no_jail: bool, *, close_others: bool = False) -> None:
    """In a forked child: put ``fds`` (stdin, stdout, agent, NIC or None, RAM image or
    None) at ``_SLOTS``, run the monitor, and end the process with its exit code; never
    returns. ``close_others``: every other descriptor but stderr is closed first (a
    child of a process that was not made to fork monitors, with descriptors of its own)."""
    try:
        # Out of the way of the targets first: a received fd may sit at 3, 4 or 5.
        placed = [(fd, slot) for fd, slot in zip(fds, _SLOTS, strict=False) if fd is not None]
        moved = [(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16), slot) for fd, slot in placed]
        for fd, _ in placed:
            os.close(fd)
        if close_others:  # all but stderr and the moved ones
            keep = sorted(fd for fd, _ in moved)
            starts, ends = [3] + [fd + 1 for fd in keep], keep + [os.sysconf("SC_OPEN_MAX")]
            for lo, hi in zip(starts, ends, strict=True):
                os.closerange(lo, hi)
        for fd, target in moved:
            os.dup2(fd, target, inheritable=target < 3)
            os.close(fd)
        if no_jail:
            os.environ["SPORE_NO_JAIL"] = "1"
        else:
            os.environ.pop("SPORE_NO_JAIL", None)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - events; fd 0 is read raw
        from sporevm.runtime import monitor

        code = monitor.main()
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote loop
        code = 70
        with contextlib.suppress(BaseException):
            import traceback

            traceback.print_exc()
    os._exit(code)


def serve(ctl: socket.socket) -> int:
    """The zygote's loop: fork on request, reap and report children; end on EOF."""
    from sporevm.runtime import confine, lazy, monitor  # noqa: F401 - the point: import once
    from sporevm.vmm import jail

    with contextlib.suppress(jail.JailError):  # a child that needs it reports the error
        jail.load_seccomp()  # loads libseccomp once; children inherit it mapped
    gc.collect()
    gc.freeze()  # imported objects stay put: the collector won't dirty shared pages
    monitor.release_freed_heap()  # what importing freed need not stay resident here
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)
    while True:
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [])
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):
                    ctl.send(f"exit {pid} {code}".encode())
        if ctl.fileno() in ready:
            msg, fds = _recv_fds(ctl, 5)
            if not msg:
                return 0  # the caller is gone; running children end when their stdin does
            parts = msg.split()
            extras = parts[2:]
            if (
                len(parts) < 2
                or parts[0] != b"spawn"
                or parts[1] not in (b"jail", b"nojail")
                or extras not in ([], [b"net"], [b"ram"], [b"net", b"ram"])
                or len(fds) != 3 + len(extras)
            ):
                for fd in fds:
                    os.close(fd)
                ctl.send(b"error bad request")
                continue
            no_jail = parts[1] == b"nojail"
            slots: list[int | None] = [*fds[:3], None, None]
            for word, fd in zip(extras, fds[3:], strict=True):
                slots[3 + _EXTRAS.index(word)] = fd
            pid = os.fork()
            if pid == 0:
                _child(ctl, slots, no_jail, (wake_r, wake_w))
            for fd in fds:
                os.close(fd)
            pidfd = os.pidfd_open(pid)  # before any reaping: cannot name another process
            try:
                socket.send_fds(ctl, [f"pid {pid}".encode()], [pidfd])
            finally:
                os.close(pidfd)


def main() -> int:
    fd = int(os.environ.pop(_CTL_FD_ENV))
    ctl = socket.socket(fileno=fd)
    return serve(ctl)


# -- the caller's side --------------------------------------------------------------------------


@contextlib.contextmanager
def _monitor_channels(
    config: bytes,
) -> Iterator[tuple[socket.socket, socket.socket, tuple[int, int, int, int], bytes]]:
    """A monitor's agent socketpair and its stdin and stdout pipes: (ours, theirs,
    (in_r, in_w, out_r, out_w), rest). ``config`` (its config line) is written into
    stdin now, as far as the pipe takes it without blocking, so that the monitor reads
    it the moment it starts; ``rest`` is what the caller writes after the fork. On
    leaving, the monitor's ends (theirs, in_r, out_w) are closed here: it holds its own
    copies by then. If the block raised, the caller's ends (ours, in_w, out_r) are
    closed too."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(in_w, False)
    try:
        written = os.write(in_w, config) if config else 0
    except BlockingIOError:
        written = 0
    os.set_blocking(in_w, True)
    try:
        yield ours, theirs, (in_r, in_w, out_r, out_w), config[written:]
    except BaseException:
        for fd in (in_w, out_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        ours.close()
        raise
    finally:
        for fd in (in_r, out_w):
            os.close(fd)
        theirs.close()


def _stdin(fd: int, rest: bytes) -> IO[bytes]:
    """The monitor's stdin as a file, with the rest of its config line written."""
    stdin = os.fdopen(fd, "wb")
    if rest:
        stdin.write(rest)
        stdin.flush()
    return stdin


class ForkedMonitor:
    """The subset of ``subprocess.Popen`` VmProcess uses, for a zygote's child."""

    def __init__(self, pid: int, pidfd: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None
        self._done = threading.Event()

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"monitor {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signo: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signo)  # a pidfd: never a reused pid

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


class Zygote:
    """One zygote per caller process, started on first use; restarted if it died."""

    _lock = threading.Lock()
    _instance: Zygote | None = None

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ctl = ours
        self.proc = subprocess.Popen(
            module_argv("sporevm.runtime.zygote"),
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            env={**os.environ, _CTL_FD_ENV: str(theirs.fileno())},
        )
        theirs.close()
        self._children: dict[int, ForkedMonitor] = {}
        self._early_exits: dict[int, int] = {}
        self._replies: list[tuple[bytes, list[int]]] = []
        self._cond = threading.Condition()
        self._spawn_lock = threading.Lock()
        self._dead = False
        threading.Thread(target=self._read, name="spore-zygote", daemon=True).start()

    @classmethod
    def shared(cls) -> Zygote:
        with cls._lock:
            if cls._instance is None or cls._instance._dead:
                cls._instance = cls()
            return cls._instance

    def _read(self) -> None:
        while True:
            try:
                msg, fds = _recv_fds(self._ctl, 1)
            except OSError:
                msg, fds = b"", []
            if not msg:
                with self._cond:
                    self._dead = True
                    self._cond.notify_all()
                return
            if msg.startswith(b"exit "):
                _, pid, code = msg.split()
                with self._cond:
                    child = self._children.pop(int(pid), None)
                    if child is None:
                        self._early_exits[int(pid)] = int(code)
                if child is not None:
                    child._exited(int(code))
                continue
            with self._cond:
                self._replies.append((msg, fds))
                self._cond.notify_all()

    def spawn(
        self,
        *,
        jail: bool,
        net_fd: int | None = None,
        ram_fd: int | None = None,
        config: bytes = b"",
        timeout: float = 10.0,
    ) -> tuple[ForkedMonitor, socket.socket]:
        """Fork a monitor; returns it and the caller's end of its agent socket. ``net_fd``:
        the monitor's end of its NIC channel (duplicated into it at CHILD_NET_FD);
        ``ram_fd``: a sealed RAM image (at CHILD_RAM_FD); ``config``: its config line,
        already written to its stdin when this returns."""
        with _monitor_channels(config) as (ours, theirs, (in_r, in_w, out_r, out_w), rest):
            with self._spawn_lock:
                word = b"jail" if jail else b"nojail"
                send = [in_r, out_w, theirs.fileno()]
                for extra, fd in zip(_EXTRAS, (net_fd, ram_fd), strict=True):
                    if fd is not None:
                        word += b" " + extra
                        send.append(fd)
                try:
                    socket.send_fds(self._ctl, [b"spawn " + word], send)
                except OSError as exc:
                    self._dead = True
                    raise ZygoteError(
                        f"the monitor zygote is gone ({exc.strerror}; exit code {self.proc.poll()})"
                    ) from None
                with self._cond:
                    if not self._cond.wait_for(lambda: self._replies or self._dead, timeout):
                        raise ZygoteError("the monitor zygote did not answer a spawn request")
                    if not self._replies:
                        raise ZygoteError(
                            f"the monitor zygote is gone (exit code {self.proc.poll()})"
                        )
                    msg, fds = self._replies.pop(0)
                    parts = msg.split()
                    if parts[:1] != [b"pid"] or len(parts) != 2 or len(fds) != 1:
                        for fd in fds:
                            os.close(fd)
                        raise ZygoteError(f"the monitor zygote refused: {msg[:80]!r}")
                    pid = int(parts[1])
                    child = ForkedMonitor(pid, fds[0], _stdin(in_w, rest), os.fdopen(out_r, "rb"))
                    early = self._early_exits.pop(pid, None)
                    if early is None:
                        self._children[pid] = child
            if early is not None:
                child._exited(early)
        return child, ours


def monitor_popen(
    jail: bool,
    net_fd: int | None = None,
    *,
    ram_fd: int | None = None,
    config: bytes = b"",
    fork_here: bool = False,
) -> tuple[ForkedMonitor, socket.socket, int]:
    """(process, caller's agent socket, the agent fd number inside the monitor); with
    ``net_fd`` the monitor finds its NIC channel at CHILD_NET_FD, with ``ram_fd`` its
    RAM image at CHILD_RAM_FD; ``config`` is written to its stdin. ``fork_here``: fork
    the monitor from this process (``fork_monitor_here``) when it has one thread only;
    from the shared zygote otherwise."""
    if fork_here and threading.active_count() == 1:
        child, sock = fork_monitor_here(jail=jail, net_fd=net_fd, ram_fd=ram_fd, config=config)
    else:
        spawn = Zygote.shared().spawn
        child, sock = spawn(jail=jail, net_fd=net_fd, ram_fd=ram_fd, config=config)
    return child, sock, CHILD_AGENT_FD


def fork_monitor_here(
    *, jail: bool, net_fd: int | None = None, ram_fd: int | None = None, config: bytes = b""
) -> tuple[ForkedMonitor, socket.socket]:
    """Fork one monitor from this very process, for a one-off `spore run --from`.

    The zygote exists so that a caller with many VMs, or with secrets in memory
    (registry credentials, build state), never hands its memory to a monitor. A one-off
    run that only resumes a local spore holds neither, and a zygote would cost it a
    second interpreter start and the monitor's imports (~2.5 s where host code is
    emulated, ~0.15 s natively). The caller must be single-threaded (``monitor_popen``
    checks) and hold nothing secret. The child closes every descriptor it does not
    need, then runs ``monitor.main`` as a zygote's child does, jail and all.
    """
    from sporevm.runtime import monitor  # noqa: F401 - imported before the fork, once

    for stream in (sys.stdout, sys.stderr):  # or the child could write them out again
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    with _monitor_channels(config) as (ours, theirs, (in_r, in_w, out_r, out_w), rest):
        fds: list[int | None] = [in_r, out_w, theirs.fileno(), net_fd, ram_fd]
        pid = os.fork()
        if pid == 0:
            gc.freeze()  # the caller's objects are never collected (nor closed) in here
            _become_monitor(fds, not jail, close_others=True)
        pidfd = os.pidfd_open(pid)
    child = ForkedMonitor(pid, pidfd, _stdin(in_w, rest), os.fdopen(out_r, "rb"))

    def reap() -> None:
        _, status = os.waitpid(pid, 0)
        child._exited(os.waitstatus_to_exitcode(status))

    threading.Thread(target=reap, name="spore-monitor-reaper", daemon=True).start()
    return child, ours


if __name__ == "__main__":
    sys.exit(main())
