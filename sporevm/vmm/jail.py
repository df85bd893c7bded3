"""The jail of a process that runs guest code: Landlock for files, a seccomp allowlist for syscalls.

Two stages, because they have different timing constraints (docs/jail.md):

1. ``restrict_filesystem`` (Landlock): which paths the process may still open, and
   how. Landlock (ABI < 8) restricts only the calling thread and the threads it
   starts later, so it must run while the process has exactly one thread.
2. ``enter_seccomp`` (libseccomp through ``pyseccomp``): which syscalls, with
   argument filters where a filter can express them (ioctl request numbers, clone
   flags, no executable mappings, signals only to our own threads). Applied to
   every thread at once (SECCOMP_FILTER_FLAG_TSYNC) just before guest code runs.

``refuse_ioctls`` stacks a further filter later, taking back an ioctl the
allowlist kept only for a while (the monitor's KVM_SET_USER_MEMORY_REGION).

Anything not allowed fails with EPERM rather than killing the process: the code
that tried it raises OSError and the monitor reports a one-line error, and tests
can watch a denied call fail while the VM keeps running. A kill would buy nothing
against an attacker already running code here (the allowlist is the same either
way) and would turn an allowlist gap into a silent death mid-snapshot.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sporevm.errors import SporeError


class JailError(SporeError):
    """The jail cannot be entered as asked; the VM must not run."""


# --- Landlock (linux/landlock.h) ----------------------------------------------------------

_SYS_LANDLOCK_CREATE_RULESET = 444  # x86_64 syscall numbers, stable kernel ABI
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_REG = 1 << 8
FS_REFER = 1 << 13  # ABI 2: rename/link across directories
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5: ioctl on device files opened from now on
# Rights that make sense on a file (the rest only on directories).
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
# Every filesystem right each ABI knows: all of them are handled, so all are denied
# except where a rule grants them.
_FS_HANDLED = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_FS_HANDLED_LATEST = (1 << 16) - 1  # ABI >= 5
_NET_TCP = (1 << 0) | (1 << 1)  # ABI 4: bind and connect TCP; no rule grants either
_SCOPE_ALL = (1 << 0) | (1 << 1)  # ABI 6: abstract unix sockets and signals stay inside

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@dataclass(frozen=True)
class PathRule:
    """``access`` (FS_* bits) granted on ``path`` and, for a directory, everything beneath."""

    path: Path
    access: int


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is absent or disabled."""
    ret = int(_libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION))
    return max(ret, 0)


def thread_count() -> int:
    """Threads of this process, native ones included (Python's count misses those)."""
    return len(os.listdir("/proc/self/task"))


MIN_ABI = 1  # below: no Landlock at all, and the monitor refuses to run (docs/jail.md)
ABI_CAP_ENV = "SPORE_JAIL_LANDLOCK_ABI"  # tests: behave as on a kernel with this ABI


@dataclass(frozen=True)
class LandlockPlan:
    """What the jail asks of Landlock on a kernel with ``abi``, and what seccomp must
    close instead where that ABI cannot govern it (docs/jail.md has the table)."""

    abi: int
    handled_fs: int  # every filesystem right this ABI knows: all denied unless granted
    handled_net: int  # ABI 4: TCP bind/connect (seccomp denies socket() anyway)
    scoped: int  # ABI 6: signals and abstract unix sockets stay inside
    attr_size: int  # sizeof(struct landlock_ruleset_attr) this ABI reads
    seccomp_denies_truncation: bool  # ABI < 3: truncate(2) and O_TRUNC are not Landlock's
    # ABI 1 has no REFER right: every rename or link across directories fails, so new
    # store entries are staged in the directory they are published in (docs/jail.md).
    cross_directory_publish: bool


def plan_for(abi: int) -> LandlockPlan:
    if abi < MIN_ABI:
        found = f"ABI {abi}" if abi else "no Landlock"
        raise JailError(
            f"jail: this kernel has {found}; the monitor's file jail needs Landlock ABI "
            f">= {MIN_ABI} (Linux 5.13+ with landlock in lsm=); run with --no-jail only to "
            "debug"
        )
    return LandlockPlan(
        abi=abi,
        handled_fs=_FS_HANDLED.get(abi, _FS_HANDLED_LATEST),
        handled_net=_NET_TCP if abi >= 4 else 0,
        scoped=_SCOPE_ALL if abi >= 6 else 0,
        attr_size=8 if abi < 4 else 16 if abi < 6 else 24,
        seccomp_denies_truncation=abi < 3,
        cross_directory_publish=abi >= 2,
    )


def effective_abi() -> int:
    """The kernel's ABI, or less when ``SPORE_JAIL_LANDLOCK_ABI`` asks to behave as an
    older kernel would (never more: the cap only narrows what Landlock is asked)."""
    abi = landlock_abi()
    cap = os.environ.get(ABI_CAP_ENV, "")
    if cap:
        if not cap.isdigit() or int(cap) < 1:
            raise JailError(f"jail: {ABI_CAP_ENV}={cap!r} is not a Landlock ABI number")
        abi = min(abi, int(cap))
    return abi


def restrict_filesystem(rules: Sequence[PathRule]) -> LandlockPlan:
    """Confine this (single-threaded) process to ``rules``; returns the plan used.

    Already open file descriptors keep working. No TCP bind/connect (ABI 4), no
    signals or abstract-socket connections outside the process (ABI 6). The caller
    must pass ``plan.seccomp_denies_truncation`` on to ``enter_seccomp``.
    """
    plan = plan_for(effective_abi())
    threads = thread_count()
    if threads != 1:
        raise JailError(
            f"jail: {threads} threads already run; Landlock must be entered before any "
            "thread starts (it would not cover them)"
        )
    attr = _RulesetAttr(plan.handled_fs, plan.handled_net, plan.scoped)
    ruleset = _check(
        _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), plan.attr_size, 0),
        "landlock_create_ruleset",
    )
    try:
        for rule in rules:
            _add_path_rule(ruleset, rule, plan.handled_fs)
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return plan


def _add_path_rule(ruleset: int, rule: PathRule, handled: int) -> None:
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise JailError(
            f"jail: cannot open {rule.path} for a Landlock rule: {exc.strerror}"
        ) from None
    try:
        access = rule.access & handled
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            access &= _FILE_RIGHTS
        if access:
            beneath = _PathBeneath(access, fd)
            _check(
                _libc.syscall(
                    _SYS_LANDLOCK_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(beneath), 0
                ),
                f"landlock_add_rule({rule.path})",
            )
    finally:
        os.close(fd)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise JailError(f"jail: {what} failed: {os.strerror(err)}")
    return int(ret)


# --- seccomp ------------------------------------------------------------------------------

# Allowed with any arguments: what the run loop, the devices, Python threads, the lazy
# pager and snapshot publication call once the VM runs (measured with strace, then
# trimmed; docs/jail.md lists why each is here). Paths are Landlock's business.
SYSCALLS = (
    # I/O on descriptors opened before the jail, and files Landlock lets us open
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "preadv2",
    "lseek",
    "close",
    "fstat",
    "newfstatat",
    "statx",
    "lstat",
    "stat",
    "fsync",
    "fdatasync",
    "ftruncate",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "rmdir",
    "poll",
    "ppoll",
    "dup",
    # memory (mmap and mprotect are below: never executable)
    "munmap",
    "mremap",
    "madvise",
    "brk",
    # threads, time, signals within the process
    "futex",
    "set_robust_list",
    "rseq",
    "sched_yield",
    "sched_getaffinity",
    "gettid",
    "getpid",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "rt_sigprocmask",
    "rt_sigaction",
    "rt_sigreturn",
    "rt_sigtimedwait",
    "sigaltstack",
    "restart_syscall",
    "getrandom",
    "exit",
    "exit_group",
    # further filters (``refuse_ioctls``): a filter can only narrow what runs, never widen
    "seccomp",
)

# clone: threads only. CLONE_THREAD implies CLONE_SIGHAND and CLONE_VM (the kernel
# refuses it otherwise), so this admits pthread_create and nothing that makes a process
# or a namespace. clone3 passes its flags in memory, which a filter cannot read: it fails
# with ENOSYS and glibc falls back to clone.
CLONE_THREAD = 0x00010000
_CLONE_NEW = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_CLONE_VFORK = 0x00004000
PROT_EXEC = 0x4
_FCNTL_OK = (1, 2, 3, 4, 1030)  # F_GETFD F_SETFD F_GETFL F_SETFL F_DUPFD_CLOEXEC
_TCGETS = 0x5401  # isatty() from open(): answered "not a terminal"
_IOCTL_CMD = 0xFFFFFFFF  # the kernel reads the request as 32 bits; compare only those


_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}  # glibc; Debian's libseccomp2


def load_seccomp() -> Any:
    """Import the binding (before the jail: it loads a shared library).

    pyseccomp finds its libraries with ``ctypes.util.find_library``, which runs
    ``ldconfig -p`` in a subprocess (~20 ms, and an exec the monitor otherwise never
    needs); the sonames are fixed, so they are answered directly during the import.
    """
    import ctypes.util

    if "pyseccomp" not in sys.modules:
        real = ctypes.util.find_library
        ctypes.util.find_library = lambda name: _SONAMES.get(name) or real(name)
        try:
            import pyseccomp  # noqa: F401
        except OSError as exc:
            raise JailError(
                f"jail: cannot load libseccomp ({exc}); install Debian's "
                "libseccomp2 (scripts/setup does)"
            ) from None
        finally:
            ctypes.util.find_library = real
    return sys.modules["pyseccomp"]


def enter_seccomp(ioctls: Iterable[int], *, deny_truncation: bool = False) -> None:
    """Load the allowlist into every thread of this process (TSYNC); irreversible.

    ``ioctls``: the request numbers the process may still issue (any descriptor).
    ``deny_truncation``: Landlock below ABI 3 cannot refuse truncation, so openat
    is allowed only without O_TRUNC (truncate(2) and creat(2) are never listed);
    ftruncate stays, since it needs a descriptor opened for writing, which Landlock
    grants only in the private staging directory.
    """
    sc = load_seccomp()
    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    f.set_attr(sc.Attr.CTL_TSYNC, 1)  # all threads, or the load fails
    f.set_attr(sc.Attr.CTL_NNP, 1)

    def _nr(name: str) -> int:
        nr = int(sc.resolve_syscall(sc.Arch.NATIVE, name))
        if nr < 0:
            raise JailError(f"jail: libseccomp does not know the syscall {name!r}")
        return nr

    for name in SYSCALLS:
        f.add_rule(sc.ALLOW, _nr(name))
    if deny_truncation:
        f.add_rule(sc.ALLOW, _nr("openat"), sc.Arg(2, sc.MASKED_EQ, os.O_TRUNC, 0))
    else:
        f.add_rule(sc.ALLOW, _nr("openat"))
    f.add_rule(sc.ERRNO(errno.ENOSYS), _nr("clone3"))
    f.add_rule(
        sc.ALLOW,
        _nr("clone"),
        sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD | _CLONE_NEW | _CLONE_VFORK, CLONE_THREAD),
    )
    for name in ("mmap", "mprotect"):
        f.add_rule(sc.ALLOW, _nr(name), sc.Arg(2, sc.MASKED_EQ, PROT_EXEC, 0))
    pid = os.getpid()
    f.add_rule(sc.ALLOW, _nr("tgkill"), sc.Arg(0, sc.EQ, pid))
    for cmd in _FCNTL_OK:
        f.add_rule(sc.ALLOW, _nr("fcntl"), sc.Arg(1, sc.EQ, cmd))
    for req in sorted(set(ioctls)):
        f.add_rule(sc.ALLOW, _nr("ioctl"), sc.Arg(1, sc.MASKED_EQ, _IOCTL_CMD, req))
    f.add_rule(sc.ERRNO(errno.ENOTTY), _nr("ioctl"), sc.Arg(1, sc.MASKED_EQ, _IOCTL_CMD, _TCGETS))
    try:
        f.load()
    except OSError as exc:
        raise JailError(f"jail: loading the seccomp filter failed: {exc.strerror}") from None


def refuse_ioctls(requests: Iterable[int]) -> None:
    """Stack a filter on every thread (TSYNC) that refuses ``requests`` with EPERM, as
    the allowlist refuses what it does not list; irreversible.

    For a jailed process whose allowlist had to keep an ioctl only for a while (the
    monitor's KVM_SET_USER_MEMORY_REGION, until the dirty log is on). Filters stack,
    and the strictest answer of all of them wins. No NO_NEW_PRIVS request: the
    allowlist set it already (the kernel needs it), and prctl is not on the list.
    """
    sc = load_seccomp()
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.CTL_TSYNC, 1)
    f.set_attr(sc.Attr.CTL_NNP, 0)
    nr = int(sc.resolve_syscall(sc.Arch.NATIVE, "ioctl"))
    for req in sorted(set(requests)):
        f.add_rule(sc.ERRNO(errno.EPERM), nr, sc.Arg(1, sc.MASKED_EQ, _IOCTL_CMD, req))
    try:
        f.load()
    except OSError as exc:
        raise JailError(f"jail: loading the seccomp filter failed: {exc.strerror}") from None
