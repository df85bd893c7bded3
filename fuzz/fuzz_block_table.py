"""Fuzz the rootfs block table decoder (``spore-blktab/v1``) and the per-block check.

The table comes from a store or a bundle (a peer's), named by the manifest's
``rootfs.table`` digest. Only SporeError may escape ``decode``; a table that
decodes re-encodes to exactly the input bytes, and checking any block against
it (right length or not) returns a bool and marks only a block that matched.
The sizes the "manifest" expects are the input's own header when there is one
(so the fuzzer reaches the length checks), else fixed.
"""

import struct
import sys

import atheris

with atheris.instrument_imports():
    from sporevm.errors import SporeError
    from sporevm.spore import blocktable


def TestOneInput(data: bytes) -> None:
    if len(data) >= blocktable.HEADER_SIZE:
        block_size, image_size = struct.unpack_from("<QQ", data, 16)
    else:
        block_size, image_size = 4096, 4096
    try:
        digests = blocktable.decode(data, block_size=block_size, image_size=image_size)
    except SporeError:
        return
    assert blocktable.encode(block_size, image_size, digests) == data
    t = blocktable.BlockTable(digests, block_size, image_size)
    body = data[blocktable.HEADER_SIZE :]
    for block in (0, t.blocks - 1, t.blocks, -1):
        size = t.span(block)[1] if 0 <= block < t.blocks else 1
        probe = (body * (size // max(len(body), 1) + 1))[:size] if body else bytes(size)
        before = 0 <= block < t.blocks and t.is_verified(block)
        ok = t.check(block, probe)
        if 0 <= block < t.blocks:
            assert t.is_verified(block) == (before or ok)
        else:
            assert not ok


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
