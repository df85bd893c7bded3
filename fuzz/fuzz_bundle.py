"""Fuzz bundle metadata: bundle.json alone, or every metadata file of a bundle at once.

Input without the separator is a bundle.json; with it, the parts are the
metadata files in identity order (bundle.json, chunkpack.index.json,
rootfs.index.json, manifests…) and go through ``assemble``'s cross-checks. Only
SporeError may escape; whatever decodes re-encodes to exactly the input bytes.
"""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.dist import bundle
    from sporevm.errors import SporeError

SEP = b"\n--\n"


def TestOneInput(data: bytes) -> None:
    parts = data.split(SEP)
    try:
        doc = bundle.decode(parts[0])
    except SporeError:
        return
    assert bundle.encode(doc) == parts[0]
    if len(parts) == 1:
        return
    names = bundle.metadata_names(doc)
    try:
        meta = bundle.assemble(list(zip(names, parts, strict=False)))
    except SporeError:
        return
    assert meta.digest == bundle.identity(list(zip(names, parts, strict=True)))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
