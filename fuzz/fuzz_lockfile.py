"""Fuzz Sporefile.lock decoding: only SporefileError may escape."""

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm.build import lockfile
    from sporevm.errors import SporeError

_PATH = Path("Sporefile.lock")


def TestOneInput(data: bytes) -> None:
    try:
        lock = lockfile.decode(data, _PATH)
    except SporeError:
        return
    # Whatever decodes must re-encode and decode to the same value.
    assert lockfile.decode(lock.encode(), _PATH) == lock


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
