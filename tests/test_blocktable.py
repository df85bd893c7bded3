"""The rootfs block table: built in one read with the image digest, strict to decode,
and the check the blk device runs on each block's first read."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from sporevm.spore import blocktable as bt
from sporevm.store import blake3_file

BS = 4096


def image(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(bytes((i * 7 + i // 4096) & 0xFF for i in range(size)))
    return path


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = image(tmp_path, 5 * BS + 1000)  # a short last block
    fd = os.open(path, os.O_RDONLY)
    yield path, fd
    os.close(fd)


def test_hash_image_gives_the_file_digest_and_one_digest_per_block(
    opened: tuple[Path, int],
) -> None:
    path, fd = opened
    h = bt.hash_image(fd, BS)
    assert (h.digest, h.size) == blake3_file(path)
    data = path.read_bytes()
    digests = bt.decode(h.table, block_size=BS, image_size=len(data))
    assert len(digests) == 6 * bt.DIGEST
    for b in range(6):
        block = data[b * BS : (b + 1) * BS]
        assert digests[b * 32 : (b + 1) * 32] == blake3.blake3(block).digest()
    assert h.table_digest == "blake3:" + blake3.blake3(h.table).hexdigest()
    assert bt.encode(BS, len(data), digests) == h.table  # one byte form


def test_default_block_size_grows_only_when_the_table_would_not_fit() -> None:
    assert bt.choose_block_size(16 << 20) == 64 << 10
    assert bt.choose_block_size((32 << 30) - (64 << 10)) == 64 << 10
    assert bt.choose_block_size(32 << 30) == 128 << 10  # 512 Ki blocks + header > 16 MiB
    assert bt.choose_block_size(64 << 30) == 256 << 10  # the largest rootfs spore builds
    assert bt.table_size(64 << 30, 256 << 10) <= bt.MAX_TABLE
    assert bt.choose_block_size(1 << 40) == 4 << 20


def test_check_marks_verified_blocks_and_refuses_others(opened: tuple[Path, int]) -> None:
    path, fd = opened
    data = path.read_bytes()
    t = bt.BlockTable.from_table(bt.hash_image(fd, BS).table, block_size=BS, image_size=len(data))
    assert t.blocks == 6 and not any(t.verified)
    assert t.span(5) == (5 * BS, 1000)
    assert t.check(1, data[BS : 2 * BS]) and t.is_verified(1)
    assert not t.is_verified(0) and not t.all_verified(0, 1)
    corrupt = bytearray(data[2 * BS : 3 * BS])
    corrupt[100] ^= 1
    assert not t.check(2, corrupt) and not t.is_verified(2)
    assert not t.check(3, data[3 * BS : 4 * BS - 1])  # truncated block
    assert not t.check(3, data[3 * BS : 4 * BS] + b"x")  # extended block
    assert not t.check(5, data[5 * BS :] + bytes(BS - 1000))  # last block padded
    assert t.check(5, data[5 * BS :])
    assert t.unverified == 4 and t.check(5, data[5 * BS :]) and t.unverified == 4
    for b in (0, 2, 3, 4):
        assert t.check(b, data[b * BS : (b + 1) * BS])
    assert t.unverified == 0 and t.all_verified(0, 5)
    assert not t.check(2, data[BS : 2 * BS])  # another block's bytes
    assert not t.check(6, b"") and not t.check(-1, b"")
    # A fresh table (a new restore) starts with nothing verified.
    again = bt.BlockTable(t.digests, BS, len(data))
    assert not any(again.verified)


def test_decode_refuses_tables_that_do_not_fit_the_manifest(opened: tuple[Path, int]) -> None:
    path, fd = opened
    size = os.fstat(fd).st_size
    table = bt.hash_image(fd, BS).table
    with pytest.raises(bt.BlockTableError, match="8192-byte blocks"):
        bt.decode(table, block_size=2 * BS, image_size=size)  # wrong block size
    with pytest.raises(bt.BlockTableError, match="the manifest says"):
        bt.decode(table, block_size=BS, image_size=size + 1)  # extended image
    with pytest.raises(bt.BlockTableError, match="the manifest says"):
        bt.decode(table, block_size=BS, image_size=size - 1)
    with pytest.raises(bt.BlockTableError, match="expected"):
        bt.decode(table[:-1], block_size=BS, image_size=size)
    with pytest.raises(bt.BlockTableError, match="expected"):
        bt.decode(table + bytes(32), block_size=BS, image_size=size)
    with pytest.raises(bt.BlockTableError, match="magic"):
        bt.decode(b"X" + table[1:], block_size=BS, image_size=size)
    with pytest.raises(bt.BlockTableError, match="shorter than its header"):
        bt.decode(table[:31], block_size=BS, image_size=size)


@pytest.mark.parametrize(
    ("block_size", "image_size", "match"),
    [
        (0, 1, "power of two"),
        (3 * 4096, 1 << 20, "power of two"),
        (2048, 1 << 20, "power of two"),
        (32 << 20, 1 << 30, "power of two"),
        (4096, 0, "image size"),
        (4096, (1 << 50) + 1, "image size"),
        (4096, 1 << 40, "larger block size"),
        (1 << 64 - 1, 1, "power of two"),
    ],
)
def test_hostile_headers(block_size: int, image_size: int, match: str) -> None:
    header = struct.pack("<16sQQ", bt.MAGIC, block_size, image_size)
    with pytest.raises(bt.BlockTableError, match=match):
        bt.decode(header, block_size=block_size, image_size=image_size)


def test_hash_image_refuses_a_block_size_out_of_bounds(opened: tuple[Path, int]) -> None:
    _, fd = opened
    with pytest.raises(bt.BlockTableError, match="power of two"):
        bt.hash_image(fd, 1000)
