"""Fuzz the rootfs artifact index decoder: only SporeError may escape, and whatever
decodes re-encodes to exactly the input bytes, with segments adding up to each image."""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.dist import rootfs_artifact
    from sporevm.errors import SporeError


def TestOneInput(data: bytes) -> None:
    try:
        index = rootfs_artifact.decode(data)
    except SporeError:
        return
    assert rootfs_artifact.encode(index) == data
    for img in index.images:
        assert sum(s.size for s in img.segments) == img.size


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
