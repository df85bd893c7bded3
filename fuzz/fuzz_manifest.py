"""Fuzz spore manifest decoding: only SporeError may escape, and whatever decodes re-encodes
to exactly the input bytes (a manifest has one byte form, hence one id)."""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.errors import SporeError
    from sporevm.spore import manifest


def TestOneInput(data: bytes) -> None:
    try:
        m = manifest.decode(data)
    except SporeError:
        return
    assert manifest.encode(m) == data
    assert manifest.decode(data) == m


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
