"""Host side of the agent protocol: frame codec, hostile-input decoding, session logic.

The session tests play the guest from Python over a socketpair, so every
misbehaviour (bad frames, silence, hang-up) is scripted exactly.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from sporevm.errors import SporeError
from sporevm.runtime.agent import (
    HEADER,
    HOST_TYPES,
    MAGIC,
    MAX_PAYLOAD,
    AgentProtocolError,
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
    Done,
    Error,
    Exec,
    Exit,
    Generation,
    Hello,
    Message,
    Output,
    Probe,
    ProbeResult,
    Ready,
    SetTime,
    Shutdown,
    Signal,
    Started,
    decode_message,
    message_frame,
)
from sporevm.runtime.agent_session import (
    AgentClosedError,
    AgentError,
    AgentExecError,
    AgentSession,
    AgentTimeoutError,
    FdChannel,
    QueueChannel,
)

ALL_MESSAGES: list[Message] = [
    Hello(2**64 - 1, 7),
    Exec(Command(("ls", "-l", "é"), False, ("A=1", "B="), "/tmp"), 1500, True, False),
    Exec(Command(("echo $HOME",), True), 0, False, True),
    Signal(15),
    Probe(ProbeKind.FILE, 1000, 50, path="/run/ready"),
    Probe(ProbeKind.TCP, 30000, 100, port=8080),
    Probe(ProbeKind.COMMAND, 5000, 200, command=Command(("test", "-e", "/x"))),
    SetTime(1700000000, 999_999_999),
    Generation("g-1", "p.0", 3, 8, "child-3", b"\x00" * 64, (1, 2)),
    Generation("g-2"),
    Shutdown(True),
    Ready(1, "spore-agent/1.0", 0xFE, 1, 123),
    Ready(1, "spore-agent/1.0", 0xFE, 1, 123, 64),
    Ack(5, "v", 1),
    Started(42),
    Output(b"hello"),
    Output(b"oops", stderr=True),
    Exit(False, 7, False, 10, 20, 30),
    Exit(True, 9, True, 1, 2, 3),
    Error(ErrorCode.EXEC_FAILED, 2, "exec x: No such file"),
    ProbeResult(True, 3, 99, 0),
    Done(),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(msg: Message) -> None:
    decoder = FrameDecoder(frozenset(MsgType))
    frames = decoder.feed(message_frame(msg, 17))
    assert len(frames) == 1 and frames[0].stream == 17
    assert decode_message(frames[0]) == msg


def test_ready_ends_with_the_cpus_online() -> None:
    # The host checks them against the vCPUs it gave (runner.boot_vm): no silent single CPU.
    payload = Ready(1, "a", 0, 1, 0, 2).encode()
    assert payload[-4:] == (2).to_bytes(4, "little")
    with pytest.raises(AgentProtocolError, match="READY"):
        Ready.decode(payload[:-4])  # an agent from before the field: refused, not guessed


def test_header_layout() -> None:
    raw = encode_frame(MsgType.STDOUT, 0x01020304, b"xy")
    assert raw == MAGIC + bytes([1, 0x84, 0, 0, 4, 3, 2, 1, 2, 0, 0, 0]) + b"xy"
    assert HEADER.size == 16


def test_decoder_byte_by_byte_and_batched() -> None:
    stream = b"".join(message_frame(m, i) for i, m in enumerate(ALL_MESSAGES))
    one = FrameDecoder(frozenset(MsgType))
    frames: list[Frame] = []
    for b in stream:
        frames += one.feed(bytes([b]))
    assert [decode_message(f) for f in frames] == ALL_MESSAGES
    assert FrameDecoder(frozenset(MsgType)).feed(stream) == frames


def test_max_payload_accepted_and_one_more_rejected() -> None:
    ok = encode_frame(MsgType.STDOUT, 1, b"a" * MAX_PAYLOAD)
    assert FrameDecoder().feed(ok)[0].payload == b"a" * MAX_PAYLOAD
    with pytest.raises(ValueError):
        encode_frame(MsgType.STDOUT, 1, b"a" * (MAX_PAYLOAD + 1))
    bad = HEADER.pack(MAGIC, 1, MsgType.STDOUT, 0, 1, MAX_PAYLOAD + 1)
    with pytest.raises(AgentProtocolError, match="exceeds"):
        FrameDecoder().feed(bad)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (HEADER.pack(b"SPAX", 1, 0x84, 0, 1, 0), "bad magic"),
        (HEADER.pack(MAGIC, 2, 0x84, 0, 1, 0), "version 2"),
        (HEADER.pack(MAGIC, 1, 0x8F, 0, 1, 0), "unknown or unexpected frame type 0x8f"),
        (HEADER.pack(MAGIC, 1, MsgType.EXEC, 0, 1, 0), "unexpected frame type 0x02"),
        (HEADER.pack(MAGIC, 1, 0x84, 1, 1, 0), "reserved flags"),
        (HEADER.pack(MAGIC, 1, 0x84, 0, 1, 0xFFFFFFFF), "exceeds"),
    ],
)
def test_decoder_rejects_and_stays_rejected(header: bytes, match: str) -> None:
    decoder = FrameDecoder()
    with pytest.raises(AgentProtocolError, match=match):
        decoder.feed(encode_frame(MsgType.DONE, 1, b"") + header)
    assert decoder.failed
    with pytest.raises(AgentProtocolError, match="already rejected"):
        decoder.feed(encode_frame(MsgType.DONE, 1, b""))


def test_decoder_buffers_at_most_one_frame() -> None:
    decoder = FrameDecoder()
    partial = encode_frame(MsgType.STDOUT, 1, b"z" * MAX_PAYLOAD)[:-1]
    assert decoder.feed(partial) == []
    assert len(decoder._buf) <= MAX_PAYLOAD  # header is parsed and dropped


@pytest.mark.parametrize(
    ("mtype", "payload", "match"),
    [
        (MsgType.EXIT, b"\x00\x00" + struct.pack("<i", 7), "truncated"),
        (MsgType.EXIT, Exit(False, 7, False, 1, 2, 3).encode() + b"!", "trailing"),
        (MsgType.EXIT, b"\x02\x00" + b"\x00" * 28, "bad exit kind"),
        (MsgType.EXIT, b"\x00\x00" + struct.pack("<i", 300) + b"\x00" * 24, "out of range"),
        (MsgType.ERROR, struct.pack("<HiI", 1, 0, 5000) + b"x" * 5000, "exceeds 1024"),
        (MsgType.ERROR, struct.pack("<HiI", 1, 0, 3) + b"a\0b", "NUL"),
        (MsgType.READY, struct.pack("<II", 1, 0xFFFFFFFF), "exceeds"),
        (MsgType.PROBE_RESULT, b"\x05" + b"\x00" * 16, "bad ok flag"),
        (MsgType.DONE, b"x", "trailing"),
    ],
)
def test_malformed_payloads(mtype: MsgType, payload: bytes, match: str) -> None:
    with pytest.raises(AgentProtocolError, match=match):
        decode_message(Frame(mtype, 1, payload))


def test_list_count_cannot_force_allocation() -> None:
    payload = bytes([0]) + struct.pack("<I", 0) + bytes([0]) + struct.pack("<I", 1) + b"/"
    payload += struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(AgentProtocolError, match="cannot fit"):
        Exec.decode(payload)


def test_invalid_utf8_guest_text_is_escaped_not_fatal() -> None:
    msg = decode_message(Frame(MsgType.ERROR, 1, struct.pack("<HiI", 6, 5, 2) + b"\xff\xfe"))
    assert isinstance(msg, Error) and "\\xff" in msg.message


def test_host_side_validation() -> None:
    with pytest.raises(ValueError, match="NUL"):
        Exec(Command(("a\0b",))).encode()
    with pytest.raises(ValueError, match="not absolute"):
        Exec(Command(("ls",), cwd="tmp")).encode()
    with pytest.raises(ValueError, match="KEY=VALUE"):
        Exec(Command(("ls",), env=("NOEQUALS",))).encode()
    with pytest.raises(ValueError, match="exactly one shell string"):
        Exec(Command(("a", "b"), shell=True)).encode()
    with pytest.raises(ValueError, match="frame limit"):
        Exec(Command(("x" * MAX_PAYLOAD,))).encode()
    assert HOST_TYPES == {t for t in MsgType if t < 0x80}
    assert issubclass(AgentProtocolError, SporeError)


# -- session against a scripted guest -------------------------------------------


class FakeGuest:
    """Runs ``script(guest)`` in a thread; the guest reads host frames and writes bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(HOST_TYPES)

    def recv(self) -> tuple[Frame, Message]:
        while True:
            data = self.sock.recv(65536)
            assert data, "host closed"
            frames = self.decoder.feed(data)
            if frames:
                assert len(frames) == 1
                return frames[0], decode_message(frames[0])

    def send(self, msg: Message, stream: int) -> None:
        self.sock.sendall(message_frame(msg, stream))


@pytest.fixture
def guest_pair() -> Iterator[Callable[[Callable[[FakeGuest], None]], AgentSession]]:
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def start(script: Callable[[FakeGuest], None]) -> AgentSession:
        host, guest = socket.socketpair()
        socks.extend((host, guest))
        t = threading.Thread(target=script, args=(FakeGuest(guest),), daemon=True)
        t.start()
        threads.append(t)
        return AgentSession(FdChannel(host.fileno()), grace=0.5)

    yield start
    for s in socks:
        s.close()
    for t in threads:
        t.join(2)


def test_session_exec_streams_and_exits(guest_pair: Callable[..., AgentSession]) -> None:
    def script(g: FakeGuest) -> None:
        g.send(Ready(1, "fake", 0, 1, 0), 0)
        frame, msg = g.recv()
        assert isinstance(msg, Exec) and msg.command.argv == ("echo hi",) and msg.command.shell
        assert msg.command.env == ("A=b",) and msg.timeout_ms == 2000
        g.send(Started(9), frame.stream)
        g.send(Output(b"h"), frame.stream)
        g.send(Output(b"i\n"), frame.stream)
        g.send(Output(b"e", stderr=True), frame.stream)
        g.send(Output(b"old"), 999)  # a stream from before a restore: dropped
        g.send(Exit(False, 3, False, 5, 0, 0), frame.stream)

    session = guest_pair(script)
    assert session.wait_ready(2).agent_version == "fake"
    out: list[bytes] = []
    h = session.exec("echo hi", env={"A": "b"}, timeout=2, on_stdout=out.append)
    status = h.wait()
    assert (status.exit_code, status.returncode, h.pid) == (3, 3, 9)
    assert b"".join(out) == b"hi\n" and h.stderr == b"e" and h.stdout == b""
    assert session.orphan_frames == 1
    assert status.describe() == "exited with code 3"


def test_session_exec_failure(guest_pair: Callable[..., AgentSession]) -> None:
    def script(g: FakeGuest) -> None:
        frame, _ = g.recv()
        g.send(
            Error(ErrorCode.EXEC_FAILED, 2, "exec nope: No such file or directory"), frame.stream
        )

    session = guest_pair(script)
    with pytest.raises(AgentExecError, match="No such file") as exc:
        session.exec(["nope"]).wait(2)
    assert exc.value.errno == 2


def test_session_host_deadline(guest_pair: Callable[..., AgentSession]) -> None:
    session = guest_pair(lambda g: g.recv() and None)
    h = session.exec(["sleep", "100"], timeout=0.2)
    with pytest.raises(AgentTimeoutError, match="within 0.7 s"):
        h.wait()


def test_session_guest_hangs_up(guest_pair: Callable[..., AgentSession]) -> None:
    def script(g: FakeGuest) -> None:
        g.recv()
        g.sock.shutdown(socket.SHUT_WR)

    session = guest_pair(script)
    with pytest.raises(AgentClosedError, match="closed"):
        session.exec(["true"]).wait(2)


def test_session_garbage_fails_the_run(guest_pair: Callable[..., AgentSession]) -> None:
    session = guest_pair(lambda g: g.sock.sendall(b"\x1b[0mLinux version 6.1 ..."))
    with pytest.raises(AgentProtocolError, match="bad magic"):
        session.wait_ready(2)


def test_session_wrong_protocol_version(guest_pair: Callable[..., AgentSession]) -> None:
    session = guest_pair(lambda g: g.send(Ready(2, "future", 0, 1, 0), 0))
    with pytest.raises(AgentProtocolError, match="protocol 2"):
        session.wait_ready(2)


def test_session_guest_rejects_host_frame(guest_pair: Callable[..., AgentSession]) -> None:
    def script(g: FakeGuest) -> None:
        g.recv()
        g.send(Error(ErrorCode.UNKNOWN_TYPE, 0, "unknown request type 0x42"), 4242)

    session = guest_pair(script)
    with pytest.raises(AgentProtocolError, match="rejected a host frame"):
        session.exec(["true"]).wait(2)


def test_session_requests(guest_pair: Callable[..., AgentSession]) -> None:
    def script(g: FakeGuest) -> None:
        frame, msg = g.recv()
        assert isinstance(msg, Hello)
        g.send(Ack(msg.nonce, "fake", 3), frame.stream)
        frame, msg = g.recv()
        assert isinstance(msg, SetTime) and msg.sec > 1_600_000_000
        g.send(Done(), frame.stream)
        frame, msg = g.recv()
        assert isinstance(msg, Probe) and msg.port == 80
        g.send(ProbeResult(False, 4, 10**9, 111), frame.stream)
        frame, msg = g.recv()
        assert isinstance(msg, Generation)
        g.send(Error(ErrorCode.BAD_PAYLOAD, 0, "GENERATION: malformed"), frame.stream)
        frame, msg = g.recv()
        assert isinstance(msg, Shutdown)
        g.send(Ack(1, "x", 0), frame.stream)  # wrong reply type

    session = guest_pair(script)
    assert session.hello(2).caps == 3
    session.set_time()
    result = session.probe(Probe(ProbeKind.TCP, 1000, 100, port=80))
    assert not result.ok and result.attempts == 4 and result.last == 111
    with pytest.raises(AgentError, match="GENERATION failed"):
        session.apply_generation(Generation("bad id"))
    with pytest.raises(AgentProtocolError, match="answered SHUTDOWN with Ack"):
        session.shutdown()


def test_session_output_on_request_stream_is_a_violation(
    guest_pair: Callable[..., AgentSession],
) -> None:
    def script(g: FakeGuest) -> None:
        frame, _ = g.recv()
        g.send(Output(b"x"), frame.stream)

    session = guest_pair(script)
    with pytest.raises(AgentProtocolError, match="Output for request stream"):
        session.hello(2)


def test_capture_keeps_the_tail(guest_pair: Callable[..., AgentSession]) -> None:
    def script(g: FakeGuest) -> None:
        frame, _ = g.recv()
        g.send(Started(1), frame.stream)
        for i in range(10):
            g.send(Output(bytes([48 + i]) * 10), frame.stream)
        g.send(Exit(True, 9, False, 0, 0, 0), frame.stream)

    session = guest_pair(script)
    h = session.exec(["x"], capture_limit=25)
    status = h.wait(2)
    assert h.stdout == b"7" * 5 + b"8" * 10 + b"9" * 10
    assert (status.signal, status.returncode) == (9, 137)
    assert "SIGKILL" in status.describe()


def test_queue_channel_partial_writes_and_stall() -> None:
    sent = bytearray()
    budget = {"n": 0}

    def write(data: bytes) -> int:
        n = min(3, len(data), budget["n"])
        budget["n"] -= n
        sent.extend(data[:n])
        return n

    ch = QueueChannel(write, stall=0.2)

    def refill() -> None:
        for _ in range(10):
            budget["n"] = 3
            ch.writable()
            threading.Event().wait(0.01)

    t = threading.Thread(target=refill)
    t.start()
    ch.send(b"0123456789")
    t.join()
    assert bytes(sent) == b"0123456789"
    budget["n"] = 0
    with pytest.raises(AgentTimeoutError, match="has not read its channel"):
        ch.send(b"x")
    assert ch.recv(0.01) is None
    ch.feed(b"abc")
    assert ch.recv(0.01) == b"abc"
