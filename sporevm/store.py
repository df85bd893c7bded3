"""The content-addressed local store ($SPORE_HOME, default ~/.cache/spore).

Layout (documented in docs/store.md)::

    blobs/sha256/<hex>        OCI manifests, indexes, configs and layers, by sha256
    rootfs/blake3/<hex>       ext4 root filesystems, by BLAKE3-256 of their bytes
    chunks/blake3/<hex>       spore memory chunks and state objects, by BLAKE3-256
    keys/<kind>/<key>.json    build-key -> result records (what a cached task produced)
    tmp/                      staging; anything here is garbage after a crash
    lock                      flock: builds hold it shared, prune holds it exclusive

Entries are published with temp + fsync + rename and verified on install, so a
reader never sees a partial entry and concurrent builds that produce the same
entry race harmlessly (both write identical bytes, the last rename wins).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from sporevm.atomic import atomic_write, publish
from sporevm.errors import StoreError

SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
BLAKE3_DIGEST = re.compile(r"blake3:[0-9a-f]{64}")
KEY = re.compile(r"[0-9a-f]{64}")
KINDS = ("blobs", "rootfs", "keys")
_READ = 1 << 20


def default_root() -> Path:
    env = os.environ.get("SPORE_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "spore"


def check_sha256(digest: str, what: str) -> str:
    if not SHA256_DIGEST.fullmatch(digest):
        raise StoreError(
            f"{what}: {digest!r} is not a sha256 digest (expected sha256:<64 lowercase hex>)"
        )
    return digest[len("sha256:") :]


def check_blake3(digest: str, what: str) -> str:
    if not BLAKE3_DIGEST.fullmatch(digest):
        raise StoreError(
            f"{what}: {digest!r} is not a blake3 digest (expected blake3:<64 lowercase hex>)"
        )
    return digest[len("blake3:") :]


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_READ):
            h.update(block)
            size += len(block)
    return "sha256:" + h.hexdigest(), size


def blake3_file(path: Path) -> tuple[str, int]:
    h = blake3.blake3()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_READ):
            h.update(block)
            size += len(block)
    return "blake3:" + h.hexdigest(), size


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    size: int
    last_used: float
    path: Path


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_root()).absolute()
        for sub in ("blobs/sha256", "rootfs/blake3", "keys", "tmp"):
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"store {self.root}: cannot create {sub}/: {exc.strerror}; "
                    "set SPORE_HOME to a writable directory"
                ) from exc

    # -- locking ---------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, exclusive: bool = False) -> Iterator[None]:
        """Builds share the store; prune/gc take it exclusively."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # -- staging ---------------------------------------------------------
    @contextlib.contextmanager
    def staging_dir(self, prefix: str) -> Iterator[Path]:
        """A private directory on the store's filesystem, removed afterwards."""
        path = Path(tempfile.mkdtemp(prefix=prefix + "-", dir=self.root / "tmp"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def temp_path(self, prefix: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=prefix + "-", dir=self.root / "tmp")
        os.close(fd)
        return Path(name)

    # -- blobs (sha256) --------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / check_sha256(digest, "blob")

    def has_blob(self, digest: str) -> bool:
        try:
            return self.blob_path(digest).lstat().st_mode & 0o170000 == 0o100000
        except FileNotFoundError:
            return False

    def ingest_blob(
        self, digest: str, chunks: Iterable[bytes], *, max_size: int, what: str
    ) -> Path:
        """Stream bytes into the store, verifying size bound and sha256 before publishing."""
        dest = self.blob_path(digest)
        tmp = self.temp_path("blob")
        h = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_size:
                        raise StoreError(
                            f"{what}: more than {max_size} bytes received; "
                            "refusing (raise the limit only if the blob is expected to be this big)"
                        )
                    h.update(chunk)
                    fh.write(chunk)
            got = "sha256:" + h.hexdigest()
            if got != digest:
                raise StoreError(
                    f"{what}: content digest is {got}, expected {digest}; "
                    "the source served corrupt or substituted bytes"
                )
            publish(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return dest

    def ingest_blob_bytes(self, digest: str, data: bytes, *, what: str) -> Path:
        return self.ingest_blob(digest, [data], max_size=len(data), what=what)

    def evict_if_corrupt(self, digest: str) -> bool:
        """Re-hash a cached blob; remove it (and say so) if it does not match its digest."""
        path = self.blob_path(digest)
        if not self.has_blob(digest):
            return False
        if sha256_file(path)[0] == digest:
            return False
        path.unlink(missing_ok=True)
        return True

    def read_blob(self, digest: str, *, max_size: int, what: str) -> bytes:
        """Read a small blob (manifest, config) and re-verify it."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as fh:
                data = fh.read(max_size + 1)
        except FileNotFoundError:
            raise StoreError(f"{what}: blob {digest} is not in the store {self.root}") from None
        if len(data) > max_size:
            raise StoreError(f"{what}: blob {digest} is larger than {max_size} bytes")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(
                f"{what}: store entry {path} does not match its digest; "
                "run `spore cache prune --all` and rebuild"
            )
        return data

    # -- rootfs (blake3) -------------------------------------------------
    def rootfs_path(self, digest: str) -> Path:
        return self.root / "rootfs" / "blake3" / check_blake3(digest, "rootfs")

    def install_rootfs(self, tmp: Path) -> tuple[str, int]:
        """Hash a finished ext4 image and publish it under its BLAKE3 digest."""
        digest, size = blake3_file(tmp)
        publish(tmp, self.rootfs_path(digest))
        return digest, size

    # -- build keys ------------------------------------------------------
    def _key_path(self, kind: str, key: str) -> Path:
        if not re.fullmatch(r"[a-z0-9-]+", kind) or not KEY.fullmatch(key):
            raise StoreError(f"invalid build key {kind}/{key}")
        return self.root / "keys" / kind / f"{key}.json"

    def get_key(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self._key_path(kind, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return None  # a corrupt record is a cache miss, never a result
        if not isinstance(record, dict):
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # last-used time for prune
        return record

    def put_key(self, kind: str, key: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        atomic_write(self._key_path(kind, key), data)

    def touch(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            os.utime(path)

    # -- listing and pruning --------------------------------------------
    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        for kind, sub in (("blob", "blobs/sha256"), ("rootfs", "rootfs/blake3")):
            for p in sorted((self.root / sub).iterdir()):
                if p.name.startswith(".tmp-"):
                    continue
                st = p.lstat()
                prefix = "sha256:" if kind == "blob" else "blake3:"
                out.append(Entry(kind, prefix + p.name, st.st_size, st.st_mtime, p))
        # Built guest pieces: kernels are directories (bzImage, vmlinux, config), the
        # agent and initramfs are files; both are named by BLAKE3. Spore memory chunks
        # and state objects (sporevm/spore/chunks.py) are files named the same way.
        for kind, sub in (
            ("kernel", "kernels/blake3"),
            ("guest", "guest/blake3"),
            ("chunk", "chunks/blake3"),
        ):
            base = self.root / sub
            if not base.is_dir():
                continue
            for p in sorted(base.iterdir()):
                if p.name.startswith(".tmp-"):
                    continue
                st = p.lstat()
                size = st.st_size
                if p.is_dir() and not p.is_symlink():
                    size = sum(f.lstat().st_size for f in p.iterdir())
                out.append(Entry(kind, "blake3:" + p.name, size, st.st_mtime, p))
        keys = self.root / "keys"
        for kdir in sorted(keys.iterdir()):
            for p in sorted(kdir.glob("*.json")):
                st = p.lstat()
                out.append(Entry("key/" + kdir.name, p.stem, st.st_size, st.st_mtime, p))
        return out

    def prune(self, older_than: float | None) -> list[Entry]:
        """Remove staging leftovers and entries unused for ``older_than`` seconds (None: all)."""
        removed: list[Entry] = []
        with self.lock(exclusive=True):
            for p in (self.root / "tmp").iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            cutoff = None if older_than is None else time.time() - older_than
            for entry in self.entries():
                if cutoff is None or entry.last_used < cutoff:
                    if entry.path.is_dir() and not entry.path.is_symlink():
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        entry.path.unlink(missing_ok=True)
                    removed.append(entry)
        return removed
