"""Virtqueue kicks through KVM_IOEVENTFD and interrupts through KVM_IRQFD (vmm/notify.py).

Real /dev/kvm, the probe guest's virtio driver and sporevm's own devices: with
ioeventfd on, the guest's QueueNotify writes never exit to the VMM (no
``mmio:notify`` exits) and the device thread serves them; off, every kick is an
exit. A run that ends with kicks KVM accepted but the thread has not handled
yet drains them before run() returns.
"""

from __future__ import annotations

import os
import time

import pytest

from sporevm.vmm import kvm
from sporevm.vmm.devices.virtio import WINDOW, RngDevice, VirtioMmio, kernel_cmdline
from sporevm.vmm.machine import StopReason
from sporevm.vmm.vcpu_loop import IN_KVM_RUN, MMIO_NOTIFY
from tests.probe_build import ProbeVm

pytestmark = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)

BASE, GSI = 0xD0000000, 5


def rng_vm(*, ioeventfd: bool) -> tuple[ProbeVm, VirtioMmio]:
    vm = ProbeVm("virtio_rng", kernel_cmdline(BASE, GSI), ioeventfd=ioeventfd)
    t = VirtioMmio(RngDevice(), vm.machine.ram, vm.machine.irq_line(GSI), base=BASE)
    vm.machine.add_mmio(BASE, WINDOW, t)
    return vm, t


def test_kicks_do_not_exit_with_ioeventfd() -> None:
    vm, t = rng_vm(ioeventfd=True)
    with vm:
        if not len(vm.machine.notifier):
            pytest.skip("this KVM refuses KVM_IOEVENTFD (the exit path is used)")
        r = vm.machine.run(time.monotonic() + 30)
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), vm.output
        stats = vm.machine.stats
        assert stats.exits[MMIO_NOTIFY] == 0
        assert vm.machine.notifier.handled >= 2  # the probe's two rng requests
        assert t.queues[0].used_idx == 2
        assert isinstance(t.irq, kvm.IrqLineEventfd)  # the transport's line is an irqfd
        assert stats.exits[IN_KVM_RUN] >= 1 and stats.exit_ns[IN_KVM_RUN] > 0


def test_kicks_exit_without_ioeventfd() -> None:
    vm, t = rng_vm(ioeventfd=False)
    with vm:
        r = vm.machine.run(time.monotonic() + 30)
        assert (r.reason, r.status) == (StopReason.POWEROFF, 0), vm.output
        assert vm.machine.stats.exits[MMIO_NOTIFY] == 2
        assert vm.machine.stats.exit_ns[MMIO_NOTIFY] > 0
        assert len(vm.machine.notifier) == 0 and isinstance(t.irq, kvm.IrqLineIoctl)
        assert t.queues[0].used_idx == 2


def test_run_returns_only_after_pending_kicks_are_handled() -> None:
    """A kick KVM took while the device thread could not run is served before run()
    returns: the snapshot that follows sees its used ring and dirty pages."""
    vm, t = rng_vm(ioeventfd=True)
    with vm:
        if not len(vm.machine.notifier):
            pytest.skip("this KVM refuses KVM_IOEVENTFD")
        fd = vm.machine.notifier.fds[0]
        handled = vm.machine.notifier.handled
        os.eventfd_write(fd, 1)  # what KVM does on a matching QueueNotify write
        r = vm.machine.run(time.monotonic() - 1)  # stops before any guest instruction
        assert r.reason is StopReason.DEADLINE
        # The device was not live yet, so the kick changed nothing, but it was consumed.
        assert vm.machine.notifier.handled == handled + 1
        assert t.queues[0].used_idx == 0
        try:
            os.eventfd_read(fd)
            pytest.fail("the kick was still pending after run() returned")
        except BlockingIOError:
            pass
