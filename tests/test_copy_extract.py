"""The host's copy-out extractor against hostile archives (crafted streams, no VM).

Whatever the archive holds, the host must write nothing outside the target,
follow no link, create no device, FIFO or setuid file, stay within its bounds,
and leave either the whole tree or nothing (no temp directory behind).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sporevm.build.copy_extract import Bounds, check_target, extract
from sporevm.errors import CopyError

WHAT = "--copy-out /g → out"


class Member:
    def __init__(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object):
        self.info = tarfile.TarInfo(name)
        self.info.type = kind
        self.info.mode = 0o644
        self.data = data
        if kind == tarfile.REGTYPE:
            self.info.size = len(data)
        for k, v in kw.items():
            setattr(self.info, k, v)


def tar(*members: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for m in members:
            tf.addfile(m.info, io.BytesIO(m.data) if m.info.isreg() else None)
    return buf.getvalue()


class Counting(io.BytesIO):
    """A source that records how much of it was read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.taken = 0

    def read(self, n: int | None = -1) -> bytes:
        out = super().read(n)
        self.taken += len(out)
        return out


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A parent directory with a sentinel beside the target: nothing else may appear."""
    (tmp_path / "sentinel").write_text("keep")
    return tmp_path


def untouched(box: Path, *allowed: str) -> None:
    assert sorted(os.listdir(box)) == sorted(["sentinel", *allowed])
    assert (box / "sentinel").read_text() == "keep"


def refused(box: Path, archive: bytes, match: str, bounds: Bounds | None = None) -> None:
    with pytest.raises(CopyError, match=match) as err:
        extract(io.BytesIO(archive), box / "out", bounds or Bounds(), WHAT)
    assert "\n" not in str(err.value) and "nothing was written" in str(err.value)
    untouched(box)


def test_a_plain_tree(box: Path) -> None:
    archive = tar(
        Member("d", tarfile.DIRTYPE, mode=0o750),
        Member("d/f.txt", data=b"hello", mtime=1_000_000),
        Member("d/run.sh", data=b"#!/bin/sh\n", mode=0o755),
        Member("d/link", tarfile.SYMTYPE, linkname="/etc/passwd"),
        Member("d/hard", tarfile.LNKTYPE, linkname="d/f.txt"),
        Member("with space", data=b"s"),
    )
    stats = extract(io.BytesIO(archive), box / "out", Bounds(), WHAT)
    out = box / "out"
    assert (stats.entries, stats.bytes) == (6, 16)
    assert (out / "d" / "f.txt").read_bytes() == b"hello"
    assert os.stat(out / "d" / "f.txt").st_mtime == 1_000_000
    assert stat.S_IMODE(os.stat(out / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(out / "d" / "run.sh").st_mode) == 0o755
    assert os.readlink(out / "d" / "link") == "/etc/passwd"  # kept as a link, never followed
    assert os.stat(out / "d" / "hard").st_ino == os.stat(out / "d" / "f.txt").st_ino
    untouched(box, "out")


@pytest.mark.parametrize("name", ["../escape", "d/../../escape", "/etc/evil", "a/\0b"], ids=repr)
def test_names_outside_the_target(box: Path, name: str) -> None:
    # a PAX path: a ustar name field would end at the NUL
    refused(box, tar(Member("x", data=b"x", pax_headers={"path": name})), "absolute|'\\.\\.'|NUL")
    assert not (box.parent / "escape").exists()


def test_write_through_a_planted_symlink(box: Path) -> None:
    (box / "victim").mkdir()
    archive = tar(
        Member("l", tarfile.SYMTYPE, linkname=str(box / "victim")),
        Member("l/planted", data=b"x"),
    )
    with pytest.raises(CopyError, match="symlink or not a directory"):
        extract(io.BytesIO(archive), box / "out", Bounds(), WHAT)
    assert list((box / "victim").iterdir()) == []
    untouched(box, "victim")


@pytest.mark.parametrize(
    "target",
    ["/etc/passwd", "../../etc/passwd", str(Path.home()), "missing", "dir", "sym"],
)
def test_hardlinks_out_of_the_tree(box: Path, target: str) -> None:
    archive = tar(
        Member("dir", tarfile.DIRTYPE),
        Member("sym", tarfile.SYMTYPE, linkname="/etc/passwd"),
        Member("h", tarfile.LNKTYPE, linkname=target),
    )
    refused(box, archive, "hardlink")


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
        (b"Z", "tar type"),
    ],
)
def test_devices_and_fifos(box: Path, kind: bytes, what: str) -> None:
    refused(box, tar(Member("ok", data=b"1"), Member("dev", kind, devmajor=1, devminor=3)), what)


def test_setuid_is_dropped(box: Path) -> None:
    extract(io.BytesIO(tar(Member("su", data=b"x", mode=0o6755))), box / "out", Bounds(), WHAT)
    assert stat.S_IMODE(os.stat(box / "out" / "su").st_mode) == 0o755


def test_size_bound_is_checked_before_the_data(box: Path) -> None:
    archive = tar(Member("a", data=b"a" * 4096), Member("b", data=b"b" * (1 << 20)))
    src = Counting(archive)
    with pytest.raises(CopyError, match="--copy-out-max-bytes"):
        extract(src, box / "out", Bounds(max_bytes=100_000), WHAT)
    assert src.taken < 64 << 10  # the big member's data was never read
    untouched(box)


def test_a_huge_declared_size(box: Path) -> None:
    # a 2 GiB sparse file as an honest tar writer would declare it, then nothing
    info = tarfile.TarInfo("sparse")
    info.size = 2 << 30
    head = info.tobuf(tarfile.PAX_FORMAT)
    refused(box, head + b"\0" * 4096, "--copy-out-max-bytes")


def test_entry_bound(box: Path) -> None:
    archive = tar(*(Member(f"f{i}") for i in range(11)))
    refused(box, archive, "more than 10 entries", Bounds(max_entries=10))


def test_stream_bound(box: Path) -> None:
    # valid, small, then zeros forever: the raw stream bound stops it
    bounds = Bounds(max_bytes=1, max_entries=1)
    archive = tar(Member("a", data=b"x")) + b"\0" * (bounds.stream_limit() + 1)
    refused(box, archive, "over .* bytes", bounds)


def test_duplicates_and_type_changes(box: Path) -> None:
    refused(box, tar(Member("a", data=b"1"), Member("a", data=b"2")), "already created")
    refused(box, tar(Member("a", tarfile.DIRTYPE), Member("a", data=b"2")), "already created")
    refused(
        box, tar(Member("a", data=b"1"), Member("a/b", data=b"2")), "symlink or not a directory"
    )


def test_broken_archives(box: Path) -> None:
    whole = tar(Member("a", data=b"abc" * 1000))
    refused(box, whole[:1200], "truncated|malformed|corrupt")
    refused(box, whole[:512], "truncated|malformed|corrupt|end-of-archive")
    bad = bytearray(whole)
    bad[148] ^= 1
    refused(box, bytes(bad), "malformed|corrupt|not a valid")
    refused(box, whole + b"junk" + b"\0" * 1020, "after the end-of-archive marker")
    pax = tarfile.TarInfo("p")
    pax.pax_headers = {"comment": "x" * (20 << 10)}  # over the 16 KiB header bound
    refused(box, pax.tobuf(tarfile.PAX_FORMAT) + b"\0" * 1024, "PAX header declares")
    refused(box, tar(Member("s", tarfile.GNUTYPE_SPARSE), fmt=tarfile.GNU_FORMAT), "sparse")


def test_target_rules(box: Path) -> None:
    (box / "full").mkdir()
    (box / "full" / "x").write_text("x")
    with pytest.raises(CopyError, match="not empty"):
        check_target(box / "full", WHAT)
    (box / "file").write_text("x")
    with pytest.raises(CopyError, match="not a directory"):
        check_target(box / "file", WHAT)
    (box / "link").symlink_to(box / "empty")
    (box / "empty").mkdir()
    with pytest.raises(CopyError, match="not a directory"):
        check_target(box / "link", WHAT)
    extract(io.BytesIO(tar(Member("a", data=b"1"))), box / "empty", Bounds(), WHAT)
    assert (box / "empty" / "a").read_bytes() == b"1"


_name = st.lists(
    st.sampled_from(["a", "b", "..", ".", "", "/", "c d", "\u00e9", "x" * 300]),
    min_size=1,
    max_size=5,
).map("/".join)
_member = st.tuples(
    _name,
    st.sampled_from(
        [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
    ),
    st.binary(max_size=64),
    _name,
    st.integers(0, 0o7777),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(members=st.lists(_member, max_size=8))
def test_any_archive_stays_inside(
    tmp_path: Path, members: list[tuple[str, bytes, bytes, str, int]]
) -> None:
    box = tmp_path / f"box{len(os.listdir(tmp_path))}"
    box.mkdir()
    (box / "sentinel").write_text("keep")
    built = []
    for name, kind, data, link, mode in members:
        m = Member(name, kind, data if kind == tarfile.REGTYPE else b"", mode=mode)
        if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            m.info.linkname = link
        built.append(m)
    try:
        archive = tar(*built)
    except (ValueError, UnicodeError, tarfile.TarError):
        return
    try:
        extract(io.BytesIO(archive), box / "out", Bounds(max_entries=6), WHAT)
    except CopyError:
        untouched(box)
        return
    untouched(box, "out")
    for dirpath, dirnames, filenames in os.walk(box / "out"):
        for n in dirnames + filenames:
            st_ = os.lstat(os.path.join(dirpath, n))
            assert (
                stat.S_ISDIR(st_.st_mode) or stat.S_ISREG(st_.st_mode) or stat.S_ISLNK(st_.st_mode)
            )
            assert not st_.st_mode & 0o7000


def test_bounds_at_the_boundary(box: Path) -> None:
    """The limit is accepted, one more is refused (docs/limits.md)."""
    bounds = Bounds(max_bytes=1000, max_entries=4)
    at = tar(*(Member(f"f{i}", data=b"x" * 250) for i in range(4)))
    assert extract(io.BytesIO(at), box / "at", bounds, WHAT).bytes == 1000
    over_bytes = tar(*(Member(f"f{i}", data=b"x" * (251 if i == 3 else 250)) for i in range(4)))
    with pytest.raises(CopyError, match="limit of 1000 bytes"):
        extract(io.BytesIO(over_bytes), box / "b", bounds, WHAT)
    over_entries = tar(*(Member(f"f{i}") for i in range(5)))
    with pytest.raises(CopyError, match="more than 4 entries"):
        extract(io.BytesIO(over_entries), box / "e", bounds, WHAT)
    untouched(box, "at")
