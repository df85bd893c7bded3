"""Seal a running build VM into a spore, and open a spore for `spore run --from`.

A spore on disk is a directory holding one file, `manifest.json` (canonical
bytes, docs/spore-format.md); the memory chunks and state objects it names
live in the store's chunk CAS (`chunks/blake3/`). Bundles (distribution) pack
both; until then a spore is usable on the machine that holds its chunks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from sporevm import __version__
from sporevm.atomic import atomic_write, fsync_dir
from sporevm.build.guest import GuestPlatform
from sporevm.errors import SporeError
from sporevm.spore import manifest
from sporevm.spore.chunks import MemoryIndex
from sporevm.spore.launcher import VmProcess
from sporevm.spore.monitor import cpu_profile
from sporevm.store import Store
from sporevm.vmm.board import DEVICE_MODEL, SLOT_BLK

if TYPE_CHECKING:  # types only: `spore run --from` should not import the OCI/YAML stacks
    from sporevm.build.imagefs import RootfsRecord
    from sporevm.sporefile import Sporefile

MANIFEST = "manifest.json"
ID_FILE = "id"  # "blake3:<hex>\n" of manifest.json: any edited byte is caught on open
ROOTFS_KIND = "ext4-immutable"


class SporeOpenError(SporeError):
    """A spore directory cannot be used here."""


def platform_contract(guest: GuestPlatform, memory: int, vcpus: int) -> manifest.PlatformContract:
    return manifest.PlatformContract(
        arch="x86_64", cpu_profile=cpu_profile(), device_model=DEVICE_MODEL, memory=memory,
        vcpus=vcpus, kernel=guest.kernel_digest, initrd=guest.initrd_digest,
        cmdline=guest.cmdline,
    )


def seal(vm: VmProcess, sf: Sporefile, rootfs: RootfsRecord, guest: GuestPlatform,
         step_keys: list[str], lock_path: Path) -> manifest.Manifest:
    """Snapshot the (idle) VM into the store and describe it; the VM stays paused."""
    event = vm.snapshot()
    chunks = tuple(c if c is None else str(c) for c in event["chunks"])
    lock_digest = None
    if lock_path.is_file():
        lock_digest = "blake3:" + blake3.blake3(lock_path.read_bytes()).hexdigest()
    return manifest.Manifest(
        platform=platform_contract(guest, sf.machine.memory, sf.machine.vcpus),
        rootfs=manifest.RootfsRef(ROOTFS_KIND, rootfs.digest, rootfs.size, rootfs.image,
                                  rootfs.builder, SLOT_BLK),
        memory=MemoryIndex(int(event["chunk_size"]), chunks),
        state={"vm": manifest.StateObject(str(event["state"]["digest"]),
                                          int(event["state"]["size"]))},
        generation=manifest.Generation(str(uuid.uuid4()), None, 0, 1),
        annotations={"org.spore.name": sf.name},
        provenance=manifest.Provenance(sf.digest, lock_digest, tuple(step_keys),
                                       f"sporevm/{__version__}"),
    )


def write_spore(m: manifest.Manifest, out: Path) -> str:
    """Publish ``out/manifest.json`` atomically (a whole new directory replaces the old)."""
    data = manifest.encode(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-spore-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        atomic_write(tmp / MANIFEST, data)
        atomic_write(tmp / ID_FILE, manifest.manifest_id(data).encode() + b"\n")
        if out.exists():
            old = out.with_name(f".old-{out.name}-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest.manifest_id(data)


def split_pin(text: str) -> tuple[Path, str | None]:
    """``DIR@blake3:<hex>`` pins the manifest id; without a pin the spore's id file is used."""
    base, sep, pin = text.rpartition("@")
    if sep and pin.startswith("blake3:"):
        return Path(base), pin
    return Path(text), None


def open_spore(path: Path, store: Store,
               pin: str | None = None) -> tuple[manifest.Manifest, Path, Path]:
    """(manifest, manifest path, rootfs path in the store) — everything checked up front.

    The manifest's id (BLAKE3 of its bytes) must equal ``pin`` when given, else the
    spore directory's ``id`` file: one edited byte anywhere fails here, before any VM.
    """
    mpath = path / MANIFEST if path.is_dir() else path
    try:
        with open(mpath, "rb") as fh:
            data = fh.read(manifest.MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise SporeOpenError(f"{path}: no spore here (expected {MANIFEST})") from None
    mid = manifest.manifest_id(data)
    want = pin
    if want is None and path.is_dir():
        try:
            want = (path / ID_FILE).read_text(encoding="ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            raise SporeOpenError(f"{path}: no readable {ID_FILE} file; the spore is incomplete "
                                 "(pass DIR@blake3:<manifest id> to pin it explicitly)") from None
    if want is not None and mid != want:
        raise SporeOpenError(f"{mpath}: manifest id is {mid}, expected {want}; the manifest "
                             "was modified or is not the spore you pinned")
    m = manifest.decode(data, str(mpath))
    if m.rootfs.kind != ROOTFS_KIND or m.rootfs.blk_slot != SLOT_BLK:
        raise SporeOpenError(f"{mpath}: rootfs kind {m.rootfs.kind!r} on slot "
                             f"{m.rootfs.blk_slot} is not supported")
    rootfs = store.rootfs_path(m.rootfs.digest)
    if not rootfs.is_file() or rootfs.is_symlink():
        raise SporeOpenError(f"{mpath}: rootfs {m.rootfs.digest} is not in the store "
                             f"{store.root}; pull the spore's bundle or rebuild it")
    return m, mpath, rootfs
