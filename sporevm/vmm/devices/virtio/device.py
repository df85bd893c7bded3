"""What every virtio device implements, independent of the transport that carries it.

A device declares its id, feature bits, config space and queue sizes, and
handles queue notifications. The transport (mmio.py) owns the register file,
feature negotiation and interrupts; a device reaches it only through the
small DeviceLink interface, so blk/console/rng never see MMIO.

Locking: ``lock`` is shared with the transport. vCPU threads (MMIO exits) and
host threads (console ``send``) both take it before touching queues.
"""

from __future__ import annotations

import threading
from typing import Protocol

from sporevm.vmm.memory import GuestMemory

from .queue import Virtqueue
from .state import State, expect_keys

F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33
F_RING_PACKED = 1 << 34

# Offered by the transport for every device. EVENT_IDX and packed rings are not
# offered: fewer code paths reading guest memory, and Linux works without them.
TRANSPORT_FEATURES = F_VERSION_1 | F_INDIRECT_DESC


class DeviceLink(Protocol):
    """The transport as a device sees it."""

    def signal_used(self, queue: int) -> None:
        """Used buffers were added to ``queue``: interrupt unless the driver suppressed it."""

    def needs_reset(self, reason: str) -> None:
        """The device hit guest-caused corruption: set DEVICE_NEEDS_RESET and stop."""

    def config_changed(self) -> None:
        """The device changed its config space (net link status): tell a live driver."""


class VirtioDevice:
    """Base class: override the class attributes, ``notify`` and what else applies."""

    device_id = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.queues: list[Virtqueue] = []
        self._mem: GuestMemory | None = None
        self._link: DeviceLink | None = None
        self.driver_features = 0
        self.active = False  # DRIVER_OK set and no NEEDS_RESET

    # -- wiring (transport calls these) -------------------------------------

    def bind(self, mem: GuestMemory, queues: list[Virtqueue], link: DeviceLink) -> None:
        self._mem, self.queues, self._link = mem, queues, link

    @property
    def mem(self) -> GuestMemory:
        if self._mem is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a transport")
        return self._mem

    @property
    def link(self) -> DeviceLink:
        if self._link is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a transport")
        return self._link

    # -- device description -------------------------------------------------

    def features(self) -> int:
        """Device-specific feature bits offered (the transport adds its own)."""
        return 0

    def config(self) -> bytes:
        """The device config space as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver write into config space; read-only by default (ignored)."""

    # -- lifecycle ----------------------------------------------------------

    def activate(self) -> None:
        """DRIVER_OK was set: queues are live. May raise SporeError (-> NEEDS_RESET)."""
        self.active = True

    def notify(self, index: int) -> None:
        """The driver kicked queue ``index`` (ready, in range, device active).

        May raise any SporeError for guest-caused corruption; the transport
        turns it into DEVICE_NEEDS_RESET.
        """
        raise NotImplementedError

    def reset(self) -> None:
        """Device reset (status 0): forget in-flight state tied to the rings."""
        self.active = False
        self.driver_features = 0

    # -- snapshot -----------------------------------------------------------

    def state(self) -> State:
        """Device-specific snapshot fields (plain ints/bools/strings)."""
        return {}

    def restore(self, state: object) -> None:
        """Load ``state()`` output; raise VirtioStateError on anything unexpected."""
        expect_keys(state, f"device {self.device_id}", set())
