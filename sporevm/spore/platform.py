"""The platform contract's constants: what a host must provide to restore a spore.

A spore's manifest records its platform (``manifest.PlatformContract``): the
architecture, the CPU profile, the device model, memory, vCPUs, kernel, initrd
and cmdline. The values that are not measured from the host are defined here,
beside the format, so code that only reads or moves spores never loads a VMM
(docs/spore-format.md, "platform"). A backend implements them: the KVM one in
``sporevm/vmm/board.py`` wires exactly these slots.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCH = "x86_64"

# The device model: virtio-mmio window n at VIRTIO_BASE + n × 4 KiB on GSI
# VIRTIO_FIRST_GSI + n, in this slot order. Bump DEVICE_MODEL when slots, devices
# or their features change, and keep the old model restorable (BOARD_MODELS below).
# /2: the console offers VIRTIO_CONSOLE_F_MULTIPORT and
# the agent's channel is a named generic port instead of /dev/hvc0.
DEVICE_MODEL = "spore-board/2"
SLOT_BLK, SLOT_CONSOLE, SLOT_RNG = 0, 1, 2
# A VM with a network has one more slot, the NIC (virtio-net to its egress gateway,
# docs/network.md), and so a device model of its own: a spore without a NIC keeps
# "spore-board/2" (and restores as before); one with a NIC restores only where the
# monitor has one too (manifest.check_platform says so in one line).
DEVICE_MODEL_NET = "spore-board-net/2"
SLOT_NET = 3
GUEST_MAC = b"\x02SPRE\x02"  # 02:53:50:52:45:02, the guest's NIC; the gateway is ...:01
GUEST_MTU = 65520


def device_model(net: bool) -> str:
    """The device model a new VM gets: what builds seal and fresh runs boot."""
    return DEVICE_MODEL_NET if net else DEVICE_MODEL


@dataclass(frozen=True)
class BoardModel:
    """How a backend builds the board of one device model."""

    net: bool  # slot 3 holds the NIC
    legacy_console: bool  # slot 1 is the /1 console: no MULTIPORT, the guest's /dev/hvc0


# Every device model a host restores; anything else is refused (manifest.check_platform).
# The /1 models are restored, never built: spores pinned by id before /2 keep working.
BOARD_MODELS = {
    "spore-board/1": BoardModel(net=False, legacy_console=True),
    "spore-board-net/1": BoardModel(net=True, legacy_console=True),
    DEVICE_MODEL: BoardModel(net=False, legacy_console=False),
    DEVICE_MODEL_NET: BoardModel(net=True, legacy_console=False),
}


VIRTIO_BASE = 0xD0000000
VIRTIO_FIRST_GSI = 5
GUEST_ROOT = "/dev/vda"  # what the guest sees in SLOT_BLK
# SLOT_CONSOLE's one port, by name: the guest finds /dev/vportNp0 by it
# (docs/devices.md); spore.agent= on the guest's cmdline.
GUEST_AGENT = "org.spore.agent"
GUEST_AGENT_LEGACY = "/dev/hvc0"  # the /1 models' console port: restored guests have it open

# The CPU profile is "<host class>/<version>": the host class names the hypervisor
# behind the backend (KVM: the kernel module, e.g. "kvm_pvm", whose guests need the
# fix-ups of docs/vmm.md); the version changes when the CPUID/MSR profile a backend
# exposes does.
CPU_PROFILE_VERSION = "v1"


def cpu_profile(host_class: str) -> str:
    return f"{host_class}/{CPU_PROFILE_VERSION}"
