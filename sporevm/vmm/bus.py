"""The device interfaces the VMM dispatches port and MMIO exits to.

Devices never see KVM: they get an offset within their window and bytes, and
raise interrupts through an ``IrqLine`` the machine wires to the irqchip.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class IrqLine(Protocol):
    def set_level(self, high: bool) -> None:
        """Level-triggered line: high while the device has an unacknowledged interrupt."""


@runtime_checkable
class QueueNotifier(Protocol):
    """A device whose queue kicks and interrupt the machine may move off the exit path
    (KVM_IOEVENTFD / KVM_IRQFD, notify.py): a virtio-mmio transport."""

    @property
    def notify_address(self) -> int | None: ...

    @property
    def queue_count(self) -> int: ...

    @property
    def irq_gsi(self) -> int | None: ...

    def notify_queue(self, index: int) -> None: ...

    def set_irq_line(self, line: IrqLine) -> None: ...


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes for a guest read at ``offset`` in the window."""

    def write(self, offset: int, data: bytes) -> None:
        """Handle a guest write at ``offset``; unknown offsets are ignored, never fatal."""


class Bus:
    """Maps [base, base + length) windows to devices (one bus for PIO, one for MMIO)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._windows: list[tuple[int, int, BusDevice]] = []

    def add(self, base: int, length: int, device: BusDevice) -> None:
        for b, n, _ in self._windows:
            if base < b + n and b < base + length:
                raise ValueError(f"{self.name} window {base:#x}+{length:#x} overlaps {b:#x}+{n:#x}")
        self._windows.append((base, length, device))
        self._windows.sort(key=lambda w: w[0])

    def find(self, addr: int) -> tuple[BusDevice, int] | None:
        for base, length, dev in self._windows:
            if base <= addr < base + length:
                return dev, addr - base
        return None

    def read(self, addr: int, size: int) -> bytes | None:
        hit = self.find(addr)
        return None if hit is None else hit[0].read(hit[1], size)

    def write(self, addr: int, data: bytes) -> bool:
        hit = self.find(addr)
        if hit is None:
            return False
        hit[0].write(hit[1], data)
        return True
