"""This host as a spore platform: its CPU profile and the platform contract it offers.

The one place a contract is built from the host (docs/spore-format.md, "platform"):
``spore build`` seals a spore with it, ``resume_vm`` checks a spore against it
before starting a monitor, and the monitor checks again with what only it knows.
"""

from __future__ import annotations

from sporevm.spore import platform
from sporevm.spore.manifest import PlatformContract


def cpu_profile() -> str:
    """The CPU profile this host's backend exposes: the KVM module behind /dev/kvm
    (kvm_pvm needs its own fix-ups) and the profile version."""
    from sporevm.vmm.kvm import host_class  # the ctypes ABI only when a contract is needed

    return platform.cpu_profile(host_class())


def host_contract(
    *, memory: int, vcpus: int, kernel: str, initrd: str, cmdline: str, net: bool = False
) -> PlatformContract:
    """What this host provides for a VM of ``memory`` and ``vcpus`` booting ``kernel`` and
    ``initrd`` (their blake3 digests) with ``cmdline``, with a NIC or without (``net``)."""
    return PlatformContract(
        arch=platform.ARCH,
        cpu_profile=cpu_profile(),
        device_model=platform.device_model(net),
        memory=memory,
        vcpus=vcpus,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
    )
