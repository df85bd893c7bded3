"""The content-addressed local store ($SPORE_HOME, default ~/.cache/spore).

Layout (documented in docs/store.md)::

    blobs/sha256/<hex>        OCI manifests, indexes, configs and layers, by sha256
    rootfs/blake3/<hex>       ext4 root filesystems, by BLAKE3-256 of their bytes
    chunks/blake3/<hex>       spore memory chunks and state objects, by BLAKE3-256
    keys/<kind>/<key>.json    build-key -> result records (what a cached task produced)
    roots/<hex>.json          the spore directories prune keeps alive (sporevm/storeroots.py)
    tmp/                      staging; anything here is garbage after a crash
    lock                      flock: builds hold it shared, prune holds it exclusive

Entries are published with temp + fsync + rename and verified on install, so a
reader never sees a partial entry and concurrent builds that produce the same
entry race harmlessly (both write identical bytes, the last rename wins).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from sporevm.atomic import atomic_write, publish
from sporevm.errors import StoreError
from sporevm.nofollow import NotADirectoryInPath, open_dir, opened_dir

SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
BLAKE3_DIGEST = re.compile(r"blake3:[0-9a-f]{64}")
KEY = re.compile(r"[0-9a-f]{64}")
KINDS = ("blobs", "rootfs", "keys")
CONTENT_DIRS = (
    ("blob", "blobs/sha256"),
    ("rootfs", "rootfs/blake3"),
    ("kernel", "kernels/blake3"),
    ("guest", "guest/blake3"),
    ("chunk", "chunks/blake3"),
    ("memfile", "memfiles/blake3"),
)
_READ = 1 << 20
# Every directory the store makes below its root, parents first. Nothing below the
# root is trusted to be what its name says: at open each of these must be a real
# directory (never a symlink) owned by this user, or the store refuses to work.
LAYOUT = (
    "blobs",
    "blobs/sha256",
    "rootfs",
    "rootfs/blake3",
    "kernels",
    "kernels/blake3",
    "guest",
    "guest/blake3",
    "chunks",
    "chunks/blake3",
    "memfiles",
    "memfiles/blake3",
    "keys",
    "roots",
    "state",
    "tmp",
)
LOCK = "lock"
# A use is recorded (mtime) only when the last recorded one is older: store.touch.
TOUCH_EVERY = 600.0


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
    # Whether an entry staged in tmp/ may be renamed into its content directory. A
    # monitor jailed on Landlock ABI 1 cannot rename across directories at all
    # (runtime/confine.py): it stages chunks beside their final name instead, and
    # keeps the memory file of a local restore private (spore/backing.py).
    publish_from_staging = True

    def __init__(self, root: Path | None = None, *, checked: bool = False) -> None:
        """``checked``: the caller already made and checked this store's layout in this
        run (a VM monitor's caller did, moments before starting it), so it is not
        walked again (~30 directories: ~1 ms natively, ~10 ms where host code is
        emulated, per VM)."""
        self.root = (root or default_root()).absolute()
        if checked:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"store {self.root}: cannot create it: {exc.strerror}; "
                "set SPORE_HOME to a writable directory"
            ) from exc
        self.check_layout(create=True)

    # -- layout ----------------------------------------------------------
    def check_layout(self, create: bool = False) -> None:
        """Check (and with ``create``, make) the store's own directories and lock file.

        The root itself may be reached through a symlink (the user chose it); below
        it, a symlink, a non-directory or a directory owned by someone else where
        the store expects its own directory is refused with one line naming it.
        A store restored from a CI cache or shared with other users can carry such
        entries, and following one would read, write or delete outside the store."""
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(
                f"store {self.root}: cannot open it: {exc.strerror}; "
                "set SPORE_HOME to a writable directory"
            ) from exc
        try:
            self._check_owner(os.fstat(root_fd), ".")
            for rel in LAYOUT:
                self._check_dir(root_fd, rel, create)
            with opened_dir(root_fd, "keys") as keys_fd:
                for name in sorted(os.listdir(keys_fd)):
                    if not name.startswith(".tmp-"):
                        self._check_dir(root_fd, f"keys/{name}", create=False)
            try:
                st = os.stat(LOCK, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise self._planted(LOCK, "is not a regular file")
                self._check_owner(st, LOCK)
        finally:
            os.close(root_fd)

    def _check_dir(self, root_fd: int, rel: str, create: bool) -> None:
        parent, _, name = rel.rpartition("/")
        try:
            with opened_dir(root_fd, parent) if parent else _dup(root_fd) as pfd:
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        return
                    with contextlib.suppress(FileExistsError):  # another process won
                        os.mkdir(name, 0o755, dir_fd=pfd)
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except NotADirectoryInPath as exc:
            raise self._planted(exc.rel, "is a symbolic link or not a directory") from None
        except OSError as exc:
            raise StoreError(
                f"store {self.root}: cannot create {rel}/: {exc.strerror}; "
                "set SPORE_HOME to a writable directory"
            ) from exc
        if stat.S_ISLNK(st.st_mode):
            raise self._planted(rel, f"is a symbolic link (to {self._link_text(rel)})")
        if not stat.S_ISDIR(st.st_mode):
            raise self._planted(rel, "is not a directory")
        self._check_owner(st, rel)

    def _check_owner(self, st: os.stat_result, rel: str) -> None:
        if st.st_uid != os.geteuid():
            raise self._planted(
                rel, f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
            )

    def _link_text(self, rel: str) -> str:
        try:
            return os.readlink(self.root / rel)
        except OSError:
            return "?"

    def _planted(self, rel: str, what: str) -> StoreError:
        return StoreError(
            f"store {self.root}: {rel} {what}; the store never follows or "
            "trusts entries it did not make — remove that entry (or the whole "
            "store) and run again"
        )

    # -- locking ---------------------------------------------------------
    @contextlib.contextmanager
    def lock(
        self,
        exclusive: bool = False,
        on_wait: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> Iterator[None]:
        """Every command that reads or writes entries holds this shared for as long as it
        needs them (a VM reads chunks lazily until it exits); prune takes it exclusively.
        ``on_wait`` is called once if the lock is not free right away. ``timeout`` bounds
        the wait in seconds (None: wait as long as it takes; 0: try once); when it
        passes, :class:`StoreBusy` is raised and the lock was never held."""
        try:
            fd = os.open(self.root / LOCK, _LOCK_FLAGS, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise self._planted(LOCK, "is not a regular file") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted as the lock
            os.close(fd)
            raise self._planted(LOCK, "is not a regular file")
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                if timeout is None:
                    fcntl.flock(fd, mode)
                else:
                    _flock_until(fd, mode, time.monotonic() + timeout, self.root, timeout)
            yield
        finally:
            os.close(fd)

    def lock_holders(self) -> int | None:
        """How many processes hold the store lock now (from /proc/locks), or None if
        that cannot be told (no /proc, or the lock file's inode is not listed)."""
        try:
            st = os.lstat(self.root / LOCK)
            text = Path("/proc/locks").read_text()
        except OSError:
            return None
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        pids: set[str] = set()
        for line in text.splitlines():
            f = line.split()
            # "1: FLOCK  ADVISORY  READ 1234 08:01:5678 0 EOF"; "1: -> FLOCK ..." waits.
            if len(f) >= 6 and f[1] == "FLOCK" and f[5] == ident:
                pids.add(f[4])
        return len(pids) or None

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
        """Hash a finished ext4 image and publish it under its BLAKE3 digest (a build
        uses blocktable.install_rootfs: the same, plus the image's block table)."""
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
        self.touch(path)  # last-used time for prune
        return record

    def put_key(self, kind: str, key: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        # Staged in tmp/, so a crash leaves nothing beside the records (prune sweeps tmp/).
        atomic_write(self._key_path(kind, key), data, tmp_dir=self.root / "tmp")

    def touch(self, path: Path) -> None:
        """Record a use of ``path`` for `spore cache prune` (its mtime is its last use).

        Like relatime: only when the recorded use is older than TOUCH_EVERY, so a run
        does not rewrite a dozen inodes (journal commits, writeback) every time it
        resolves its kernel, initramfs and memo records; last use is exact to within
        that, against prune's week by default."""
        with contextlib.suppress(OSError):
            if time.time() - os.stat(path).st_mtime > TOUCH_EVERY:
                os.utime(path)

    # -- listing and pruning --------------------------------------------
    def entries(self) -> list[Entry]:
        self.check_layout()
        out: list[Entry] = []
        # Kernels are directories (bzImage, vmlinux, config); everything else is a file.
        # Chunks hold spore memory and state objects; memfiles are RAM images for the
        # local restore strategy (sporevm/spore/backing.py), named by their index.
        for kind, sub in CONTENT_DIRS:
            base = self.root / sub
            if not base.is_dir():
                continue
            prefix = "sha256:" if kind == "blob" else "blake3:"
            for p in sorted(base.iterdir()):
                if p.name.startswith(".tmp-"):
                    continue
                try:  # a corrupt entry may be evicted by a concurrent reader
                    st = p.lstat()
                    size = st.st_size
                    if stat.S_ISDIR(st.st_mode):
                        size = sum(f.lstat().st_size for f in p.iterdir())
                except FileNotFoundError:
                    continue
                out.append(Entry(kind, prefix + p.name, size, st.st_mtime, p))
        keys = self.root / "keys"
        for kdir in sorted(keys.iterdir()):
            if kdir.name.startswith(".tmp-"):
                continue
            for p in sorted(kdir.glob("*.json")):
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                out.append(Entry("key/" + kdir.name, p.stem, st.st_size, st.st_mtime, p))
        return out

    def _sweep_staging(self, root_fd: int) -> None:
        """Empty tmp/ and drop ``.tmp-*`` names elsewhere (left by older versions)."""
        with opened_dir(root_fd, "tmp") as tmp_fd:
            for name in sorted(os.listdir(tmp_fd)):
                _remove_at(tmp_fd, name)
        dirs = [sub for _, sub in CONTENT_DIRS] + ["state", "roots"]
        with opened_dir(root_fd, "keys") as keys_fd:
            dirs += [f"keys/{n}" for n in sorted(os.listdir(keys_fd)) if not n.startswith(".")]
        for rel in dirs:
            try:
                dfd = open_dir(root_fd, rel)
            except FileNotFoundError:
                continue
            try:
                for name in sorted(os.listdir(dfd)):
                    if name.startswith(".tmp-"):
                        _remove_at(dfd, name)
            finally:
                os.close(dfd)

    def prune(
        self,
        older_than: float | None,
        on_wait: Callable[[], None] | None = None,
        wait: float | None = None,
    ) -> list[Entry]:
        """Remove staging leftovers and what nothing live reaches; see :meth:`collect`."""
        return self.collect(older_than, on_wait, wait).removed

    def collect(
        self,
        older_than: float | None,
        on_wait: Callable[[], None] | None = None,
        wait: float | None = None,
    ) -> Pruned:
        """Remove staging leftovers and every entry no live spore or kept record reaches
        and unused for ``older_than`` seconds (None: regardless of age); see
        sporevm/storegc.py for what reaches what.

        Waits for every running build and run (they hold the lock shared), so nothing
        a live command needs disappears under it: at most ``wait`` seconds (None: no
        bound), then :class:`StoreBusy` is raised with nothing removed. A root that
        cannot be judged raises StoreError, also with nothing removed."""
        from sporevm.storegc import plan  # reads manifests: sporevm.spore imports the store

        removed: list[Entry] = []
        with self.lock(exclusive=True, on_wait=on_wait, timeout=wait):
            entries = self.entries()  # checks the layout first
            cutoff = None if older_than is None else time.time() - older_than
            # Everything below is removed through descriptors opened without following
            # links, so a link planted after the check still leads nowhere.
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                p = plan(self, root_fd, entries, cutoff)  # raises before anything is removed
                self._sweep_staging(root_fd)
                dead = [
                    Entry("root", j.root.path, 0, 0.0, self.root / "roots" / j.name)
                    for j in p.dead_roots
                ]
                removed += self._remove(root_fd, dead)
                removed += self._remove(root_fd, p.remove)
            finally:
                os.close(root_fd)
        return Pruned(removed, p.kept, len(p.live_roots))

    def _remove(self, root_fd: int, entries: list[Entry]) -> list[Entry]:
        done = []
        for entry in entries:
            rel = entry.path.parent.relative_to(self.root).as_posix()
            try:
                with opened_dir(root_fd, rel) as dfd:
                    _remove_at(dfd, entry.path.name, root_fd)
            except NotADirectoryInPath as exc:
                raise self._planted(exc.rel, "is a symbolic link or not a directory") from None
            except FileNotFoundError:
                continue
            done.append(entry)
        return done


@dataclass(frozen=True)
class Pruned:
    removed: list[Entry]  # in removal order; dropped root records have kind "root"
    kept: int  # entries kept: reached from a live spore or a recently used entry
    live_spores: int  # root records whose directory still holds their spore


class StoreBusy(StoreError):
    """The store lock stayed held by other processes for the whole allowed wait."""

    def __init__(self, root: Path, waited: float) -> None:
        super().__init__(
            f"the store {root} is still in use after {waited:g}s (running builds or VMs hold it)"
        )
        self.root = root
        self.waited = waited


_POLL = 0.05  # seconds between tries of a bounded lock wait


def _flock_until(fd: int, mode: int, deadline: float, root: Path, waited: float) -> None:
    """Take ``flock(fd, mode)`` by polling until ``deadline`` (monotonic); StoreBusy then."""
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreBusy(root, waited) from None
            time.sleep(min(_POLL, left))


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@contextlib.contextmanager
def _dup(fd: int) -> Iterator[int]:
    new = os.dup(fd)
    try:
        yield new
    finally:
        os.close(new)


def _remove_at(dir_fd: int, name: str, root_fd: int | None = None) -> None:
    """Delete ``name`` in ``dir_fd`` without following it. A directory is first renamed
    into tmp/ (given ``root_fd``) so that a crash halfway through never leaves a
    partial kernel directory under its final name; shutil.rmtree with ``dir_fd``
    removes it through descriptors, never following a link inside."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    if root_fd is None:
        shutil.rmtree(name, dir_fd=dir_fd)
        return
    with opened_dir(root_fd, "tmp") as tmp_fd:
        gone = f"prune-{os.getpid()}-{time.monotonic_ns()}"
        os.mkdir(gone, 0o700, dir_fd=tmp_fd)
        with opened_dir(tmp_fd, gone) as gone_fd:
            os.rename(name, "entry", src_dir_fd=dir_fd, dst_dir_fd=gone_fd)
        shutil.rmtree(gone, dir_fd=tmp_fd)
