"""What a machine backend implements to produce and consume a spore's VM state.

The spore format defines the state (``vmstate.py``: ``spore-vmstate/v1``, its
x86 layouts in ``x86.py``) and the platform contract (``platform.py``); a
backend is a machine that can hand that state out of a paused VM and write it
into a fresh one. The runtime's capture and restore (``sporevm/runtime/``)
are written against these protocols only. The KVM backend is
``sporevm.vmm.machine.Machine`` (with ``Vcpu.capture``/``apply`` and each
device's ``state()``/``restore()`` next to the device); docs/vmm.md,
"Backends", says what a second one (QEMU TCG) has to provide.

Errors: every method that writes state raises ``VmStateError`` naming the part
the backend refused (``restoring vcpus[0].sregs: KVM refused the state (…)``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from sporevm.spore.vmstate import JsonObj, SerialState, VcpuState, VmState, VmWideState
from sporevm.spore.x86 import KvmClockData


class SerialBackend(Protocol):
    """The COM1 16550A: its registers and unread input."""

    def state(self) -> SerialState: ...

    def restore(self, s: SerialState) -> None: ...


class VirtioTransport(Protocol):
    """One virtio-mmio transport of the board, in slot order (docs/devices.md,
    "Snapshot state"): ``state()`` has exactly ``vmstate.VIRTIO_TRANSPORT_FIELDS``;
    ``restore`` checks every value against the attached device and raises (any
    ``SporeError``) on one it cannot take."""

    def state(self) -> JsonObj: ...

    def restore(self, state: object) -> None: ...


class MachineBackend(Protocol):
    """A machine whose paused state is a spore's: capture it, or apply it in order.

    Capture: ``held_still()`` around ``capture_vcpus``, ``capture_vm`` and the devices'
    ``state()``. Apply, on a machine created for the spore's platform and never run:
    ``check_state`` before anything, then (RAM loaded) ``apply_vm`` (interrupt
    controllers and timers), ``apply_vcpus``, the devices, and ``apply_clock`` last.
    """

    @property
    def serial(self) -> SerialBackend: ...

    def held_still(self) -> AbstractContextManager[None]: ...

    def capture_vcpus(self) -> list[VcpuState]: ...

    def capture_vm(self) -> VmWideState: ...

    def check_state(self, state: VmState) -> None: ...

    def apply_vm(self, state: VmWideState) -> None: ...

    def apply_vcpus(self, states: list[VcpuState]) -> None: ...

    def apply_clock(self, captured: KvmClockData) -> None: ...
