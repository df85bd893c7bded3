"""The gateway's jail: narrower than the monitor's, and with no way to make sockets.

Entered once passt is connected, the host-address netlink socket and the resolver's
UDP sockets are open and the log is open, i.e. before the first guest byte is read.
The mechanisms are ``sporevm.vmm.jail``'s (docs/jail.md); the policy is here:

* Landlock: read Python's library directories (lazy imports), nothing else — no
  writes anywhere, no ``/proc``, no ``/etc``. From ABI 4, TCP bind and connect are
  refused outright.
* seccomp (default ``EPERM``): I/O on the descriptors it already holds (``read``,
  ``write``, ``recvfrom``, ``sendto``, ``recvmsg``, ``sendmsg``, ``poll``), memory
  without ``PROT_EXEC``, time, signals within itself, ``getrandom``, ``openat`` (which
  Landlock confines), ``wait4`` and ``kill`` of its own passt only, ``exit``. Not
  ``socket``, ``connect``, ``bind``, ``accept``, ``clone`` (no threads either),
  ``execve``, ``ptrace``, ``setns``, ``unshare``, ``mount``, ``ioctl`` (``TCGETS``
  answers ``ENOTTY``), or anything else.

So a compromised gateway can send what it likes to passt (which applies no policy:
that is the residual risk, docs/network.md), to the resolvers it was connected to,
and to the VM channel; it cannot open a new connection, read a file other than
Python's libraries, or start a process.
"""

from __future__ import annotations

import errno
import os
import sysconfig
from pathlib import Path

import sporevm
from sporevm.vmm import jail

SYSCALLS = (
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "poll",
    "ppoll",
    "close",
    "lseek",
    "fstat",
    "newfstatat",
    "statx",
    "openat",
    "munmap",
    "mremap",
    "madvise",
    "brk",
    "futex",
    "getpid",
    "gettid",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "restart_syscall",
    "getrandom",
    "wait4",
    "exit",
    "exit_group",
)
_FCNTL_OK = (1, 2, 3, 4)  # F_GETFD F_SETFD F_GETFL F_SETFL
_TCGETS = 0x5401


def library_dirs() -> list[Path]:
    libs = {
        Path(p)
        for k, p in sysconfig.get_paths().items()
        if k in ("stdlib", "platstdlib", "purelib", "platlib") and os.path.isdir(p)
    }
    libs.add(Path(sporevm.__file__).parent)
    return sorted(libs)


def prepare() -> None:
    """Load the seccomp binding while files can still be opened."""
    jail.load_seccomp()


def enter(passt_pid: int) -> str:
    """Both stages, irreversibly; returns a short description for the ready line."""
    read = jail.FS_READ_FILE | jail.FS_READ_DIR
    plan = jail.restrict_filesystem([jail.PathRule(p, read) for p in library_dirs()])
    _seccomp(passt_pid)
    return f"landlock-abi-{plan.abi}+seccomp"


def _seccomp(passt_pid: int) -> None:
    sc = jail.load_seccomp()
    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    f.set_attr(sc.Attr.CTL_TSYNC, 1)
    f.set_attr(sc.Attr.CTL_NNP, 1)

    def nr(name: str) -> int:
        n = int(sc.resolve_syscall(sc.Arch.NATIVE, name))
        if n < 0:
            raise jail.JailError(f"jail: libseccomp does not know the syscall {name!r}")
        return n

    for name in SYSCALLS:
        f.add_rule(sc.ALLOW, nr(name))
    for name in ("mmap", "mprotect"):
        f.add_rule(sc.ALLOW, nr(name), sc.Arg(2, sc.MASKED_EQ, jail.PROT_EXEC, 0))
    for cmd in _FCNTL_OK:
        f.add_rule(sc.ALLOW, nr("fcntl"), sc.Arg(1, sc.EQ, cmd))
    f.add_rule(sc.ALLOW, nr("kill"), sc.Arg(0, sc.EQ, passt_pid))
    f.add_rule(sc.ALLOW, nr("tgkill"), sc.Arg(0, sc.EQ, os.getpid()))
    f.add_rule(sc.ERRNO(errno.ENOTTY), nr("ioctl"), sc.Arg(1, sc.EQ, _TCGETS))
    f.add_rule(sc.ERRNO(errno.ENOSYS), nr("clone3"))
    try:
        f.load()
    except OSError as exc:
        raise jail.JailError(f"jail: loading the seccomp filter failed: {exc.strerror}") from None
