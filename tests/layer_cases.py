"""Builders for layer tars (benign and hostile) and a tree describer to compare results.

Used by tests/test_layers.py and, for ``multi_layer_case()``, by end-to-end tests
that push the same image to a real registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import zstandard

from sporevm.build.layers import Layer

MTIME = 1_700_000_000
MEDIA = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}

Entry = tuple[tarfile.TarInfo, bytes | None]


def _info(
    name: str,
    type_: bytes,
    mode: int,
    uid: int,
    gid: int,
    xattrs: Mapping[str, bytes] | None = None,
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.mtime = MTIME
    if xattrs:
        # tarfile writes PAX values as UTF-8; surrogateescape carries arbitrary bytes.
        ti.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    return ti


def file(
    name: str,
    data: bytes = b"",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    xattrs: Mapping[str, bytes] | None = None,
    mtime: int = MTIME,
) -> Entry:
    ti = _info(name, tarfile.REGTYPE, mode, uid, gid, xattrs)
    ti.size = len(data)
    ti.mtime = mtime
    return ti, data


def directory(
    name: str,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    xattrs: Mapping[str, bytes] | None = None,
) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode, uid, gid, xattrs), None


def symlink(name: str, target: str, uid: int = 0, gid: int = 0) -> Entry:
    ti = _info(name, tarfile.SYMTYPE, 0o777, uid, gid)
    ti.linkname = target
    return ti, None


def hardlink(name: str, target: str) -> Entry:
    ti = _info(name, tarfile.LNKTYPE, 0o644, 0, 0)
    ti.linkname = target
    return ti, None


def device(name: str, kind: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    ti = _info(name, tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE, mode, 0, 0)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def fifo(name: str, mode: int = 0o644) -> Entry:
    return _info(name, tarfile.FIFOTYPE, mode, 0, 0), None


def whiteout(path: str) -> Entry:
    head, _, base = path.rpartition("/")
    return file(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opaque(dirpath: str) -> Entry:
    return file(f"{dirpath}/.wh..wh..opq" if dirpath else ".wh..wh..opq")


def make_tar(entries: Iterable[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, fmt: str) -> bytes:
    if fmt == "gzip":
        return gzip.compress(data, mtime=0)
    if fmt == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def write_layers(directory_: Path, tars: Iterable[bytes], fmt: str = "tar") -> list[Layer]:
    """Compress each tar, store it as a blob file and describe it as a Layer."""
    directory_.mkdir(parents=True, exist_ok=True)
    layers = []
    for i, tar in enumerate(tars):
        blob = compress(tar, fmt)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        path = directory_ / f"layer{i}-{digest[7:19]}"
        path.write_bytes(blob)
        layers.append(Layer(digest, MEDIA[fmt], path))
    return layers


# -- hand-crafted tar bytes for hostile cases ----------------------------------


def raw_header(
    name: bytes,
    type_: bytes = b"0",
    size: int = 0,
    linkname: bytes = b"",
    mode: int = 0o644,
    size_field: bytes | None = None,
) -> bytes:
    """One ustar header block with a correct checksum; ``size_field`` overrides the size."""
    hdr = bytearray(512)
    hdr[0 : len(name[:100])] = name[:100]
    hdr[100:108] = b"%07o\0" % mode
    hdr[108:116] = b"0000000\0"
    hdr[116:124] = b"0000000\0"
    hdr[124:136] = size_field if size_field is not None else b"%011o\0" % size
    hdr[136:148] = b"%011o\0" % MTIME
    hdr[148:156] = b" " * 8
    hdr[156:157] = type_
    hdr[157 : 157 + len(linkname[:100])] = linkname[:100]
    hdr[257:265] = b"ustar\x0000"
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def raw_member(
    name: bytes,
    data: bytes = b"",
    type_: bytes = b"0",
    linkname: bytes = b"",
    pax: Mapping[bytes, bytes] | None = None,
) -> bytes:
    out = b""
    if pax:
        payload = b"".join(pax_record(k, v) for k, v in pax.items())
        out += raw_header(b"PaxHeader", b"x", len(payload)) + pad(payload)
    return out + raw_header(name, type_, len(data), linkname) + pad(data)


END = b"\0" * 1024


def write_oci_layout(
    layout: Path, tars: Iterable[bytes], fmt: str = "tar", ref: str = "latest"
) -> str:
    """An OCI image layout holding ``tars`` as one image tagged ``ref``; returns its digest."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    tars = list(tars)
    layers = [dict(put(compress(t, fmt)), mediaType=MEDIA[fmt]) for t in tars]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars],
        },
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": dict(
            put(json.dumps(config).encode()), mediaType="application/vnd.oci.image.config.v1+json"
        ),
        "layers": layers,
    }
    desc = dict(
        put(json.dumps(manifest).encode()),
        mediaType="application/vnd.oci.image.manifest.v1+json",
        annotations={"org.opencontainers.image.ref.name": ref},
    )
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return str(desc["digest"])


# -- describing a tree ------------------------------------------------------------


def describe_tree(root: Path) -> dict[str, dict[str, Any]]:
    """Every entry under ``root`` (not root itself) by relative path.

    Directory mtimes are left out; hardlinked names carry ``link_group``: the
    smallest path among the names sharing the inode.
    """
    out: dict[str, dict[str, Any]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            d: dict[str, Any] = {"uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISDIR(st.st_mode):
                d["type"] = "dir"
            elif stat.S_ISREG(st.st_mode):
                d["type"] = "file"
                d["data"] = Path(full).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                d["type"] = "symlink"
                d["target"] = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                d["type"] = "chr" if stat.S_ISCHR(st.st_mode) else "blk"
                d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            elif stat.S_ISFIFO(st.st_mode):
                d["type"] = "fifo"
            if d["type"] != "symlink":
                d["mode"] = stat.S_IMODE(st.st_mode)
            if d["type"] != "dir":
                d["mtime"] = int(st.st_mtime)
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            xattrs = {
                k: os.getxattr(full, k, follow_symlinks=False)
                for k in os.listxattr(full, follow_symlinks=False)
            }
            if xattrs:
                d["xattrs"] = xattrs
            out[rel] = d
    for names in inodes.values():
        for n in names:
            out[n]["link_group"] = min(names)
    return out


# -- the end-to-end image ------------------------------------------------------------

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # v2, permitted


def multi_layer_case() -> tuple[list[bytes], dict[str, dict[str, Any]]]:
    """Three uncompressed layers covering every layer semantic, and the expected tree."""
    base = make_tar(
        [
            directory("./"),
            directory("etc"),
            file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            file("etc/shadow", b"root:*::::::\n", mode=0o640, gid=42),
            file("etc/keep", b"keep\n", xattrs={"user.note": b"kept"}),
            directory("usr"),
            directory("usr/bin"),
            directory("usr/lib"),
            file("usr/bin/su", b"su-binary", mode=0o4755),
            file("usr/bin/wall", b"wall-binary", mode=0o2755, gid=5),
            file(
                "usr/bin/ping",
                b"ping-binary",
                mode=0o755,
                xattrs={"security.capability": CAP_NET_RAW},
            ),
            file("usr/bin/perl5", b"perl-old"),
            hardlink("usr/bin/perl", "usr/bin/perl5"),
            file("usr/lib/libx.so.1", b"\x7fELF lib"),
            symlink("usr/lib/libx.so", "libx.so.1"),
            symlink("bin", "usr/bin"),
            directory("tmp", mode=0o1777),
            directory("home"),
            directory("home/user", mode=0o700, uid=1000, gid=1000),
            file("home/user/.profile", b"export A=1\n", mode=0o600, uid=1000, gid=1000),
            directory("var"),
            directory("var/log"),
            file("var/log/old.log", b"old"),
            directory("var/cache"),
            directory("var/cache/apt"),
            file("var/cache/apt/pkgcache.bin", b"cache"),
            directory("var/cache/apt/archives"),
            directory("srv"),
            file("srv/data", b"was a file"),
            directory("srv/dir1"),
            file("srv/dir1/child", b"child"),
            symlink("srv/link1", "/nonexistent"),
            file("srv/f2sym", b"becomes a symlink"),
            directory("opt", xattrs={"trusted.spore": b"lower"}),
            file("opt/old", b"old opt"),
            directory("dev"),
            device("dev/null", "chr", 1, 3),
            device("dev/loop0", "blk", 7, 0, mode=0o660),
            directory("run"),
            fifo("run/initctl", mode=0o600),
        ]
    )
    middle = make_tar(
        [
            whiteout("etc/shadow"),  # a lower file
            whiteout("var/log"),  # a lower directory tree
            file("var/cache/apt/new.bin", b"new"),  # kept: this layer, before the opaque marker
            opaque("var/cache/apt"),
            file("var/cache/apt/after.bin", b"after"),
            file("etc/samelayer", b"same"),
            whiteout("etc/samelayer"),  # same layer: must NOT remove it
            directory("srv/data"),
            file("srv/data/inner", b"inner"),  # file -> dir
            file("srv/dir1", b"now a file"),  # dir -> file
            directory("srv/link1", mode=0o750),  # symlink -> dir
            symlink("srv/f2sym", "/etc/passwd"),  # file -> symlink
            directory("usr/lib", mode=0o700, uid=2, gid=2),  # dir over dir: keep children
            hardlink("usr/bin/su-link", "usr/bin/su"),  # hardlink to a lower entry
            file("usr/bin/perl", b"perl-new", mode=0o755),  # replace one hardlinked name
            device("dev/null", "chr", 1, 3, mode=0o666),
        ]
    )
    top = make_tar(
        [
            whiteout("etc/samelayer"),  # now it is lower: removed
            file("opt/new", b"new opt"),
            opaque("opt"),  # removes opt/old, keeps opt/new and opt itself
            directory("data"),
            file("data/a", b"shared", mode=0o640, uid=7, gid=8),
            hardlink("data/b", "data/a"),  # hardlink within the layer
            whiteout("usr/lib/libx.so"),  # removes the symlink, not its target
            fifo("srv/dir1", mode=0o620),  # file -> fifo
            whiteout("nothing-here"),  # whiteout of nothing: no-op
        ]
    )
    root = {"uid": 0, "gid": 0}
    f = dict(root, type="file", mode=0o644, mtime=MTIME)
    d = dict(root, type="dir", mode=0o755)
    expected: dict[str, dict[str, Any]] = {
        "bin": dict(root, type="symlink", target="usr/bin", mtime=MTIME),
        "data": d,
        "data/a": dict(f, data=b"shared", mode=0o640, uid=7, gid=8, link_group="data/a"),
        "data/b": dict(f, data=b"shared", mode=0o640, uid=7, gid=8, link_group="data/a"),
        "dev": d,
        "dev/loop0": dict(root, type="blk", rdev=(7, 0), mode=0o660, mtime=MTIME),
        "dev/null": dict(root, type="chr", rdev=(1, 3), mode=0o666, mtime=MTIME),
        "etc": d,
        "etc/keep": dict(f, data=b"keep\n", xattrs={"user.note": b"kept"}),
        "etc/passwd": dict(f, data=b"root:x:0:0::/root:/bin/sh\n"),
        "home": d,
        "home/user": dict(d, mode=0o700, uid=1000, gid=1000),
        "home/user/.profile": dict(f, data=b"export A=1\n", mode=0o600, uid=1000, gid=1000),
        "opt": dict(d, xattrs={"trusted.spore": b"lower"}),
        "opt/new": dict(f, data=b"new opt"),
        "run": d,
        "run/initctl": dict(root, type="fifo", mode=0o600, mtime=MTIME),
        "srv": d,
        "srv/data": d,
        "srv/data/inner": dict(f, data=b"inner"),
        "srv/dir1": dict(root, type="fifo", mode=0o620, mtime=MTIME),
        "srv/f2sym": dict(root, type="symlink", target="/etc/passwd", mtime=MTIME),
        "srv/link1": dict(d, mode=0o750),
        "tmp": dict(d, mode=0o1777),
        "usr": d,
        "usr/bin": d,
        "usr/bin/perl": dict(f, data=b"perl-new", mode=0o755),
        "usr/bin/perl5": dict(f, data=b"perl-old"),
        "usr/bin/ping": dict(
            f, data=b"ping-binary", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}
        ),
        "usr/bin/su": dict(f, data=b"su-binary", mode=0o4755, link_group="usr/bin/su"),
        "usr/bin/su-link": dict(f, data=b"su-binary", mode=0o4755, link_group="usr/bin/su"),
        "usr/bin/wall": dict(f, data=b"wall-binary", mode=0o2755, gid=5),
        "usr/lib": dict(d, mode=0o700, uid=2, gid=2),
        "usr/lib/libx.so.1": dict(f, data=b"\x7fELF lib"),
        "var": d,
        "var/cache": d,
        "var/cache/apt": d,
        "var/cache/apt/after.bin": dict(f, data=b"after"),
        "var/cache/apt/new.bin": dict(f, data=b"new"),
    }
    return [base, middle, top], expected
