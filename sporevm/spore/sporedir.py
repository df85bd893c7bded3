"""The spore directory on disk: ``manifest.json`` plus ``id``, and how it is opened.

A spore directory holds the manifest's canonical bytes (docs/spore-format.md)
and ``id``, the BLAKE3 of those bytes; the chunks and state objects it names
live in a store's chunk CAS, the rootfs in its ``rootfs/blake3/``. Builds write
it (``write_spore``), ``spore run --from``/``fork``/``inspect`` and bundles read
it, always through ``read_spore``: the id, from the ``id`` file or an explicit
``DIR@blake3:<id>`` pin, is checked against the bytes before they are decoded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sporevm.atomic import DirKind, atomic_write, replace_dir
from sporevm.errors import SporeError
from sporevm.spore import manifest
from sporevm.store import Store
from sporevm.vmm.board import SLOT_BLK

MANIFEST = "manifest.json"
ID_FILE = "id"  # "blake3:<hex>\n" of manifest.json: any edited byte is caught on open
ROOTFS_KIND = "ext4-immutable"
# An existing output is replaced only if it is empty or holds exactly these names.
SPORE_DIR = DirKind("spore directory", MANIFEST, frozenset({MANIFEST, ID_FILE}))


class SporeOpenError(SporeError):
    """A spore directory cannot be used here."""


def split_pin(text: str) -> tuple[Path, str | None]:
    """``DIR@blake3:<hex>`` pins the manifest id; without a pin the spore's id file is used."""
    base, sep, pin = text.rpartition("@")
    if sep and pin.startswith("blake3:"):
        return Path(base), pin
    return Path(text), None


def _read(path: Path, pin: str | None) -> tuple[str, manifest.Manifest, bytes, Path]:
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
            raise SporeOpenError(f"{path}: no readable {ID_FILE} file; the spore is incomplete "
                                 "(pass DIR@blake3:<manifest id> to pin it explicitly)") from None
    if want is not None and mid != want:
        raise SporeOpenError(f"{mpath}: manifest id is {mid}, expected {want}; the manifest "
                             "was modified or is not the spore you pinned")
    return mid, manifest.decode(data, str(mpath)), data, mpath


def read_spore(text: str) -> tuple[str, manifest.Manifest, bytes]:
    """(id, manifest, exact bytes) of ``DIR`` or ``DIR@blake3:<id>``, id checked first."""
    path, pin = split_pin(text)
    mid, m, data, _ = _read(path, pin)
    return mid, m, data


def open_spore(path: Path, store: Store,
               pin: str | None = None) -> tuple[manifest.Manifest, Path, Path]:
    """(manifest, manifest path, rootfs path in the store) — everything checked up front.

    One edited byte anywhere fails here, before any VM; so does a rootfs of another
    kind or slot, or one this store does not hold.
    """
    _, m, _, mpath = _read(path, pin)
    if m.rootfs.kind != ROOTFS_KIND or m.rootfs.blk_slot != SLOT_BLK:
        raise SporeOpenError(f"{mpath}: rootfs kind {m.rootfs.kind!r} on slot "
                             f"{m.rootfs.blk_slot} is not supported")
    rootfs = store.rootfs_path(m.rootfs.digest)
    if not rootfs.is_file() or rootfs.is_symlink():
        raise SporeOpenError(f"{mpath}: rootfs {m.rootfs.digest} is not in the store "
                             f"{store.root}; pull the spore's bundle or rebuild it")
    return m, mpath, rootfs


def write_spore(m: manifest.Manifest, out: Path) -> str:
    """Publish ``out/manifest.json`` atomically (a whole new directory replaces the old)."""
    data = manifest.encode(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-spore-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        atomic_write(tmp / MANIFEST, data)
        atomic_write(tmp / ID_FILE, manifest.manifest_id(data).encode() + b"\n")
        replace_dir(tmp, out, SPORE_DIR)  # never a moment without a whole spore at ``out``
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest.manifest_id(data)
