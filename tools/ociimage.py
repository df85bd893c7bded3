"""Build small OCI images offline, deterministically, and push them with skopeo.

Used by the test suite and by ``scripts/setup`` (``python tools/ociimage.py
busybox --out DIR``) so the examples need no registry on the internet. Same
inputs give byte-identical layouts: tar entries are sorted, owned by 0:0 with
mtime 0, and gzip headers carry no name and mtime 0.

    python tools/ociimage.py busybox --out DIR [--tag latest] [--compression gzip]
    python tools/ociimage.py minbase --out DIR --cache DIR [--tag bookworm-minbase]
    python tools/ociimage.py push --layout DIR --tag TAG --dest HOST/REPO:TAG
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal, cast

import zstandard

Compression = Literal["gzip", "zstd", "none"]
Layer = bytes | Path  # an uncompressed tar, in memory or (for big ones) on disk

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"
BUSYBOX = Path("/bin/busybox")  # Debian busybox-static: one static binary, all applets
APT_SOURCES = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))
MINBASE_STAMP = "debootstrap --variant=minbase bookworm v1"
_BLOCK = 1 << 20


def debian_mirror() -> str:
    """The Debian archive this machine's apt already uses (deb822 ``URIs:`` or a one-line
    ``deb URI bookworm …``), read at run time: the repository names no mirror host."""
    files: list[Path] = []
    for src in APT_SOURCES:
        if src.is_dir():
            files += sorted(src.glob("*.sources")) + sorted(src.glob("*.list"))
        elif src.is_file():
            files.append(src)
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and "/debian" in words[1]:
                return words[1]
            if words[:1] == ["deb"] and "bookworm" in words and "/debian" in line:
                uri = next((w for w in words[1:] if "://" in w), None)
                if uri is not None:
                    return uri
    raise SystemExit("ociimage: no Debian archive in /etc/apt/sources*; debootstrap needs one")


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- layers ------------------------------------------------------------------------


def _info(name: str, kind: bytes, mode: int, *, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def busybox_layers(busybox: Path = BUSYBOX) -> list[bytes]:
    """One layer: static busybox, applets (hardlinks in bin/, symlinks elsewhere), /etc basics."""
    binary = busybox.read_bytes()
    listing = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    applets = sorted({p.strip("/") for p in listing} - {"bin/busybox"})
    dirs = {
        "bin",
        "dev",
        "etc",
        "proc",
        "root",
        "sbin",
        "sys",
        "tmp",
        "usr",
        "usr/bin",
        "usr/sbin",
        "var",
    }
    dirs |= {str(Path(a).parent) for a in applets}
    files = {
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
        "etc/hostname": b"spore\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):  # sorted: parents come before children
            mode = {"tmp": 0o1777, "root": 0o700}.get(d, 0o755)
            tar.addfile(_info(d, tarfile.DIRTYPE, mode))
        tar.addfile(
            _info("bin/busybox", tarfile.REGTYPE, 0o755, size=len(binary)), io.BytesIO(binary)
        )
        for name, data in sorted(files.items()):
            tar.addfile(_info(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
        for applet in applets:  # the hardlink target was written above
            if applet.startswith("bin/"):
                tar.addfile(_info(applet, tarfile.LNKTYPE, 0o755, link="bin/busybox"))
            else:
                tar.addfile(_info(applet, tarfile.SYMTYPE, 0o777, link="/bin/busybox"))
    return [buf.getvalue()]


def tar_layer(entries: dict[str, bytes | str | None]) -> bytes:
    """A small deterministic layer: path -> file bytes, symlink target (str) or dir (None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, value in sorted(entries.items()):
            if value is None:
                tar.addfile(_info(name, tarfile.DIRTYPE, 0o755))
            elif isinstance(value, str):
                tar.addfile(_info(name, tarfile.SYMTYPE, 0o777, link=value))
            else:
                tar.addfile(_info(name, tarfile.REGTYPE, 0o644, size=len(value)), io.BytesIO(value))
    return buf.getvalue()


def minbase_rootfs(cache_dir: Path) -> Path:
    """debootstrap --variant=minbase bookworm into cache_dir, once (keyed by a stamp file)."""
    base = cache_dir / "minbase"
    root, stamp = base / "rootfs", base / "stamp"
    if stamp.is_file() and stamp.read_text() == MINBASE_STAMP and root.is_dir():
        return root
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    try:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(root), debian_mirror()],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)  # never leave a half-built tree behind the stamp
        raise
    stamp.write_text(MINBASE_STAMP)
    return root


def minbase_layers(cache_dir: Path) -> list[Path]:
    """The minbase rootfs as ONE uncompressed tar on disk (~80 MB), cached next to it."""
    root = minbase_rootfs(cache_dir)
    out = cache_dir / "minbase" / "layer-v2.tar"  # bump the name when the tar options change
    if out.is_file():
        return [out]
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        [
            "tar",
            "--create",
            "--file",
            str(tmp),
            "--directory",
            str(root),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            "--mtime=@0",
            "--format=posix",
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            # debootstrap keeps the downloaded .debs; an image does not need them
            "--exclude=var/cache/apt/archives/*.deb",
            "--exclude=var/lib/apt/lists/*_*",
            *sorted(os.listdir(root)),
        ],
        check=True,
    )
    os.replace(tmp, out)
    return [out]


# -- layouts -----------------------------------------------------------------------


def _chunks(layer: Layer) -> Iterator[bytes]:
    if isinstance(layer, bytes):
        yield layer
        return
    with open(layer, "rb") as fh:
        while block := fh.read(_BLOCK):
            yield block


class _HashingWriter:
    """Counts and hashes what the compressor writes, on its way to a file."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.hash, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = _digest(data)
    path = layout / "blobs" / "sha256" / digest[7:]
    if not path.exists():
        path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _put_layer(layout: Path, layer: Layer, compression: Compression) -> tuple[dict[str, Any], str]:
    """Compress a layer into the layout; returns (descriptor, diff_id)."""
    blobs = layout / "blobs" / "sha256"
    diff = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".tmp-")
    with os.fdopen(fd, "wb") as raw:
        out = _HashingWriter(raw)
        if compression == "gzip":
            with gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0, compresslevel=6) as gz:
                for block in _chunks(layer):
                    diff.update(block)
                    gz.write(block)
        elif compression == "zstd":
            cctx = zstandard.ZstdCompressor(level=3)
            with cctx.stream_writer(cast(IO[bytes], out), closefd=False) as zw:
                for block in _chunks(layer):
                    diff.update(block)
                    zw.write(block)
        else:
            for block in _chunks(layer):
                diff.update(block)
                out.write(block)
    digest = "sha256:" + out.hash.hexdigest()
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, blobs / digest[7:])
    desc = {"mediaType": LAYER_MEDIA[compression], "digest": digest, "size": out.size}
    return desc, "sha256:" + diff.hexdigest()


def _init_layout(layout: Path) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))


def _write_image(
    layout: Path,
    layers: list[Layer],
    platform: str,
    compression: Compression | list[Compression],
    config_extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """Blobs for one image; returns the manifest descriptor (with platform)."""
    os_, arch, *variant = platform.split("/")
    per_layer = compression if isinstance(compression, list) else [compression] * len(layers)
    if len(per_layer) != len(layers):
        raise ValueError(f"{len(per_layer)} compressions given for {len(layers)} layers")
    descs, diff_ids = [], []
    for layer, comp in zip(layers, per_layer, strict=True):
        desc, diff_id = _put_layer(layout, layer, comp)
        descs.append(desc)
        diff_ids.append(diff_id)
    config: dict[str, Any] = {
        "architecture": arch,
        "os": os_,
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if variant:
        config["variant"] = variant[0]
    config.update(config_extra or {})
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **_put_blob(layout, _json(config))},
        "layers": descs,
    }
    plat: dict[str, str] = {"architecture": arch, "os": os_}
    if variant:
        plat["variant"] = variant[0]
    return {"mediaType": OCI_MANIFEST, **_put_blob(layout, _json(manifest)), "platform": plat}


def _tag(layout: Path, desc: dict[str, Any], tag: str) -> None:
    """Point ``tag`` at ``desc`` in index.json, keeping other tags."""
    index_path = layout / "index.json"
    entries: list[dict[str, Any]] = []
    if index_path.exists():
        entries = json.loads(index_path.read_bytes()).get("manifests", [])
    entries = [e for e in entries if e.get("annotations", {}).get(REF_NAME) != tag]
    entries.append({**desc, "annotations": {REF_NAME: tag}})
    entries.sort(key=lambda e: e["annotations"][REF_NAME])
    index_path.write_bytes(
        _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    )


def write_layout(
    layout: Path,
    layers: list[Layer],
    *,
    tag: str,
    compression: Compression | list[Compression] = "gzip",
    platform: str = "linux/amd64",
    config_extra: dict[str, Any] | None = None,
) -> str:
    """Write (or add a tag to) an OCI image layout; returns the manifest digest.

    ``compression`` is one for all layers or one per layer."""
    _init_layout(layout)
    desc = _write_image(layout, layers, platform, compression, config_extra)
    desc.pop("platform")
    _tag(layout, desc, tag)
    return str(desc["digest"])


def write_index_layout(
    layout: Path, images: dict[str, list[Layer]], *, tag: str, compression: Compression = "gzip"
) -> str:
    """A multi-platform image: one manifest per platform under an OCI index; returns its digest."""
    _init_layout(layout)
    manifests = [
        _write_image(layout, layers, platform, compression, None)
        for platform, layers in sorted(images.items())
    ]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    desc = {"mediaType": OCI_INDEX, **_put_blob(layout, _json(index))}
    _tag(layout, desc, tag)
    return str(desc["digest"])


def push_layout(layout: Path, tag: str, dest: str) -> None:
    """Copy ``oci:LAYOUT:TAG`` to ``docker://DEST`` with skopeo, byte for byte."""
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--insecure-policy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{layout}:{tag}",
            f"docker://{dest}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ociimage", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    bb = sub.add_parser("busybox", help="static busybox image")
    bb.add_argument("--out", type=Path, required=True)
    bb.add_argument("--tag", default="latest")
    bb.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    mb = sub.add_parser("minbase", help="Debian bookworm minbase (debootstrap, cached)")
    mb.add_argument("--out", type=Path, required=True)
    mb.add_argument("--cache", type=Path, required=True)
    mb.add_argument("--tag", default="bookworm-minbase")
    push = sub.add_parser("push", help="push a layout tag to a registry with skopeo")
    push.add_argument("--layout", type=Path, required=True)
    push.add_argument("--tag", required=True)
    push.add_argument("--dest", required=True, help="HOST/REPO:TAG")
    args = parser.parse_args(argv)
    if args.cmd == "busybox":
        digest = write_layout(
            args.out, list(busybox_layers()), tag=args.tag, compression=args.compression
        )
    elif args.cmd == "minbase":
        digest = write_layout(args.out, list(minbase_layers(args.cache)), tag=args.tag)
    else:
        push_layout(args.layout, args.tag, args.dest)
        return 0
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
