"""The resident server's wire format (sporevm.cli.serverwire): strict both ways.

No VM and no server here (tests/test_server_e2e.py runs real ones): what decodes
must round-trip, and everything else is a WireError, never another exception.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sporevm.cli import serverwire as wire

text = st.text(st.characters(codec="utf-8", blacklist_characters="\0"), max_size=40)
names = st.text(st.characters(codec="utf-8", blacklist_characters="\0="), min_size=1, max_size=12)


def request(**changes: object) -> wire.Request:
    fields: dict[str, object] = {
        "install": "/venv:/usr/bin/python3.11:/src/sporevm",
        "cwd": "/work",
        "umask": 0o022,
        "argv": ["run", "--from", "x.spore", "--", "sh", "-c", "echo hi"],
        "env": {"HOME": "/root", "SPORE_HOME": "/s", "EMPTY": ""},
    }
    fields.update(changes)
    return wire.Request(**fields)  # type: ignore[arg-type]


@given(
    install=text,
    cwd=text.map(lambda t: "/" + t),
    umask=st.integers(0, 0o777),
    argv=st.lists(text, max_size=20),
    env=st.dictionaries(names, text, max_size=20),
)
def test_requests_round_trip(
    install: str, cwd: str, umask: int, argv: list[str], env: dict[str, str]
) -> None:
    req = wire.Request(install, cwd, umask, argv, env)
    assert wire.decode_request(wire.encode_request(req)) == req


def test_arguments_that_are_not_utf8_survive() -> None:
    arg = os.fsdecode(b"caf\xe9")  # a Latin-1 file name on the command line
    req = request(argv=["run", "--from", arg])
    assert wire.decode_request(wire.encode_request(req)).argv == ["run", "--from", arg]


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_fail_as_wire_errors(data: bytes) -> None:
    for frame in (data, wire.MAGIC + len(data).to_bytes(4, "little") + data):
        try:
            wire.decode_request(frame)
        except wire.WireError:
            pass


@given(st.data())
def test_every_truncation_of_a_request_is_refused(data: st.DataObject) -> None:
    frame = wire.encode_request(request())
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(wire.WireError):
        wire.decode_request(frame[:cut])


def nul(*fields: str) -> bytes:
    return b"".join(f.encode() + b"\x00" for f in fields)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (nul("spore-server/2", "i", "/", "22", "0", "0"), "protocol"),
        (nul("spore-server/1", "i", "rel", "22", "0", "0"), "not absolute"),
        (nul("spore-server/1", "i", "/", "999", "0", "0"), "octal"),
        (nul("spore-server/1", "i", "/", "22", "02", "a", "b", "0"), "not a decimal"),
        (nul("spore-server/1", "i", "/", "22", "5000", "0"), "over 4096"),
        (nul("spore-server/1", "i", "/", "22", "1"), "missing fields"),
        (nul("spore-server/1", "i", "/", "22", "2", "a", "b"), "inside its arguments"),
        (nul("spore-server/1", "i", "/", "22", "0", "1", "A=1", "B=2"), "count says"),
        (nul("spore-server/1", "i", "/", "22", "0", "1", "NOEQUALS"), "NAME=VALUE"),
        (nul("spore-server/1", "i", "/", "22", "0", "2", "A=1", "A=2"), "twice"),
        (nul("spore-server/1", "i", "/", "22", "0", "0")[:-1], "NUL-terminated"),
    ],
)
def test_malformed_requests_say_what_is_wrong(payload: bytes, says: str) -> None:
    frame = wire.MAGIC + len(payload).to_bytes(4, "little") + payload
    with pytest.raises(wire.WireError, match=says):
        wire.decode_request(frame)


def test_oversized_requests_are_refused_from_the_header() -> None:
    with pytest.raises(wire.WireError, match="over"):
        wire.frame_length(wire.MAGIC + (wire.MAX_PAYLOAD + 1).to_bytes(4, "little"))
    with pytest.raises(wire.WireError, match="over"):
        wire.encode_request(request(env={f"V{i}": "x" * 300 for i in range(4000)}))
    with pytest.raises(wire.WireError, match="magic"):
        wire.frame_length(b"GET / HT")


def test_replies_decode_whole_and_wait_for_more() -> None:
    stream = wire.started(4242) + wire.refused("no: because") + wire.exited(7)
    got = []
    while stream:
        rec = wire.decode_reply(stream)
        assert rec is not None
        kind, value, used = rec
        got.append((kind, value))
        stream = stream[used:]
    assert got == [("P", 4242), ("R", "no: because"), ("X", 7)]
    for whole in (wire.started(9), wire.exited(0), wire.refused("why")):
        for cut in range(len(whole)):
            assert wire.decode_reply(whole[:cut]) is None


@pytest.mark.parametrize(
    "record",
    [b"Z", b"P\x00\x00\x00\x00", b"P\xff\xff\xff\xff", b"X\x00\x01\x00\x00", b"X\xff\xff\xff\xff"],
)
def test_bad_replies_are_wire_errors(record: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_reply(record)


@given(st.binary(max_size=64))
def test_any_reply_bytes_decode_or_fail_as_wire_errors(data: bytes) -> None:
    try:
        wire.decode_reply(data)
    except wire.WireError:
        pass


def test_runtime_dir_must_be_private_and_ours(tmp_path: object) -> None:
    base = f"/tmp/spore-wire-test-{os.getpid()}"
    try:
        assert wire.check_runtime_dir(base, create=True) is None
        assert stat.S_IMODE(os.lstat(base).st_mode) == 0o700
        os.chmod(base, 0o755)
        assert "open to other users" in str(wire.check_runtime_dir(base, create=False))
        os.chmod(base, 0o700)
        os.chown(base, 65534, -1)
        assert "belongs to uid 65534" in str(wire.check_runtime_dir(base, create=False))
    finally:
        os.rmdir(base)
    os.symlink("/tmp", base)
    try:
        assert "not a directory" in str(wire.check_runtime_dir(base, create=True))
    finally:
        os.unlink(base)


def test_the_thin_client_imports_nothing_heavy() -> None:
    """`spore run` with no server imports only the client before it decides: the rest of
    spore is imported by the command it then runs here, not on the way."""
    code = (
        "import sys; before = set(sys.modules); from sporevm.cli import client; "
        "client.wanted(['run']); print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    new = set(out.strip()[2:-2].split("', '"))
    spore = {"sporevm", "sporevm.cli", "sporevm.cli.client", "sporevm.cli.serverwire"}
    assert new - spore <= {"__future__", "_socket", "binascii"}, new
