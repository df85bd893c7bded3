"""The guest platform a VM boots: managed kernel (or --kernel), initramfs, cmdline.

Every piece is content-addressed; its digests become part of the boot key and,
later, of a spore's platform contract.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sporevm.build.initrd import ensure_initrd
from sporevm.build.kernel import (
    KernelArtifact,
    default_cmdline,
    detect_host_class,
    ensure_kernel,
)
from sporevm.build.progress import Reporter
from sporevm.errors import UsageError
from sporevm.store import Store, blake3_file

# Host classes whose guests may have more than one vCPU. kvm-pvm's managed kernel stays
# uniprocessor: built with SMP it did boot 2 vCPUs there, but every one-vCPU cold boot
# (the common case) took ~65% longer, its per-CPU setup being emulated kernel code
# (docs/vmm.md, "SMP").
SMP_HOST_CLASSES = frozenset({"kvm"})


def check_vcpus(vcpus: int, host_class: str, setting: str) -> None:
    """Refuse, before any VM exists, more vCPUs than this host class can give a guest.

    ``setting`` names where the count came from (``--vcpus``, ``machine.vcpus:``)."""
    if vcpus > 1 and host_class not in SMP_HOST_CLASSES:
        raise UsageError(
            f"{setting} {vcpus} needs SMP, which host class {host_class} does not support; use 1"
        )


@dataclass(frozen=True)
class GuestPlatform:
    host_class: str
    kernel: Path  # the image handed to the VMM (vmlinux on kvm-pvm, bzImage elsewhere)
    kernel_digest: str
    initrd: Path
    initrd_digest: str
    cmdline: str


def lookup_guest(store: Store, kernel: Path | None = None) -> GuestPlatform | None:
    """The guest platform if everything is already built; never builds (cheap check)."""
    from sporevm.build import initrd as initrd_mod
    from sporevm.build import kernel as kernel_mod

    host_class = detect_host_class()
    if kernel is not None:
        if not kernel.is_file():
            return None
        image, digest = kernel, blake3_file(kernel)[0]
    else:
        key = kernel_mod.cache_key(kernel_mod.build_inputs(host_class, store=store))
        art = kernel_mod.cached_kernel(store, key, host_class)
        if art is None:
            return None
        if host_class == "kvm-pvm":
            image, digest = art.vmlinux_path, art.vmlinux_digest
        else:
            image, digest = art.path, art.digest
    agent = initrd_mod.cached_artifact(store, "guest-agent", initrd_mod.build_key(store), "agent")
    if agent is None:
        return None
    hit = initrd_mod.cached_artifact(store, "initrd", initrd_mod.initrd_key(agent[0]), "initrd")
    if hit is None:
        return None
    if kernel is None:
        store.touch(image.parent)  # last use of the kernel entry, for `spore cache prune`
    return GuestPlatform(host_class, image, digest, hit[1], hit[0], default_cmdline(host_class))


def _boot_image(art: KernelArtifact) -> tuple[Path, str]:
    """The image a VM of ``art``'s host class boots, and its digest: kvm_pvm emulates
    kernel code, where decompressing a bzImage costs ~28 s, so it boots the ELF."""
    if art.host_class == "kvm-pvm":
        return art.vmlinux_path, art.vmlinux_digest
    return art.path, art.digest


def ensure_guest(
    store: Store, reporter: Reporter, kernel: Path | None = None, *, verify: bool = True
) -> GuestPlatform:
    """The guest platform, built where missing. ``verify=False`` (a restore: the spore's
    memory holds its kernel, and the monitor never reads these files) takes the stored
    kernel's and initramfs's recorded digests without re-hashing their bytes; a boot
    hashes them before they reach a VM."""
    host_class = detect_host_class()
    if kernel is not None:
        if not kernel.is_file():
            raise UsageError(f"--kernel {kernel}: no such file; give a bzImage or ELF vmlinux")
        image, digest = kernel, blake3_file(kernel)[0]
    else:

        def say(msg: str) -> None:
            reporter.info(f"kernel: {msg}")

        art = ensure_kernel(store, host_class, say, verify=False)
        image, digest = _boot_image(art)
        # Only the image this VM boots is hashed (the other is ~16 MiB of nothing);
        # a damaged one makes the entry a miss, rebuilt as ensure_kernel does.
        if verify and blake3_file(image)[0] != digest:
            image, digest = _boot_image(ensure_kernel(store, host_class, say))
    initrd = ensure_initrd(store, verify)
    if kernel is None:
        store.touch(image.parent)
    return GuestPlatform(
        host_class, image, digest, initrd.path, initrd.digest, default_cmdline(host_class)
    )


# What restores in this process resolved (guest_for_restore), by store, host class, PATH.
_for_restore: dict[tuple[str, str, str], GuestPlatform] = {}


def guest_for_restore(
    store: Store, reporter: Reporter, kernel: Path | None = None
) -> GuestPlatform:
    """``ensure_guest(verify=False)``, remembered for this process's later restores.

    A restore only compares the platform's digests with the spore's contract (its
    kernel is in the spore's RAM), and a stored kernel and initramfs, once resolved,
    stay what they are while their entries exist (content-addressed). So a process that
    restores again and again (the resident server's handlers, a program on the API)
    resolves them once, not ~100 file lookups per restore; the entries are checked to
    still exist each time. A toolchain change that would build a new kernel is seen by
    the next process (the server restarts when its code changes; builds never use this).
    """
    if kernel is not None:
        return ensure_guest(store, reporter, kernel, verify=False)
    key = (str(store.root), detect_host_class(), os.environ.get("PATH", ""))
    hit = _for_restore.get(key)
    if hit is not None and hit.kernel.is_file() and hit.initrd.is_file():
        return hit
    guest = ensure_guest(store, reporter, None, verify=False)
    _for_restore[key] = guest
    return guest


def remember_for_restore(store: Store) -> None:
    """Resolve this store's guest platform now, if it is all built (never builds), so
    that forks of this process (the resident server's handlers) start with it."""
    guest = lookup_guest(store)
    if guest is not None:
        _for_restore[(str(store.root), guest.host_class, os.environ.get("PATH", ""))] = guest
