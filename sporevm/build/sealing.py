"""Seal a running build VM into a spore manifest (the directory: sporevm/spore/sporedir.py)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from sporevm import __version__
from sporevm.build.guest import GuestPlatform
from sporevm.runtime.host import host_contract
from sporevm.runtime.launcher import VmProcess
from sporevm.spore import manifest
from sporevm.spore.chunks import MemoryIndex
from sporevm.spore.platform import SLOT_BLK
from sporevm.spore.sporedir import ROOTFS_KIND

if TYPE_CHECKING:  # types only: `spore run --from` should not import the OCI/YAML stacks
    from sporevm.build.imagefs import RootfsRecord
    from sporevm.sporefile import Sporefile


def platform_contract(
    guest: GuestPlatform, memory: int, vcpus: int, *, net: bool = False
) -> manifest.PlatformContract:
    """What this host offers a VM of ``guest``, with a NIC or without (the monitor checks
    the same contract)."""
    return host_contract(
        memory=memory,
        vcpus=vcpus,
        kernel=guest.kernel_digest,
        initrd=guest.initrd_digest,
        cmdline=guest.cmdline,
        net=net,
    )


def seal(
    vm: VmProcess,
    sf: Sporefile,
    rootfs: RootfsRecord,
    guest: GuestPlatform,
    step_keys: list[str],
    lock_path: Path,
) -> manifest.Manifest:
    """Snapshot the (idle) VM into the store and describe it; the VM stays paused. The
    network recorded is the one the VM runs with (its NIC and policy)."""
    net = vm.spec.network
    event = vm.snapshot()  # checked in full by the protocol's decoder (untrusted monitor)
    lock_digest = None
    if lock_path.is_file():
        lock_digest = "blake3:" + blake3.blake3(lock_path.read_bytes()).hexdigest()
    return manifest.Manifest(
        platform=platform_contract(guest, sf.machine.memory, sf.machine.vcpus, net=net is not None),
        rootfs=manifest.RootfsRef(
            ROOTFS_KIND,
            rootfs.digest,
            rootfs.size,
            rootfs.image,
            rootfs.builder,
            SLOT_BLK,
            rootfs.table,
        ),
        memory=MemoryIndex(event.chunk_size, event.chunks),
        state={"vm": manifest.StateObject(event.state.digest, event.state.size)},
        generation=manifest.Generation(str(uuid.uuid4()), None, 0, 1),
        network=net.allow if net is not None else None,
        annotations={"org.spore.name": sf.name},
        provenance=manifest.Provenance(
            sf.digest, lock_digest, tuple(step_keys), f"sporevm/{__version__}"
        ),
    )
