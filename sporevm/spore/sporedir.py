"""The spore directory on disk: ``manifest.json`` plus ``id``, and how it is opened.

A spore directory holds the manifest's canonical bytes (docs/spore-format.md)
and ``id``, the BLAKE3 of those bytes; the chunks and state objects it names
live in a store's chunk CAS, the rootfs in its ``rootfs/blake3/``. Every
publisher (build, fork, pull, unpack) writes it through ``write_spore``, which
also records it as one of the store's roots (sporevm/storeroots.py), so prune
keeps what it names. ``spore run --from``/``fork``/``inspect`` and bundles read
it, always through ``read_spore``: the id, from the ``id`` file or an explicit
``DIR@blake3:<id>`` pin, is checked against the bytes before they are decoded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import blake3

from sporevm import storeroots
from sporevm.atomic import DirKind, NotReplaceable, atomic_write, publish_new_dir, replace_dir
from sporevm.errors import SporeError
from sporevm.spore import manifest
from sporevm.spore.platform import SLOT_BLK
from sporevm.store import Store

MANIFEST = "manifest.json"
ID_FILE = "id"  # "blake3:<hex>\n" of manifest.json: any edited byte is caught on open
ROOTFS_KIND = "ext4-immutable"
# An existing output is replaced only if it is empty or holds exactly these names.
CHECKED_KIND = "manifest-checked"  # store records: these manifest bytes passed the schema
SPORE_DIR = DirKind("spore directory", MANIFEST, frozenset({MANIFEST, ID_FILE}))


class SporeOpenError(SporeError):
    """A spore directory cannot be used here."""


def split_pin(text: str) -> tuple[Path, str | None]:
    """``DIR@blake3:<hex>`` pins the manifest id; without a pin the spore's id file is used."""
    base, sep, pin = text.rpartition("@")
    if sep and pin.startswith("blake3:"):
        return Path(base), pin
    return Path(text), None


def _read(
    path: Path, pin: str | None, store: Store | None = None
) -> tuple[str, manifest.Manifest, bytes, Path]:
    """(id, manifest, exact bytes, manifest path); a directory needs its id file or a pin.

    A bare manifest file (the build's own snapshots, named by their id in the chunk
    CAS) is checked against ``pin`` when one is given.
    """
    mpath = path / MANIFEST if path.is_dir() else path
    try:
        with open(mpath, "rb") as fh:
            data = fh.read(manifest.MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise SporeOpenError(f"{path}: no spore here (expected {MANIFEST})") from None
    except OSError as exc:
        raise SporeOpenError(f"{path}: not a readable spore ({exc.strerror})") from None
    mid = manifest.manifest_id(data)
    want = pin
    if want is None and path.is_dir():
        try:
            want = (path / ID_FILE).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            raise SporeOpenError(
                f"{path}: no readable {ID_FILE} file; the spore is incomplete "
                "(pass DIR@blake3:<manifest id> to pin it explicitly)"
            ) from None
    if want is not None and mid != want:
        raise SporeOpenError(
            f"{mpath}: manifest id is {mid}, expected {want}; the manifest "
            "was modified or is not the spore you pinned"
        )
    return mid, _decode(data, mid, str(mpath), store), data, mpath


def _decode(data: bytes, mid: str, what: str, store: Store | None) -> manifest.Manifest:
    """``manifest.decode``, minus its schema pass for bytes this store saw pass it before.

    The schema pass costs ~0.15 s (jsonschema's import) on every `run --from`; the same
    bytes (same id) under the same schema pass the same way, so a store record keyed by
    both stands for it. Everything else ``decode`` checks runs each time
    (``decode_vouched``). The record is the store's own state, trusted as its kernel and
    rootfs records are; a missing or damaged record is a full decode.
    """
    if store is None:
        return manifest.decode(data, what)
    key = blake3.blake3(f"{mid}\0{manifest.schema_fingerprint()}".encode()).hexdigest()
    rec = store.get_key(CHECKED_KIND, key)
    if rec is not None and rec.get("manifest") == mid:
        return manifest.decode_vouched(data, mid, what)
    m = manifest.decode(data, what)
    with contextlib.suppress(OSError):  # a read-only store: the next open checks again
        store.put_key(CHECKED_KIND, key, {"manifest": mid})
    return m


def read_spore(text: str) -> tuple[str, manifest.Manifest, bytes]:
    """(id, manifest, exact bytes) of ``DIR`` or ``DIR@blake3:<id>``, id checked first."""
    path, pin = split_pin(text)
    mid, m, data, _ = _read(path, pin)
    return mid, m, data


def open_spore(
    path: Path, store: Store, pin: str | None = None
) -> tuple[manifest.Manifest, Path, Path]:
    """(manifest, manifest path, rootfs path in the store) — everything checked up front.

    One edited byte anywhere fails here, before any VM; so does a rootfs of another
    kind or slot, or one this store does not hold.
    """
    _, m, _, mpath = _read(path, pin, store)
    if m.rootfs.kind != ROOTFS_KIND or m.rootfs.blk_slot != SLOT_BLK:
        raise SporeOpenError(
            f"{mpath}: rootfs kind {m.rootfs.kind!r} on slot {m.rootfs.blk_slot} is not supported"
        )
    rootfs = store.rootfs_path(m.rootfs.digest)
    if not rootfs.is_file() or rootfs.is_symlink():
        raise SporeOpenError(
            f"{mpath}: rootfs {m.rootfs.digest} is not in the store "
            f"{store.root}; pull the spore's bundle or rebuild it"
        )
    return m, mpath, rootfs


def write_spore(
    m: manifest.Manifest, out: Path, store: Store | None = None, *, replace: bool = True
) -> str:
    """Publish the spore directory ``out`` (``manifest.json`` + ``id``) and record it as a
    root of ``store``, so prune keeps what it names; returns the manifest id.

    The directory is built beside ``out`` and renamed into place whole. ``replace``:
    an existing spore directory (and only that, atomic.replace_dir) is swapped out in
    the same step (build, fork); otherwise an existing ``out`` is refused, even one
    created meanwhile (pull, unpack). The root record is written *before* the rename
    and keyed by path and id, so no crash leaves a spore at ``out`` without its
    record; the replaced spore's record is dropped afterwards (a crash in between
    leaves it for prune to drop). Callers hold the store lock shared, so a prune sees
    the spore and its record together or neither."""
    data = manifest.encode(m)
    mid = manifest.manifest_id(data)
    out = out.absolute()
    if not replace and (out.exists() or out.is_symlink()):
        raise NotReplaceable(f"{out}: already exists; remove it or choose another --out")
    root = storeroots.root_for(out, mid) if store is not None else None
    old_id = storeroots.read_id(out) if store is not None and replace else None
    old = storeroots.root_for(out, old_id) if old_id is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        atomic_write(tmp / MANIFEST, data)
        atomic_write(tmp / ID_FILE, mid.encode() + b"\n")
        if store is not None and root is not None:
            storeroots.add(store.root, root)
        if replace:
            replace_dir(tmp, out, SPORE_DIR)  # never a moment without a whole spore at ``out``
        else:
            publish_new_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if store is not None and old is not None and old != root:
        with contextlib.suppress(OSError):
            storeroots.discard(store.root, old)
    return mid


def keep_spore(text: str, store: Store) -> tuple[storeroots.Root, int]:
    """Record an existing spore directory (``DIR`` or ``DIR@blake3:<id>``), e.g. one
    moved or copied by hand, as a root of ``store``. Returns the root and how many of
    the objects it names (chunks, state objects, rootfs) the store does not hold."""
    from sporevm.spore.chunks import ChunkStore

    path, pin = split_pin(text)
    if not path.is_dir():
        raise SporeOpenError(
            f"{path}: not a spore directory (expected {MANIFEST} and {ID_FILE} in it)"
        )
    mid, m, _, _ = _read(path, None)  # the id file, which prune checks, must match
    if pin is not None and pin != mid:
        raise SporeOpenError(f"{path}: manifest id is {mid}, you pinned {pin}")
    root = storeroots.Root(storeroots.check_path(os.path.realpath(path), str(path)), mid)
    storeroots.add(store.root, root)
    chunks = ChunkStore(store)
    objects = [cid for cid, _, _ in manifest.objects(m)]
    missing = sum(not chunks.has(c) for c in set(objects))
    missing += not store.rootfs_path(m.rootfs.digest).is_file()
    return root, missing
