"""Reproducible ext4 root filesystems from an extracted image tree.

Same tree + same image digest + same e2fsprogs version → bit-identical image.
What makes that true (measured on e2fsprogs 1.47.0, see docs/rootfs.md):

- mke2fs reads our own config file (``MKE2FS_CONFIG``), never the host's;
- UUID and directory hash seed are derived from the image manifest digest;
- ``E2FSPROGS_FAKE_TIME`` (1.47.0) / ``SOURCE_DATE_EPOCH`` (1.47.1+) pin the
  superblock times; mke2fs -d walks directories in sorted order, so inode
  numbers do not depend on the staging filesystem;
- mke2fs copies lstat() a/c/mtimes into inodes and ctime cannot be set from
  userspace, so a debugfs pass pins atime, ctime and crtime of every used
  inode to the rootfs epoch (mtime keeps the value from the layer tar);
- no journal (the rootfs is mounted read-only), no reserved blocks.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import blake3

from sporevm.errors import RootfsError

ROOTFS_EPOCH = 946684800  # 2000-01-01T00:00:00Z: every pinned time in the image
BLOCK = 4096
INODE_SIZE = 256
_MIB = 1 << 20
MIN_SIZE = 16 * _MIB
MAX_SIZE = 64 << 30


@dataclass(frozen=True)
class TreeStats:
    inodes: int  # distinct inodes below the root (hardlinks counted once), root excluded
    data_blocks: int  # 4 KiB blocks needed for file data, directories and long symlinks


@functools.cache
def tool_versions() -> str:
    """The e2fsprogs version: part of every rootfs cache key (bytes depend on it)."""
    try:
        out = subprocess.run(["mke2fs", "-V"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RootfsError("mke2fs not found; install e2fsprogs (scripts/setup does)") from None
    m = re.search(r"mke2fs (\d+\.\d+(?:\.\d+)?)", out.stderr + out.stdout)
    if not m:
        raise RootfsError(f"cannot read the mke2fs version from {out.stderr.strip()!r}")
    return m.group(1)


def derived_uuid(domain: str, image_digest: str) -> str:
    raw = blake3.blake3(f"spore/{domain}/v1\0{image_digest}".encode()).digest()[:16]
    return str(uuid.UUID(bytes=raw, version=4))


def scan_tree(tree: Path) -> TreeStats:
    """Count inodes and data blocks so the image is sized to its content."""
    seen: set[tuple[int, int]] = set()
    inodes = 0
    blocks = 1  # root directory
    stack = [str(tree)]
    while stack:
        path = stack.pop()
        dir_bytes = 24  # "." and ".."
        with os.scandir(path) as it:
            for ent in it:
                st = ent.stat(follow_symlinks=False)
                dir_bytes += 8 + ((len(ent.name.encode()) + 3) & ~3)
                # Only a hardlink can share an inode. Overlayfs over two file systems
                # (the hardware-KVM lane's /tmp) hands out colliding st_ino for
                # different files: deduplicating those undersized the image.
                if st.st_nlink > 1 and not ent.is_dir(follow_symlinks=False):
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                inodes += 1
                if ent.is_dir(follow_symlinks=False):
                    stack.append(ent.path)
                elif ent.is_file(follow_symlinks=False):
                    blocks += (st.st_size + BLOCK - 1) // BLOCK
                    blocks += (st.st_size // (BLOCK * 340 * 32768)) + 1  # extent tree slack
                elif ent.is_symlink() and st.st_size >= 60:
                    blocks += 1
        blocks += (dir_bytes + BLOCK - 1) // BLOCK + 1  # +1: htree index block
    return TreeStats(inodes=inodes, data_blocks=blocks)


def size_policy(stats: TreeStats) -> tuple[int, int]:
    """(image bytes, inode count): content plus metadata plus 10 % and 8 MiB headroom.

    The rootfs is immutable and mounted read-only; headroom is only for
    metadata the estimate misses, not for guest writes (those go to tmpfs).
    """
    inodes = stats.inodes + 16 + stats.inodes // 20
    inodes = (inodes + 63) // 64 * 64
    meta = inodes * INODE_SIZE + (inodes // 8) + 64 * BLOCK  # tables, bitmaps, descriptors
    raw = stats.data_blocks * BLOCK + meta
    size = raw + raw // 10 + 8 * _MIB
    size = max(MIN_SIZE, (size + _MIB - 1) // _MIB * _MIB)
    if size > MAX_SIZE:
        raise RootfsError(
            f"image tree needs {size >> 20} MiB; the rootfs limit is {MAX_SIZE >> 30} GiB"
        )
    return size, inodes


def _env() -> dict[str, str]:
    conf = resources.files("sporevm.build").joinpath("mke2fs.conf")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MKE2FS_", "E2FSPROGS_"))}
    env.update(
        MKE2FS_CONFIG=str(conf),
        E2FSPROGS_FAKE_TIME=str(ROOTFS_EPOCH),
        SOURCE_DATE_EPOCH=str(ROOTFS_EPOCH),
        LC_ALL="C",
        TZ="UTC",
    )
    return env


def _run(argv: list[str], what: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, env=_env(), check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-3:]
        raise RootfsError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc.stdout.decode(errors="replace")


def make_ext4(tree: Path, image_digest: str, out: Path) -> None:
    """Write a reproducible ext4 image of ``tree`` to ``out`` (a temp path the caller publishes)."""
    if shutil.which("mke2fs") is None or shutil.which("debugfs") is None:
        raise RootfsError("mke2fs/debugfs not found; install e2fsprogs (scripts/setup does)")
    stats = scan_tree(tree)
    size, inodes = size_policy(stats)
    fs_uuid = derived_uuid("rootfs-uuid", image_digest)
    seed = derived_uuid("rootfs-hash-seed", image_digest)
    with open(out, "wb") as fh:
        fh.truncate(size)
    _run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            str(BLOCK),
            "-I",
            str(INODE_SIZE),
            "-N",
            str(inodes),
            "-m",
            "0",
            "-L",
            "spore-rootfs",
            "-U",
            fs_uuid,
            "-E",
            f"hash_seed={seed},root_owner=0:0,nodiscard,lazy_itable_init=0",
            "-d",
            str(tree),
            str(out),
            f"{size // 1024}k",
        ],
        "mke2fs",
    )
    _pin_inode_times(out)


def _pin_inode_times(image: Path) -> None:
    stats = _run(["debugfs", "-R", "stats", str(image)], "debugfs stats")
    count = int(_field(stats, "Inode count"))
    free = int(_field(stats, "Free inodes"))
    first = int(_field(stats, "First inode"))
    # mke2fs -d allocates inodes densely from the first non-reserved one, so
    # the used set is the reserved range plus [first, first + used - reserved).
    used_top = count - free
    commands = []
    targets = [2] + list(range(first, used_top + 1))
    for ino in targets:
        for field in ("atime", "ctime", "crtime"):
            commands.append(f"sif <{ino}> {field} @{ROOTFS_EPOCH}")
    script = ("\n".join(commands) + "\n").encode()
    _run(["debugfs", "-w", "-f", "-", str(image)], "debugfs time pinning", stdin=script)
    _check_no_stray_inode(image, used_top + 1, count)


def _check_no_stray_inode(image: Path, ino: int, count: int) -> None:
    """Fail closed if the dense-allocation assumption ever breaks."""
    if ino > count:
        return
    out = _run(["debugfs", "-R", f"testi <{ino}>", str(image)], "debugfs testi")
    if "is marked in use" in out:
        raise RootfsError(f"inode {ino} is in use beyond the expected range; cannot pin times")


def _field(stats: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}:\s+(\S+)", stats, re.M)
    if not m:
        raise RootfsError(f"debugfs stats has no {name!r} line")
    return m.group(1)
