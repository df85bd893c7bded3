"""The rootfs block table (``spore-blocktable/v1``): BLAKE3 per fixed-size block.

A restore used to hash the whole rootfs image before the VM started (GiBs for a
distro image, on every ``run --from``). Instead, when the image is installed
into the store its bytes are hashed once more per block into a table; the
manifest names the table by digest (``rootfs.table``); a restore fetches the
table through the chunk store (re-hashed against that digest: cheap), and the
virtio-blk device checks each block on the guest's first read of it
(``BlockTable.check``), remembering verified blocks in a bitmap.

Table bytes (docs/spore-format.md, "rootfs.table")::

    magic       16 bytes  b"spore-blktab/v1\\0"
    block_size  u64 LE    a power of two, MIN_BLOCK .. MAX_BLOCK
    image_size  u64 LE    1 .. MAX_IMAGE
    digests     32 bytes each, one per block, ceil(image_size / block_size) of them:
                BLAKE3-256 of that block's bytes (the last block may be shorter)

The table reaches a restore from a store or a bundle, so ``decode`` is strict:
exact magic, header values equal to what the manifest says, exact length. Its
digest is BLAKE3 of all of these bytes, so the header binds block size and
image size to the root digest the manifest records.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import blake3

from sporevm.atomic import publish
from sporevm.errors import SporeError
from sporevm.store import Store

MAGIC = b"spore-blktab/v1\0"
_HEADER = struct.Struct("<16sQQ")
HEADER_SIZE = _HEADER.size  # 32
DIGEST = 32
MIN_BLOCK = 4096
MAX_BLOCK = 16 << 20
DEFAULT_BLOCK = 64 << 10  # a guest readahead window: one hash per request, little waste
MAX_TABLE = 16 << 20  # a chunk-store object (chunks.MAX_OBJECT)
MAX_IMAGE = 1 << 50  # manifest rootfs.size bound
_READ = 4 << 20  # bytes per read while building (a multiple of every block size we pick)


class BlockTableError(SporeError):
    """A block table is malformed, does not fit its manifest, or a block does not match."""


def block_count(image_size: int, block_size: int) -> int:
    return -(-image_size // block_size)


def table_size(image_size: int, block_size: int) -> int:
    return HEADER_SIZE + DIGEST * block_count(image_size, block_size)


def check_geometry(image_size: int, block_size: int, what: str) -> None:
    """Block size a power of two in bounds, and a table that fits a chunk-store object."""
    if not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise BlockTableError(
            f"{what}: block size {block_size} is not a power of two in {MIN_BLOCK}..{MAX_BLOCK}"
        )
    if not 1 <= image_size <= MAX_IMAGE:
        raise BlockTableError(f"{what}: image size {image_size} is not in 1..{MAX_IMAGE}")
    if table_size(image_size, block_size) > MAX_TABLE:
        raise BlockTableError(
            f"{what}: {block_count(image_size, block_size)} blocks of {block_size} B make a "
            f"table over {MAX_TABLE} B; a larger block size is needed"
        )


def choose_block_size(image_size: int) -> int:
    """DEFAULT_BLOCK, doubled until the table fits (64 KiB blocks up to 32 GiB images)."""
    bs = DEFAULT_BLOCK
    while table_size(image_size, bs) > MAX_TABLE and bs < MAX_BLOCK:
        bs *= 2
    check_geometry(image_size, bs, "rootfs")
    return bs


def table_id(table: bytes) -> str:
    return "blake3:" + blake3.blake3(table).hexdigest()


def encode(block_size: int, image_size: int, digests: bytes) -> bytes:
    check_geometry(image_size, block_size, "block table")
    if len(digests) != DIGEST * block_count(image_size, block_size):
        raise BlockTableError("block table: digest count does not match the image size")
    return _HEADER.pack(MAGIC, block_size, image_size) + digests


def decode(data: bytes, *, block_size: int, image_size: int, what: str = "block table") -> bytes:
    """The digests of a table that must describe ``image_size`` bytes in ``block_size``
    blocks (what the manifest says); anything else is a one-line BlockTableError."""
    if len(data) < HEADER_SIZE:
        raise BlockTableError(f"{what}: {len(data)} bytes, shorter than its header")
    magic, got_block, got_size = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BlockTableError(f"{what}: not a spore-blktab/v1 table (magic {magic[:16]!r})")
    check_geometry(got_size, got_block, what)
    if (got_block, got_size) != (block_size, image_size):
        raise BlockTableError(
            f"{what}: describes {got_size} B in {got_block}-byte blocks; the manifest says "
            f"{image_size} B in {block_size}-byte blocks"
        )
    want = table_size(image_size, block_size)
    if len(data) != want:
        raise BlockTableError(f"{what}: {len(data)} bytes; {want} expected for this image")
    return data[HEADER_SIZE:]


@dataclass(frozen=True)
class Hashed:
    """One read of an image: its whole-file digest, size and block table."""

    digest: str
    size: int
    table: bytes
    block_size: int

    @property
    def table_digest(self) -> str:
        return table_id(self.table)


def hash_image(fd: int, block_size: int | None = None) -> Hashed:
    """Read the file behind ``fd`` once: BLAKE3 of the whole (``rootfs.digest``) and the
    block table. ``block_size`` defaults to ``choose_block_size`` of the file's size."""
    size = os.fstat(fd).st_size
    bs = choose_block_size(max(size, 1)) if block_size is None else block_size
    check_geometry(max(size, 1), bs, "rootfs")
    whole = blake3.blake3(max_threads=blake3.blake3.AUTO)
    digests = bytearray()
    step = max(_READ, bs)
    offset = 0
    while offset < size:
        data = os.pread(fd, min(step, size - offset), offset)
        if not data:
            raise BlockTableError(f"rootfs: file shrank to {offset} B while it was hashed")
        whole.update(data)
        view = memoryview(data)
        for at in range(0, len(view), bs):
            digests += blake3.blake3(view[at : at + bs]).digest()
        offset += len(data)
        if len(data) % bs and offset < size:
            raise BlockTableError("rootfs: short read inside the image while hashing it")
    if os.fstat(fd).st_size != size:
        raise BlockTableError("rootfs: file changed size while it was hashed")
    return Hashed("blake3:" + whole.hexdigest(), size, encode(bs, size, bytes(digests)), bs)


def install_rootfs(store: Store, tmp: Path) -> Hashed:
    """Publish a finished ext4 image under its BLAKE3 digest (``Store.install_rootfs``),
    with one read giving that digest and the image's block table; the caller stores the
    table in the chunk store."""
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        hashed = hash_image(fd)
    finally:
        os.close(fd)
    publish(tmp, store.rootfs_path(hashed.digest))
    return hashed


class BlockTable:
    """The check of an open image against a decoded table, block by block.

    ``verified`` is the bitmap of blocks already checked on this open file; it starts
    empty for every table (a restore re-opens the file and checks afresh) and is never
    part of a snapshot.
    """

    def __init__(self, digests: bytes, block_size: int, image_size: int) -> None:
        check_geometry(image_size, block_size, "block table")
        if len(digests) != DIGEST * block_count(image_size, block_size):
            raise BlockTableError("block table: digest count does not match the image size")
        self.digests = digests
        self.block_size = block_size
        self.image_size = image_size
        self.blocks = block_count(image_size, block_size)
        self.verified = bytearray((self.blocks + 7) // 8)
        self.unverified = self.blocks  # 0: every read takes the plain path at once

    @classmethod
    def from_table(cls, data: bytes, *, block_size: int, image_size: int) -> BlockTable:
        return cls(
            decode(data, block_size=block_size, image_size=image_size), block_size, image_size
        )

    def is_verified(self, block: int) -> bool:
        return bool(self.verified[block >> 3] & (1 << (block & 7)))

    def span(self, block: int) -> tuple[int, int]:
        """(offset, length) of ``block`` in the image."""
        start = block * self.block_size
        return start, min(self.block_size, self.image_size - start)

    def check(self, block: int, data: bytes | bytearray | memoryview) -> bool:
        """True if ``data`` is exactly block ``block``; then it is marked verified."""
        if not 0 <= block < self.blocks or len(data) != self.span(block)[1]:
            return False
        at = block * DIGEST
        if blake3.blake3(data).digest() != self.digests[at : at + DIGEST]:
            return False
        if not self.is_verified(block):
            self.verified[block >> 3] |= 1 << (block & 7)
            self.unverified -= 1
        return True

    def all_verified(self, first: int, last: int) -> bool:
        """Whether every block in ``first..last`` (inclusive) is verified already."""
        return not self.unverified or all(self.is_verified(b) for b in range(first, last + 1))
