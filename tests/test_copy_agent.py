"""Copy-in and copy-out through the real C guest agent, without a VM.

The agent runs as an ordinary process (``init --serve-fd N --sandbox``, the
fixture of test_guest_agent.py): its "guest filesystem" is this machine's, so
every test works below a tmp directory and checks nothing appeared outside it.
The host side is the one `spore run` uses (copies.py, copyio.py).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from sporevm.build.copies import CopyIn, CopyOut, CopyPlan, copy_in, copy_out
from sporevm.build.copy_archive import write_archive
from sporevm.build.copy_extract import Bounds
from sporevm.build.progress import Reporter
from sporevm.build.tarsafety import Limits, Reject, split_name
from sporevm.errors import CopyError
from sporevm.runtime.agent import ErrorCode
from sporevm.runtime.copyio import CopyInStream
from tests.test_guest_agent import Running, agent, agent_bin  # noqa: F401 - fixtures
from tests.treecmp import describe_tree

QUIET = Reporter(enabled=False)


def make_source(root: Path) -> Path:
    """Nested dirs, an executable script, a symlink, a name with spaces, an empty dir."""
    src = root / "src"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (src / "run.sh").chmod(0o755)
    (src / "with space.txt").write_text("spaces\n")
    (src / "a" / "b" / "c" / "deep.bin").write_bytes(os.urandom(200_000))
    (src / "a" / "long-" / "x").parent.mkdir(exist_ok=True)
    (src / "a" / "long-").joinpath("n" * 150).write_bytes(b"long name\n")
    (src / "a" / "ro.txt").write_text("read only\n")
    (src / "a" / "ro.txt").chmod(0o444)
    (src / "link").symlink_to("a/b")
    (src / "dangling").symlink_to("/nonexistent/" + "t" * 120)
    (src / "big").write_bytes(b"\xab" * (3 << 20))
    return src


def facts(root: Path) -> dict[str, tuple[object, ...]]:
    return {k: v[:2] + v[4:6] for k, v in describe_tree(root, with_xattrs=False).items()}


def test_round_trip_through_the_agent(agent: Running, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    guest = tmp_path / "guest" / "work"
    out = tmp_path / "out"
    plan = CopyPlan(ins=(CopyIn(src, str(guest)),), outs=(CopyOut(str(guest), out),))
    copy_in(agent.session, plan, QUIET)
    # owner 0:0 by default, modes kept, the symlinks are links
    assert facts(guest) == facts(src)
    assert os.readlink(guest / "link") == "a/b"
    assert stat.S_IMODE(os.stat(guest / "run.sh").st_mode) == 0o755
    assert os.stat(guest / "a" / "ro.txt").st_uid == 0
    assert agent.session.exec([str(guest / "run.sh")]).wait(10).exit_code == 0
    assert copy_out(agent.session, plan, QUIET) == 0
    assert facts(out) == facts(src)


def test_copy_in_owner_and_single_file(agent: Running, tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("one\n")
    f.chmod(0o640)
    dest = tmp_path / "g" / "sub" / "renamed.txt"
    copy_in(agent.session, CopyPlan(ins=(CopyIn(f, str(dest)),), owner=(1234, 5678)), QUIET)
    st = os.stat(dest)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert dest.read_text() == "one\n"


def test_copy_out_of_a_single_file_lands_by_name(agent: Running, tmp_path: Path) -> None:
    (tmp_path / "report.xml").write_text("<ok/>")
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is accepted and replaced
    plan = CopyPlan(outs=(CopyOut(str(tmp_path / "report.xml"), out),))
    assert copy_out(agent.session, plan, QUIET) == 0
    assert (out / "report.xml").read_text() == "<ok/>"


def _raw_copy_in(agent: Running, dest: Path, archive: bytes) -> str | None:
    """Send hand-made archive bytes; the guest's refusal, or None if it took them."""
    stream = CopyInStream(agent.session, str(dest))
    try:
        stream.write(archive)
        stream.finish(10)
    except CopyError as exc:
        return str(exc)
    return None


def _tar(*members: tuple[str, bytes, bytes | str]) -> bytes:
    """(name, type, data or link target) members after a root directory member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        root = tarfile.TarInfo(".")
        root.type = tarfile.DIRTYPE
        root.mode = 0o755
        tf.addfile(root)
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o644
            if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE:
                assert isinstance(payload, str)
                info.linkname = payload
                tf.addfile(info)
            else:
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


# The guest's rules are the layer rules (tarsafety.split_name) plus "absolute is refused":
# each name is tried on both sides and both must agree.
NAMES = [
    "ok.txt",
    "./dot/ok.txt",
    "a//b.txt",
    "../escape.txt",
    "a/../../escape.txt",
    "/abs.txt",
    "x/" * 300 + "deep.txt",
    "c" * 256 + ".txt",
    "n" * 5000,
]


def _host_accepts(name: str) -> bool:
    if name.startswith("/"):
        return False
    try:
        split_name(name.encode(), Limits(), "name")
    except Reject:
        return False
    return True


@pytest.mark.parametrize("name", NAMES, ids=lambda n: n[:24])
def test_guest_name_rules_match_the_layer_rules(agent: Running, tmp_path: Path, name: str) -> None:
    dest = tmp_path / "g" / "dest"
    refused = _raw_copy_in(agent, dest, _tar((name, tarfile.REGTYPE, b"x")))
    assert (refused is None) == _host_accepts(name), refused
    assert not (tmp_path / "g" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_guest_never_writes_through_a_symlink(agent: Running, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "g" / "dest"
    # a link made by the archive itself, then a member below it
    archive = _tar(("l", tarfile.SYMTYPE, str(outside)), ("l/planted", tarfile.REGTYPE, b"x"))
    refused = _raw_copy_in(agent, dest, archive)
    assert refused is not None and "symlink" in refused
    # a link already in the guest where a directory is expected
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pre").unlink(missing_ok=True)
    (dest / "pre").symlink_to(outside)
    refused = _raw_copy_in(agent, dest, _tar(("pre/planted", tarfile.REGTYPE, b"x")))
    assert refused is not None and "symlink" in refused
    # a final symlink is replaced, never followed
    assert _raw_copy_in(agent, dest, _tar(("pre", tarfile.REGTYPE, b"mine"))) is None
    assert (dest / "pre").read_bytes() == b"mine" and not (dest / "pre").is_symlink()
    assert list(outside.iterdir()) == []


def test_guest_refuses_special_members_and_broken_archives(agent: Running, tmp_path: Path) -> None:
    dest = tmp_path / "g" / "dest"
    assert _raw_copy_in(agent, dest, _tar(("h", tarfile.LNKTYPE, "x"))) is not None
    assert _raw_copy_in(agent, dest, _tar(("f", tarfile.FIFOTYPE, b""))) is not None
    whole = _tar(("a.txt", tarfile.REGTYPE, b"abc" * 1000))
    refused = _raw_copy_in(agent, dest, whole[:1500])
    assert refused is not None and "ends early" in refused
    bad = bytearray(whole)
    bad[512 + 148] ^= 1  # the member's checksum
    assert "checksum" in (_raw_copy_in(agent, dest, bytes(bad)) or "")
    # the agent is still serving
    assert agent.session.exec("true").wait(10).exit_code == 0


def test_copy_in_refuses_host_special_files(agent: Running, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "fifo")
    with pytest.raises(CopyError, match="FIFO"):
        copy_in(agent.session, CopyPlan(ins=(CopyIn(src, str(tmp_path / "g")),)), QUIET)
    assert agent.session.exec("true").wait(10).exit_code == 0


def _hostile_tree(root: Path) -> None:
    (root / "links").mkdir(parents=True)
    (root / "links" / "etc").symlink_to("/etc")
    (root / "links" / "up").symlink_to("../../../../tmp")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "p")
    (root / "big").mkdir()
    with open(root / "big" / "sparse", "wb") as fh:
        fh.truncate(2 << 30)


def test_copy_out_of_a_hostile_tree(agent: Running, tmp_path: Path) -> None:
    g = tmp_path / "guest"
    _hostile_tree(g)
    o = tmp_path / "host"
    o.mkdir()
    plan = CopyPlan(
        outs=(
            CopyOut(str(g / "links"), o / "links"),
            CopyOut(str(g / "fifo"), o / "fifo"),
            CopyOut(str(g / "big"), o / "big"),
        ),
        bounds=Bounds(max_bytes=1 << 30, max_entries=1000),
    )
    assert copy_out(agent.session, plan, QUIET) == 2
    assert os.readlink(o / "links" / "etc") == "/etc"  # a link, never followed
    assert os.readlink(o / "links" / "up") == "../../../../tmp"
    assert sorted(os.listdir(o)) == ["links"]  # the refused copies left nothing
    assert agent.session.exec("true").wait(10).exit_code == 0


def test_error_code_of_a_refusal_is_copy_refused(agent: Running, tmp_path: Path) -> None:
    seen: list[int] = []
    session = agent.session
    original: Callable[..., object] = session._dispatch  # noqa: SLF001

    def spy(frame: object) -> None:
        from sporevm.runtime.agent_messages import Error, decode_message

        msg = decode_message(frame)  # type: ignore[arg-type]
        if isinstance(msg, Error):
            seen.append(msg.code)
        original(frame)

    session._dispatch = spy  # type: ignore[method-assign]  # noqa: SLF001
    _raw_copy_in(agent, tmp_path / "d", _tar(("../x", tarfile.REGTYPE, b"")))
    assert seen == [ErrorCode.COPY_REFUSED]


def test_archive_of_a_tree_parses_with_tarfile(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    buf = io.BytesIO()
    stats = write_archive(src, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r|") as tf:
        names = [m.name for m in tf]
    assert names[0] == "." and "with space.txt" in names and stats.entries == len(names)


def test_build_step_artifacts_are_collected_and_replaced(agent: Running, tmp_path: Path) -> None:
    from sporevm.build.steps import run_steps
    from sporevm.sporefile import Artifact, Step

    made = tmp_path / "made"
    out = tmp_path / "ctx" / "out" / "dist"
    step = Step(
        "build",
        f"mkdir -p {made}/sub && echo v1 > {made}/sub/app && ln -sf /etc {made}/etc",
        (),
        "/",
        None,
        False,
        None,
        (Artifact(str(made), "dist", out),),
    )
    (res,) = run_steps(agent.session, [step], QUIET)
    assert res.exit_code == 0
    assert (out / "sub" / "app").read_text() == "v1\n" and os.readlink(out / "etc") == "/etc"
    # a rebuild replaces the whole directory: nothing of the old set survives
    (out / "stale").write_text("old")
    again = Step(
        "build",
        f"rm -rf {made}/sub && echo v2 > {made}/new",
        (),
        "/",
        None,
        False,
        None,
        step.copy_out,
    )
    run_steps(agent.session, [again], QUIET)
    assert sorted(os.listdir(out)) == ["etc", "new"]
    assert sorted(os.listdir(out.parent)) == ["dist"]  # no staging left behind
    # a hostile artifact fails the build and leaves the last good set
    bad = Step("build", f"mkfifo {made}/pipe", (), "/", None, False, None, step.copy_out)
    with pytest.raises(CopyError, match="FIFO"):
        run_steps(agent.session, [bad], QUIET)
    assert sorted(os.listdir(out)) == ["etc", "new"]
    assert sorted(os.listdir(out.parent)) == ["dist"]
