"""Fuzz store root records (`roots/<hex>.json`, sporevm/storeroots.py): only RootError may
escape decoding; what decodes re-encodes to the same bytes; reading the record from a
store directory and probing a spore directory whose `id` holds the same bytes never
raise and never report a live spore that is not one."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm import storeroots
    from sporevm.errors import StoreError

WORK = Path(tempfile.mkdtemp(prefix="spore-fuzz-roots-"))
atexit.register(shutil.rmtree, WORK, True)
(WORK / "roots").mkdir()
SPORE = WORK / "x.spore"
SPORE.mkdir()
(SPORE / "manifest.json").write_bytes(b"{}")
NAME = "ab" * 32 + ".json"
MID = "blake3:" + "cd" * 32


def TestOneInput(data: bytes) -> None:
    try:
        root = storeroots.decode(data)
    except StoreError:
        root = None
    if root is not None:
        assert storeroots.encode(root) == data
        assert storeroots.decode(storeroots.encode(root)) == root
        assert len(root.name()) == 69 and root.path.startswith("/")
    (WORK / "roots" / NAME).write_bytes(data)
    fd = os.open(WORK, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (stored,) = list(storeroots.read_all(fd))
    finally:
        os.close(fd)
    assert stored.root == root and stored.error is not None  # a fixed name never matches
    (SPORE / "id").write_bytes(data)
    p = storeroots.probe(storeroots.Root(str(SPORE), MID))
    assert p.state in ("replaced", "gone"), p  # manifest.json never hashes to MID


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
