"""Capture the state of a paused machine into a VmState (docs/vm-state.md).

Pause protocol. The caller stops the guest first: ``machine.pause()`` from any
thread makes the running ``machine.run()`` return ``StopReason.PAUSED`` (a
DEADLINE or HALTED stop is just as still). A stop sets ``immediate_exit`` on
every vCPU and kicks it, and each vCPU re-enters KVM_RUN once so KVM
completes the pending PIO/MMIO instruction without running guest code: once
run() has returned, no vCPU is inside KVM_RUN, RIP is past the last device
access, and that access has reached its device. Devices are quiesced by the
same fact: virtio requests are handled synchronously inside the MMIO exit, so
none is in flight. Host-side producers (``ConsoleDevice.send``,
``Serial.feed``) may still run on other threads; each device's state is read
under that device's lock, so it is consistent, but bytes sent after capture
are not in it — stop the agent session's writer before capturing if that
matters.

``capture`` holds the machine still (``held_still``) while it reads, so a run()
started on another thread during the capture fails instead of racing it. It
speaks only the backend protocol (``sporevm.spore.backend``).
"""

from __future__ import annotations

from collections.abc import Sequence

from sporevm.spore.backend import MachineBackend, VirtioTransport
from sporevm.spore.vmstate import VmState


def capture(machine: MachineBackend, transports: Sequence[VirtioTransport] = ()) -> VmState:
    """Everything but guest RAM of a paused machine; ``transports`` in board slot order."""
    with machine.held_still():
        return VmState(
            vcpus=machine.capture_vcpus(),
            vm=machine.capture_vm(),
            serial=machine.serial.state(),
            virtio=[t.state() for t in transports],
        )
