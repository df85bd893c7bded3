"""Fuzz layer application: bytes -> one or two layers under /tmp; only SporeError may escape.

Input: one flag byte, then the blob. Flag bit 0: the body is a tar to gzip (so the
tar parser sees it); bit 1: the body is declared gzip as is (fuzzes the gzip
decoder); bit 2: split the body in two layers at the offset in the next two bytes;
bit 3: recompute the checksum of every block that looks like a ustar header, so
mutations get past the checksum into the member logic.
After every input the work directory must hold nothing but our blobs: a layer
that made us write beside dest would show up there.
"""

import gzip
import hashlib
import os
import shutil
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm.build.layers import Layer, Limits, apply_layers
    from sporevm.errors import SporeError

# libFuzzer exits without running Python's atexit hooks, so each run removes
# the work directories that dead runs left behind.
for _old in Path("/tmp").glob("fuzz-layers-*"):
    if not Path("/proc", _old.name.rpartition("-")[2]).exists():
        shutil.rmtree(_old, ignore_errors=True)
_WORK = Path(f"/tmp/fuzz-layers-{os.getpid()}")
_WORK.mkdir()
_LIMITS = Limits(
    max_entries=256,
    max_total_bytes=1 << 20,
    max_name_bytes=1024,
    max_header_bytes=64 << 10,
    max_depth=32,
    max_stream_bytes=8 << 20,
)
_TAR = "application/vnd.oci.image.layer.v1.tar"
_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _layer(i: int, blob: bytes, media_type: str) -> Layer:
    path = _WORK / f"blob{i}"
    path.write_bytes(blob)
    return Layer("sha256:" + hashlib.sha256(blob).hexdigest(), media_type, path)


def _fix_checksums(body: bytes) -> bytes:
    out = bytearray(body)
    for off in range(0, len(out) - 511, 512):
        if out[off + 257 : off + 262] == b"ustar":
            out[off + 148 : off + 156] = b" " * 8
            out[off + 148 : off + 156] = b"%06o\0 " % sum(out[off : off + 512])
    return bytes(out)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    flag, body = data[0], data[1:]
    if flag & 8:
        body = _fix_checksums(body)
    parts = [body]
    if flag & 4 and len(body) >= 2:
        cut = int.from_bytes(body[:2], "big") * 512
        parts = [body[2 : 2 + cut], body[2 + cut :]]
    layers = []
    for i, part in enumerate(parts):
        if flag & 1:
            layers.append(_layer(i, gzip.compress(part, mtime=0), _GZIP))
        elif flag & 2:
            layers.append(_layer(i, part, _GZIP))
        else:
            layers.append(_layer(i, part, _TAR))
    dest = _WORK / "root"
    try:
        apply_layers(layers, dest, _LIMITS)
    except SporeError:
        if dest.exists():
            raise AssertionError("a failed apply left dest behind") from None
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    extra = set(os.listdir(_WORK)) - {f"blob{i}" for i in range(len(layers))}
    if extra:
        raise AssertionError(f"layer application wrote outside dest: {sorted(extra)}")
    for i in range(len(layers)):
        (_WORK / f"blob{i}").unlink()


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
