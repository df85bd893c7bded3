"""virtio-blk (device id 2) on a read-only backing file: the rootfs ext4.

The caller opens the file and hands over a file descriptor and a size; we
only ever pread from it. Reads go straight from the file into guest RAM
through writable views (os.preadv, no host-side copy, pages marked dirty).

Request layout (virtio 1.2 §5.2.6) is parsed without assumptions about
framing: the 16-byte header is the first 16 device-readable bytes, the status
is the last device-writable byte, data lies in between. A request we can
answer but not honour gets IOERR or UNSUPP in its status byte; a chain with no
writable byte at all cannot be answered and resets the device.

With a block table (a restored spore's rootfs, sporevm/spore/blocktable.py), each
table block is checked on the guest's first read of it: the block is read into a
host buffer, hashed, and only then copied into guest RAM; later reads of it go
straight from the file. A block that does not match fails the request with IOERR
(its bytes never reach the guest) and is reported once through ``on_bad_block``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from sporevm.spore.blocktable import BlockTable

from .device import VirtioDevice
from .queue import ChainError, DescriptorChain
from .state import State, VirtioStateError, expect_keys, get_hex, get_int

DEVICE_ID = 2
SECTOR = 512  # virtio-blk sectors are always 512 bytes, whatever blk_size says

F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # data segments per request: the header and status take two
SIZE_MAX = 1 << 20  # bytes per data segment
ID_BYTES = 20
CONFIG_SIZE = 64  # through the write-zeroes fields; all beyond blk_size read as zero

_HEADER = struct.Struct("<IIQ")


class BlkDevice(VirtioDevice):
    """Read-only virtio-blk over ``fd`` (not owned: the caller closes it)."""

    device_id = DEVICE_ID
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(
        self,
        fd: int,
        size: int,
        *,
        serial: bytes = b"",
        table: BlockTable | None = None,
        on_bad_block: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"backing size {size} is negative")
        if len(serial) > ID_BYTES:
            raise ValueError(f"serial is {len(serial)} bytes, at most {ID_BYTES}")
        if table is not None and table.image_size != size:
            raise ValueError(f"block table covers {table.image_size} B, the disk is {size} B")
        self.fd = fd
        self.capacity = size // SECTOR  # a trailing partial sector is not exposed
        self.serial = serial
        self.table = table
        self.on_bad_block = on_bad_block
        self.bad_blocks: set[int] = set()  # reported already: a retrying guest says it once

    def features(self) -> int:
        return F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH

    def config(self) -> bytes:
        cfg = bytearray(CONFIG_SIZE)
        struct.pack_into("<QII", cfg, 0, self.capacity, SIZE_MAX, SEG_MAX)
        struct.pack_into("<I", cfg, 20, SECTOR)  # blk_size
        return bytes(cfg)

    def notify(self, index: int) -> None:
        q = self.queues[index]
        done = False
        # At most one ring's worth per kick: a guest that keeps refilling from
        # another vCPU cannot pin this thread; it kicks again for the rest.
        with q.used_batch():
            for _ in range(q.size):
                chain = q.pop()
                if chain is None:
                    break
                q.push_used(chain.head, self._handle(chain))
                done = True
        if done:
            self.link.signal_used(index)

    def _handle(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the number of bytes written for the used ring."""
        wlen = chain.writable_len
        if wlen < 1:
            raise ChainError(chain.head, "blk request has no writable status byte")
        data_len = wlen - 1
        written = 0
        if chain.readable_len < _HEADER.size:
            status = S_IOERR
        else:
            rtype, _reserved, sector = _HEADER.unpack(chain.gather(self.mem, 0, _HEADER.size))
            if rtype == T_IN:
                status = self._read(chain, sector, data_len)
                written = data_len if status == S_OK else 0
            elif rtype == T_OUT:
                status = S_IOERR  # read-only device: spec says IOERR and write nothing
            elif rtype == T_FLUSH:
                status = S_OK  # nothing is ever dirty on a read-only backing file
            elif rtype == T_GET_ID:
                ident = self.serial.ljust(ID_BYTES, b"\0")
                written = chain.scatter(self.mem, 0, ident[: min(ID_BYTES, data_len)])
                status = S_OK
            else:
                status = S_UNSUPP
        chain.scatter(self.mem, data_len, bytes([status]))
        return written + 1

    def _read(self, chain: DescriptorChain, sector: int, length: int) -> int:
        if length % SECTOR:
            return S_IOERR
        if sector + length // SECTOR > self.capacity:
            return S_IOERR
        if any(seg.length > SIZE_MAX for seg in chain.writable):
            return S_IOERR
        if length == 0:
            return S_OK
        offset = sector * SECTOR
        t = self.table
        if t is None or t.all_verified(
            offset // t.block_size, (offset + length - 1) // t.block_size
        ):
            return self._pread(chain.writable_views(self.mem, 0, length), offset)
        # Block by block: verified ones straight from the file, the rest through a check.
        pos, end = offset, offset + length
        while pos < end:
            block = pos // t.block_size
            start, size = t.span(block)
            n = min(end, start + size) - pos
            views = chain.writable_views(self.mem, pos - offset, n)
            if t.is_verified(block):
                status = self._pread(views, pos)
            else:
                status = self._checked(block, start, size, views, pos - start)
            if status != S_OK:
                return status
            pos += n
        return S_OK

    def _pread(self, views: list[memoryview], offset: int) -> int:
        try:
            while views:
                n = os.preadv(self.fd, views, offset)
                if n <= 0:
                    return S_IOERR  # backing file shorter than it claimed
                offset += n
                views = _advance(views, n)
        except OSError:
            return S_IOERR
        return S_OK

    def _checked(
        self, block: int, start: int, size: int, views: list[memoryview], skip: int
    ) -> int:
        """Read table block ``block`` whole, check it, then copy from byte ``skip`` of it
        into ``views``: what the guest gets is exactly what was hashed."""
        assert self.table is not None
        try:
            data = os.pread(self.fd, size, start)
        except OSError:
            data = b""
        if not self.table.check(block, data):
            if block not in self.bad_blocks and self.on_bad_block is not None:
                self.on_bad_block(
                    f"rootfs block {block} (bytes {start}..{start + size - 1}) does not match "
                    "the spore's block table; the guest's read of it failed with an I/O error"
                )
            self.bad_blocks.add(block)
            return S_IOERR
        src = memoryview(data)[skip:]
        for v in views:
            v[:] = src[: len(v)]
            src = src[len(v) :]
        return S_OK

    def state(self) -> State:
        # Only identity: the backing file is reattached by the caller, and a
        # snapshot must not resume against a different disk.
        return {"capacity": self.capacity, "serial": self.serial.hex()}

    def restore(self, state: object) -> None:
        where = "virtio-blk"
        s = expect_keys(state, where, {"capacity", "serial"})
        capacity = get_int(s, where, "capacity", 0, (1 << 64) - 1)
        serial = get_hex(s, where, "serial", ID_BYTES)
        if capacity != self.capacity or serial != self.serial:
            raise VirtioStateError(f"{where}: snapshot was taken with a different backing disk")


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a list of buffers (after a short preadv)."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    if views and n:
        views = [views[0][n:], *views[1:]]
    return views
