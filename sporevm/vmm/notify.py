"""Guest notifications without a VM exit: KVM_IOEVENTFD kicks on one device thread.

With an ioeventfd on a virtio-mmio QueueNotify register (one per queue, matched on
the queue index the driver writes), KVM completes the guest's write itself and
signals an eventfd; the vCPU never leaves KVM_RUN. One ``Notifier`` thread polls
all those eventfds and runs the transport's ``notify_queue`` for each, the same
entry point (and the same checks) as a QueueNotify write that exits to us.

Drain. A kick KVM accepted but this thread has not yet handled is guest state that
lives nowhere else, so ``drain()`` handles every pending one synchronously; the
machine calls it whenever ``run()`` returns (vCPUs stopped, so no new kick can
come), before anything captures devices, dirty pages or RAM. ``_lock`` is held
across read-and-handle, so a kick this thread read is finished before ``drain``
looks at the fds.
"""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Callable

from sporevm.vmm import kvm

_said: set[str] = set()


def say_once(what: str, why: str) -> None:
    """One line on stderr per refused mechanism and process: the fallback is not silent."""
    if what in _said:
        return
    _said.add(what)
    print(f"spore: {what} refused by this KVM ({why}); using the exit path", file=sys.stderr)


def ioeventfd(vm_fd: int, addr: int, datamatch: int, length: int = 4) -> int | None:
    """An eventfd KVM signals on a ``length``-byte guest write of ``datamatch`` to MMIO
    ``addr``; None (said once) when this KVM refuses."""
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    req = kvm.KvmIoeventfd()
    req.datamatch, req.addr, req.len, req.fd = datamatch, addr, length, fd
    req.flags = kvm.KVM_IOEVENTFD_FLAG_DATAMATCH
    try:
        kvm.ioctl(vm_fd, kvm.KVM_IOEVENTFD, req)
    except OSError as e:
        os.close(fd)
        say_once("KVM_IOEVENTFD", e.strerror or str(e))
        return None
    return fd


def irqfd(vm_fd: int, gsi: int) -> int | None:
    """An eventfd whose every write pulses ``gsi``; None (said once) when refused."""
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    req = kvm.KvmIrqfd()
    req.fd, req.gsi = fd, gsi
    try:
        kvm.ioctl(vm_fd, kvm.KVM_IRQFD, req)
    except OSError as e:
        os.close(fd)
        say_once("KVM_IRQFD", e.strerror or str(e))
        return None
    return fd


class Notifier:
    """One thread handling every ioeventfd of a machine (module docstring)."""

    def __init__(self) -> None:
        self._handlers: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None  # a handler's bug; the machine reports it
        self.on_error: Callable[[], object] = lambda: None
        self.handled = 0  # kicks handled (a kick may stand for several guest writes)

    def __len__(self) -> int:
        return len(self._handlers)

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(self._handlers)

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("notifier already running")
        self._handlers[fd] = handler

    def start(self) -> None:
        if self._thread is None and self._handlers:
            self._thread = threading.Thread(target=self._loop, name="spore-notify", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in self._handlers:
            poller.register(fd, select.POLLIN)
        while not self._stop:
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            with self._lock:
                for fd, _ in ready:
                    if fd != self._wake_r:
                        self._handle(fd)

    def _handle(self, fd: int) -> None:
        """Read one eventfd and run its handler (under ``_lock``)."""
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return  # drain() got there first
        try:
            self._handlers[fd]()
            self.handled += 1
        except Exception as e:  # a device bug: stop the VM and surface it, never lose it
            if self.error is None:
                self.error = e
            self.on_error()

    def drain(self) -> None:
        """Handle every kick KVM has signalled so far; returns once none is pending."""
        with self._lock:
            for fd in self._handlers:
                self._handle(fd)

    def close(self) -> None:
        self._stop = True
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        for fd in self._handlers:
            os.close(fd)
        self._handlers.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
