"""The board: one KVM VM with RAM, in-kernel irqchip + PIT, vCPUs, buses, run() and pause().

The run loop itself (vCPU threads, kicker, exit dispatch) is in vcpu_loop.py.

Threads. ``run()`` drives vCPU 0 on the calling thread (and vCPUs 1… on helper
threads). KVM_RUN is entered through ctypes, so the GIL is free while the
guest runs. Device callbacks run on vCPU threads under one bus lock; virtqueue
kicks that KVM takes through an ioeventfd run on the notifier's thread under the
device's own lock (notify.py), and ``run()`` drains them before it returns.

Kicks. With the in-kernel irqchip a halted guest never exits to us, so a
kicker thread sends SIGUSR1 to each vCPU thread at the deadline, on pause(),
and every ``kick_interval`` seconds. SIGUSR1 stays blocked in the vCPU thread
except *inside* KVM_RUN (KVM_SET_SIGNAL_MASK), so a kick either interrupts
KVM_RUN with EINTR or stays pending and makes the next KVM_RUN return at once:
no kick is lost and no Python signal handler runs. The kick is drained with
sigtimedwait before run() returns.

Stopping. A stop (pause, deadline, power-off) sets ``immediate_exit`` and the
vCPU does one more KVM_RUN, which completes a pending PIO/MMIO instruction
without running guest code: after run() returns, registers and device state
agree and can be captured.

Snapshots. The machine is the KVM backend of a spore's VM state (docs/vmm.md,
"Backends"): ``capture_vcpus``/``apply_vcpus``, ``capture_vm``/``apply_vm`` and
``apply_clock`` move the schema's ``VcpuState`` and ``VmWideState``; the serial
device moves its own ``SerialState``; ``held_still`` keeps run() out meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sporevm.errors import SporeError
from sporevm.spore.vmstate import OWNED_MSRS, VcpuState, VmState, VmStateError, VmWideState
from sporevm.spore.x86 import IoapicState, PicState
from sporevm.vmm import boot, kvm, mptable, notify
from sporevm.vmm.bus import Bus, BusDevice, QueueNotifier
from sporevm.vmm.cpu import BOOT_MSRS, Vcpu, build_cpuid, code_at, host_fixup, refused
from sporevm.vmm.devices.power import (
    I8042,
    I8042_DATA,
    SPORE_POWER_LEN,
    SPORE_POWER_PORT,
    PowerEvent,
    PowerPort,
)
from sporevm.vmm.devices.serial import COM1_BASE, COM1_IRQ, SERIAL_PORTS, Serial
from sporevm.vmm.kvm import (
    KvmClockData,
    KvmDirtyLog,
    KvmError,
    KvmIrqchip,
    KvmPitConfig,
    KvmPitState2,
    KvmUserspaceMemoryRegion,
    ioctl,
)
from sporevm.vmm.memory import GuestMemory

# The run loop lives in vcpu_loop; its stop types are re-exported here (explicit "as").
from sporevm.vmm.vcpu_loop import KICK_SIGNAL as KICK_SIGNAL
from sporevm.vmm.vcpu_loop import ExitResult as ExitResult
from sporevm.vmm.vcpu_loop import RunControl, run_machine
from sporevm.vmm.vcpu_loop import StopReason as StopReason

# Fixed addresses KVM needs for its own use on Intel (real-mode TSS, EPT identity map):
# three pages and one page just below the BIOS area at the top of 4 GiB, as QEMU uses.
KVM_TSS_ADDR = 0xFFFBD000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000
MMIO_HOLE_START = 0xC0000000  # RAM stops here; device windows live above
DEFAULT_KICK_INTERVAL = 0.1
SERIAL_TAIL = 64 * 1024
UNHANDLED_KEYS = 1023  # distinct stray addresses counted one by one; the rest share a bucket
UNHANDLED_OTHER = -1
# SPORE_IOEVENTFD=0 keeps virtqueue kicks and virtio interrupts on the exit path (the
# VMM before ioeventfd/irqfd): to compare, or to rule the device thread out.
IOEVENTFD_ENV = "SPORE_IOEVENTFD"


class VmmFault(SporeError):
    """The guest stopped in a way the VMM does not handle; carries where and why."""

    def __init__(
        self, reason: str, *, vcpu: int, rip: int | None, code: bytes | None, detail: str = ""
    ) -> None:
        self.reason, self.vcpu, self.rip, self.code, self.detail = reason, vcpu, rip, code, detail
        where = f"rip={rip:#x}" if rip is not None else "rip=?"
        insn = code.hex(" ") if code else "unreadable"
        super().__init__(
            f"vCPU {vcpu}: {reason} at {where} (bytes: {insn})" + (f"; {detail}" if detail else "")
        )


TERMINAL = {StopReason.POWEROFF, StopReason.RESET, StopReason.SHUTDOWN}


@dataclass
class Stats:
    exits: Counter[str] = field(default_factory=Counter)  # by class (vcpu_loop.py)
    exit_ns: Counter[str] = field(default_factory=Counter)  # host time per class
    unhandled_pio: Counter[int] = field(default_factory=Counter)
    unhandled_mmio: Counter[int] = field(default_factory=Counter)
    fixups: Counter[str] = field(default_factory=Counter)


class Machine:
    """A KVM VM on the spore board (docs/vmm.md)."""

    def __init__(
        self,
        memory_bytes: int,
        vcpus: int = 1,
        *,
        dirty_log: bool = False,
        strict_io: bool = False,
        serial_output: Callable[[bytes], None] | None = None,
        kick_interval: float = DEFAULT_KICK_INTERVAL,
        host_fixups: bool = True,
        memory: GuestMemory | None = None,
        ioeventfd: bool | None = None,
    ) -> None:
        """``memory``: RAM to use instead of fresh RAM (a prepared backing, docs/restore.md);
        the machine owns it from here on and closes it. ``ioeventfd``: virtio kicks through
        KVM_IOEVENTFD on a device thread and interrupts through KVM_IRQFD (notify.py);
        default on unless SPORE_IOEVENTFD=0."""
        if memory is not None and memory.size != memory_bytes:
            raise KvmError(f"memory is {memory.size:#x} bytes, the machine {memory_bytes:#x}")
        if not 1 <= vcpus <= 64:
            raise KvmError(f"vcpus={vcpus}: must be 1..64")
        if memory_bytes > MMIO_HOLE_START:
            raise KvmError(f"guest RAM {memory_bytes:#x} exceeds {MMIO_HOLE_START:#x} (3 GiB)")
        self.strict_io = strict_io
        self.host_fixups = host_fixups
        self.kick_interval = kick_interval
        self.stats = Stats()
        if ioeventfd is None:
            ioeventfd = os.environ.get(IOEVENTFD_ENV, "1") != "0"
        self.ioeventfd = ioeventfd
        self.notifier = notify.Notifier()
        self.notifier.on_error = self.pause
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        self._given_memory = memory
        self._closed = False
        self._bus_lock = threading.Lock()
        self.run_control = RunControl()  # shared with the run loop (vcpu_loop.py)
        self._terminal: ExitResult | None = None
        self._running = threading.Lock()
        self._irqfds: list[int] = []
        # Called once, right after the first get_dirty_log() turned KVM's log on (the
        # monitor's jail stacks a filter refusing KVM_SET_USER_MEMORY_REGION from then).
        self.on_log_armed: Callable[[], None] | None = None
        try:
            self.sys_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(
                f"cannot open /dev/kvm ({e.strerror}): spore needs KVM; check that the "
                "kvm module is loaded and this user may use /dev/kvm"
            ) from e
        self.vm_fd = -1
        try:
            self._create(memory_bytes, vcpus, dirty_log)
        except BaseException:
            if self.memory is None and memory is not None:
                memory.close()  # owned from the call on, even when creation fails
            self.close()
            raise
        self.serial_tail = bytearray()  # last SERIAL_TAIL bytes, when no callback is given
        out = serial_output if serial_output is not None else self._keep_serial_tail
        self.serial = Serial(self.irq_line(COM1_IRQ), out)
        self.add_pio(COM1_BASE, SERIAL_PORTS, self.serial)
        self.add_pio(I8042_DATA, 5, I8042(self._power_event))
        self.add_pio(SPORE_POWER_PORT, SPORE_POWER_LEN, PowerPort(self._power_event))

    def _create(self, memory_bytes: int, nvcpus: int, dirty_log: bool) -> None:
        sysfd = self.sys_fd
        if ioctl(sysfd, kvm.KVM_GET_API_VERSION) != kvm.KVM_API_VERSION:
            raise KvmError("/dev/kvm speaks an unexpected API version")
        for cap, name in (
            (kvm.KVM_CAP_IRQCHIP, "IRQCHIP"),
            (kvm.KVM_CAP_PIT2, "PIT2"),
            (kvm.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"),
            (kvm.KVM_CAP_USER_MEMORY, "USER_MEMORY"),
        ):
            if ioctl(sysfd, kvm.KVM_CHECK_EXTENSION, cap) <= 0:
                raise KvmError(f"this KVM lacks KVM_CAP_{name}, which the VMM needs")
        mmap_size = ioctl(sysfd, kvm.KVM_GET_VCPU_MMAP_SIZE)
        self.vm_fd = ioctl(sysfd, kvm.KVM_CREATE_VM, 0)
        if ioctl(sysfd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_SET_TSS_ADDR) > 0:
            ioctl(self.vm_fd, kvm.KVM_SET_TSS_ADDR, KVM_TSS_ADDR)
        if ioctl(sysfd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_SET_IDENTITY_MAP_ADDR) > 0:
            ioctl(self.vm_fd, kvm.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(KVM_IDENTITY_MAP_ADDR))
        ioctl(self.vm_fd, kvm.KVM_CREATE_IRQCHIP)
        pit = KvmPitConfig()
        pit.flags = kvm.KVM_PIT_SPEAKER_DUMMY
        ioctl(self.vm_fd, kvm.KVM_CREATE_PIT2, pit)
        self.memory = self._given_memory or GuestMemory(memory_bytes)
        self._given_memory = None
        self.dirty_log = dirty_log
        # Registered without KVM_MEM_LOG_DIRTY_PAGES even with dirty_log: KVM maps no
        # 2 MiB page in a logged slot, so the first get_dirty_log() turns the log on.
        self._dirty_log_armed = False
        self._set_ram_slot(0)
        supported = kvm.supported_cpuid(sysfd)
        self.msr_index_list = kvm.msr_index_list(sysfd)
        listed = set(self.msr_index_list)
        boot_msrs = {k: v for k, v in BOOT_MSRS.items() if k in listed}
        for i in range(nvcpus):
            v = Vcpu(self.vm_fd, i, mmap_size)
            self.vcpus.append(v)
            v.set_cpuid(build_cpuid(supported, i, nvcpus))
            v.set_msrs(boot_msrs)
        self._install_stray_kick_handler()

    def _keep_serial_tail(self, data: bytes) -> None:
        self.serial_tail += data
        if len(self.serial_tail) > 2 * SERIAL_TAIL:
            del self.serial_tail[:-SERIAL_TAIL]

    @staticmethod
    def _install_stray_kick_handler() -> None:
        # Kicks are thread-directed and blocked outside KVM_RUN; this only keeps a stray
        # process-directed SIGUSR1 from killing the process (default action: terminate).
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
                signal.signal(KICK_SIGNAL, lambda _s, _f: None)

    # --- board wiring ------------------------------------------------------------------
    def add_pio(self, base: int, length: int, dev: BusDevice) -> None:
        self.pio.add(base, length, dev)

    def add_mmio(self, base: int, length: int, dev: BusDevice) -> None:
        if base < self.ram.size:
            raise KvmError(f"MMIO window {base:#x} overlaps guest RAM")
        self.mmio.add(base, length, dev)
        if self.ioeventfd and isinstance(dev, QueueNotifier):
            self._wire_notifications(dev)

    def _wire_notifications(self, dev: QueueNotifier) -> None:
        """Kicks of each of ``dev``'s queues through an ioeventfd (datamatch = the queue
        index the driver writes) and its interrupt through an irqfd; whatever KVM refuses
        stays on the exit path (said once, notify.say_once)."""
        addr = dev.notify_address
        if addr is not None:
            for q in range(dev.queue_count):
                fd = notify.ioeventfd(self.vm_fd, addr, q)
                if fd is None:
                    break
                self.notifier.add(fd, functools.partial(dev.notify_queue, q))
        gsi = dev.irq_gsi
        if gsi is not None:
            fd = notify.irqfd(self.vm_fd, gsi)
            if fd is not None:
                self._irqfds.append(fd)
                dev.set_irq_line(kvm.IrqLineEventfd(fd))

    def irq_line(self, gsi: int) -> kvm.IrqLineIoctl:
        if not 0 <= gsi < 24:
            raise KvmError(f"GSI {gsi} is outside the IOAPIC's 24 pins")
        return kvm.IrqLineIoctl(self.vm_fd, gsi)

    @property
    def ram(self) -> GuestMemory:
        if self.memory is None:
            raise KvmError("machine is closed")
        return self.memory

    def load_kernel(
        self,
        image: bytes,
        cmdline: str,
        initrd: bytes | None = None,
        *,
        rng_seed: bytes | None = None,
    ) -> boot.LoadedKernel:
        """Load a bzImage or ELF and point vCPU 0 at its 64-bit entry.

        With more than one vCPU the guest also gets an MP table (mptable.py): without
        one Linux knows only the CPU it boots on. One vCPU gets none, as before."""
        loaded = boot.boot(self.ram, image, cmdline, initrd, rng_seed=rng_seed)
        if len(self.vcpus) > 1:
            mptable.write(self.ram, len(self.vcpus))
        self.vcpus[0].enter_long_mode(loaded.entry)
        return loaded

    # --- VM-wide state (snapshots) -----------------------------------------------------
    def get_irqchip(self, chip_id: int) -> KvmIrqchip:
        c = KvmIrqchip()
        c.chip_id = chip_id
        return kvm.fill(self.vm_fd, kvm.KVM_GET_IRQCHIP, c)

    def set_irqchip(self, chip: KvmIrqchip) -> None:
        ioctl(self.vm_fd, kvm.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> KvmPitState2:
        return kvm.fill(self.vm_fd, kvm.KVM_GET_PIT2, KvmPitState2())

    def set_pit2(self, s: KvmPitState2) -> None:
        ioctl(self.vm_fd, kvm.KVM_SET_PIT2, s)

    def get_clock(self) -> KvmClockData:
        return kvm.fill(self.vm_fd, kvm.KVM_GET_CLOCK, KvmClockData())

    def set_clock(self, s: KvmClockData) -> None:
        ioctl(self.vm_fd, kvm.KVM_SET_CLOCK, s)

    # --- a spore's VM state: this machine as its backend (docs/vm-state.md) -----------
    @contextlib.contextmanager
    def held_still(self) -> Iterator[None]:
        """Hold a paused machine still while its state is read: a run() started on another
        thread meanwhile fails instead of racing the capture. VmStateError if run() is in
        progress or the machine has stopped for good."""
        if not self._running.acquire(blocking=False):
            raise VmStateError("capture needs a paused machine: run() is in progress")
        try:
            if self._terminal is not None:
                raise VmStateError(
                    f"machine already stopped ({self._terminal.reason.value}): nothing to capture"
                )
            yield
        finally:
            self._running.release()

    def state_msrs(self) -> list[int]:
        """The OWNED_MSRS this host's KVM lists and a vCPU can read, ascending."""
        listed = set(self.msr_index_list)
        candidates = sorted(i for i in OWNED_MSRS if i in listed)
        return self.vcpus[0].readable_msrs(candidates) if self.vcpus else []

    def capture_vcpus(self) -> list[VcpuState]:
        msrs = self.state_msrs()
        return [v.capture(msrs) for v in self.vcpus]

    def check_state(self, state: VmState) -> None:
        """Refuse, before anything is written, a state this machine cannot take."""
        if len(state.vcpus) != len(self.vcpus):
            raise VmStateError(f"state has {len(state.vcpus)} vCPUs, the machine {len(self.vcpus)}")
        listed = set(self.msr_index_list)
        for i, vs in enumerate(state.vcpus):
            missing = sorted(set(vs.msrs) - listed)
            if missing:
                raise VmStateError(
                    f"vcpus[{i}]: this host's KVM does not list MSR {missing[0]:#x}; "
                    "the spore needs a host of the same class"
                )

    def apply_vcpus(self, states: list[VcpuState]) -> None:
        """Every vCPU's state (``Vcpu.apply`` has the order); after ``apply_vm``, so the
        interrupt routing exists when vCPU interrupt state lands."""
        if len(states) != len(self.vcpus):
            raise VmStateError(f"state has {len(states)} vCPUs, the machine {len(self.vcpus)}")
        for i, (v, s) in enumerate(zip(self.vcpus, states, strict=True)):
            v.apply(s, f"vcpus[{i}]")

    def capture_vm(self) -> VmWideState:
        def chip(chip_id: int, size: int) -> bytes:
            c = self.get_irqchip(chip_id)
            # Read the union raw: the c_char field accessor would stop at the first NUL byte.
            return ctypes.string_at(ctypes.addressof(c) + KvmIrqchip.chip.offset, size)

        pic, ioapic = ctypes.sizeof(PicState), ctypes.sizeof(IoapicState)
        return VmWideState(
            pic_master=PicState.from_buffer_copy(chip(kvm.KVM_IRQCHIP_PIC_MASTER, pic)),
            pic_slave=PicState.from_buffer_copy(chip(kvm.KVM_IRQCHIP_PIC_SLAVE, pic)),
            ioapic=IoapicState.from_buffer_copy(chip(kvm.KVM_IRQCHIP_IOAPIC, ioapic)),
            pit2=self.get_pit2(),
            clock=self.get_clock(),
        )

    def apply_vm(self, state: VmWideState) -> None:
        """The irqchip (PIC master, PIC slave, IOAPIC), then the PIT: VM-wide devices before
        any vCPU. ``KVM_SET_PIT2`` re-bases the count to now (a short delay to the guest).
        The clock is separate and last: ``apply_clock``."""
        refused("irqchip", lambda: self._set_irqchips(state))
        refused("PIT", lambda: self.set_pit2(state.pit2))

    def _set_irqchips(self, state: VmWideState) -> None:
        for chip_id, payload in (
            (kvm.KVM_IRQCHIP_PIC_MASTER, state.pic_master),
            (kvm.KVM_IRQCHIP_PIC_SLAVE, state.pic_slave),
            (kvm.KVM_IRQCHIP_IOAPIC, state.ioapic),
        ):
            c = KvmIrqchip()
            c.chip_id = chip_id
            ctypes.memmove(
                ctypes.addressof(c) + KvmIrqchip.chip.offset,
                ctypes.addressof(payload),
                ctypes.sizeof(payload),
            )
            self.set_irqchip(c)

    def apply_clock(self, captured: KvmClockData) -> None:
        """kvmclock resumes at exactly the captured value, with flags 0: guest time stands
        still while the spore sleeps and never goes backwards (KVM_CLOCK_REALTIME would jump
        it by the host wall time since the capture; the agent sets the wall clock)."""
        clock = KvmClockData()
        clock.clock = captured.clock
        refused("KVM clock", lambda: self.set_clock(clock))

    def _set_ram_slot(self, flags: int) -> None:
        ram = self.ram
        region = KvmUserspaceMemoryRegion(0, flags, 0, ram.size, ram.address())
        ioctl(self.vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, region)

    @property
    def dirty_log_armed(self) -> bool:
        """KVM logs guest writes to RAM (since the first ``get_dirty_log``)."""
        return self._dirty_log_armed

    def get_dirty_log(self) -> bytes:
        """KVM's dirty bitmap for guest RAM since the last call (bit n = page n); clears it.

        The RAM slot is registered without logging (KVM maps no 2 MiB page in a logged
        slot: docs/bench.md, "Nested page faults"), so the first call turns logging on
        (a flags-only KVM_SET_USER_MEMORY_REGION on the same slot) and answers every
        page dirty: relative to nothing, everything is. Then ``on_log_armed`` runs
        (the monitor's jail refuses the ioctl from then on). Call it with the machine
        paused, as every snapshot does."""
        if not self.dirty_log:
            raise KvmError("dirty logging was not enabled for this machine")
        pages = self.ram.size // 4096
        if not self._dirty_log_armed:
            self._set_ram_slot(kvm.KVM_MEM_LOG_DIRTY_PAGES)
            self._dirty_log_armed = True
            if self.on_log_armed is not None:
                self.on_log_armed()
            full, rest = divmod(pages, 8)
            return b"\xff" * full + (bytes([(1 << rest) - 1]) if rest else b"")
        buf = (ctypes.c_uint8 * (((pages + 63) // 64) * 8))()
        log = KvmDirtyLog(0, 0, ctypes.addressof(buf))
        ioctl(self.vm_fd, kvm.KVM_GET_DIRTY_LOG, log)
        return bytes(buf)[: (pages + 7) // 8]

    # --- running -----------------------------------------------------------------------
    def run(self, deadline: float | None = None) -> ExitResult:
        """Run until power-off, reset, shutdown, a dead halt, ``deadline`` or pause().

        ``deadline`` is a ``time.monotonic()`` value. Unexpected exits raise VmmFault.
        """
        if self._terminal is not None:
            raise KvmError(f"machine already stopped ({self._terminal.reason.value})")
        if not self._running.acquire(blocking=False):
            raise KvmError("run() is already in progress on another thread")
        try:
            self.run_control.begin()
            self.notifier.start()
            result = run_machine(self, deadline)
            # Every kick the guest made before it stopped is handled before anyone can
            # capture devices, dirty pages or RAM (notify.py, "Drain").
            self.notifier.drain()
            if self.notifier.error is not None:
                err = self.notifier.error
                raise self.fault(0, "virtio device failed", f"on a queue kick: {err!r}") from err
            if result.reason in TERMINAL:
                self._terminal = result
            return result
        finally:
            self._running.release()

    def pause(self) -> bool:
        """Ask a running run() to return PAUSED; True if a run() was interrupted."""
        return self.request_stop(ExitResult(StopReason.PAUSED))

    def request_stop(self, result: ExitResult) -> bool:
        """First stop wins: every vCPU leaves KVM_RUN at the next instruction boundary."""
        return self.run_control.request_stop(result, self.vcpus)

    def kick_all(self) -> None:
        self.run_control.kick_all()

    def _power_event(self, event: PowerEvent, status: int) -> None:
        reason = StopReason.POWEROFF if event is PowerEvent.POWEROFF else StopReason.RESET
        self.request_stop(ExitResult(reason, status=status))

    def vcpu_threads(self) -> list[int]:
        """Thread idents of the vCPUs inside run() right now (for CPU-time sampling)."""
        return self.run_control.threads()

    def describe(self, index: int) -> tuple[int | None, bytes | None]:
        """(RIP, instruction bytes at RIP) of a vCPU, best effort, for reports."""
        try:
            v = self.vcpus[index]
            rip = int(v.get_regs().rip)
            return rip, code_at(self.ram, v.get_sregs(), rip)
        except (OSError, KvmError):
            return None, None

    def fault(self, index: int, reason: str, detail: str = "") -> VmmFault:
        rip, code = self.describe(index)
        return VmmFault(reason, vcpu=index, rip=rip, code=code, detail=detail)

    # --- dispatch (called on vCPU threads) --------------------------------------------
    # A device that raises, or answers a read with the wrong length, is a VMM bug or a
    # device failure: it becomes a VmmFault naming the access, never a bare traceback.
    def _read(self, index: int, bus: Bus, addr: int, size: int) -> bytes:
        try:
            with self._bus_lock:
                data = bus.read(addr, size)
        except Exception as e:
            detail = f"read {addr:#x}/{size}: {e!r}"
            raise self.fault(index, f"{bus.name} device failed", detail) from e
        if data is None:
            if self.strict_io:
                raise self.fault(
                    index,
                    f"{bus.name} read outside any device",
                    f"{addr:#x}/{size}; RIP is past the instruction",
                )
            self._count_unhandled(bus, addr)
            return b"\xff" * size
        if len(data) != size:
            raise self.fault(
                index, f"{bus.name} device answered {len(data)} bytes", f"read {addr:#x}/{size}"
            )
        return data

    def _count_unhandled(self, bus: Bus, addr: int) -> None:
        """Count a stray access; a guest sweeping addresses must not grow the VMM's memory."""
        counter = self.stats.unhandled_pio if bus is self.pio else self.stats.unhandled_mmio
        if addr not in counter and len(counter) >= UNHANDLED_KEYS:
            addr = UNHANDLED_OTHER
        counter[addr] += 1

    def _write(self, index: int, bus: Bus, addr: int, data: bytes) -> None:
        try:
            with self._bus_lock:
                hit = bus.write(addr, data)
        except Exception as e:
            detail = f"write {addr:#x} <- {data.hex()}: {e!r}"
            raise self.fault(index, f"{bus.name} device failed", detail) from e
        if not hit:
            if self.strict_io:
                raise self.fault(
                    index,
                    f"{bus.name} write outside any device",
                    f"{addr:#x} <- {data.hex()}; RIP is past the instruction",
                )
            self._count_unhandled(bus, addr)

    def pio_read(self, index: int, port: int, size: int) -> bytes:
        return self._read(index, self.pio, port, size)

    def pio_write(self, index: int, port: int, data: bytes) -> None:
        self._write(index, self.pio, port, data)

    def mmio_read(self, index: int, addr: int, size: int) -> bytes:
        return self._read(index, self.mmio, addr, size)

    def mmio_write(self, index: int, addr: int, data: bytes) -> None:
        self._write(index, self.mmio, addr, data)

    def fix_up(self, index: int) -> bool:
        """Handle a known kvm_pvm emulator gap (see cpu.host_fixup); False = not ours."""
        if not self.host_fixups:
            return False
        name = host_fixup(self.vcpus[index], self.ram)
        if name is not None:
            self.stats.fixups[name] += 1
        return name is not None

    # --- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.notifier.close()
        for fd in self._irqfds:
            os.close(fd)
        self._irqfds = []
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.vm_fd >= 0:
            os.close(self.vm_fd)
            self.vm_fd = -1
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        os.close(self.sys_fd)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
