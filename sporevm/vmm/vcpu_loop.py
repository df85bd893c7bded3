"""The vCPU run loop: vCPU threads, the kicker, KVM_RUN and exit dispatch.

Split out of machine.py to keep that module to board wiring and state; the
threading and kick protocol this implements is described there. Machine is
imported for types only, so data flows one way (machine -> vcpu_loop). What the
machine and the loop share about a run (which vCPU threads are inside it, the
first stop requested, which vCPUs look stuck) is one ``RunControl``, the only
code that touches it.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sporevm.vmm import kvm
from sporevm.vmm.kvm import ioctl_eintr_ok

if TYPE_CHECKING:
    from sporevm.vmm.cpu import Vcpu
    from sporevm.vmm.machine import Machine

KICK_SIGNAL = signal.SIGUSR1

# Exit classes for Stats.exits / Stats.exit_ns beside KVM's own reasons ("IO", "MMIO",
# …, counted as before): what each PIO/MMIO exit was for, so the counts say what to
# take out of the hot path (docs/bench.md, bench_exits.py). IN_KVM_RUN is the time
# spent inside KVM_RUN (guest code and the exits KVM handles itself); KICK an EINTR.
IN_KVM_RUN = "in_kvm_run"
KICK = "kick"
IO_SERIAL = "io:serial"
IO_OTHER = "io:other"
MMIO_NOTIFY = "mmio:notify"
MMIO_IRQ = "mmio:irq"
MMIO_CONFIG = "mmio:config"
MMIO_OTHER = "mmio:other"
SERIAL_LO, SERIAL_HI = 0x3F8, 0x3FF
VIRTIO_LO = 0xD0000000  # the board's virtio-mmio windows start here (docs/vmm.md)
# Offsets in a virtio-mmio window: QueueNotify, InterruptStatus/ACK; config from 0x100.
_MMIO_KEYS = {0x050: MMIO_NOTIFY, 0x060: MMIO_IRQ, 0x064: MMIO_IRQ}
_MMIO_KEYS.update((off, MMIO_CONFIG) for off in range(0x100, 0x1000))


class StopReason(enum.Enum):
    POWEROFF = "poweroff"  # spore power port (status = value written)
    RESET = "reset"  # i8042 reset or a KVM reset system event
    SHUTDOWN = "shutdown"  # triple fault (Linux reboot=t)
    HALTED = "halted"  # HLT with interrupts off: the guest can never run again
    DEADLINE = "deadline"
    PAUSED = "paused"


@dataclass(frozen=True)
class ExitResult:
    reason: StopReason
    status: int | None = None
    vcpu: int = 0
    rip: int | None = None
    code: bytes | None = None  # instruction bytes at rip, best effort
    detail: str = ""


class RunControl:
    """The state one run() shares between the machine (pause, power events) and its vCPU
    threads, under one lock: which threads are inside the run, the first stop requested
    (first one wins), and which vCPUs the latest kick found unable to run on their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[int, int] = {}  # vcpu index -> thread ident while in run()
        self._stuck: set[int] = set()
        self._stop: ExitResult | None = None

    def begin(self) -> None:
        """A new run(): no stop requested, nothing stuck."""
        with self._lock:
            self._stop = None
            self._stuck.clear()

    def result(self) -> ExitResult | None:
        with self._lock:
            return self._stop

    def request_stop(self, result: ExitResult, vcpus: Sequence[Vcpu]) -> bool:
        """Record ``result`` unless a stop came first; make every vCPU leave KVM_RUN at its
        next instruction boundary. True if a vCPU thread was inside the run."""
        with self._lock:
            if self._stop is None:
                self._stop = result
            running = bool(self._threads)
            for v in vcpus:
                v.run.immediate_exit = 1
            for ident in self._threads.values():
                signal.pthread_kill(ident, KICK_SIGNAL)
        return running

    def kick_all(self) -> None:
        with self._lock:
            for ident in self._threads.values():
                signal.pthread_kill(ident, KICK_SIGNAL)

    def threads(self) -> list[int]:
        with self._lock:
            return list(self._threads.values())

    def enter(self, i: int, v: Vcpu) -> None:
        """The calling thread runs vCPU ``i`` from now on (a stop already requested holds)."""
        with self._lock:
            self._threads[i] = threading.get_ident()
            v.run.immediate_exit = 1 if self._stop is not None else 0

    def leave(self, i: int, v: Vcpu) -> None:
        with self._lock:
            self._threads.pop(i, None)
            v.run.immediate_exit = 0

    def stopping(self, v: Vcpu) -> bool:
        """After a kick: True if a stop was requested; else re-arm ``v`` (a pause() that
        raced with the start of run() left immediate_exit set) and carry on."""
        with self._lock:
            if self._stop is not None:
                return True
            v.run.immediate_exit = 0
            return False

    def all_stuck(self, i: int, stuck: bool, count: int) -> bool:
        """Record whether vCPU ``i`` is stuck; True once all ``count`` of them are."""
        with self._lock:
            if stuck:
                self._stuck.add(i)
            else:
                self._stuck.discard(i)
            return len(self._stuck) == count


class _Kicker(threading.Thread):
    """Kicks every vCPU thread at the deadline and every ``kick_interval`` seconds."""

    def __init__(self, m: Machine, deadline: float | None) -> None:
        super().__init__(name="spore-vcpu-kicker", daemon=True)
        self._m, self._deadline = m, deadline
        self._done = threading.Event()

    def run(self) -> None:
        deadline_kicked = False
        while True:
            timeout = self._m.kick_interval
            if self._deadline is not None and not deadline_kicked:
                timeout = min(timeout, max(0.0, self._deadline - time.monotonic()))
            if self._done.wait(timeout):
                return
            if self._deadline is not None and time.monotonic() >= self._deadline:
                deadline_kicked = True  # from now on only the periodic kick
            self._m.kick_all()

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_machine(m: Machine, deadline: float | None) -> ExitResult:
    errors: list[BaseException] = []

    def helper(index: int) -> None:
        try:
            _vcpu_loop(m, index, deadline)
        except BaseException as e:  # surfaced by run() on the caller's thread
            errors.append(e)
            m.request_stop(ExitResult(StopReason.PAUSED, vcpu=index))

    helpers = [
        threading.Thread(target=helper, args=(i,), name=f"spore-vcpu{i}", daemon=True)
        for i in range(1, len(m.vcpus))
    ]
    kicker = _Kicker(m, deadline)
    kicker.start()
    for t in helpers:
        t.start()
    try:
        _vcpu_loop(m, 0, deadline)
    except BaseException:
        m.request_stop(ExitResult(StopReason.PAUSED))
        raise
    finally:
        for t in helpers:
            t.join()
        kicker.stop()
    if errors:
        raise errors[0]
    res = m.run_control.result()
    if res is None:  # every vCPU loop returns only once a stop was requested
        raise RuntimeError("run loop ended without a stop request")
    if res.rip is None:
        rip, code = m.describe(res.vcpu)
        res = ExitResult(res.reason, res.status, res.vcpu, rip, code, res.detail)
    return res


def _vcpu_loop(m: Machine, i: int, deadline: float | None) -> None:
    v = m.vcpus[i]
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
    try:
        v.set_signal_mask({int(s) for s in old_mask} - {int(KICK_SIGNAL)})
        if deadline is not None and time.monotonic() >= deadline:
            m.request_stop(ExitResult(StopReason.DEADLINE, vcpu=i))  # the kick could miss us
        m.run_control.enter(i, v)
        _vcpu_exits(m, i, v, deadline)
    finally:
        m.run_control.leave(i, v)
        while signal.sigtimedwait({KICK_SIGNAL}, 0) is not None:
            pass  # drain our own kick before SIGUSR1 is unblocked again
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _vcpu_exits(m: Machine, i: int, v: Vcpu, deadline: float | None) -> None:
    # The hot path: kvm_run sub-structs are views at fixed addresses, so they are looked
    # up once; every attribute hop saved here is a few hundred ns per exit. Host time per
    # exit class (KVM_RUN return -> next KVM_RUN) goes into two Counters keyed by constant
    # strings: no allocation per exit beyond the ints themselves.
    run, io, mm = v.run, v.run.exit.io, v.run.exit.mmio
    exits, ns = m.stats.exits, m.stats.exit_ns
    fd, kvm_run, exit_io, exit_mmio = v.fd, kvm.KVM_RUN, kvm.KVM_EXIT_IO, kvm.KVM_EXIT_MMIO
    pio_write, pio_read = m.pio_write, m.pio_read
    clock = time.perf_counter_ns
    t1 = clock()
    while True:
        ret, err = ioctl_eintr_ok(fd, kvm_run)
        t0 = clock()
        ns[IN_KVM_RUN] += t0 - t1
        exits[IN_KVM_RUN] += 1
        if ret < 0:
            if err not in (errno.EINTR, errno.EAGAIN):
                raise m.fault(i, "KVM_RUN failed", os.strerror(err))
            stop = _on_kick(m, i, v, deadline)
            t1 = clock()
            exits[KICK] += 1
            ns[KICK] += t1 - t0
            if stop:
                return
            continue
        reason = run.exit_reason
        if reason == exit_io:
            exits["IO"] += 1
            size, count, port = io.size, io.count, io.port
            if io.direction == kvm.KVM_EXIT_IO_OUT:
                if count == 1:
                    pio_write(i, port, v.io_data(size))
                else:
                    data = v.io_data(size * count)
                    for k in range(count):
                        pio_write(i, port, data[k * size : (k + 1) * size])
            else:
                v.set_io_data(b"".join(pio_read(i, port, size) for _ in range(count)))
            key = IO_SERIAL if SERIAL_LO <= port <= SERIAL_HI else IO_OTHER
        elif reason == exit_mmio:
            exits["MMIO"] += 1
            n = min(mm.len, 8)
            addr = mm.phys_addr
            if mm.is_write:
                m.mmio_write(i, addr, bytes(mm.data[:n]))
            else:
                data = m.mmio_read(i, addr, n)
                ctypes.memmove(ctypes.addressof(mm.data), data, n)
            key = _MMIO_KEYS.get(addr & 0xFFF, MMIO_OTHER) if addr >= VIRTIO_LO else MMIO_OTHER
        else:
            key = kvm.EXIT_NAMES.get(reason, "OTHER")
            exits[key] += 1
            if _other_exit(m, i, v, reason):
                return
            ns[key] += clock() - t0
            t1 = clock()
            continue
        t1 = clock()
        exits[key] += 1
        ns[key] += t1 - t0


def _on_kick(m: Machine, i: int, v: Vcpu, deadline: float | None) -> bool:
    """KVM_RUN returned EINTR (pending PIO/MMIO already completed). True = leave the loop."""
    # The kick stays pending (blocked outside KVM_RUN): consume it, or every later KVM_RUN
    # would return EINTR at once. A stop is flagged before its kick is sent, so it is seen.
    while signal.sigtimedwait({KICK_SIGNAL}, 0) is not None:
        pass
    if m.run_control.stopping(v):
        return True
    if deadline is not None and time.monotonic() >= deadline:
        m.request_stop(ExitResult(StopReason.DEADLINE, vcpu=i))
        return True
    if _all_stuck(m, i, v):
        m.request_stop(ExitResult(StopReason.HALTED, vcpu=i, detail="HLT with interrupts disabled"))
        return True
    return False


_NOT_STARTED = (kvm.KVM_MP_STATE_UNINITIALIZED, kvm.KVM_MP_STATE_INIT_RECEIVED)


def _all_stuck(m: Machine, i: int, v: Vcpu) -> bool:
    """True once every vCPU's latest kick found it unable to run on its own.

    One dead vCPU is not a dead VM: Linux parks the other CPUs in HLT with interrupts
    off (stop_this_cpu) before the boot CPU resets or powers off, and a kernel without
    SMP never starts the APs. Each vCPU judges only itself (another vCPU's state cannot
    be read while it is inside KVM_RUN), and the VM is HALTED when all agree.
    """
    stuck = v.dead_halted() or (i > 0 and v.get_mp_state() in _NOT_STARTED)
    return m.run_control.all_stuck(i, stuck, len(m.vcpus))


def _other_exit(m: Machine, i: int, v: Vcpu, reason: int) -> bool:
    """Every exit but IO/MMIO. True = leave the loop; unknown exits raise VmmFault."""
    run = v.run
    if reason == kvm.KVM_EXIT_SHUTDOWN:
        m.request_stop(ExitResult(StopReason.SHUTDOWN, vcpu=i, detail="triple fault"))
        return True
    if reason == kvm.KVM_EXIT_INTERNAL_ERROR:
        sub = int(run.exit.internal.suberror)
        if sub == kvm.KVM_INTERNAL_ERROR_EMULATION and m.fix_up(i):
            return False
        nd = min(int(run.exit.internal.ndata), 16)
        data = " ".join(f"{int(run.exit.internal.data[k]):#x}" for k in range(nd))
        raise m.fault(i, "KVM internal error", f"suberror {sub}, data [{data}]")
    if reason == kvm.KVM_EXIT_SYSTEM_EVENT:
        kind = int(run.exit.system_event.type)
        if kind == kvm.KVM_SYSTEM_EVENT_SHUTDOWN:
            m.request_stop(ExitResult(StopReason.POWEROFF, vcpu=i, detail="system event"))
            return True
        if kind == kvm.KVM_SYSTEM_EVENT_RESET:
            m.request_stop(ExitResult(StopReason.RESET, vcpu=i, detail="system event"))
            return True
        raise m.fault(i, "KVM system event", f"type {kind}")
    if reason == kvm.KVM_EXIT_HLT:  # only without an in-kernel LAPIC; kept for completeness
        m.request_stop(ExitResult(StopReason.HALTED, vcpu=i, detail="HLT exit"))
        return True
    if reason == kvm.KVM_EXIT_INTR:
        return False
    if reason == kvm.KVM_EXIT_FAIL_ENTRY:
        hw = int(run.exit.fail_entry.hardware_entry_failure_reason)
        raise m.fault(i, "VM entry failed", f"hardware reason {hw:#x}")
    raise m.fault(i, f"unexpected exit {kvm.EXIT_NAMES.get(reason, reason)}")
