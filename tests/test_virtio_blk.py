"""virtio-blk on a read-only backing file, driven like the Linux driver would."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sporevm.spore import blocktable
from sporevm.vmm.devices.virtio import blk, mmio
from sporevm.vmm.devices.virtio.state import VirtioStateError
from sporevm.vmm.memory import PAGE
from tests.virtio_driver import RAM, Driver, DriverQueue, make

SECTORS = 64
SERIAL = b"sha256:0123456789ab"


def pattern(sector: int, count: int = 1) -> bytes:
    return b"".join(struct.pack("<I", s) * (blk.SECTOR // 4) for s in range(sector, sector + count))


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(pattern(0, SECTORS) + b"tail")  # a trailing partial sector is hidden
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def dev(disk: int) -> tuple[mmio.VirtioMmio, Driver, DriverQueue]:
    size = os.fstat(disk).st_size
    t, d, _ = make(blk.BlkDevice(disk, size, serial=SERIAL))
    (q,) = d.bring_up(1)
    return t, d, q


def request(d: Driver, q: DriverQueue, rtype: int, sector: int, data_len: int) -> tuple[int, int]:
    """Post header / data / status as three descriptors; returns (data addr, status addr)."""
    hdr = d.alloc.buf(struct.pack("<IIQ", rtype, 0, sector))
    data = d.alloc(max(data_len, 1), 512)
    status = d.alloc(1)
    d.mem.write(status, b"\xff")
    bufs = [(hdr, 16, False)]
    if data_len:
        bufs.append((data, data_len, rtype != blk.T_OUT))
    bufs.append((status, 1, True))
    q.add(bufs)
    d.kick(0)
    return data, status


def test_config_space(dev: tuple[mmio.VirtioMmio, Driver, DriverQueue]) -> None:
    t, d, _ = dev
    assert d.r32(mmio.REG_DEVICE_ID) == 2
    feats = d.device_features()
    for f in (blk.F_RO, blk.F_SEG_MAX, blk.F_SIZE_MAX, blk.F_BLK_SIZE, blk.F_FLUSH):
        assert feats & f
    cfg = t.read(0x100, 8) + t.read(0x108, 4) + t.read(0x10C, 4)
    capacity, size_max, seg_max = struct.unpack("<QII", cfg)
    assert (capacity, size_max, seg_max) == (SECTORS, blk.SIZE_MAX, blk.SEG_MAX)
    assert t.read(0x114, 4) == struct.pack("<I", 512)
    assert t.read(0x100, 1) == bytes([SECTORS])  # byte-wide config reads work
    assert t.read(0x100 + blk.CONFIG_SIZE, 4) == bytes(4)  # beyond: zeros


def test_read_sectors(dev: tuple[mmio.VirtioMmio, Driver, DriverQueue]) -> None:
    _, d, q = dev
    d.mem.vmm_dirty[:] = bytes(len(d.mem.vmm_dirty))
    data, status = request(d, q, blk.T_IN, 5, 3 * 512)
    assert d.mem.read(status, 1) == b"\x00"
    assert d.mem.read(data, 3 * 512) == pattern(5, 3)
    assert q.take_used() == [(0, 3 * 512 + 1)]
    assert d.mem.vmm_dirty[data // PAGE]  # VMM writes are visible to snapshots


def test_read_last_sector_and_zero_length(dev: tuple[mmio.VirtioMmio, Driver, DriverQueue]) -> None:
    _, d, q = dev
    data, status = request(d, q, blk.T_IN, SECTORS - 1, 512)
    assert d.mem.read(status, 1) == b"\x00" and d.mem.read(data, 512) == pattern(SECTORS - 1)
    _, status = request(d, q, blk.T_IN, SECTORS, 0)
    assert d.mem.read(status, 1) == b"\x00"


def test_read_scattered_with_split_header_and_status_in_data(
    dev: tuple[mmio.VirtioMmio, Driver, DriverQueue],
) -> None:
    _, d, q = dev
    hdr = struct.pack("<IIQ", blk.T_IN, 0, 2)
    h1, h2 = d.alloc.buf(hdr[:5]), d.alloc.buf(hdr[5:])
    a, b = d.alloc(100), d.alloc(1024 - 100 + 1)  # status byte is the last byte of b
    q.add([(h1, 5, False), (h2, 11, False), (a, 100, True), (b, 1024 - 100 + 1, True)])
    d.kick(0)
    assert d.mem.read(a, 100) + d.mem.read(b, 1024 - 100) == pattern(2, 2)
    assert d.mem.read(b + 1024 - 100, 1) == b"\x00"


def test_read_through_indirect_table(dev: tuple[mmio.VirtioMmio, Driver, DriverQueue]) -> None:
    _, d, q = dev
    hdr = d.alloc.buf(struct.pack("<IIQ", blk.T_IN, 0, 9))
    segs = [d.alloc(512) for _ in range(4)]
    status = d.alloc(1)
    q.add_indirect([(hdr, 16, False), *[(s, 512, True) for s in segs], (status, 1, True)], d.alloc)
    d.kick(0)
    assert b"".join(d.mem.read(s, 512) for s in segs) == pattern(9, 4)
    assert d.mem.read(status, 1) == b"\x00"


@pytest.mark.parametrize(
    "rtype,sector,length,expect",
    [
        (blk.T_IN, SECTORS, 512, blk.S_IOERR),  # past the end
        (blk.T_IN, SECTORS - 1, 1024, blk.S_IOERR),  # straddles the end
        (blk.T_IN, (1 << 64) - 1, 512, blk.S_IOERR),  # huge sector number
        (blk.T_IN, 0, 100, blk.S_IOERR),  # not a multiple of 512
        (blk.T_OUT, 0, 512, blk.S_IOERR),  # read-only
        (blk.T_FLUSH, 0, 0, blk.S_OK),
        (blk.T_GET_ID, 0, 20, blk.S_OK),
        (11, 0, 512, blk.S_UNSUPP),  # DISCARD: not offered
        (0xFFFF_FFFF, 0, 0, blk.S_UNSUPP),
    ],
)
def test_request_status(
    dev: tuple[mmio.VirtioMmio, Driver, DriverQueue],
    rtype: int,
    sector: int,
    length: int,
    expect: int,
) -> None:
    t, d, q = dev
    _, status = request(d, q, rtype, sector, length)
    assert d.mem.read(status, 1) == bytes([expect])
    assert not t.needs_reset_pending


def test_out_writes_nothing(dev: tuple[mmio.VirtioMmio, Driver, DriverQueue], disk: int) -> None:
    _, d, q = dev
    data, _ = request(d, q, blk.T_OUT, 0, 512)
    assert os.pread(disk, 512, 0) == pattern(0)
    del data


def test_get_id(dev: tuple[mmio.VirtioMmio, Driver, DriverQueue]) -> None:
    _, d, q = dev
    data, _ = request(d, q, blk.T_GET_ID, 0, 20)
    assert d.mem.read(data, 20) == SERIAL + b"\0"
    assert q.take_used() == [(0, 21)]


def test_short_header_is_ioerr(dev: tuple[mmio.VirtioMmio, Driver, DriverQueue]) -> None:
    t, d, q = dev
    status = d.alloc(1)
    q.add([(d.alloc.buf(b"\0" * 8), 8, False), (status, 1, True)])
    d.kick(0)
    assert d.mem.read(status, 1) == bytes([blk.S_IOERR]) and not t.needs_reset_pending


def test_missing_status_byte_resets_device(
    dev: tuple[mmio.VirtioMmio, Driver, DriverQueue],
) -> None:
    t, d, q = dev
    q.add([(d.alloc.buf(struct.pack("<IIQ", blk.T_IN, 0, 0)), 16, False)])
    d.kick(0)
    assert t.needs_reset_pending and "status byte" in t.error


def test_oversized_segment_is_ioerr(disk: int) -> None:
    t, d, _ = make(blk.BlkDevice(disk, 1 << 30), ram=4 * RAM)
    (q,) = d.bring_up(1)
    _, status = request(d, q, blk.T_IN, 0, blk.SIZE_MAX + 512)
    assert d.mem.read(status, 1) == bytes([blk.S_IOERR]) and not t.needs_reset_pending


def test_backing_file_shorter_than_declared(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(pattern(0, 2))
    fd = os.open(path, os.O_RDONLY)
    try:
        t, d, _ = make(blk.BlkDevice(fd, 8 * 512))
        (q,) = d.bring_up(1)
        _, status = request(d, q, blk.T_IN, 1, 2 * 512)
        assert d.mem.read(status, 1) == bytes([blk.S_IOERR])
    finally:
        os.close(fd)


def test_many_requests_in_one_kick(dev: tuple[mmio.VirtioMmio, Driver, DriverQueue]) -> None:
    _, d, q = dev
    statuses = []
    for i in range(40):
        hdr = d.alloc.buf(struct.pack("<IIQ", blk.T_IN, 0, i))
        data, status = d.alloc(512), d.alloc(1)
        q.add([(hdr, 16, False), (data, 512, True), (status, 1, True)])
        statuses.append((data, status, i))
    d.kick(0)
    assert len(q.take_used()) == 40
    for data, status, i in statuses:
        assert d.mem.read(status, 1) == b"\0" and d.mem.read(data, 512) == pattern(i)


def test_state_carries_disk_identity(disk: int) -> None:
    size = os.fstat(disk).st_size
    t, d, _ = make(blk.BlkDevice(disk, size, serial=SERIAL))
    d.bring_up(1)
    state = t.state()
    assert state["device"] == {"capacity": SECTORS, "serial": SERIAL.hex()}
    t2, _, _ = make(blk.BlkDevice(disk, size, serial=SERIAL))
    t2.restore(state)
    t3, _, _ = make(blk.BlkDevice(disk, size - 1024, serial=SERIAL))
    with pytest.raises(VirtioStateError, match="different backing disk"):
        t3.restore(state)


# -- with a block table: each block checked on the guest's first read --------------------------

TABLE_BLOCK = 4096  # 8 sectors per table block; the disk above is 8 blocks and a 4-byte tail


def table_bytes(path: Path, content: bytes) -> bytes:
    """The block table of ``content`` (written beside ``path`` to hash it)."""
    src = path.with_suffix(".orig")
    src.write_bytes(content)
    sfd = os.open(src, os.O_RDONLY)
    try:
        return blocktable.hash_image(sfd, TABLE_BLOCK).table
    finally:
        os.close(sfd)


@dataclass
class Tabled:
    dev: blk.BlkDevice
    d: Driver
    q: DriverQueue
    reports: list[str]
    fd: int


def tabled(path: Path, table_of: bytes | None = None) -> Tabled:
    """A blk device on ``path`` checked against the table of ``table_of`` (default: the
    file's own bytes), as a restore attaches it: the file opened afresh, its size taken."""
    table = table_bytes(path, path.read_bytes() if table_of is None else table_of)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    size = os.fstat(fd).st_size
    try:
        t = blocktable.BlockTable.from_table(table, block_size=TABLE_BLOCK, image_size=size)
    except blocktable.BlockTableError:
        os.close(fd)
        raise
    reports: list[str] = []
    dev = blk.BlkDevice(fd, size, table=t, on_bad_block=reports.append)
    _, d, _ = make(dev)
    (q,) = d.bring_up(1)
    return Tabled(dev, d, q, reports, fd)


def corrupt(path: Path, offset: int) -> bytes:
    good = path.read_bytes()
    bad = bytearray(good)
    bad[offset] ^= 0x5A
    path.write_bytes(bytes(bad))
    return good


def test_table_reads_verify_each_block_once(tmp_path: Path) -> None:
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(pattern(0, SECTORS) + b"tail")
    tb = tabled(path)
    d, q, reports, fd, dev = tb.d, tb.q, tb.reports, tb.fd, tb.dev
    try:
        assert dev.table is not None
        # Sectors 6..17 straddle table blocks 0, 1 and 2: all three checked and remembered.
        data, status = request(d, q, blk.T_IN, 6, 12 * 512)
        assert d.mem.read(status, 1) == b"\x00"
        assert d.mem.read(data, 12 * 512) == pattern(6, 12)
        assert [dev.table.is_verified(b) for b in range(4)] == [True, True, True, False]
        data, status = request(d, q, blk.T_IN, 0, 24 * 512)  # now the fast path
        assert d.mem.read(status, 1) == b"\x00"
        assert d.mem.read(data, 24 * 512) == pattern(0, 24)
        data, status = request(d, q, blk.T_IN, SECTORS - 1, 512)  # the last whole sector
        assert d.mem.read(status, 1) == b"\x00"
        assert d.mem.read(data, 512) == pattern(SECTORS - 1)
        assert reports == []
    finally:
        os.close(fd)


def test_a_corrupt_block_fails_its_reads_and_only_those(tmp_path: Path) -> None:
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(pattern(0, SECTORS) + b"tail")
    good = corrupt(path, 3 * TABLE_BLOCK + 700)  # inside sector 25, table block 3
    tb = tabled(path, table_of=good)
    d, q, reports, fd = tb.d, tb.q, tb.reports, tb.fd
    try:
        for sector in (24, 25, 31):  # every sector of block 3 fails, not only sector 25
            data, status = request(d, q, blk.T_IN, sector, 512)
            assert d.mem.read(status, 1) == bytes([blk.S_IOERR])
            assert d.mem.read(data, 512) == bytes(512)  # no unverified byte reached the guest
        # A request spanning good blocks and the bad one fails whole.
        data, status = request(d, q, blk.T_IN, 16, 16 * 512)
        assert d.mem.read(status, 1) == bytes([blk.S_IOERR])
        # Its neighbours are served.
        for sector in (16, 23, 32, 40):
            data, status = request(d, q, blk.T_IN, sector, 512)
            assert d.mem.read(status, 1) == b"\x00"
            assert d.mem.read(data, 512) == pattern(sector)
        assert len(reports) == 1, reports  # once per block, however often the guest retries
        assert reports[0].startswith("rootfs block 3 (bytes 12288..16383)"), reports
    finally:
        os.close(fd)


@pytest.mark.parametrize("change", ["truncated", "extended", "swapped"])
def test_a_file_changed_between_restores_is_caught(tmp_path: Path, change: str) -> None:
    """Each restore opens the file again with an empty bitmap: a block verified by an
    earlier VM is checked again, so a file swapped in between cannot pass."""
    path = tmp_path / "rootfs.ext4"
    original = pattern(0, SECTORS) + b"tail"
    path.write_bytes(original)
    tb = tabled(path)
    data, status = request(tb.d, tb.q, blk.T_IN, 0, SECTORS * 512)
    assert tb.d.mem.read(status, 1) == b"\x00"
    os.close(tb.fd)
    if change == "swapped":  # same size, other bytes in block 5
        path.write_bytes(original[: 5 * TABLE_BLOCK] + bytes(TABLE_BLOCK) + original[24576:])
        tb = tabled(path, table_of=original)
        d, q, reports, fd = tb.d, tb.q, tb.reports, tb.fd
        try:
            data, status = request(d, q, blk.T_IN, 0, SECTORS * 512)
            assert d.mem.read(status, 1) == bytes([blk.S_IOERR])
            assert reports and reports[0].startswith("rootfs block 5 ")
        finally:
            os.close(fd)
        return
    changed = original[:-5] if change == "truncated" else original + b"more"
    path.write_bytes(changed)
    with pytest.raises(blocktable.BlockTableError, match="the manifest says"):
        tabled(path, table_of=original)  # the table describes another size: refused
    # The monitor compares the size with the manifest; a device given a table for
    # another size refuses to exist.
    fd = os.open(path, os.O_RDONLY)
    try:
        t = blocktable.BlockTable.from_table(
            table_bytes(path, original), block_size=TABLE_BLOCK, image_size=len(original)
        )
        with pytest.raises(ValueError, match="block table covers"):
            blk.BlkDevice(fd, len(changed), table=t)
    finally:
        os.close(fd)


def test_a_file_shrunk_under_a_running_vm_fails_reads(tmp_path: Path) -> None:
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(pattern(0, SECTORS) + b"tail")
    tb = tabled(path)
    d, q, reports, fd = tb.d, tb.q, tb.reports, tb.fd
    try:
        os.truncate(path, 6 * TABLE_BLOCK + 100)
        data, status = request(d, q, blk.T_IN, 48, 8 * 512)  # block 6: now short
        assert d.mem.read(status, 1) == bytes([blk.S_IOERR])
        assert reports and reports[0].startswith("rootfs block 6 ")
    finally:
        os.close(fd)
