"""The real C guest agent, end to end without a VM.

The agent binary built by ``sporevm.build.initrd`` runs as an ordinary process
(``init --serve-fd N --sandbox``) on one end of a socketpair; the host session
drives it exactly as it would drive /dev/hvc0 in a guest. ``--sandbox`` keeps it
from changing this machine's clock, hostname or entropy pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sporevm.build.initrd import copy_agent
from sporevm.runtime.agent import (
    HEADER,
    MAGIC,
    ErrorCode,
    Frame,
    FrameDecoder,
    MsgType,
    ProbeKind,
    encode_frame,
)
from sporevm.runtime.agent_messages import (
    Ack,
    Command,
    Error,
    Exec,
    Generation,
    Hello,
    Message,
    Probe,
    decode_message,
    message_frame,
)
from sporevm.runtime.agent_session import AgentError, AgentExecError, AgentSession, FdChannel
from sporevm.store import Store


@pytest.fixture(scope="session")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("agent")
    return copy_agent(Store(root / "store"), root / "init")


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    session: AgentSession
    run_dir: Path


@pytest.fixture
def agent(agent_bin: Path, tmp_path: Path) -> Iterator[Running]:
    host, guest = socket.socketpair()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [str(agent_bin), "--serve-fd", str(guest.fileno()), "--sandbox", "--run-dir", str(run_dir)],
        pass_fds=[guest.fileno()],
    )
    guest.close()
    session = AgentSession(FdChannel(host.fileno()), grace=5)
    session.wait_ready(10)
    yield Running(proc, host, session, run_dir)
    host.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_ready_and_hello(agent: Running) -> None:
    ready = agent.session.ready
    assert ready is not None and ready.protocol == 1 and ready.pid == agent.proc.pid
    ack = agent.session.hello()
    assert ack.agent_version == ready.agent_version == "spore-agent/1.0"
    for t in (MsgType.HELLO, MsgType.EXEC, MsgType.PROBE, MsgType.GENERATION):
        assert ack.caps & (1 << t)


def test_shell_exit_code_stdout_stderr(agent: Running) -> None:
    h = agent.session.exec("echo out; echo err >&2; exit 7")
    st = h.wait(10)
    assert (st.exit_code, st.signal, st.timed_out) == (7, None, False)
    assert (h.stdout, h.stderr) == (b"out\n", b"err\n")
    assert st.elapsed > 0 and h.pid is not None


def test_exit_kinds(agent: Running) -> None:
    assert agent.session.exec("exit 255").wait(10).exit_code == 255
    st = agent.session.exec("kill -SEGV $$").wait(10)
    assert (st.exit_code, st.signal, st.returncode) == (None, 11, 139)


def test_argv_env_and_defaults(agent: Running) -> None:
    h = agent.session.exec(["sh", "-c", 'echo "$FOO|$HOME|$PATH"'], env={"FOO": "a b=c"})
    assert h.wait(10).exit_code == 0
    assert h.stdout == b"a b=c|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    h = agent.session.exec(["/usr/bin/env"], env={"HOME": "/h", "X": "1"}, clear_env=True)
    h.wait(10)
    assert sorted(h.stdout.decode().split()) == ["HOME=/h", "X=1"]
    h = agent.session.exec(["sh", "-c", "echo $HOME"], env={"HOME": "/override"})
    h.wait(10)
    assert h.stdout == b"/override\n"


def test_argv_is_not_shell_interpreted(agent: Running) -> None:
    h = agent.session.exec(["echo", "$HOME; rm -rf /", "*"])
    h.wait(10)
    assert h.stdout == b"$HOME; rm -rf / *\n"


def test_cwd(agent: Running, tmp_path: Path) -> None:
    h = agent.session.exec(["pwd"], cwd=str(tmp_path))
    h.wait(10)
    assert h.stdout == f"{tmp_path}\n".encode()
    with pytest.raises(AgentExecError, match="chdir /no/such/dir: No such file") as exc:
        agent.session.exec(["pwd"], cwd="/no/such/dir").wait(10)
    assert exc.value.errno == 2


def test_exec_failures_report_errno(agent: Running, tmp_path: Path) -> None:
    with pytest.raises(AgentExecError, match="exec no-such-program-x: No such file") as exc:
        agent.session.exec(["no-such-program-x"]).wait(10)
    assert exc.value.errno == 2 and exc.value.code == ErrorCode.EXEC_FAILED
    script = tmp_path / "noexec"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(AgentExecError, match="Permission denied"):
        agent.session.exec([str(script)]).wait(10)
    assert agent.session.exec(["true"]).wait(10).exit_code == 0  # still serving


def test_commands_start_with_default_signals_and_an_empty_mask(agent: Running) -> None:
    # The agent ignores SIGPIPE and blocks SIGCHLD; a command must inherit neither.
    h = agent.session.exec(["grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status"])
    assert h.wait(10).exit_code == 0
    assert h.stdout.split() == [b"SigBlk:", b"0" * 16, b"SigIgn:", b"0" * 16]


def test_path_search_follows_the_commands_path_like_execvp(agent: Running, tmp_path: Path) -> None:
    # The agent searches PATH itself (stat, not a failed execve per entry); the
    # answer must be execvp's: the first regular, executable file, in order.
    dirs = [tmp_path / d for d in ("a", "b", "c", "d")]
    for d in dirs:
        d.mkdir()
    (dirs[0] / "which-one").mkdir()  # a directory is skipped
    (dirs[1] / "which-one").write_text("#!/bin/sh\necho b\n")  # not executable: skipped
    for d in dirs[2:]:
        (d / "which-one").write_text(f"#!/bin/sh\necho {d.name}\n")
        (d / "which-one").chmod(0o755)
    path = ":".join(str(d) for d in dirs)
    h = agent.session.exec(["which-one"], env={"PATH": path})
    assert h.wait(10).exit_code == 0 and h.stdout == b"c\n"
    with pytest.raises(AgentExecError, match="exec which-one: Permission denied"):
        agent.session.exec(["which-one"], env={"PATH": ":".join(map(str, dirs[:2]))}).wait(10)
    with pytest.raises(AgentExecError, match="exec which-one: No such file"):
        agent.session.exec(["which-one"], env={"PATH": str(tmp_path)}).wait(10)


def test_stdin_is_closed(agent: Running) -> None:
    h = agent.session.exec(["cat"])
    assert h.wait(10).exit_code == 0 and h.stdout == b""


def test_signal_reaches_the_process_group(agent: Running, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    h = agent.session.exec(f"sleep 100 & echo $! > {pidfile}; wait", background=True)
    h.wait_started(10)
    _wait_for(pidfile.exists)
    child = int(pidfile.read_text())
    h.signal(signal.SIGTERM)
    st = h.wait(10)
    assert st.signal == signal.SIGTERM
    _wait_for(lambda: not _alive(child))


def test_timeout_kills_the_group(agent: Running, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    h = agent.session.exec(f"sleep 100 & echo $! > {pidfile}; sleep 100", timeout=0.5)
    st = h.wait()
    assert st.timed_out and st.signal == signal.SIGKILL and st.returncode == 137
    assert 0.4 < time.monotonic() - t0 < 5
    assert "timed out" in st.describe()
    _wait_for(lambda: not _alive(int(pidfile.read_text())))


def test_big_output_both_streams_with_backpressure(agent: Running) -> None:
    size = 24 << 20
    digests = {1: hashlib.sha256(), 2: hashlib.sha256()}
    counts = {1: 0, 2: 0}
    slow = {"n": 0}

    def sink(fd: int) -> Callable[[bytes], None]:
        def cb(b: bytes) -> None:
            digests[fd].update(b)
            counts[fd] += len(b)
            slow["n"] += 1
            if slow["n"] % 64 == 0:
                time.sleep(0.01)  # a slow host: the agent must hold back, not buffer all

        return cb

    h = agent.session.exec(
        f"head -c {size} /dev/urandom | tee /dev/stderr",
        on_stdout=sink(1),
        on_stderr=sink(2),
    )
    assert h.wait(120).exit_code == 0
    assert counts == {1: size, 2: size}
    assert digests[1].digest() == digests[2].digest()
    rss_kib = _rss_kib(agent.proc.pid)
    assert rss_kib < 16 * 1024, f"agent RSS {rss_kib} KiB: output was not bounded"


def test_background_output_keeps_flowing(agent: Running) -> None:
    seen: list[bytes] = []
    bg = agent.session.exec(
        "for i in 1 2 3; do echo tick$i; sleep 0.1; done", background=True, on_stdout=seen.append
    )
    bg.wait_started(10)
    assert agent.session.exec(["sleep", "0.5"]).wait(10).exit_code == 0
    assert bg.wait(10).exit_code == 0
    assert b"".join(seen) == b"tick1\ntick2\ntick3\n"


def test_probe_file(agent: Running, tmp_path: Path) -> None:
    target = tmp_path / "ready"
    agent.session.exec(f"sleep 0.3; touch {target}; sleep 100", background=True).wait_started()
    res = agent.session.probe(Probe(ProbeKind.FILE, 5000, 20, path=str(target)))
    assert res.ok and res.attempts > 1 and res.last == 0
    res = agent.session.probe(Probe(ProbeKind.FILE, 200, 50, path=str(tmp_path / "never")))
    assert not res.ok and res.last == 2 and 2 <= res.attempts <= 6
    assert res.elapsed_ns >= 200_000_000


def test_probe_tcp(agent: Running) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        res = agent.session.probe(Probe(ProbeKind.TCP, 150, 50, port=port))
        assert not res.ok and res.last == 111  # ECONNREFUSED: bound, not listening
        s.listen()
        res = agent.session.probe(Probe(ProbeKind.TCP, 2000, 50, port=port))
        assert res.ok


def test_probe_command(agent: Running, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    agent.session.exec(f"sleep 0.3; touch {flag}", background=True)
    res = agent.session.probe(
        Probe(ProbeKind.COMMAND, 5000, 50, command=Command((f"test -e {flag}",), True))
    )
    assert res.ok and res.attempts > 1
    res = agent.session.probe(Probe(ProbeKind.COMMAND, 300, 50, command=Command(("false",))))
    assert not res.ok and res.last == 1
    t0 = time.monotonic()  # an attempt that never finishes is killed at the deadline
    res = agent.session.probe(Probe(ProbeKind.COMMAND, 300, 50, command=Command(("sleep", "100"))))
    assert not res.ok and time.monotonic() - t0 < 3


def test_generation(agent: Running) -> None:
    gen = Generation("gen-7f", "parent.1", 2, 4, "child-2", os.urandom(64), (1_700_000_000, 0))
    agent.session.apply_generation(gen)
    doc = json.loads((agent.run_dir / "generation.json").read_text())
    assert doc["generation"] == "gen-7f" and doc["parent"] == "parent.1"
    assert (doc["index"], doc["count"], doc["hostname"], doc["entropy_bytes"]) == (
        2,
        4,
        "child-2",
        64,
    )
    with pytest.raises(AgentError, match="malformed or unsafe"):
        agent.session.apply_generation(Generation('x"}, {"evil'))


def test_generation_creates_a_missing_run_dir(agent: Running) -> None:
    shutil.rmtree(agent.run_dir, ignore_errors=True)
    agent.session.apply_generation(Generation("gen-2", "", 0, 1, "", os.urandom(64), None))
    doc = json.loads((agent.run_dir / "generation.json").read_text())
    assert (doc["generation"], doc["parent"], doc["count"]) == ("gen-2", "", 1)
    assert [p.name for p in agent.run_dir.iterdir()] == ["generation.json"]


def test_too_many_streams_is_busy(agent: Running) -> None:
    handles = [agent.session.exec(["sleep", "100"], background=True) for _ in range(64)]
    for h in handles:
        h.wait_started(10)
    with pytest.raises(AgentError, match="too many live streams"):
        agent.session.exec(["true"]).wait(10)
    for h in handles:
        h.kill()
    for h in handles:
        assert h.wait(10).signal == signal.SIGKILL
    assert agent.session.exec(["true"]).wait(10).exit_code == 0


def test_shutdown_ends_serve_mode(agent: Running) -> None:
    agent.session.shutdown()
    assert agent.proc.wait(10) == 0


def test_host_hangup_kills_children(agent_bin: Path, tmp_path: Path) -> None:
    host, guest = socket.socketpair()
    proc = subprocess.Popen(
        [str(agent_bin), "--serve-fd", str(guest.fileno()), "--sandbox"], pass_fds=[guest.fileno()]
    )
    guest.close()
    session = AgentSession(FdChannel(host.fileno()))
    session.wait_ready(10)
    pid = session.exec(["sleep", "100"], background=True).wait_started()
    host.close()
    assert proc.wait(10) == 0
    _wait_for(lambda: not _alive(pid))


# -- hostile host bytes: an error frame, never a crash ----------------------------


class Raw:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next(self, timeout: float = 10) -> tuple[Frame, Message]:
        self.sock.settimeout(timeout)
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "agent closed the channel"
            self.pending += self.decoder.feed(data)
        f = self.pending.pop(0)
        return f, decode_message(f)

    def expect_error(self, code: ErrorCode) -> Error:
        _, msg = self.next()
        assert isinstance(msg, Error), msg
        assert msg.code == code, msg
        return msg

    def still_alive(self) -> None:
        self.send(message_frame(Hello(77), 1000))
        f, msg = self.next()
        assert isinstance(msg, Ack) and msg.nonce == 77 and f.stream == 1000


def _exec_payload(argv_list: bytes) -> bytes:
    return b"\x00" + struct.pack("<I", 0) + b"\x00" + struct.pack("<I", 1) + b"/" + argv_list


@pytest.mark.parametrize(
    ("data", "code", "match"),
    [
        (b"garbage that is not a frame at all!", ErrorCode.BAD_FRAME, "bad magic"),
        (
            HEADER.pack(MAGIC, 9, MsgType.HELLO, 0, 1, 12) + bytes(12),
            ErrorCode.BAD_FRAME,
            "unsupported protocol version",
        ),
        (
            HEADER.pack(MAGIC, 1, MsgType.HELLO, 0x8000, 1, 12) + bytes(12),
            ErrorCode.BAD_FRAME,
            "reserved flags",
        ),
        (
            HEADER.pack(MAGIC, 1, MsgType.HELLO, 0, 1, 0x7FFFFFFF),
            ErrorCode.BAD_FRAME,
            "over 64 KiB",
        ),
        (encode_frame(0x42, 5, b"abc"), ErrorCode.UNKNOWN_TYPE, "0x42"),
        (encode_frame(MsgType.READY, 5, b""), ErrorCode.UNKNOWN_TYPE, "0x81"),
        (encode_frame(MsgType.HELLO, 5, b"\x01\x02"), ErrorCode.BAD_PAYLOAD, "HELLO"),
        (encode_frame(MsgType.EXEC, 5, b"\x00\x00"), ErrorCode.BAD_PAYLOAD, "EXEC"),
        (encode_frame(MsgType.EXEC, 5, b"\x80" + bytes(4)), ErrorCode.BAD_PAYLOAD, "flags"),
        (
            encode_frame(MsgType.EXEC, 5, _exec_payload(struct.pack("<I", 0xFFFFFFFF))),
            ErrorCode.BAD_PAYLOAD,
            "EXEC",
        ),
        (
            encode_frame(
                MsgType.EXEC,
                5,
                _exec_payload(struct.pack("<II", 1, 3) + b"a\0b" + struct.pack("<I", 0)),
            ),
            ErrorCode.BAD_PAYLOAD,
            "EXEC",
        ),
        (
            encode_frame(MsgType.EXEC, 5, _exec_payload(struct.pack("<I", 0) * 2)),
            ErrorCode.BAD_PAYLOAD,
            "argv must be non-empty",
        ),
        (
            encode_frame(MsgType.EXEC, 0, Exec(Command(("true",))).encode()),
            ErrorCode.BAD_STREAM,
            "reserved",
        ),
        (encode_frame(MsgType.SIGNAL, 5, struct.pack("<I", 0)), ErrorCode.BAD_PAYLOAD, "signal"),
        (
            encode_frame(MsgType.SIGNAL, 5, struct.pack("<I", 15)),
            ErrorCode.BAD_STREAM,
            "no running command",
        ),
        (
            encode_frame(MsgType.PROBE, 5, b"\x09" + bytes(8)),
            ErrorCode.BAD_PAYLOAD,
            "unknown probe kind",
        ),
        (
            encode_frame(MsgType.PROBE, 5, b"\x02" + bytes(8) + b"\x00\x00"),
            ErrorCode.BAD_PAYLOAD,
            "tcp port 0",
        ),
        (
            encode_frame(MsgType.SET_TIME, 5, struct.pack("<qI", 1, 2_000_000_000)),
            ErrorCode.BAD_PAYLOAD,
            "SET_TIME",
        ),
        (encode_frame(MsgType.SHUTDOWN, 5, b"\x07"), ErrorCode.BAD_PAYLOAD, "SHUTDOWN"),
        (
            encode_frame(MsgType.GENERATION, 5, struct.pack("<I", 5000)),
            ErrorCode.BAD_PAYLOAD,
            "GENERATION",
        ),
    ],
)
def test_malformed_host_frames(agent: Running, data: bytes, code: ErrorCode, match: str) -> None:
    raw = Raw(agent.sock)
    raw.send(data)
    err = raw.expect_error(code)
    assert match in err.message
    raw.still_alive()


def test_duplicate_stream_id(agent: Running) -> None:
    raw = Raw(agent.sock)
    raw.send(message_frame(Exec(Command(("sleep", "100"))), 9))
    _, msg = raw.next()
    assert msg.TYPE == MsgType.STARTED
    raw.send(message_frame(Exec(Command(("true",))), 9))
    assert "already in use" in raw.expect_error(ErrorCode.BAD_STREAM).message
    raw.send(encode_frame(MsgType.SIGNAL, 9, struct.pack("<I", 9)))
    _, msg = raw.next()
    assert msg.TYPE == MsgType.DONE
    _, msg = raw.next()
    assert msg.TYPE == MsgType.EXIT


def test_resync_after_garbage_reports_once(agent: Running) -> None:
    raw = Raw(agent.sock)
    raw.send(os.urandom(5000).replace(b"SPAG", b"XXXX") + message_frame(Hello(5), 3))
    raw.expect_error(ErrorCode.BAD_FRAME)
    f, msg = raw.next()
    assert isinstance(msg, Ack) and msg.nonce == 5  # one error, then back in sync


def test_split_writes(agent: Running) -> None:
    raw = Raw(agent.sock)
    frame = message_frame(Exec(Command(("echo", "split"))), 4)
    for b in frame:
        raw.send(bytes([b]))
    kinds: list[int] = []
    while not kinds or kinds[-1] != MsgType.EXIT:
        f, _ = raw.next()
        kinds.append(f.type)
    assert kinds == [MsgType.STARTED, MsgType.STDOUT, MsgType.EXIT]


# -- helpers -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_for(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")
