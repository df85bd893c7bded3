"""The ext4 builder: reproducible bytes, clean fsck, and the tree reads back exactly."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import blake3
import pytest

from sporevm.build import rootfs
from sporevm.build.imagefs import RootfsRecord, with_table
from sporevm.errors import RootfsError
from sporevm.spore import blocktable
from sporevm.spore.chunks import ChunkStore
from sporevm.spore.manifest import RootfsTable
from sporevm.store import Store, blake3_file
from tests.ext4mount import mounted_ro
from tests.treecmp import describe_tree, diff_trees

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def make_tree(root: Path, reverse: bool = False) -> None:
    """A tree with every entry kind; ``reverse`` creates it in the opposite order."""
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    dirs = ["etc", "usr/bin", "tmp", "dev"]
    for d in sorted(dirs, reverse=reverse):
        (root / d).mkdir(parents=True, exist_ok=True)
    files = {
        "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
        "usr/bin/tool": b"\x7fELF" + b"x" * 9000,
        "etc/big": bytes(range(256)) * 3000,
    }
    names = sorted(files, reverse=reverse)
    for name in names:
        (root / name).write_bytes(files[name])
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.chown(root / "usr/bin/tool", 0, 0)
    os.chmod(root / "tmp", 0o1777)
    os.symlink("../usr/bin/tool", root / "etc/link")
    os.symlink("/" + "long/" * 20 + "target", root / "etc/longlink")
    os.link(root / "etc/passwd", root / "etc/passwd-hard")
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mkfifo(root / "dev/fifo", 0o600)
    os.chown(root / "etc/big", 1000, 1001, follow_symlinks=False)
    os.setxattr(
        root / "usr/bin/tool",
        "security.capability",
        bytes.fromhex("0100000200200000000000000000000000000000"),
    )
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            os.utime(os.path.join(dirpath, n), (1234567890, 1234567890), follow_symlinks=False)
    os.utime(root, (1234567890, 1234567890))


def test_same_inputs_give_identical_bytes(tmp_path: Path) -> None:
    make_tree(tmp_path / "t1")
    time.sleep(1.1)  # different ctimes on the second tree
    make_tree(tmp_path / "t2", reverse=True)
    rootfs.make_ext4(tmp_path / "t1", DIGEST_A, tmp_path / "a.ext4")
    rootfs.make_ext4(tmp_path / "t2", DIGEST_A, tmp_path / "b.ext4")
    assert (tmp_path / "a.ext4").read_bytes() == (tmp_path / "b.ext4").read_bytes()


def test_uuid_follows_image_digest(tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    rootfs.make_ext4(tmp_path / "t", DIGEST_A, tmp_path / "a.ext4")
    rootfs.make_ext4(tmp_path / "t", DIGEST_B, tmp_path / "b.ext4")
    assert (tmp_path / "a.ext4").read_bytes() != (tmp_path / "b.ext4").read_bytes()
    out = subprocess.run(
        ["dumpe2fs", "-h", str(tmp_path / "a.ext4")], capture_output=True, text=True, check=True
    ).stdout
    assert rootfs.derived_uuid("rootfs-uuid", DIGEST_A) in out
    assert "Block size:               4096" in out


def test_fsck_clean_and_times_pinned(tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    img = tmp_path / "r.ext4"
    rootfs.make_ext4(tmp_path / "t", DIGEST_A, img)
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    stat_out = subprocess.run(
        ["debugfs", "-R", "stat /etc/passwd", str(img)], capture_output=True, text=True, check=True
    ).stdout
    assert f"ctime: {rootfs.ROOTFS_EPOCH:#x}:00000000" in stat_out
    assert f"crtime: {rootfs.ROOTFS_EPOCH:#x}:00000000" in stat_out
    assert "mtime: 0x499602d2:00000000" in stat_out  # 1234567890 from the tree


@pytest.mark.mount
def test_tree_reads_back_exactly(tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    img = tmp_path / "r.ext4"
    rootfs.make_ext4(tmp_path / "t", DIGEST_A, img)
    want = describe_tree(tmp_path / "t")
    with mounted_ro(img) as mnt:
        got = describe_tree(mnt)
    got.pop("/lost+found", None)
    assert diff_trees(want, got) == []


def test_size_policy_bounds() -> None:
    size, inodes = rootfs.size_policy(rootfs.TreeStats(inodes=10, data_blocks=10))
    assert size == rootfs.MIN_SIZE and inodes % 64 == 0 and inodes >= 26
    size, _ = rootfs.size_policy(rootfs.TreeStats(inodes=100_000, data_blocks=50_000))
    assert size > 50_000 * 4096 + 100_000 * 256 and size % (1 << 20) == 0
    with pytest.raises(RootfsError):
        rootfs.size_policy(rootfs.TreeStats(inodes=10, data_blocks=(70 << 30) // 4096))


def test_installed_rootfs_gets_its_block_table(tmp_path: Path, store: Store) -> None:
    """Installing an image hashes it once for its digest and its block table; a rootfs
    record from before tables gets its table on lookup (one read of the image, which
    also re-checks the digest); a rotten image is a miss, never a table of wrong bytes."""
    make_tree(tmp_path / "t")
    out = tmp_path / "img.ext4"
    rootfs.make_ext4(tmp_path / "t", DIGEST_A, out)
    data = out.read_bytes()
    hashed = blocktable.install_rootfs(store, out)
    assert (hashed.digest, hashed.size) == blake3_file(store.rootfs_path(hashed.digest))
    assert hashed.block_size == 64 << 10 and len(data) == hashed.size
    digests = blocktable.decode(hashed.table, block_size=64 << 10, image_size=len(data))
    assert digests[:32] == blake3.blake3(data[: 64 << 10]).digest()
    key = "e" * 64
    old = {"digest": hashed.digest, "size": hashed.size, "image": DIGEST_A, "builder": "b/1"}
    store.put_key("rootfs", key, old)
    rec = RootfsRecord.lookup(store, key)
    assert rec is not None and rec.table is None
    rec = with_table(store, rec)
    assert rec is not None and rec.table == RootfsTable(hashed.table_digest, 64 << 10)
    assert ChunkStore(store).get(rec.table.digest) == hashed.table
    again = RootfsRecord.lookup(store, key)  # the record now names its table
    assert again is not None and again.table == rec.table
    assert with_table(store, again) == again  # present: nothing re-read
    ChunkStore(store).path(rec.table.digest).unlink()  # pruned: made again
    assert with_table(store, again) == again
    path = store.rootfs_path(hashed.digest)
    path.chmod(0o644)
    with open(path, "r+b") as fh:  # rot in the image: a miss (rebuilt), not a table
        fh.seek(70000)
        fh.write(b"\xff")
    ChunkStore(store).path(rec.table.digest).unlink()
    assert with_table(store, again) is None


def test_scan_counts_hardlinks_once_and_nothing_else_together(tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    stats = rootfs.scan_tree(tmp_path / "t")
    entries = sum(len(d) + len(f) for _, d, f in os.walk(tmp_path / "t"))
    assert stats.inodes == entries - 1  # etc/passwd-hard is etc/passwd


def test_scan_sizes_an_overlay_whose_layers_reuse_inode_numbers(tmp_path: Path) -> None:
    # Overlayfs over two tmpfs mounts reports both layers' own inode numbers: different
    # files share st_ino. The hardware-KVM lane's /tmp is such an overlay, and counting
    # by st_ino alone undersized a Debian rootfs there (mke2fs ran out of blocks).
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, merged):
        d.mkdir()
    mounted: list[Path] = []
    try:
        for d in (lower, upper):
            if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)]).returncode:
                pytest.skip("needs mount (root)")
            mounted.append(d)
        work = upper / "work"
        (upper / "up").mkdir()
        work.mkdir()
        for i in range(40):
            (lower / f"low{i}").write_bytes(b"l" * 5000)
        (upper / "up" / "sub").mkdir()
        for i in range(40):
            (upper / "up" / "sub" / f"up{i}").write_bytes(b"u" * 5000)
        opts = f"lowerdir={lower},upperdir={upper / 'up'},workdir={work}"
        if subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)]
        ).returncode:
            pytest.skip("needs overlayfs")
        mounted.append(merged)
        inos = [os.lstat(p).st_ino for p in merged.rglob("*")]
        stats = rootfs.scan_tree(merged)
        assert stats.inodes == 81, (stats, len(set(inos)))
        out = tmp_path / "img.ext4"
        rootfs.make_ext4(merged, DIGEST_A, out)  # fits: mke2fs does not run out of blocks
    finally:
        for d in reversed(mounted):
            subprocess.run(["umount", str(d)])
