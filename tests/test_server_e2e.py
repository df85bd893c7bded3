"""The resident server end to end (docs/server.md): `spore server start`, then `spore
run --from` handed to it by the thin client, with a real spore on /dev/kvm.

- a served run is the run itself: the client's stdout, stderr, working directory and
  environment (the server was started with another SPORE_HOME), and its exit code;
- Ctrl-C on the client reaches the run; a client that dies takes its run and VM with
  it;
- the server refuses what it must not serve, and the client then runs the command
  itself, saying why: another user, another network namespace, code changed on disk;
- SPORE_SERVER=require fails in one line when no server runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PushedImage
from tests.test_kernel import KERNEL_STORE, built_kernel  # noqa: F401  (shared fixture)

needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)
ROOT = Path(__file__).resolve().parent.parent

SPOREFILE = """\
sporefile: 1
name: served
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB}}
steps:
  - name: marker
    run: echo served > /tmp/marker
"""


def spore_env(runtime: Path, mode: str | None = "require", **extra: str) -> dict[str, str]:
    env = {**os.environ, "SPORE_HOME": str(KERNEL_STORE), "XDG_RUNTIME_DIR": str(runtime)}
    # This checkout's spore wherever the client runs (the install id names the package
    # directory: a client that imported another copy would find no server of its own).
    env["PYTHONPATH"] = str(ROOT)
    env.pop("SPORE_SERVER", None)
    if mode is not None:
        env["SPORE_SERVER"] = mode
    env.update(extra)
    return env


def spore_cmd(
    env: dict[str, str], *args: str, cwd: Path | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "sporevm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        **kw,
    )


@dataclass
class Server:
    runtime: Path  # its XDG_RUNTIME_DIR
    pid: int
    socket: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text()


def start_server(runtime: Path, empty_home: Path) -> Server:
    # The server's own SPORE_HOME is an empty store: a run that used it instead of the
    # client's would find neither the spore's chunks nor the kernel.
    proc = spore_cmd(
        spore_env(runtime, None, SPORE_HOME=str(empty_home)), "server", "start", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["started"] is True
    return Server(runtime, doc["pid"], Path(doc["socket"]), Path(doc["log"]))


def stop_server(srv: Server) -> None:
    spore_cmd(spore_env(srv.runtime, None), "server", "stop", "--now", "--wait", "30s")


@pytest.fixture(scope="module")
def spore_dir(
    busybox_image: PushedImage,
    built_kernel: None,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    ctx = tmp_path_factory.mktemp("served")
    (ctx / "Sporefile").write_text(SPOREFILE.format(layout=busybox_image.layout))
    proc = spore_cmd(spore_env(ctx, "off"), "build", str(ctx / "Sporefile"))
    assert proc.returncode == 0, proc.stderr
    return ctx / "out" / "served.spore"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    # Short: the socket path must fit sun_path (108 bytes).
    runtime = Path(tempfile.mkdtemp(prefix="sps", dir="/tmp"))
    srv = start_server(runtime, tmp_path / "empty-home")
    try:
        yield srv
    finally:
        stop_server(srv)
        shutil.rmtree(runtime, ignore_errors=True)


def group_members(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    out.append(int(entry))
            except ProcessLookupError:
                pass
    return out


def wait_for(cond: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def handler_of(srv: Server, nth: int) -> int:
    line = [ln for ln in srv.log_text().splitlines() if f"run {nth}: " in ln][0]
    return int(line.rsplit(" ", 1)[1])


pytestmark = [pytest.mark.vm, pytest.mark.kernelbuild]


@needs_kvm
def test_a_served_run_is_the_run_itself(spore_dir: Path, server: Server) -> None:
    script = 'cat /tmp/marker; echo "in $WHO"; echo oops >&2; exit 7'
    # a relative spore path: the server's own working directory is /
    proc = spore_cmd(
        spore_env(server.runtime),
        *("run", "--from", "out/served.spore", "-e", "WHO=hello", "--", "sh", "-c", script),
        cwd=spore_dir.parent.parent,
    )
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "served\nin hello\n"
    assert "oops" in proc.stderr
    assert "run 1: run for pid" in server.log_text()
    # and a second one from the same warm server
    again = spore_cmd(
        spore_env(server.runtime), "run", "--from", str(spore_dir), "--", "cat", "/tmp/marker"
    )
    assert (again.returncode, again.stdout) == (0, "served\n"), again.stderr
    assert "run 2: " in server.log_text()


@needs_kvm
def test_served_restores_share_one_verified_ram_image(spore_dir: Path, server: Server) -> None:
    """The first served restore fills and seals the spore's RAM image and the server
    keeps it; the next restore maps it without reading a chunk: a chunk corrupted on
    disk in between does not reach it (what was verified is what runs), while a run
    without the server still reads that chunk and fails closed in one line."""
    from sporevm.spore.chunks import ChunkStore
    from sporevm.store import Store

    env = spore_env(server.runtime)
    first = spore_cmd(env, "run", "--from", str(spore_dir), "--", "cat", "/tmp/marker")
    assert (first.returncode, first.stdout) == (0, "served\n"), first.stderr
    wait_for(lambda: "kept RAM image" in server.log_text(), 10, "the handler's offer")
    doc = json.loads((spore_dir / "manifest.json").read_text())
    cid = next(c for c in doc["memory"]["chunks"] if c is not None)
    chunks = ChunkStore(Store(KERNEL_STORE))
    original = chunks.get(cid)
    path = chunks.path(cid)
    try:
        os.chmod(path, 0o644)
        with open(path, "r+b") as fh:
            fh.write(bytes([original[0] ^ 0xFF]))
        again = spore_cmd(env, "run", "--from", str(spore_dir), "--", "cat", "/tmp/marker")
        assert (again.returncode, again.stdout) == (0, "served\n"), again.stderr
        assert server.log_text().count("kept RAM image") == 1  # a hit: nothing new filled
        off = spore_cmd(
            spore_env(server.runtime, "off"), "run", "--from", str(spore_dir), "--", "true"
        )
        assert off.returncode != 0 and off.stdout == ""
        assert cid in off.stderr and len(off.stderr.strip().splitlines()) == 1, off.stderr
    finally:
        chunks.put(original)  # repairs (or re-creates) the entry for the other tests
    assert chunks.get(cid) == original


def start_sleeper(spore_dir: Path, srv: Server) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sporevm.cli",
            "run",
            "--from",
            str(spore_dir),
            "--",
            "sleep",
            "600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=spore_env(srv.runtime),
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "resumed SPORE in X s": the VM runs the command
    assert line.startswith("resumed "), line + proc.stderr.read()
    return proc


@needs_kvm
def test_ctrl_c_on_the_client_ends_the_run(spore_dir: Path, server: Server) -> None:
    proc = start_sleeper(spore_dir, server)
    handler = handler_of(server, 1)
    assert len(group_members(handler)) >= 2  # the handler and its VM monitor
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "spore: interrupted" in err
    wait_for(lambda: not group_members(handler), 30, "the run's processes to end")


@needs_kvm
def test_a_client_that_dies_takes_its_run_along(spore_dir: Path, server: Server) -> None:
    proc = start_sleeper(spore_dir, server)
    handler = handler_of(server, 1)
    proc.kill()
    proc.wait(10)
    wait_for(lambda: not group_members(handler), 30, "the orphaned run to end")
    assert "hung up; ending handler" in server.log_text()
    # the server itself serves on
    ok = spore_cmd(spore_env(server.runtime), "run", "--from", str(spore_dir), "--", "true")
    assert ok.returncode == 0, ok.stderr


@needs_kvm
def test_another_network_namespace_runs_here(spore_dir: Path, server: Server) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-m", "sporevm.cli"]
        + ["run", "--from", str(spore_dir), "--", "cat", "/tmp/marker"],
        capture_output=True,
        text=True,
        env=spore_env(server.runtime, None),
        timeout=300,
    )
    assert (proc.returncode, proc.stdout) == (0, "served\n"), proc.stderr
    assert "did not take this run: the client runs in another net namespace" in proc.stderr
    assert "run 1:" not in server.log_text()


@needs_kvm
def test_changed_code_is_never_served(spore_dir: Path, server: Server) -> None:
    module = ROOT / "sporevm" / "units.py"  # imported by the server at start
    st = module.stat()
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        proc = spore_cmd(
            spore_env(server.runtime, None),
            "run",
            "--from",
            str(spore_dir),
            "--",
            "cat",
            "/tmp/marker",
        )
    finally:
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (proc.returncode, proc.stdout) == (0, "served\n"), proc.stderr  # run here instead
    assert "the server's code changed on disk" in proc.stderr
    assert "units.py changed" in proc.stderr
    wait_for(lambda: not server.socket.exists(), 10, "the stale server to stop")
    status = spore_cmd(spore_env(server.runtime, None), "server", "status", "--json")
    wait_for(
        lambda: (
            not json.loads(
                spore_cmd(spore_env(server.runtime, None), "server", "status", "--json").stdout
            )["running"]
        ),
        10,
        "the stale server to exit",
    )
    assert status.returncode == 0


def test_another_user_is_refused(tmp_path: Path) -> None:
    """No VM needed: the refusal comes before anything runs."""
    runtime = Path(tempfile.mkdtemp(prefix="sps", dir="/tmp"))
    srv = start_server(runtime, tmp_path / "empty-home")
    try:
        # Open the directory up (as a careless admin might), so only the server's own
        # peer check stands between another user and the socket.
        os.chmod(runtime, 0o711)
        os.chmod(runtime / "spore", 0o711)
        os.chmod(srv.socket, 0o666)
        probe = (
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "sys.stdout.buffer.write(s.recv(4096))"
        )
        got = subprocess.run(
            # Debian's own python3: this user cannot reach the venv's interpreter
            ["/usr/bin/python3", "-I", "-c", probe, str(srv.socket)],
            capture_output=True,
            user=65534,
            group=65534,
            timeout=30,
            cwd="/",
        )
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith(b"R") and b"belongs to uid 0" in got.stdout
        assert "refused a client of uid 65534" in srv.log_text()
        # and a client of this user finds the directory no longer private
        os.chmod(runtime / "spore", 0o755)
        proc = spore_cmd(spore_env(runtime), "run", "--from", "/nonexistent", "--", "true")
        assert proc.returncode == 69
        assert "is open to other users" in proc.stderr
    finally:
        os.chmod(runtime / "spore", 0o700)
        stop_server(srv)
        shutil.rmtree(runtime, ignore_errors=True)


def test_require_without_a_server_fails_in_one_line(tmp_path: Path) -> None:
    proc = spore_cmd(spore_env(tmp_path), "run", "--from", "/nonexistent", "--", "true")
    assert proc.returncode == 69
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no server is running" in lines[0], proc.stderr


def test_start_status_stop(tmp_path: Path) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="sps", dir="/tmp"))
    try:
        srv = start_server(runtime, tmp_path / "empty-home")
        again = spore_cmd(spore_env(runtime, None), "server", "start", "--json")
        assert json.loads(again.stdout)["started"] is False  # one per user and install
        status = json.loads(
            spore_cmd(spore_env(runtime, None), "server", "status", "--json").stdout
        )
        assert status["running"] and status["pid"] == srv.pid and status["accepting"]
        with socket.socket(socket.AF_UNIX) as s:  # a client that never sends a request
            s.connect(str(srv.socket))
            stop = spore_cmd(spore_env(runtime, None), "server", "stop")
        assert stop.returncode == 0 and f"stopped (pid {srv.pid})" in stop.stdout, stop.stderr
        assert not srv.socket.exists()
        status = json.loads(
            spore_cmd(spore_env(runtime, None), "server", "status", "--json").stdout
        )
        assert not status["running"]
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.parametrize("fds", [0, 1, 4])
def test_a_request_carries_exactly_three_descriptors(tmp_path: Path, fds: int) -> None:
    from sporevm.cli import serverwire as wire

    runtime = Path(tempfile.mkdtemp(prefix="sps", dir="/tmp"))
    srv = start_server(runtime, tmp_path / "empty-home")
    try:
        # the running test's own install: the install check passes, the descriptors don't
        req = wire.Request(wire.install_id(), "/", 0o022, ["run", "--help"], {})
        with socket.socket(socket.AF_UNIX) as s, open(os.devnull) as null:
            s.connect(str(srv.socket))
            socket.send_fds(s, [wire.encode_request(req)], [null.fileno()] * fds)
            reply = s.recv(4096)
        rec = wire.decode_reply(reply)
        assert rec is not None and rec[0] == "R", reply
        assert f"carries 3 descriptors, not {fds}" in str(rec[1])
    finally:
        stop_server(srv)
        shutil.rmtree(runtime, ignore_errors=True)


@needs_kvm
def test_a_server_that_dies_mid_run_is_outlived_by_its_client(
    spore_dir: Path, server: Server
) -> None:
    """The handler still writes into the client's stdout: the client waits for it to
    end, then says the outcome is unknown (exit 70)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sporevm.cli", "run", "--from", str(spore_dir), "--"]
        + ["sh", "-c", "sleep 4; echo after"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=spore_env(server.runtime),
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("resumed "), line + proc.stderr.read()
    handler = handler_of(server, 1)
    os.kill(server.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 70, err
    assert out == "after\n"  # the run finished: the client did not leave before it
    assert "went away during the run" in err
    wait_for(lambda: not group_members(handler), 30, "the handler to end")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@needs_kvm
def test_the_server_sleeps_while_a_long_run_goes_on(spore_dir: Path, server: Server) -> None:
    """Regression: once a run outlived the request deadline (10 s), the server's loop
    had a deadline in the past and spun at 100% CPU until the run ended."""
    from sporevm.cli.server import REQUEST_TIMEOUT

    proc = start_sleeper(spore_dir, server)
    try:
        time.sleep(REQUEST_TIMEOUT + 1)
        before = cpu_seconds(server.pid)
        time.sleep(2.0)
        assert cpu_seconds(server.pid) - before < 0.2
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_a_large_environment_and_a_lost_working_directory(tmp_path: Path) -> None:
    """No VM needed: `spore run --help` is served too. A request near the 1 MiB bound
    goes whole (more than one send); a client whose working directory was deleted
    has none to hand over and says so."""
    runtime = Path(tempfile.mkdtemp(prefix="sps", dir="/tmp"))
    srv = start_server(runtime, tmp_path / "empty-home")
    try:
        # one string may be 128 KiB (MAX_ARG_STRLEN): eight of 110 KiB
        env = spore_env(runtime, **{f"BIG{i}": "x" * (110 << 10) for i in range(8)})
        proc = spore_cmd(env, "run", "--help")
        assert proc.returncode == 0, proc.stderr
        assert "usage: spore run" in proc.stdout
        assert "run 1: run for pid" in srv.log_text()
        gone = tmp_path / "gone"
        gone.mkdir()
        code = (
            "import os, sys; os.rmdir(sys.argv[1]); from sporevm.cli import main; "
            "sys.exit(main(sys.argv[2:]))"
        )
        lost = subprocess.run(
            [sys.executable, "-c", code, str(gone), "run", "--help"],
            capture_output=True,
            text=True,
            env=spore_env(runtime),
            cwd=gone,
            timeout=60,
        )
        assert lost.returncode == 69, lost.stderr
        assert "no working directory to hand over" in lost.stderr
    finally:
        stop_server(srv)
        shutil.rmtree(runtime, ignore_errors=True)
