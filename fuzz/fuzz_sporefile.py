"""Fuzz the Sporefile loader (YAML -> schema -> model): only SporeError may escape."""

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm import sporefile
    from sporevm.errors import SporeError

# A small build context so files/kernel/output checks run for real, including a symlink
# that escapes the context and one that loops.
_CTX = Path(tempfile.mkdtemp(prefix="fuzz-sporefile-")).resolve()
(_CTX / "app").mkdir()
(_CTX / "app" / "serve").write_text("#!/bin/sh\n")
(_CTX / "bzImage").write_bytes(b"kernel")
os.symlink("/etc", _CTX / "escape")
os.symlink("loop", _CTX / "loop")
_PATH = _CTX / "Sporefile"


def TestOneInput(data: bytes) -> None:
    try:
        sf = sporefile.loads(data, _PATH)
    except SporeError:
        return
    # Whatever loads must be usable by the build: canonical forms encode, paths stay inside.
    for step in sf.steps:
        sporefile.canonical_step(step)
    sporefile.canonical_machine(sf.machine)
    for f in sf.files:
        assert f.src.is_relative_to(_CTX), f.src
    assert sf.output.spore.is_relative_to(_CTX) and sf.output.bundle.is_relative_to(_CTX)
    assert sporefile.MIN_MEMORY <= sf.machine.memory <= sporefile.MAX_MEMORY


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
