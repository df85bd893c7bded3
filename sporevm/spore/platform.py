"""The platform contract's constants: what a host must provide to restore a spore.

A spore's manifest records its platform (``manifest.PlatformContract``): the
architecture, the CPU profile, the device model, memory, vCPUs, kernel, initrd
and cmdline. The values that are not measured from the host are defined here,
beside the format, so code that only reads or moves spores never loads a VMM
(docs/spore-format.md, "platform"). A backend implements them: the KVM one in
``sporevm/vmm/board.py`` wires exactly these slots.
"""

from __future__ import annotations

ARCH = "x86_64"

# The device model: virtio-mmio window n at VIRTIO_BASE + n × 4 KiB on GSI
# VIRTIO_FIRST_GSI + n, in this slot order. Bump DEVICE_MODEL when slots, devices
# or their features change.
DEVICE_MODEL = "spore-board/1"
SLOT_BLK, SLOT_CONSOLE, SLOT_RNG = 0, 1, 2
# A VM with a network has one more slot, the NIC (virtio-net to its egress gateway,
# docs/network.md), and so a device model of its own: a spore without a NIC keeps
# "spore-board/1" (and restores as before); one with a NIC restores only where the
# monitor has one too (manifest.check_platform says so in one line).
DEVICE_MODEL_NET = "spore-board-net/1"
SLOT_NET = 3
GUEST_MAC = b"\x02SPRE\x02"  # 02:53:50:52:45:02, the guest's NIC; the gateway is ...:01
GUEST_MTU = 65520


def device_model(net: bool) -> str:
    return DEVICE_MODEL_NET if net else DEVICE_MODEL


VIRTIO_BASE = 0xD0000000
VIRTIO_FIRST_GSI = 5
GUEST_ROOT = "/dev/vda"  # what the guest sees in SLOT_BLK
GUEST_AGENT = "/dev/hvc0"  # and in SLOT_CONSOLE

# The CPU profile is "<host class>/<version>": the host class names the hypervisor
# behind the backend (KVM: the kernel module, e.g. "kvm_pvm", whose guests need the
# fix-ups of docs/vmm.md); the version changes when the CPUID/MSR profile a backend
# exposes does.
CPU_PROFILE_VERSION = "v1"


def cpu_profile(host_class: str) -> str:
    return f"{host_class}/{CPU_PROFILE_VERSION}"
