"""The real VM monitor, plus an attacker's to-do list run from inside it once it is jailed.

Test helper for tests/test_jail.py, started instead of ``python -m sporevm.runtime.monitor``
(same stdin/stdout/agent-fd protocol). It wraps the monitor's two jail stages:

* after stage 1 (Landlock) it starts an "early" thread, which exists before seccomp
  is loaded, so its results show TSYNC reached threads already running;
* after stage 2 (seccomp) it wakes that thread and starts a "late" one.

Each thread tries what a guest that took over the monitor would try and writes one
JSON line ``{"thread": ..., "results": {op: "ok" | errno name}}`` to the fd named by
``JAIL_PROBE_FD`` (opened by the test, inherited). Nothing here is reachable from
the guest: it lives in tests/ and only this wrapper installs it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from sporevm.runtime import confine, monitor
from sporevm.vmm import kvm
from sporevm.vmm.machine import Machine

_libc = ctypes.CDLL(None, use_errno=True)
OUT = int(os.environ["JAIL_PROBE_FD"])
SCRATCH = Path(os.environ["JAIL_PROBE_SCRATCH"])  # a directory the test owns
STORE = Path(os.environ["JAIL_PROBE_STORE"])
PTRACE_ATTACH = 16


def _libc_call(fn: Callable[[], int]) -> None:
    if fn() < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _kvm_create_vm() -> None:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)  # Landlock lets the monitor open it
    try:
        _libc_call(lambda: int(_libc.ioctl(fd, ctypes.c_ulong(kvm.KVM_CREATE_VM), 0)))
    finally:
        os.close(fd)


def _set_user_memory_region() -> None:
    """Past seccomp, on no descriptor: EBADF while the jail allows it, EPERM after."""
    _libc_call(lambda: int(_libc.ioctl(-1, ctypes.c_ulong(kvm.KVM_SET_USER_MEMORY_REGION), 0)))


def _fork() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _thread() -> None:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


def attempts(unjailed: bool) -> dict[str, Callable[[], object]]:
    ops: dict[str, Callable[[], object]] = {
        "open_new_path": lambda: open(SCRATCH / f"new-{threading.get_native_id()}", "wb"),
        "open_existing_outside": lambda: open("/etc/hostname", "rb"),
        "write_store_outside_chunks": lambda: open(STORE / "keys" / "planted", "wb"),
        # W^X would mean little if the monitor could rewrite its own code through /proc
        "proc_self_mem": lambda: open("/proc/self/mem", "r+b", buffering=0),
        "socket_inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        "socket_inet6": lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM),
        "socket_unix": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "thread": _thread,  # must keep working: the run loop starts threads
        # A published entry must never change in place (other VMs map memfiles).
        "truncate_chunk": lambda: os.truncate(STORE / "chunks" / "blake3" / "victim", 0),
        "open_trunc_chunk": lambda: os.close(
            os.open(STORE / "chunks" / "blake3" / "victim", os.O_RDONLY | os.O_TRUNC)
        ),
    }
    if unjailed:
        return ops  # the rest would replace or disturb the process even when allowed
    ops.update(
        {
            "execve": lambda: os.execv("/bin/true", ["true"]),
            "fork": _fork,
            "ptrace": lambda: _libc_call(
                lambda: int(_libc.ptrace(PTRACE_ATTACH, os.getppid(), 0, 0))
            ),
            "mount": lambda: _libc_call(
                lambda: int(_libc.mount(b"none", str(SCRATCH).encode(), b"tmpfs", 0, None))
            ),
            "mmap_exec": lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC),
            "kvm_create_vm": _kvm_create_vm,
            "kvm_set_user_memory_region": _set_user_memory_region,
            "kill_parent": lambda: os.kill(os.getppid(), 0),
            "open_trunc_staging": _open_trunc_staging,
        }
    )
    return ops


def _open_trunc_staging() -> None:
    """O_TRUNC even where writing is granted: below ABI 3 seccomp cannot tell paths apart."""
    assert staging is not None
    path = staging / f"t-{threading.get_native_id()}"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    os.unlink(path)  # the staging directory must be empty when the monitor ends


def probe(name: str, ops: dict[str, Callable[[], object]] | None = None) -> None:
    results: dict[str, str] = {}
    if ops is None:
        ops = attempts(confine.jail_disabled())
    for op, fn in ops.items():
        try:
            fn()
            results[op] = "ok"
        except OSError as exc:
            results[op] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        except Exception as exc:  # a broken attempt is a result too, never a dead thread
            results[op] = f"raised {type(exc).__name__}: {exc}"
    os.write(OUT, json.dumps({"thread": name, "results": results}).encode() + b"\n")


go = threading.Event()
sealed = threading.Event()
real_files, real_syscalls = confine.MonitorJail.files, confine.MonitorJail.syscalls
real_seal = confine.MonitorJail.seal_memory
AFTER_SEAL: dict[str, Callable[[], object]] = {
    "kvm_set_user_memory_region": _set_user_memory_region
}


def _early() -> None:
    go.wait()
    probe("early")


staging: Path | None = None  # this monitor's private staging directory, once jailed


def files(self: confine.MonitorJail) -> None:
    global staging
    staging = self.staging
    real_files(self)
    threading.Thread(target=_early, daemon=True).start()


def _late() -> None:
    probe("late")
    sealed.wait()  # a thread that predates the third filter: TSYNC must reach it too
    probe("late-sealed", AFTER_SEAL)


def syscalls(self: confine.MonitorJail, machine: Machine) -> None:
    real_syscalls(self, machine)
    go.set()
    threading.Thread(target=_late, daemon=True).start()


def seal_memory(self: confine.MonitorJail) -> None:
    """Stage 3 (the first snapshot turned the dirty log on): try again, here and in
    the late thread."""
    real_seal(self)
    probe("sealed", AFTER_SEAL)
    sealed.set()


confine.MonitorJail.files = files  # type: ignore[method-assign]
confine.MonitorJail.syscalls = syscalls  # type: ignore[method-assign]
confine.MonitorJail.seal_memory = seal_memory  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(monitor.main())
