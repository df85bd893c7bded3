"""The monitor's jail (docs/jail.md): denied operations fail from inside, the VM keeps running.

The main test runs the real monitor (tests/jail_probe.py wraps it) with the probe
guest's agent over the real board on /dev/kvm; from inside the jailed process a
thread that predates the seccomp filter and one started after it try execve, fork,
ptrace, mount, sockets, opening new and existing paths, an executable mapping and
KVM_CREATE_VM. Every one must fail, and the guest must still answer, snapshot into
the store (through the jail's staging directory) and power off cleanly afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sporevm.cli import _parser
from sporevm.runtime.agent_session import AgentSession, FdChannel
from sporevm.runtime.monitor_config import MonitorConfig, Restore, VmConfig
from sporevm.runtime.protocol import MonitorError
from sporevm.runtime.zygote import Zygote
from sporevm.vmm import jail
from tests.probe_build import build_probe

REPO = Path(__file__).resolve().parent.parent
needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)
needs_landlock = pytest.mark.skipif(
    jail.landlock_abi() < jail.MIN_ABI, reason=f"needs Landlock ABI >= {jail.MIN_ABI}"
)

DENIED_BY_SECCOMP = {
    "execve",
    "fork",
    "ptrace",
    "mount",
    "mmap_exec",
    "kvm_create_vm",
    "kill_parent",
    "socket_inet",
    "socket_inet6",
    "socket_unix",
}
DENIED_BY_LANDLOCK = {
    "open_new_path",
    "open_existing_outside",
    "write_store_outside_chunks",
    "proc_self_mem",
}
OPENS_WITH_TRUNC = {"open_new_path", "write_store_outside_chunks"}
VICTIM = b"a published chunk" * 100


# Truncation: truncate(2) is never on the allowlist; O_TRUNC on a published entry is
# Landlock's to refuse from ABI 3 on, and seccomp's (every O_TRUNC) below it.
def truncation_expected(older: bool) -> dict[str, str]:
    return {
        "truncate_chunk": "EPERM",
        "open_trunc_chunk": "EPERM" if older else "EACCES",
        "open_trunc_staging": "EPERM" if older else "ok",
    }


@dataclass
class Monitor:
    proc: subprocess.Popen[bytes]
    session: AgentSession
    results: Path
    store: Path

    def events(self) -> list[dict[str, Any]]:
        assert self.proc.stdout is not None
        out: list[dict[str, Any]] = []
        for line in self.proc.stdout:
            out.append(json.loads(line))
        return out

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd}).encode() + b"\n")
        self.proc.stdin.flush()

    def next_event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        doc: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return doc

    def probe_results(self, count: int = 2, timeout: float = 20.0) -> dict[str, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.results.read_text().splitlines()
            if len(lines) >= count:
                return {d["thread"]: d["results"] for d in map(json.loads, lines)}
            time.sleep(0.05)
        raise AssertionError(f"probe threads reported {self.results.read_text()!r}")


@contextmanager
def probe_monitor(
    tmp_path: Path, *, unjailed: bool = False, abi_cap: int | None = None, snapshots: bool = True
) -> Iterator[Monitor]:
    files = tmp_path / "files"
    scratch = tmp_path / "scratch"
    store = tmp_path / "store"
    for d in (files, scratch, store / "keys", store / "chunks" / "blake3"):
        d.mkdir(parents=True)
    (store / "chunks" / "blake3" / "victim").write_bytes(VICTIM)
    (files / "initrd").write_bytes(b"\0" * 4096)
    (files / "rootfs").write_bytes(bytes(1 << 20))
    results = tmp_path / "results.jsonl"
    out_fd = os.open(results, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    vm = VmConfig(
        kernel=build_probe(),
        initrd=files / "initrd",
        rootfs=files / "rootfs",
        cmdline="probe.tests=virtio_agent",
        memory=32 << 20,
        # A safety net only: the hardware-KVM lane runs this under nested TCG, where
        # the whole test takes over a minute (60 s once cut a passing run short).
        timeout=600,
        store=store,
        snapshots=snapshots,
    )
    cfg = MonitorConfig(vm, agent_fd=theirs.fileno(), serial_log=tmp_path / "serial.log")
    env = {
        **os.environ,
        "JAIL_PROBE_FD": str(out_fd),
        "JAIL_PROBE_SCRATCH": str(scratch),
        "JAIL_PROBE_STORE": str(store),
        "PYTHONPATH": str(REPO),
    }
    env.pop("SPORE_NO_JAIL", None)
    if unjailed:
        env["SPORE_NO_JAIL"] = "1"
    env.pop(jail.ABI_CAP_ENV, None)
    if abi_cap is not None:
        env[jail.ABI_CAP_ENV] = str(abi_cap)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.jail_probe"],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(theirs.fileno(), out_fd),
    )
    theirs.close()
    os.close(out_fd)
    assert proc.stdin is not None
    proc.stdin.write(cfg.encode())
    proc.stdin.flush()
    try:
        yield Monitor(proc, AgentSession(FdChannel(ours.fileno()), grace=10.0), results, store)
    except BaseException as exc:
        # Say why the monitor went away, not only that the channel closed.
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=30)
        tail = (out[-2000:] + b"\n" + err[-4000:]).decode(errors="replace")
        exc.add_note(f"monitor exit {proc.returncode}; its last events and stderr:\n{tail}")
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        ours.close()


def seccomp_filters(status: str) -> int | None:
    """``Seccomp_filters`` of a /proc/PID/status (Linux 5.9+), None when not shown."""
    for line in status.splitlines():
        if line.startswith("Seccomp_filters:"):
            return int(line.split()[1])
    return None


def exec_answers(session: AgentSession, argv0: str) -> None:
    h = session.exec([argv0], timeout=10)
    st = h.wait(10)
    assert st.exit_code == 7 and h.stdout == f"probe-exec:{argv0}".encode()


@needs_kvm
@needs_landlock
@pytest.mark.parametrize("abi_cap", [None, 2, 1], ids=["kernel-abi", "as-abi-2", "as-abi-1"])
def test_denied_operations_fail_inside_the_jailed_monitor_and_the_vm_keeps_running(
    tmp_path: Path, abi_cap: int | None
) -> None:
    """With the kernel's own Landlock ABI, and behaving as on a kernel with ABI 2
    (Debian 12, Amazon Linux 2023) or ABI 1 (Ubuntu 22.04): the same operations fail
    every way, and the snapshot still publishes (on ABI 1, staged in chunks/ itself)."""
    used = jail.landlock_abi() if abi_cap is None else min(abi_cap, jail.landlock_abi())
    older = used < 3  # Debian 12's own kernel in the hardware-KVM lane: ABI 2 for real
    with probe_monitor(tmp_path, abi_cap=abi_cap) as mon:
        assert mon.next_event()["event"] == "booting"
        mon.session.wait_ready(20)
        results = mon.probe_results()
        assert set(results) == {"early", "late"}
        for thread, res in results.items():
            for op in DENIED_BY_SECCOMP:
                assert res[op] == "EPERM", (thread, op, res)
            for op in DENIED_BY_LANDLOCK:
                # below ABI 3 an open(…, "wb") never reaches Landlock: its O_TRUNC is refused
                want = "EPERM" if older and op in OPENS_WITH_TRUNC else "EACCES"
                assert res[op] == want, (thread, op, res)
            for op, want in truncation_expected(older).items():
                assert res[op] == want, (thread, op, res)
            assert res["thread"] == "ok", (thread, res)
            # Allowed until the first snapshot turns the dirty log on: past seccomp, the
            # call fails on its bad descriptor.
            assert res["kvm_set_user_memory_region"] == "EBADF", (thread, res)
        assert (mon.store / "chunks" / "blake3" / "victim").read_bytes() == VICTIM
        status = Path(f"/proc/{mon.proc.pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
        filters = seccomp_filters(status)
        assert list((tmp_path / "scratch").iterdir()) == []
        assert list((mon.store / "keys").iterdir()) == []

        # Still running: the guest answers, a snapshot publishes chunks through the
        # jail's private staging directory, and the VM resumes and powers off cleanly.
        exec_answers(mon.session, "/after/the/attempts")
        mon.command("snapshot")
        snap = mon.next_event()
        assert snap["event"] == "snapshot", snap
        chunk_dir = mon.store / "chunks" / "blake3"
        for cid in [c for c in snap["chunks"] if c] + [snap["state"]["digest"]]:
            assert (chunk_dir / cid.split(":", 1)[1]).is_file()
        # The snapshot turned the dirty log on, and the jail took the ioctl back: on the
        # thread that took the snapshot and on one that was already running (TSYNC).
        results = mon.probe_results(count=4)
        for thread in ("sealed", "late-sealed"):
            assert results[thread] == {"kvm_set_user_memory_region": "EPERM"}, results
        status = Path(f"/proc/{mon.proc.pid}/status").read_text()
        assert filters is None or seccomp_filters(status) == filters + 1, status
        mon.command("resume")
        exec_answers(mon.session, "/after/the/snapshot")
        mon.session.shutdown()
        assert mon.proc.wait(20) == 0
        events = mon.events()
        assert events[-1]["event"] == "exit" and events[-1]["reason"] == "POWEROFF", events
        assert list((mon.store / "tmp").iterdir()) == []  # the staging dir went away
        assert mon.proc.stderr is not None
        assert b"WITHOUT its jail" not in mon.proc.stderr.read()


@needs_kvm
def test_no_jail_runs_unconfined_and_says_so(tmp_path: Path) -> None:
    """The control: the same probe succeeds without the jail, so the test above can fail."""
    with probe_monitor(tmp_path, unjailed=True) as mon:
        mon.session.wait_ready(20)
        results = mon.probe_results()
        for res in results.values():
            assert res["socket_inet"] == "ok" and res["open_new_path"] == "ok", res
            assert res["open_existing_outside"] == "ok", res
            assert res["proc_self_mem"] == "ok", res
        status = Path(f"/proc/{mon.proc.pid}/status").read_text()
        assert "Seccomp:\t0" in status
        mon.session.shutdown()
        assert mon.proc.wait(20) == 0
        assert mon.proc.stderr is not None
        assert b"WARNING: this VM monitor runs WITHOUT its jail" in mon.proc.stderr.read()


# --- the mechanisms on their own, in a throwaway child process ----------------------------

CHILD = textwrap.dedent("""
    import ctypes, errno, json, os, socket, sys, threading
    from pathlib import Path
    from sporevm.vmm import jail
    sandbox = Path(sys.argv[1])
    out = {}
    def attempt(name, fn):
        try:
            fn()
            out[name] = "ok"
        except OSError as exc:
            out[name] = errno.errorcode[exc.errno]
    jail.load_seccomp()  # before Landlock, as the monitor does: its import runs ldconfig
    jail.restrict_filesystem([jail.PathRule(sandbox, jail.FS_READ_FILE | jail.FS_WRITE_FILE
                                             | jail.FS_MAKE_REG | jail.FS_TRUNCATE)])
    attempt("write_inside", lambda: (sandbox / "a").write_bytes(b"x"))
    attempt("read_outside", lambda: open("/etc/hostname", "rb"))
    attempt("create_outside", lambda: open(sandbox.parent / "escaped", "wb"))
    attempt("unlink_inside", lambda: os.unlink(sandbox / "a"))  # REMOVE_FILE not granted
    before = threading.Event()
    early = {}
    def early_thread():
        before.wait()
        try:
            socket.socket(socket.AF_INET)
            early["socket"] = "ok"
        except OSError as exc:
            early["socket"] = errno.errorcode[exc.errno]
    t = threading.Thread(target=early_thread, daemon=True)
    t.start()
    jail.enter_seccomp([0x1234])
    before.set()
    t.join()
    out["early_thread_socket"] = early["socket"]
    libc = ctypes.CDLL(None, use_errno=True)
    def raw(fn):
        def call():
            if fn() < 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        return call
    attempt("clone3", raw(lambda: libc.syscall(435, None, 0)))
    attempt("new_thread", lambda: threading.Thread(target=lambda: None).start())
    attempt("ioctl_listed", raw(lambda: libc.ioctl(0, ctypes.c_ulong(0x1234), 0)))
    attempt("ioctl_unlisted", raw(lambda: libc.ioctl(0, ctypes.c_ulong(0x1235), 0)))
    me = threading.get_native_id()
    attempt("tgkill_self", raw(lambda: libc.syscall(234, os.getpid(), me, 0)))
    attempt("tgkill_parent", raw(lambda: libc.syscall(234, os.getppid(), os.getppid(), 0)))
    attempt("setns", raw(lambda: libc.syscall(308, 0, 0)))
    attempt("unshare", raw(lambda: libc.syscall(272, 0x10000000)))
    print(json.dumps(out))
""")


@needs_landlock
def test_mechanisms_deny_what_they_do_not_list(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(sandbox)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {
        "write_inside": "ok",
        "read_outside": "EACCES",
        "create_outside": "EACCES",
        "unlink_inside": "EACCES",
        "early_thread_socket": "EPERM",
        "clone3": "ENOSYS",
        "new_thread": "ok",
        # fd 0 is not a KVM fd: a listed request reaches the kernel (ENOTTY), an unlisted
        # one never does (EPERM).
        "ioctl_listed": "ENOTTY",
        "ioctl_unlisted": "EPERM",
        "tgkill_self": "ok",
        "tgkill_parent": "EPERM",
        "setns": "EPERM",
        "unshare": "EPERM",
    }
    assert not (tmp_path / "escaped").exists()


def test_landlock_refuses_a_process_that_already_has_threads(tmp_path: Path) -> None:
    code = (
        "import threading, time; from pathlib import Path; from sporevm.vmm import jail\n"
        "threading.Thread(target=time.sleep, args=(2,), daemon=True).start()\n"
        "jail.restrict_filesystem([jail.PathRule(Path('/tmp'), jail.FS_READ_FILE)])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    if jail.landlock_abi() < jail.MIN_ABI:
        assert "Landlock ABI >= 1" in proc.stderr
    else:
        assert "2 threads already run" in proc.stderr, proc.stderr
    assert proc.returncode != 0


def test_cli_no_jail_flag_is_on_run_and_build_and_warns(tmp_path: Path) -> None:
    p = _parser()
    assert p.parse_args(["run", "--no-jail", "--rootfs", "r", "--", "true"]).no_jail
    assert p.parse_args(["build", "--no-jail"]).no_jail
    assert not p.parse_args(["build"]).no_jail
    env = {**os.environ, "SPORE_NO_JAIL": "1", "SPORE_HOME": str(tmp_path / "store")}
    proc = subprocess.run(
        [sys.executable, "-m", "sporevm.cli", "cache", "ls", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: every VM monitor this command starts runs WITHOUT its jail" in proc.stderr


PUBLISHED = textwrap.dedent("""
    import errno, os, sys
    from pathlib import Path
    from sporevm.runtime import confine
    from sporevm.vmm import jail
    base = Path(sys.argv[1])
    jail.restrict_filesystem([jail.PathRule(base / "chunks", confine.STORE_ENTRY),
                              jail.PathRule(base / "staging", confine.STAGING)])
    def attempt(fn):
        try:
            fn()
            return "ok"
        except OSError as exc:
            return errno.errorcode[exc.errno]
    (base / "staging" / "new").write_bytes(b"fresh")
    print(attempt(lambda: os.rename(base / "staging" / "new", base / "chunks" / "new")),
          attempt(lambda: open(base / "chunks" / "old", "r+b")),
          attempt(lambda: os.rename(base / "chunks" / "old", base / "staging" / "old")),
          attempt(lambda: open(base / "chunks" / "old", "rb").read()))
""")


@needs_landlock
def test_published_store_entries_cannot_be_rewritten_in_place(tmp_path: Path) -> None:
    """Chunks and memfiles (which other VMs may have mapped) are publish-only: a jailed
    monitor can rename new files in, but can neither open one for writing nor move it
    back into its writable staging directory (Landlock: no rights gained by a rename)."""
    (tmp_path / "chunks").mkdir()
    (tmp_path / "staging").mkdir()
    (tmp_path / "chunks" / "old").write_bytes(b"published")
    proc = subprocess.run(
        [sys.executable, "-c", PUBLISHED, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "EACCES", "EXDEV", "ok"]
    assert (tmp_path / "chunks" / "old").read_bytes() == b"published"


@needs_kvm
@needs_landlock
def test_a_refused_restore_leaves_no_staging_directory(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (tmp_path / "manifest.json").write_bytes(b'{"format": "not a spore"}')
    (tmp_path / "k").write_bytes(b"\0" * 4096)
    restore = Restore(
        tmp_path / "manifest.json", "blake3:" + "0" * 64, "blake3:" + "0" * 64, "blake3:" + "0" * 64
    )
    vm = VmConfig(
        kernel=tmp_path / "k",
        initrd=tmp_path / "k",
        rootfs=tmp_path / "k",
        cmdline="",
        memory=32 << 20,
        timeout=10,
        store=store,
        restore=restore,
    )
    cfg = MonitorConfig(vm, agent_fd=3, serial_log=tmp_path / "log")
    env = {k: v for k, v in os.environ.items() if k != "SPORE_NO_JAIL"}
    proc = subprocess.run(
        [sys.executable, "-m", "sporevm.runtime.monitor"],
        cwd=REPO,
        env=env,
        input=cfg.encode(),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["event"] == "error"
    assert list((store / "tmp").iterdir()) == []


def test_without_landlock_the_monitor_refuses_instead_of_half_jailing() -> None:
    code = (
        "from sporevm.vmm import jail\n"
        "jail.landlock_abi = lambda: 0\n"
        "jail.restrict_filesystem([])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "JailError: jail: this kernel has no Landlock" in proc.stderr
    assert "--no-jail" in proc.stderr


@needs_kvm
@needs_landlock
def test_a_vm_started_without_snapshots_refuses_the_memory_ioctl_from_the_start(
    tmp_path: Path,
) -> None:
    """`spore run`'s VMs are never snapshotted: no dirty log to turn on, so stage 2 already
    refuses KVM_SET_USER_MEMORY_REGION, and a snapshot request fails in one line."""
    with probe_monitor(tmp_path, snapshots=False) as mon:
        assert mon.next_event()["event"] == "booting"
        mon.session.wait_ready(20)
        results = mon.probe_results()
        for thread, res in results.items():
            assert res["kvm_set_user_memory_region"] == "EPERM", (thread, res)
        status = Path(f"/proc/{mon.proc.pid}/status").read_text()
        filters = seccomp_filters(status)
        mon.command("snapshot")
        ev = mon.next_event()
        assert ev == {"event": "snapshot-error", "message": "this VM was started without snapshots"}
        later = Path(f"/proc/{mon.proc.pid}/status").read_text()
        assert filters is None or seccomp_filters(later) == filters  # no third filter
        mon.command("resume")
        exec_answers(mon.session, "/no/snapshot")
        mon.session.shutdown()
        assert mon.proc.wait(20) == 0


@needs_kvm
@needs_landlock
@pytest.mark.parametrize(("zygote", "fork_here"), [(True, False), (False, False), (True, True)])
def test_monitors_the_launcher_starts_are_jailed_by_default(
    tmp_path: Path, zygote: bool, fork_here: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spawned, forked by the zygote, or forked from the caller itself (`run --from`):
    the monitor jails itself all the same, and the last holds only its own descriptors."""
    from sporevm.runtime.launcher import VmProcess, VmSpec

    monkeypatch.delenv("SPORE_NO_JAIL", raising=False)
    (tmp_path / "initrd").write_bytes(b"\0" * 4096)
    (tmp_path / "rootfs").write_bytes(bytes(1 << 20))
    spec = VmSpec(
        VmConfig(
            kernel=build_probe(),
            initrd=tmp_path / "initrd",
            rootfs=tmp_path / "rootfs",
            cmdline="probe.tests=virtio_agent",
            memory=32 << 20,
            timeout=60,
            store=tmp_path / "store",
        ),
        zygote=zygote,
        fork_here=fork_here,
    )
    marker = tmp_path / "callers-own-file"
    alone = threading.active_count() == 1  # else (an earlier test's zygote) the zygote forks
    with open(marker, "w"), VmProcess(spec) as vm:
        vm.session.wait_ready(20)
        status = Path(f"/proc/{vm.proc.pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
        if fork_here:  # a child of this very process (pytest) if it had one thread
            parent = os.getpid() if alone else Zygote.shared().proc.pid
            assert f"PPid:\t{parent}\n" in status
            fd_dir = Path(f"/proc/{vm.proc.pid}/fd")
            held = {os.readlink(fd_dir / n) for n in os.listdir(fd_dir)}
            assert str(marker) not in held, held  # the caller's descriptors stay the caller's
        exec_answers(vm.session, "/jailed")
        vm.session.shutdown()
        ev = vm.wait_exit(20)
        assert ev is not None and not isinstance(ev, MonitorError), ev
        assert ev.reason == "POWEROFF", ev


@needs_kvm
@needs_landlock
def test_a_refused_restore_in_a_zygote_monitor_leaves_no_staging_directory(tmp_path: Path) -> None:
    from sporevm.runtime.launcher import VmProcess, VmSpec

    store = tmp_path / "store"
    (tmp_path / "manifest.json").write_bytes(b'{"format": "not a spore"}')
    (tmp_path / "k").write_bytes(b"\0" * 4096)
    restore = Restore(
        tmp_path / "manifest.json", "blake3:" + "0" * 64, "blake3:" + "0" * 64, "blake3:" + "0" * 64
    )
    spec = VmSpec(
        VmConfig(
            kernel=tmp_path / "k",
            initrd=tmp_path / "k",
            rootfs=tmp_path / "k",
            cmdline="",
            memory=32 << 20,
            timeout=10,
            store=store,
            restore=restore,
        ),
        zygote=True,
    )
    with VmProcess(spec) as vm:
        ev = vm.wait_exit(30)
        assert isinstance(ev, MonitorError), ev
    assert list((store / "tmp").iterdir()) == []


@pytest.mark.parametrize("abi", range(0, 9))
def test_the_plan_for_each_landlock_abi(abi: int) -> None:
    """Which rights Landlock is asked to handle per ABI, and what seccomp closes instead."""
    if abi < 1:
        with pytest.raises(jail.JailError, match=r"no Landlock; .*Landlock ABI >= 1 .*--no-jail"):
            jail.plan_for(abi)
        return
    plan = jail.plan_for(abi)
    assert bool(plan.handled_fs & jail.FS_REFER) == plan.cross_directory_publish == (abi >= 2)
    assert bool(plan.handled_fs & jail.FS_TRUNCATE) == (abi >= 3)
    assert plan.seccomp_denies_truncation == (abi < 3)
    assert bool(plan.handled_fs & jail.FS_IOCTL_DEV) == (abi >= 5)
    assert bool(plan.handled_net) == (abi >= 4) and bool(plan.scoped) == (abi >= 6)
    assert plan.attr_size == (8 if abi < 4 else 16 if abi < 6 else 24)


def test_the_abi_cap_only_narrows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jail.ABI_CAP_ENV, "2")
    assert jail.effective_abi() == min(2, jail.landlock_abi())
    monkeypatch.setenv(jail.ABI_CAP_ENV, "99")
    assert jail.effective_abi() == jail.landlock_abi()
    monkeypatch.setenv(jail.ABI_CAP_ENV, "two")
    with pytest.raises(jail.JailError, match="not a Landlock ABI number"):
        jail.effective_abi()
