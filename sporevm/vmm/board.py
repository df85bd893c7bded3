"""The spore microVM: a Machine with the standard devices wired to a kernel, initrd and rootfs.

Device slots are part of the platform contract (docs/vmm.md), whose constants
the format defines (``sporevm/spore/platform.py``): virtio-mmio window n at
0xd0000000 + n × 4 KiB on GSI 5 + n, in this order:

    0  virtio-blk      the immutable rootfs, read-only        (guest: /dev/vda)
    1  virtio-console  the agent channel, port org.spore.agent (guest: /dev/vport0p0)
    2  virtio-rng      host entropy
    3  virtio-net      the NIC, only when the VM has a network    (guest: eth0)

A board without a network has no slot 3 at all (and the device model
``spore-board/2``); with one it is ``spore-board-net/2``. The NIC's host side is a
descriptor the caller opened (the monitor creates no sockets, docs/network.md).

``legacy_console`` builds the board of the /1 models (``spore-board/1``,
``spore-board-net/1``), only to restore their spores: slot 1 is then the
single-port console without MULTIPORT, the guest's ``/dev/hvc0``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from sporevm.spore.blocktable import BlockTable
from sporevm.spore.platform import (
    GUEST_AGENT,
    GUEST_AGENT_LEGACY,
    GUEST_ROOT,
    SLOT_BLK,
    SLOT_CONSOLE,
    SLOT_NET,
    SLOT_RNG,
    VIRTIO_BASE,
    VIRTIO_FIRST_GSI,
)
from sporevm.vmm.devices.virtio import WINDOW, VirtioMmio, kernel_cmdline
from sporevm.vmm.devices.virtio.blk import BlkDevice
from sporevm.vmm.devices.virtio.console import ConsoleDevice
from sporevm.vmm.devices.virtio.device import VirtioDevice
from sporevm.vmm.devices.virtio.net import NetDevice
from sporevm.vmm.devices.virtio.rng import RngDevice
from sporevm.vmm.machine import Machine
from sporevm.vmm.memory import GuestMemory


@dataclass(frozen=True)
class NetConfig:
    """The NIC: the host end of its frame channel (opened by the caller, not owned
    here), its MAC and MTU (both part of its snapshot state)."""

    fd: int
    mac: bytes
    mtu: int


@dataclass(frozen=True)
class BoardConfig:
    memory: int
    vcpus: int
    cmdline: str  # the kernel's own options; device declarations are appended here
    rootfs_fd: int  # opened read-only by the caller
    rootfs_size: int
    rootfs_serial: bytes = b""
    net: NetConfig | None = None  # None: no NIC, no slot 3
    # A restored spore's rootfs: each block checked on first read (spore/blocktable.py).
    rootfs_table: BlockTable | None = None
    # The /1 device models' console (platform.BOARD_MODELS): restoring their spores only.
    legacy_console: bool = False


@dataclass(frozen=True)
class BoardWiring:
    """Where the board's host-side ends go: the agent console's output (and its room for
    more input), the serial log; ``dirty_log`` registers RAM with KVM's dirty log."""

    on_agent_output: Callable[[bytes], None]
    on_agent_writable: Callable[[], None] | None = None
    serial_output: Callable[[bytes], None] | None = None
    dirty_log: bool = False
    on_bad_block: Callable[[str], None] | None = None  # one line per rootfs block that failed


@dataclass
class Board:
    machine: Machine
    console: ConsoleDevice
    blk: BlkDevice
    rng: RngDevice
    transports: list[VirtioMmio]  # in slot order
    cmdline: str
    net: NetDevice | None = None


def slot_base(slot: int) -> int:
    return VIRTIO_BASE + slot * WINDOW


def build_board(
    cfg: BoardConfig, wiring: BoardWiring, *, memory: GuestMemory | None = None
) -> Board:
    """``memory``: RAM prepared before the VM exists (an eager restore); the machine owns it."""
    machine = Machine(
        cfg.memory,
        cfg.vcpus,
        serial_output=wiring.serial_output,
        dirty_log=wiring.dirty_log,
        memory=memory,
    )
    try:
        blk = BlkDevice(
            cfg.rootfs_fd,
            cfg.rootfs_size,
            serial=cfg.rootfs_serial,
            table=cfg.rootfs_table,
            on_bad_block=wiring.on_bad_block,
        )
        console = ConsoleDevice(
            wiring.on_agent_output,
            on_writable=wiring.on_agent_writable,
            port_name=GUEST_AGENT.encode(),
            legacy=cfg.legacy_console,
        )
        rng = RngDevice()
        slots: list[tuple[int, VirtioDevice]] = [
            (SLOT_BLK, blk),
            (SLOT_CONSOLE, console),
            (SLOT_RNG, rng),
        ]
        net = None
        if cfg.net is not None:
            net = NetDevice(cfg.net.fd, cfg.net.mac, mtu=cfg.net.mtu)
            slots.append((SLOT_NET, net))
        transports: list[VirtioMmio] = []
        decls: list[str] = []
        for slot, dev in slots:
            base, gsi = slot_base(slot), VIRTIO_FIRST_GSI + slot
            t = VirtioMmio(dev, machine.ram, machine.irq_line(gsi), base=base)
            machine.add_mmio(base, WINDOW, t)
            transports.append(t)
            decls.append(kernel_cmdline(base, gsi))
        agent = GUEST_AGENT_LEGACY if cfg.legacy_console else GUEST_AGENT
        cmdline = " ".join(
            [cfg.cmdline, *decls, f"spore.root={GUEST_ROOT}", f"spore.agent={agent}"]
        )
        return Board(machine, console, blk, rng, transports, cmdline, net)
    except BaseException:
        machine.close()
        raise


def rootfs_size(fd: int) -> int:
    return os.fstat(fd).st_size
