"""Store roots: which spore directories on this machine the store must keep alive.

A spore directory (``manifest.json`` + ``id``) lives outside the store, but
everything it names lives inside. Prune must therefore know where the spores
are. Every publisher (build, fork, pull, unpack, ``spore cache keep``) writes one
small record per spore directory before the directory appears::

    roots/<hex>.json   {"format":"spore-root/v1","manifest":"blake3:…","path":"/abs/dir"}

``<hex>`` is BLAKE3 of the path and the manifest id, so publishing a new spore
at the same path adds a record instead of overwriting the old one: a crash
between the record and the directory's rename never leaves the spore that is
still there without its record (docs/store.md, "Roots").

A record is outside input of sorts (a store may be shared or restored from a CI
cache): ``decode`` is bounded and strict, accepts only the canonical bytes,
and ``probe`` reads nothing of the named directory but ``id`` and
``manifest.json``, each opened from the directory's descriptor with
``O_NOFOLLOW`` and required to be a regular file of bounded size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from sporevm.atomic import atomic_write
from sporevm.errors import StoreError
from sporevm.nofollow import NotARegularFile, open_file, opened_dir
from sporevm.strictjson import load_versioned_object

FORMAT = "spore-root/v1"
ROOTS = "roots"
MAX_PATH = 4096  # bytes of UTF-8, as PATH_MAX
# No control characters in a path, so JSON escapes at most double it (\" and \\).
MAX_RECORD = 2 * MAX_PATH + 256
MAX_ID_FILE = 128  # "blake3:<64 hex>\n" is 72 bytes
MAX_MANIFEST = 16 * 1024 * 1024  # as sporevm.spore.manifest.MAX_MANIFEST (not imported: layering)
_MID = re.compile(r"blake3:[0-9a-f]{64}")
_NAME = re.compile(r"[0-9a-f]{64}\.json")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RootError(StoreError):
    """A root record is malformed or a path cannot be recorded as a root."""


@dataclass(frozen=True)
class Root:
    path: str  # absolute, normalized, UTF-8: the spore directory
    manifest: str  # blake3:<hex>: the manifest id it held when it was recorded

    def name(self) -> str:
        """The record's file name in ``roots/``."""
        material = f"spore/root/v1\0{self.path}\0{self.manifest}".encode()
        return blake3.blake3(material).hexdigest() + ".json"


def check_path(path: str, what: str) -> str:
    """``path`` if it is one a root may name: absolute, normalized, UTF-8, ≤ 4096 bytes."""
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise RootError(
            f"{what}: path {path!r} is not UTF-8; spore records roots by "
            "UTF-8 path only — use such a path"
        ) from None
    if len(raw) > MAX_PATH:
        raise RootError(f"{what}: path longer than {MAX_PATH} bytes")
    if _CONTROL.search(path) or not path.startswith("/") or path == "/":
        raise RootError(
            f"{what}: path {path[:200]!r} is not an absolute directory path "
            "without control characters"
        )
    if any(part in ("", ".", "..") for part in path[1:].split("/")):
        raise RootError(
            f"{what}: path {path[:200]!r} is not normalized (empty, . or .. components)"
        )
    return path


def encode(root: Root) -> bytes:
    """The one byte form of a record (sorted keys, no spaces, raw UTF-8)."""
    doc = {"format": FORMAT, "manifest": root.manifest, "path": root.path}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def decode(data: bytes, what: str = "root record") -> Root:
    """A record from bytes nobody vouches for: bounded, strict, canonical bytes only."""
    doc = load_versioned_object(
        data, what, limit=MAX_RECORD, encoding="utf-8", fmt=FORMAT, error=RootError
    )
    if set(doc) != {"format", "manifest", "path"}:
        raise RootError(f"{what}: fields must be exactly format, manifest, path")
    mid, path = doc["manifest"], doc["path"]
    if not isinstance(mid, str) or not _MID.fullmatch(mid):
        raise RootError(f"{what}: manifest is not blake3:<64 lowercase hex>")
    if not isinstance(path, str):
        raise RootError(f"{what}: path is not a string")
    root = Root(check_path(path, what), mid)
    if encode(root) != data:
        raise RootError(f"{what}: not in canonical form")
    return root


def root_for(out: Path, mid: str) -> Root:
    """The record for a spore directory at ``out`` (it need not exist yet): its parent
    resolved (symlinks included, as the user chose them), its own name kept."""
    out = Path(os.path.abspath(out))
    path = os.path.join(os.path.realpath(out.parent), out.name)
    return Root(check_path(path, str(out)), mid)


def add(store_root: Path, root: Root) -> Path:
    """Write the record (temp in the store's tmp/ + fsync + rename); unchanged: no write."""
    dest = store_root / ROOTS / root.name()
    data = encode(root)
    root_fd = os.open(store_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError, _TooLarge):
            if _read_file(root_fd, f"{ROOTS}/{root.name()}", MAX_RECORD) == data:
                return dest  # a no-op build re-registers its spore: no fsync for nothing
    finally:
        os.close(root_fd)
    atomic_write(dest, data, tmp_dir=store_root / "tmp")
    return dest


def discard(store_root: Path, root: Root) -> None:
    """Remove ``root``'s record, never following a link (best effort: prune drops it too)."""
    root_fd = os.open(store_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with opened_dir(root_fd, ROOTS) as dfd, contextlib.suppress(FileNotFoundError):
            os.unlink(root.name(), dir_fd=dfd)
    finally:
        os.close(root_fd)


@dataclass(frozen=True)
class Stored:
    """One file in ``roots/``: its record, or why it is not one."""

    name: str
    root: Root | None
    error: str | None = None


def read_all(root_fd: int) -> Iterator[Stored]:
    """Every record in ``roots/`` (below ``root_fd``), parsed; staging names skipped."""
    with opened_dir(root_fd, ROOTS) as dfd:
        for name in sorted(os.listdir(dfd)):
            if name.startswith(".tmp-"):
                continue  # staging left by an old writer; prune's sweep removes it
            yield _read_one(dfd, name)


def _read_one(dfd: int, name: str) -> Stored:
    what = f"{ROOTS}/{name}"
    if not _NAME.fullmatch(name):
        return Stored(name, None, "not named <64 hex>.json")
    try:
        data = _read_file(dfd, name, MAX_RECORD)
    except (OSError, _TooLarge) as exc:
        return Stored(name, None, f"cannot be read ({_reason(exc)})")
    try:
        root = decode(data, what)
    except RootError as exc:
        return Stored(name, None, str(exc).removeprefix(what + ": "))
    if root.name() != name:
        return Stored(name, root, "its name is not the hash of its path and manifest id")
    return Stored(name, root)


@dataclass(frozen=True)
class Probe:
    """What a root's directory holds now.

    ``live``: its ``id`` is the record's manifest id and ``manifest.json`` hashes to it
    (``manifest`` holds those bytes); ``gone``: the directory, its id or its manifest
    is absent; ``replaced``: it holds another manifest, or something that is not one
    (a directory, FIFO or over-long file); ``unreadable``: it cannot be told
    (permissions, I/O, a symlink where a spore has a file: never followed)."""

    state: str
    detail: str
    manifest: bytes | None = None


def probe(root: Root) -> Probe:
    # The directory itself is opened as the user named it (links on the way are theirs);
    # both files are then read from that one descriptor, never through a link.
    try:
        dfd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return Probe("gone", "the directory is gone")
    except OSError as exc:
        return Probe("unreadable", _reason(exc))
    try:
        text = _read_file(dfd, "id", MAX_ID_FILE)
        if text.strip() != root.manifest.encode():
            return Probe("replaced", "holds another spore (its id differs)")
        data = _read_file(dfd, "manifest.json", MAX_MANIFEST)
    except FileNotFoundError:
        return Probe("gone", "its id or manifest.json is gone")
    except NotARegularFile as exc:
        if exc.symlink:
            return Probe("unreadable", _reason(exc))
        return Probe("replaced", "holds something else (not a regular file)")
    except _TooLarge as exc:
        return Probe("replaced", f"holds something else ({exc})")
    except OSError as exc:
        return Probe("unreadable", _reason(exc))
    finally:
        os.close(dfd)
    if "blake3:" + blake3.blake3(data).hexdigest() != root.manifest:
        return Probe("replaced", "its manifest.json was changed (it no longer matches its id)")
    return Probe("live", "", data)


def read_id(directory: Path) -> str | None:
    """The manifest id in ``directory/id`` if it holds one (bounded, never via a link)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = _read_file(dfd, "id", MAX_ID_FILE).strip().decode("ascii")
    except (OSError, _TooLarge, UnicodeDecodeError):
        return None
    finally:
        os.close(dfd)
    return text if _MID.fullmatch(text) else None


def survey(root_fd: int) -> Iterator[tuple[Stored, Probe | None]]:
    """Every record below ``root_fd`` with what its directory holds (None: not a record)."""
    for stored in read_all(root_fd):
        yield stored, (probe(stored.root) if stored.root and not stored.error else None)


def survey_store(store_root: Path) -> list[tuple[Stored, Probe | None]]:
    root_fd = os.open(store_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return list(survey(root_fd))
    finally:
        os.close(root_fd)


class _TooLarge(Exception):
    """A file longer than any the spore writes there: certainly not the recorded one."""


def _read_file(dir_fd: int, name: str, limit: int) -> bytes:
    """A regular file in ``dir_fd`` (a link is never followed), at most ``limit`` bytes."""
    fd = open_file(dir_fd, name)
    try:
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _TooLarge(f"{name} is larger than {limit} bytes")
    return data


def _reason(exc: OSError | _TooLarge) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "a symbolic link where a regular file was expected (never followed)"
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
