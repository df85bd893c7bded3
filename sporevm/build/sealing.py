"""Seal a running build VM into a spore manifest (the directory: sporevm/spore/sporedir.py)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from sporevm import __version__
from sporevm.build.guest import GuestPlatform
from sporevm.spore import manifest
from sporevm.spore.chunks import MemoryIndex
from sporevm.spore.launcher import VmProcess
from sporevm.spore.monitor import cpu_profile
from sporevm.spore.sporedir import ROOTFS_KIND
from sporevm.vmm.board import DEVICE_MODEL, SLOT_BLK

if TYPE_CHECKING:  # types only: `spore run --from` should not import the OCI/YAML stacks
    from sporevm.build.imagefs import RootfsRecord
    from sporevm.sporefile import Sporefile

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
