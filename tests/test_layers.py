"""Layer application: OCI semantics, formats, and hostile layers that must be rejected."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sporevm.build import tarsafety
from sporevm.build.layers import Layer, Limits, apply_layers
from sporevm.errors import LayerError, SporeError
from tests.layer_cases import (
    END,
    MEDIA,
    describe_tree,
    device,
    directory,
    fifo,
    file,
    hardlink,
    make_tar,
    multi_layer_case,
    opaque,
    pad,
    pax_record,
    raw_header,
    raw_member,
    symlink,
    whiteout,
    write_layers,
    write_oci_layout,
)

# -- helpers --------------------------------------------------------------------


def _listing(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st_ = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            link = os.readlink(p) if p.is_symlink() else None
            out[str(p.relative_to(root))] = (st_.st_mode, st_.st_uid, st_.st_mtime_ns, data, link)
    return out


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory next to dest that no layer may touch."""
    s = tmp_path / "sentinel"
    (s / "sub").mkdir(parents=True)
    (s / "passwd").write_bytes(b"original\n")
    (s / "sub" / "x").write_bytes(b"x\n")
    return s


def _apply_raw(
    tmp_path: Path, tars: list[bytes], fmt: str = "tar", limits: Limits | None = None
) -> Path:
    dest = tmp_path / "root"
    layers = write_layers(tmp_path / "blobs", tars, fmt)
    apply_layers(layers, dest, limits or Limits())
    return dest


def _rejected(
    tmp_path: Path,
    sentinel: Path,
    tars: list[bytes],
    match: str,
    fmt: str = "tar",
    limits: Limits | None = None,
) -> LayerError:
    before = _listing(sentinel)
    dest = tmp_path / "root"
    with pytest.raises(LayerError, match=match) as info:
        _apply_raw(tmp_path, tars, fmt, limits)
    assert not dest.exists(), "a failed apply must leave no tree behind"
    assert _listing(sentinel) == before, "something outside dest was modified"
    assert "\n" not in str(info.value)
    return info.value


# -- semantics ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tar", "gzip", "zstd"])
def test_multi_layer_case(tmp_path: Path, fmt: str) -> None:
    tars, expected = multi_layer_case()
    seen: list[int] = []
    layers = write_layers(tmp_path / "blobs", tars, fmt)
    stats = apply_layers(layers, tmp_path / "root", progress=seen.append)
    assert describe_tree(tmp_path / "root") == expected
    assert sum(seen) == sum(p.path.stat().st_size for p in layers)
    assert [s.compressed_bytes for s in stats.layers] == [p.path.stat().st_size for p in layers]
    assert stats.entries == sum(s.entries for s in stats.layers)
    assert stats.layers[1].whiteouts == 4


def test_root_and_directory_times(tmp_path: Path) -> None:
    tar = make_tar(
        [directory("./", mode=0o750), directory("a"), file("a/f", b"1"), file("implicit/g", b"2")]
    )
    later = make_tar([file("a/h", b"3")])
    dest = _apply_raw(tmp_path, [tar, later])
    assert (dest.stat().st_mode & 0o7777) == 0o750
    # Declared directory mtimes survive children written after them (even in later
    # layers); implicitly created parents get mtime 0 so output is deterministic.
    assert int((dest / "a").stat().st_mtime) == 1_700_000_000
    assert (dest / "implicit").stat().st_mtime == 0
    assert ((dest / "implicit").stat().st_mode & 0o7777) == 0o755


def test_absolute_name_stays_inside(tmp_path: Path, sentinel: Path) -> None:
    before = _listing(sentinel)
    outside = tmp_path / "abs-target"
    dest = _apply_raw(
        tmp_path, [make_tar([file(str(outside), b"pwned"), file("/etc/passwd", b"inside")])]
    )
    assert not outside.exists()
    assert (dest / str(outside).lstrip("/")).read_bytes() == b"pwned"
    assert (dest / "etc/passwd").read_bytes() == b"inside"
    assert _listing(sentinel) == before


def test_final_symlink_is_replaced_not_followed(tmp_path: Path, sentinel: Path) -> None:
    tars = [
        make_tar([symlink("evil", str(sentinel / "passwd")), symlink("evildir", str(sentinel))]),
        make_tar([file("evil", b"replaced"), directory("evildir")]),
    ]
    before = _listing(sentinel)
    dest = _apply_raw(tmp_path, tars)
    assert (dest / "evil").read_bytes() == b"replaced"
    assert (dest / "evildir").is_dir() and not (dest / "evildir").is_symlink()
    assert _listing(sentinel) == before


def test_hardlink_to_symlink_links_the_symlink(tmp_path: Path) -> None:
    dest = _apply_raw(tmp_path, [make_tar([symlink("s", "/etc/shadow"), hardlink("h", "s")])])
    assert os.readlink(dest / "h") == "/etc/shadow"
    assert (dest / "h").lstat().st_ino == (dest / "s").lstat().st_ino


def test_aufs_metadata_is_skipped(tmp_path: Path) -> None:
    dest = _apply_raw(
        tmp_path,
        [
            make_tar(
                [
                    directory(".wh..wh.plnk"),
                    file(".wh..wh.plnk/1.2", b"x"),
                    file(".wh..wh.aufs"),
                    file("ok", b"1"),
                ]
            )
        ],
    )
    assert sorted(os.listdir(dest)) == ["ok"]


def test_gnu_format_long_names(tmp_path: Path) -> None:
    long = "d/" + "x" * 200 + "/" + "y" * 150
    dest = _apply_raw(
        tmp_path, [make_tar([file(long, b"1"), symlink("l", "t" * 300)], fmt=tarfile.GNU_FORMAT)]
    )
    assert (dest / long).read_bytes() == b"1"
    assert os.readlink(dest / "l") == "t" * 300


def test_gzip_multi_member_and_padding(tmp_path: Path) -> None:
    tar = make_tar([file("a", b"1" * 5000), file("b", b"2")])
    blob = gzip.compress(tar[:3000], mtime=0) + gzip.compress(tar[3000:], mtime=0) + b"\0" * 64
    path = tmp_path / "blob"
    path.write_bytes(blob)
    layer = Layer("sha256:" + hashlib.sha256(blob).hexdigest(), MEDIA["gzip"], path)
    apply_layers([layer], tmp_path / "root")
    assert (tmp_path / "root/b").read_bytes() == b"2"


def test_empty_layers(tmp_path: Path) -> None:
    tars = [b"", make_tar([]), make_tar([file("a", b"1")])]
    for fmt in ("gzip", "zstd"):
        dest = tmp_path / fmt
        apply_layers(write_layers(tmp_path / f"b-{fmt}", tars, fmt), dest)
        assert os.listdir(dest) == ["a"]


def test_nondistributable_and_docker_media_types(tmp_path: Path) -> None:
    blob = gzip.compress(make_tar([file("a")]), mtime=0)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    for i, mt in enumerate(
        [
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        ]
    ):
        apply_layers([Layer(digest, mt, path)], tmp_path / f"r{i}")


def test_dest_must_not_exist(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "keep").write_bytes(b"1")
    with pytest.raises(LayerError, match="already exists"):
        _apply_raw(tmp_path, [make_tar([])])
    assert (tmp_path / "root" / "keep").exists()


def test_tarfile_extension_hook_is_pinned() -> None:
    # BoundedTarInfo relies on tarfile's documented-in-source _proc_member hook.
    assert "_proc_member" in vars(tarfile.TarInfo)
    assert tarsafety._BASE_PROC_MEMBER is vars(tarfile.TarInfo)["_proc_member"]


def test_pax_parser_is_linear() -> None:
    # tarfile's own PAX parsing is quadratic on this (CPython gh-121285).
    start = time.monotonic()
    with pytest.raises(LayerError):
        tarsafety.parse_pax(b"1" * 1_000_000)
    with pytest.raises(LayerError):
        tarsafety.parse_pax(b"99 " + b"a" * 1_000_000)
    assert time.monotonic() - start < 1
    assert tarsafety.parse_pax(pax_record(b"path", b"a=b") + b"\0\0") == {"path": b"a=b"}


# -- hostile layers -------------------------------------------------------------------


def test_dotdot_traversal(tmp_path: Path, sentinel: Path) -> None:
    _rejected(
        tmp_path,
        sentinel,
        [make_tar([file("../sentinel/passwd", b"pwned")])],
        r"member '\.\./sentinel/passwd': name contains '\.\.'",
    )
    _rejected(tmp_path, sentinel, [make_tar([file("a/../../sentinel/x", b"pwned")])], r"'\.\.'")


def test_write_through_absolute_symlink(tmp_path: Path, sentinel: Path) -> None:
    tars = [make_tar([symlink("evil", str(sentinel))]), make_tar([file("evil/passwd", b"pwned")])]
    _rejected(
        tmp_path,
        sentinel,
        tars,
        r"layer 2 \(sha256:[0-9a-f]{12}\) member 'evil/passwd': parent 'evil' is a "
        r"symlink; layers must name real paths",
    )


def test_write_through_relative_symlink(tmp_path: Path, sentinel: Path) -> None:
    tars = [
        make_tar([directory("a"), symlink("a/up", "../../sentinel"), file("a/up/passwd", b"pwned")])
    ]
    _rejected(tmp_path, sentinel, tars, r"parent 'a/up' is a symlink")


def test_write_through_chained_symlinks(tmp_path: Path, sentinel: Path) -> None:
    tars = [
        make_tar(
            [
                symlink("one", "two"),
                symlink("two", "three"),
                symlink("three", "../sentinel"),
                directory("one/sub"),
            ]
        )
    ]
    _rejected(tmp_path, sentinel, tars, r"parent 'one' is a symlink")


def test_hardlink_escapes(tmp_path: Path, sentinel: Path) -> None:
    _rejected(
        tmp_path,
        sentinel,
        [make_tar([hardlink("h", "../sentinel/passwd")])],
        r"hardlink target contains '\.\.'",
    )
    _rejected(
        tmp_path,
        sentinel,
        [make_tar([symlink("s", str(sentinel)), hardlink("h", "s/passwd")])],
        r"parent 's' is a symlink",
    )
    _rejected(
        tmp_path,
        sentinel,
        [make_tar([directory("d"), hardlink("h", "d")])],
        r"hardlink target 'd' is a directory",
    )
    _rejected(
        tmp_path,
        sentinel,
        [make_tar([hardlink("h", "missing")])],
        r"hardlink target 'missing' does not exist",
    )
    _rejected(tmp_path, sentinel, [make_tar([file("f"), hardlink("f", "f")])], r"itself")


def test_whiteout_escapes(tmp_path: Path, sentinel: Path) -> None:
    _rejected(tmp_path, sentinel, [make_tar([file("../.wh.sentinel")])], r"'\.\.'")
    tars = [make_tar([symlink("s", str(sentinel))]), make_tar([whiteout("s/passwd")])]
    _rejected(tmp_path, sentinel, tars, r"parent 's' is a symlink")
    tars = [make_tar([symlink("s", str(sentinel))]), make_tar([opaque("s")])]
    _rejected(tmp_path, sentinel, tars, r"parent 's' is a symlink")
    _rejected(tmp_path, sentinel, [make_tar([file("a/.wh.b/c")])], r"whiteout name")


@pytest.mark.parametrize("name", [".", "/", "./", "a/.."])
def test_symlink_named_root(tmp_path: Path, sentinel: Path, name: str) -> None:
    # umoci CVE-2021-29136: a symlink named "." replaced the rootfs itself.
    tars = [make_tar([symlink(name, str(sentinel))]), make_tar([file("passwd", b"pwned")])]
    _rejected(tmp_path, sentinel, tars, r"names the root but is not a directory|'\.\.'")


def test_parent_not_a_directory(tmp_path: Path, sentinel: Path) -> None:
    _rejected(
        tmp_path, sentinel, [make_tar([file("f"), file("f/g")])], r"parent 'f' is not a directory"
    )


def test_entry_count_bomb(tmp_path: Path, sentinel: Path) -> None:
    tar = make_tar([file(f"f{i}") for i in range(50)])
    _rejected(
        tmp_path, sentinel, [tar, tar], r"more than 60 entries", limits=Limits(max_entries=60)
    )


def test_size_bombs(tmp_path: Path, sentinel: Path) -> None:
    # A declared size beyond the limit is rejected before any data is read.
    huge = raw_header(b"big", size_field=b"\x80" + (1 << 40).to_bytes(11, "big")) + END
    _rejected(tmp_path, sentinel, [huge], r"member 'big': size 1099511627776 would exceed")
    negative = raw_header(b"neg", size_field=b"\xff" * 12) + END
    _rejected(tmp_path, sentinel, [negative], r"member 'neg': size -1 would exceed")
    # A decompression bomb: 64 MiB of zeros in a small gzip blob.
    bomb = make_tar([file("zeros", bytes(64 << 20))])
    _rejected(
        tmp_path,
        sentinel,
        [bomb],
        r"size 67108864 would exceed",
        fmt="gzip",
        limits=Limits(max_total_bytes=1 << 20),
    )
    _rejected(
        tmp_path,
        sentinel,
        [bomb],
        r"decompressed tar",
        fmt="zstd",
        limits=Limits(max_stream_bytes=1 << 20),
    )


@pytest.mark.parametrize("type_", [b"x", b"L", b"K"])
def test_extension_header_bomb(tmp_path: Path, sentinel: Path, type_: bytes) -> None:
    # Declares 1 GiB of header data that is not there: must fail without reading it.
    tar = raw_header(b"bomb", type_, size=1 << 30)
    tracemalloc.start()
    start = time.monotonic()
    try:
        _rejected(tmp_path, sentinel, [tar], r"declares 1073741824 bytes, more than the limit")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 2
    assert peak < 16 << 20


def test_nul_and_long_names(tmp_path: Path, sentinel: Path) -> None:
    nul = raw_member(b"x", pax={b"path": b"a\0b"}) + END
    _rejected(tmp_path, sentinel, [nul], r"NUL")
    long = raw_member(b"x", pax={b"path": b"a/" * 2100 + b"b"}) + END
    _rejected(tmp_path, sentinel, [long], r"over the limit of 4096")
    comp = raw_member(b"x", pax={b"path": b"c" * 300}) + END
    _rejected(tmp_path, sentinel, [comp], r"component of 300 bytes")
    _rejected(tmp_path, sentinel, [raw_member(b"", b"") + END], r"name is empty")


def test_malformed_tars(tmp_path: Path, sentinel: Path) -> None:
    good = raw_member(b"a", b"1")
    _rejected(tmp_path, sentinel, [good + b"\x01" * 512 + END], r"corrupt tar header")
    _rejected(tmp_path, sentinel, [good], r"end-of-archive")
    _rejected(tmp_path, sentinel, [good + b"\0" * 512 + raw_member(b"b")], r"end-of-archive")
    _rejected(tmp_path, sentinel, [good[:700]], r"truncated|unexpected end")
    _rejected(tmp_path, sentinel, [raw_member(b"v", type_=b"V") + END], r"unsupported tar")
    _rejected(tmp_path, sentinel, [raw_member(b"s", type_=b"S") + END], r"sparse")
    sparse_pax = raw_member(b"s", pax={b"GNU.sparse.major": b"1", b"GNU.sparse.minor": b"0"})
    _rejected(tmp_path, sentinel, [sparse_pax + END], r"sparse")
    bad_pax = raw_header(b"p", b"x", 10) + pad(b"garbage!!\n") + raw_member(b"a") + END
    _rejected(tmp_path, sentinel, [bad_pax], r"malformed PAX record")
    chain = b"".join(raw_header(b"p", b"x", 0) for _ in range(20)) + raw_member(b"a") + END
    _rejected(tmp_path, sentinel, [chain], r"chained")
    _rejected(tmp_path, sentinel, [b"\x01" * 2048], r"not a valid tar")


def test_bad_ids_and_times(tmp_path: Path, sentinel: Path) -> None:
    _rejected(
        tmp_path, sentinel, [raw_member(b"a", pax={b"uid": b"4294967295"}) + END], r"out of range"
    )
    _rejected(
        tmp_path, sentinel, [raw_member(b"a", pax={b"mtime": b"inf"}) + END], r"not a decimal time"
    )
    _rejected(
        tmp_path, sentinel, [raw_member(b"a", pax={b"uid": b"-1"}) + END], r"not a decimal number"
    )
    _rejected(
        tmp_path,
        sentinel,
        [raw_member(b"a", pax={b"SCHILY.xattr.system.x": b"1"}) + END],
        r"xattr 'system.x' is not supported",
    )


def test_digest_and_media_type_checks(tmp_path: Path, sentinel: Path) -> None:
    tar = make_tar([file("a", b"1")])
    before = _listing(sentinel)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    cases = [
        (tar, MEDIA["tar"], "sha256:" + "0" * 64, r"blob sha256 is sha256:[0-9a-f]{64}, expected"),
        (gzip.compress(tar), MEDIA["tar"], None, r"media type says uncompressed tar"),
        (tar, MEDIA["gzip"], None, r"gzip magic 1f8b"),
        (zstandard.ZstdCompressor().compress(tar), MEDIA["gzip"], None, r"gzip magic"),
        (gzip.compress(tar), MEDIA["zstd"], None, r"zstd magic 28b52ffd"),
        (tar, "application/vnd.oci.image.layer.v1.tar+bzip2", None, r"unknown media type"),
        (tar, MEDIA["tar"], "sha512:abc", r"is not sha256"),
        (gzip.compress(tar)[:-12], MEDIA["gzip"], None, r"truncated|malformed|corrupt"),
        (gzip.compress(tar) + b"junk", MEDIA["gzip"], None, r"corrupt gzip"),
    ]
    for i, (blob, media, digest, match) in enumerate(cases):
        path = blobs / f"b{i}"
        path.write_bytes(blob)
        layer = Layer(digest or "sha256:" + hashlib.sha256(blob).hexdigest(), media, path)
        with pytest.raises(LayerError, match=match):
            apply_layers([layer], tmp_path / "root")
        assert not (tmp_path / "root").exists()
    assert _listing(sentinel) == before


def test_failure_in_later_layer_removes_everything(tmp_path: Path, sentinel: Path) -> None:
    tars, _ = multi_layer_case()
    _rejected(tmp_path, sentinel, [*tars, make_tar([file("../x")])], r"layer 4 ")


# -- property: random benign layers match a straightforward model ----------------------

_NAMES = ["a", "b", "c"]
_path = st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3).map("/".join)
_op = st.one_of(
    st.tuples(st.just("file"), _path, st.binary(max_size=8), st.sampled_from([0o644, 0o4755])),
    st.tuples(st.just("dir"), _path, st.sampled_from([0o755, 0o700, 0o1777])),
    st.tuples(st.just("symlink"), _path, st.sampled_from(["a", "/etc", "../x"])),
    st.tuples(st.just("hardlink"), _path, _path),
    st.tuples(st.just("whiteout"), _path),
    st.tuples(st.just("opaque"), st.lists(st.sampled_from(_NAMES), max_size=2).map("/".join)),
)


class _Model:
    """The layer semantics over a dict: path -> node; parents are implicit dirs."""

    def __init__(self) -> None:
        self.tree: dict[str, tuple[Any, ...]] = {}
        self.inode = 0
        self.written: set[str] = set()
        self.holders: set[str] = set()

    def _parents_ok(self, path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(p in self.tree and self.tree[p][0] != "dir" for p in prefixes):
            return False
        for p in prefixes:
            self.tree.setdefault(p, ("dir", 0o755))
        return True

    def _whiteout_ok(self, path: str) -> bool:
        # Whiteouts create nothing: missing parents make them no-ops; a non-dir
        # parent is not benign.
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        return not any(p in self.tree and self.tree[p][0] != "dir" for p in prefixes)

    def _mark(self, path: str) -> None:
        self.written.add(path)
        parts = path.split("/")
        self.holders.update("/".join(parts[:i]) for i in range(1, len(parts)))

    def _drop(self, path: str) -> None:
        for p in [p for p in self.tree if p == path or p.startswith(path + "/")]:
            del self.tree[p]

    def _hide(self, path: str) -> None:
        if path not in self.tree:
            return
        if path not in self.written and path not in self.holders:
            self._drop(path)
        elif self.tree[path][0] == "dir":
            for child in [p for p in self.tree if p.rpartition("/")[0] == path]:
                self._hide(child)

    def _put(self, path: str, node: tuple[Any, ...]) -> None:
        old = self.tree.get(path)
        if not (old and old[0] == "dir" and node[0] == "dir"):
            self._drop(path)
        self.tree[path] = node

    def apply(self, op: tuple[Any, ...]) -> list[Any] | None:
        """Apply one op; return its tar entries, or None if it is not benign."""
        kind, path = op[0], op[1]
        if kind == "opaque":
            marker = f"{path}/.wh..wh..opq" if path else ".wh..wh..opq"
            if not self._whiteout_ok(marker):
                return None
            for child in [p for p in self.tree if p.rpartition("/")[0] == path and p]:
                self._hide(child)
            return [opaque(path)]
        if kind == "hardlink":
            target = self.tree.get(op[2])
            if (
                target is None
                or target[0] == "dir"
                or op[2] == path
                or op[2].startswith(path + "/")
            ):
                return None
        if kind == "whiteout":
            if not self._whiteout_ok(path):
                return None
            head, _, base = path.rpartition("/")
            self._hide(path)
            return [whiteout(path)]
        if not self._parents_ok(path):
            return None
        self._mark(path)
        self.inode += 1
        if kind == "file":
            self._put(path, ("file", op[2], op[3], self.inode))
            return [file(path, op[2], mode=op[3])]
        if kind == "dir":
            self._put(path, ("dir", op[2]))
            return [directory(path, mode=op[2])]
        if kind == "symlink":
            self._put(path, ("symlink", op[2], self.inode))
            return [symlink(path, op[2])]
        self._put(path, target)  # type: ignore[arg-type]
        return [hardlink(path, op[2])]

    def describe(self) -> dict[str, tuple[Any, ...]]:
        groups: dict[int, list[str]] = {}
        for p, node in self.tree.items():
            if node[0] != "dir":
                groups.setdefault(node[-1], []).append(p)
        out: dict[str, tuple[Any, ...]] = {}
        for p, node in self.tree.items():
            group = groups.get(node[-1], []) if node[0] != "dir" else []
            linked = min(group) if len(group) > 1 else None
            out[p] = (*node[:-1], linked) if node[0] != "dir" else node
        return out


def _model_layers(layers: list[list[Any]]) -> tuple[_Model, list[list[Any]]]:
    """Run ops through the model, keeping only the benign ones, layer by layer."""
    model = _Model()
    out = []
    for ops in layers:
        model.written.clear()
        model.holders.clear()
        entries: list[Any] = []
        for op in ops:
            got = model.apply(op)
            if got is not None:
                entries.extend(got)
        out.append(entries)
    return model, out


def _describe_fs(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for rel, d in describe_tree(root).items():
        linked = d.get("link_group")
        if d["type"] == "dir":
            out[rel] = ("dir", d["mode"])
        elif d["type"] == "file":
            out[rel] = ("file", d["data"], d["mode"], linked)
        else:
            out[rel] = ("symlink", d["target"], linked)
    return out


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.lists(_op, max_size=8), min_size=1, max_size=3), st.sampled_from(["tar", "gzip"])
)
def test_random_benign_layers_match_model(
    tmp_path: Path, layers: list[list[Any]], fmt: str
) -> None:
    model, layer_entries = _model_layers(layers)
    tars = [make_tar(entries) for entries in layer_entries]
    work = Path(os.path.join(tmp_path, f"ex{time.monotonic_ns()}"))
    dest = work / "root"
    apply_layers(write_layers(work / "blobs", tars, fmt), dest)
    assert _describe_fs(dest) == model.describe()


_UMOCI = shutil.which("umoci")


def _umoci_unpack(work: Path, tars: list[bytes]) -> Path:
    write_oci_layout(work / "oci", tars)
    subprocess.run(
        [str(_UMOCI), "raw", "unpack", "--image", f"{work}/oci:latest", str(work / "umoci")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return work / "umoci"


@pytest.mark.skipif(_UMOCI is None, reason="umoci is not installed")
def test_multi_layer_case_matches_umoci(tmp_path: Path) -> None:
    tars, expected = multi_layer_case()
    assert describe_tree(_umoci_unpack(tmp_path, tars)) == expected


@pytest.mark.skipif(_UMOCI is None, reason="umoci is not installed")
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(_op, max_size=8), min_size=1, max_size=3))
def test_random_benign_layers_match_umoci(tmp_path: Path, layers: list[list[Any]]) -> None:
    # Differential: the same layers through umoci, an independent implementation.
    tars = [make_tar(entries) for entries in _model_layers(layers)[1]]
    work = Path(os.path.join(tmp_path, f"ex{time.monotonic_ns()}"))
    apply_layers(write_layers(work / "blobs", tars), work / "ours")
    assert describe_tree(work / "ours") == describe_tree(_umoci_unpack(work, tars))


def test_all_errors_are_spore_errors() -> None:
    assert issubclass(LayerError, SporeError)


def test_xattr_values_round_trip_binary(tmp_path: Path) -> None:
    value = bytes(range(256))
    tar = raw_member(b"f", b"", pax={b"SCHILY.xattr.user.bin": value}) + END
    dest = _apply_raw(tmp_path, [tar])
    assert os.getxattr(dest / "f", "user.bin") == value


def test_special_files(tmp_path: Path) -> None:
    dest = _apply_raw(
        tmp_path,
        [make_tar([device("c", "chr", 4, 64), device("b", "blk", 8, 1), fifo("p", mode=0o4640)])],
    )
    tree = describe_tree(dest)
    assert tree["c"]["rdev"] == (4, 64) and tree["b"]["type"] == "blk"
    assert tree["p"]["mode"] == 0o4640


def test_reader_hands_out_bounded_slices() -> None:
    data = zstandard.ZstdCompressor().compress(b"x" * 100_000)
    src = tarsafety.HashingSource(io.BytesIO(data))
    seen: list[int] = []
    with tarsafety.DecompressingReader(src, "zstd", seen.append) as reader:
        out = b""
        while chunk := reader.read(4096):
            assert len(chunk) <= 4096
            out += chunk
    assert out == b"x" * 100_000
    assert sum(seen) == len(out)
