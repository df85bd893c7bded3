"""Describe a directory tree as comparable facts: the yardstick for rootfs equality tests."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

Fact = tuple[object, ...]


def describe_tree(root: Path, *, with_xattrs: bool = True) -> dict[str, Fact]:
    """path -> (type, mode, uid, gid, size, sha256 | link target | rdev, xattrs)."""
    out: dict[str, Fact] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, root)
            out[rel] = describe_entry(full, with_xattrs=with_xattrs)
    return out


def describe_entry(full: str, *, with_xattrs: bool = True) -> Fact:
    st = os.lstat(full)
    mode = stat.S_IMODE(st.st_mode)
    kind = stat.S_IFMT(st.st_mode)
    detail: object = None
    size = 0
    if stat.S_ISREG(kind):
        h = hashlib.sha256()
        with open(full, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        detail = h.hexdigest()
        size = st.st_size
    elif stat.S_ISLNK(kind):
        detail = os.readlink(full)
        size = st.st_size
    elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
        detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
    xattrs: tuple[tuple[str, bytes], ...] = ()
    if with_xattrs and not stat.S_ISLNK(kind):
        xattrs = tuple(
            sorted(
                (k, os.getxattr(full, k, follow_symlinks=False))
                for k in os.listxattr(full, follow_symlinks=False)
            )
        )
    return (kind, mode, st.st_uid, st.st_gid, size, detail, xattrs)


def diff_trees(a: dict[str, Fact], b: dict[str, Fact], limit: int = 20) -> list[str]:
    lines: list[str] = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            lines.append(f"{path}: {a.get(path)} != {b.get(path)}")
            if len(lines) >= limit:
                break
    return lines
