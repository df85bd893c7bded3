"""Fuzz layer application: bytes -> one or two layers under /tmp; only SporeError may escape.

Input: one flag byte, then the blob. Flag bit 0: the body is a tar to gzip (so the
tar parser sees it); bit 1: the body is declared gzip as is (fuzzes the gzip
decoder); bit 2: split the body in two layers at the offset in the next two bytes.
After every input the work directory must hold nothing but our blobs: a layer
that made us write beside dest would show up there.
"""

import atexit
import gzip
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm.build.layers import Layer, Limits, apply_layers
    from sporevm.errors import SporeError

_WORK = Path(tempfile.mkdtemp(prefix="fuzz-layers-", dir="/tmp"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)
_LIMITS = Limits(max_entries=256, max_total_bytes=1 << 20, max_name_bytes=1024,
                 max_header_bytes=64 << 10, max_depth=32, max_stream_bytes=8 << 20)
_TAR = "application/vnd.oci.image.layer.v1.tar"
_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _layer(i: int, blob: bytes, media_type: str) -> Layer:
    path = _WORK / f"blob{i}"
    path.write_bytes(blob)
    return Layer("sha256:" + hashlib.sha256(blob).hexdigest(), media_type, path)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    flag, body = data[0], data[1:]
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
