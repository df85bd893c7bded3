"""Every key the build caches a result under, computed here and nowhere else.

    rootfs    BLAKE3(json: builder, e2fsprogs, epoch, image manifest, layers[, files])
    boot      BLAKE3(domain, rootfs, kernel, initrd, cmdline, machine, device model
                     [, network policy])
    step i    BLAKE3(domain, key(step i-1), canonical step i, digests of its files)
    spore     BLAKE3(domain, last step key, snapshot.after, verify checks)

(The managed kernel's and the initramfs' keys are their builders' own: kernel.cache_key,
initrd.build_key; the bundle's is the publish stage's, sporevm/pipeline/publish.py.)

Each step key names the snapshot taken after that step: a changed step resumes the
snapshot of the step before it. A domain's version changes when what its result holds
changes, so older cached results become misses, never hits: v2 boot snapshots are taken
only once the guest has settled (vmm/quiesce.py).
"""

from __future__ import annotations

import json
from typing import Any

import blake3

from sporevm.build.fileslayer import FilesLayer
from sporevm.build.guest import GuestPlatform
from sporevm.build.oci import ResolvedImage
from sporevm.build.rootfs import ROOTFS_EPOCH, tool_versions
from sporevm.errors import SporeError
from sporevm.spore.platform import device_model
from sporevm.sporefile import Sporefile, canonical_machine, canonical_step

# Bump whenever the bytes of a rootfs can change for the same image and tools.
ROOTFS_BUILDER = "spore-rootfs/1"


def _key(*parts: bytes) -> str:
    h = blake3.blake3()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def rootfs_key(image: ResolvedImage, files: FilesLayer | None = None) -> str:
    material: dict[str, Any] = {
        "domain": "spore/rootfs-key/v1",
        "builder": ROOTFS_BUILDER,
        "e2fsprogs": tool_versions(),
        "epoch": ROOTFS_EPOCH,
        "manifest": image.manifest_digest,
        "layers": [[d.digest, d.media_type] for d in image.layers],
    }
    if files is not None:  # absent, not null: rootfs without files keep their keys
        material["files"] = files.digest()
    return blake3.blake3(json.dumps(material, sort_keys=True).encode()).hexdigest()


def network_policy(sf: Sporefile) -> list[str] | None:
    """The Sporefile's network.allow, checked and canonical (None: no network, no NIC)."""
    if sf.network is None:
        return None
    from sporevm.runtime.network import canonical_allow  # the egress policy: only if needed

    try:
        return canonical_allow(sf.network)
    except SporeError as exc:
        raise SporeError(f"{sf.path}: network.allow: {exc}") from None


def boot_key(sf: Sporefile, rootfs_digest: str, guest: GuestPlatform) -> str:
    """The network policy is part of the key (and so of every step's): a step that ran
    under another policy may have fetched other things. A Sporefile without network:
    keeps the key it had before networks existed."""
    policy = network_policy(sf)
    parts = [
        b"spore/boot-key/v2",
        rootfs_digest.encode(),
        guest.kernel_digest.encode(),
        guest.initrd_digest.encode(),
        guest.cmdline.encode(),
        canonical_machine(sf.machine),
        device_model(policy is not None).encode(),
    ]
    if policy is not None:
        parts.append(json.dumps({"network": policy}, sort_keys=True).encode())
    return _key(*parts)


def step_keys(sf: Sporefile, boot: str) -> list[str]:
    keys: list[str] = []
    prev = boot
    for step in sf.steps:
        prev = _key(b"spore/step-key/v1", prev.encode(), canonical_step(step))
        keys.append(prev)
    return keys


def after_index(sf: Sporefile) -> int:
    """How many steps the spore includes (snapshot.after; default: all of them)."""
    if sf.snapshot_after is None:
        return len(sf.steps)
    return [st.name for st in sf.steps].index(sf.snapshot_after) + 1


def spore_key(sf: Sporefile, last_step_key: str) -> str:
    """The published spore depends on the whole chain, snapshot.after and the checks."""
    checks = [[c.run if isinstance(c.run, str) else list(c.run), c.timeout] for c in sf.verify]
    material = json.dumps(
        {"chain": last_step_key, "after": after_index(sf), "verify": checks}, sort_keys=True
    )
    return blake3.blake3(b"spore/spore-key/v1\0" + material.encode()).hexdigest()
