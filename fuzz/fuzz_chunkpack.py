"""Fuzz the chunk pack index decoder: only SporeError may escape, and whatever decodes
re-encodes to exactly the input bytes (tiling and names checked on both paths)."""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.dist import chunkpack
    from sporevm.errors import SporeError


def TestOneInput(data: bytes) -> None:
    try:
        index = chunkpack.decode(data)
    except SporeError:
        return
    assert chunkpack.encode(index) == data
    for i in range(len(index.packs)):
        assert sum(p.size for _, p in index.contents(i)) == index.packs[i].size


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
