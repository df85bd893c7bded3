"""virtio-mmio transport, version 2 ("modern"), virtio 1.2 §4.2.2.

A BusDevice over a 4 KiB window: registers below 0x100, device config space
from 0x100. Every guest access lands here from an MMIO exit; nothing a guest
writes can raise out of ``read``/``write``: bad accesses are ignored (reads
return zeros) and guest-caused corruption sets DEVICE_NEEDS_RESET, raises a
config-change interrupt if the driver is live, and stops the device until the
driver writes Status = 0.

The IRQ line is level-triggered: high while InterruptStatus != 0, lowered when
the driver acknowledges the last bit.
"""

from __future__ import annotations

from sporevm.errors import SporeError
from sporevm.spore.vmstate import VIRTIO_STATE_VERSION, VIRTIO_TRANSPORT_FIELDS
from sporevm.vmm.bus import IrqLine
from sporevm.vmm.memory import GuestMemory

from .device import F_INDIRECT_DESC, F_VERSION_1, TRANSPORT_FEATURES, VirtioDevice
from .queue import Virtqueue
from .state import State, VirtioStateError, expect_keys, get_int, get_str

WINDOW = 0x1000
CONFIG_OFFSET = 0x100

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x53504F52  # "ROPS" little-endian: ours, not any registered vendor

REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_CONFIG_GENERATION = 0x0FC

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
_STATUS_DRIVER_BITS = (
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED
)

INT_VRING = 1
INT_CONFIG = 2

# The snapshot state's fields are part of the spore VM-state schema (the format's).
STATE_VERSION = VIRTIO_STATE_VERSION
_STATE_KEYS = set(VIRTIO_TRANSPORT_FIELDS)
_ADDR_REGS = {
    REG_QUEUE_DESC_LOW: ("desc_addr", 0),
    REG_QUEUE_DESC_HIGH: ("desc_addr", 32),
    REG_QUEUE_DRIVER_LOW: ("avail_addr", 0),
    REG_QUEUE_DRIVER_HIGH: ("avail_addr", 32),
    REG_QUEUE_DEVICE_LOW: ("used_addr", 0),
    REG_QUEUE_DEVICE_HIGH: ("used_addr", 32),
}


def kernel_cmdline(base: int, irq: int) -> str:
    """The Linux cmdline declaration of one device (VIRTIO_MMIO_CMDLINE_DEVICES)."""
    return f"virtio_mmio.device=4K@{base:#x}:{irq}"


class VirtioMmio:
    """One virtio device behind one MMIO window and one level-triggered IRQ line."""

    def __init__(
        self, device: VirtioDevice, mem: GuestMemory, irq: IrqLine, *, base: int | None = None
    ) -> None:
        self.device = device
        self.mem = mem
        self.irq = irq
        self.base = base
        self.lock = device.lock
        self.queues = [Virtqueue(mem, n) for n in device.queue_max_sizes]
        device.bind(mem, self.queues, self)
        self._irq_high = False
        self.config_generation = 0
        self._reset_registers()

    @property
    def offered_features(self) -> int:
        return self.device.features() | TRANSPORT_FEATURES

    @property
    def notify_address(self) -> int | None:
        """Guest-physical QueueNotify address (for an ioeventfd), if the base is known."""
        return None if self.base is None else self.base + REG_QUEUE_NOTIFY

    @property
    def queue_count(self) -> int:
        return len(self.queues)

    @property
    def irq_gsi(self) -> int | None:
        """The GSI behind our line when it is a plain KVM_IRQ_LINE one (an irqfd can
        replace it); None for any other line, e.g. a test's counting wrapper."""
        gsi = getattr(self.irq, "gsi", None)
        return gsi if isinstance(gsi, int) else None

    def set_irq_line(self, line: IrqLine) -> None:
        """Raise interrupts through ``line`` from now on (the machine's irqfd)."""
        with self.lock:
            self.irq = line
            if self._irq_high:
                line.set_level(True)

    @property
    def needs_reset_pending(self) -> bool:
        return bool(self.status & STATUS_NEEDS_RESET)

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.error = ""  # why NEEDS_RESET was set, for the VMM's log
        for q in self.queues:
            q.reset()
        self._update_irq()

    def reset(self) -> None:
        """Device reset, as on a guest write of Status = 0 (also usable by the VMM)."""
        with self.lock:
            self.device.reset()
            self._reset_registers()

    # -- BusDevice ----------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                return self._read_config(offset - CONFIG_OFFSET, size)
            if size != 4 or offset % 4 or offset < 0:
                return bytes(max(size, 0))
            return self._read_reg(offset).to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                if len(data) in (1, 2, 4, 8) and not self.needs_reset_pending:
                    cfg_len = len(self.device.config())
                    off = offset - CONFIG_OFFSET
                    if off + len(data) <= cfg_len:
                        self.device.write_config(off, bytes(data))
                return
            if len(data) != 4 or offset % 4 or offset < 0:
                return
            self._write_reg(offset, int.from_bytes(data, "little"))

    # -- registers ----------------------------------------------------------

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_config(self, off: int, size: int) -> bytes:
        cfg = self.device.config()
        if size not in (1, 2, 4, 8) or off + size > len(cfg):
            return bytes(max(size, 0))
        return cfg[off : off + size]

    def _read_reg(self, offset: int) -> int:
        q = self._selected_queue()
        if offset == REG_MAGIC:
            return MAGIC
        if offset == REG_VERSION:
            return VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_id
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return (self.offered_features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF
        if offset == REG_QUEUE_NUM_MAX:
            return 0 if q is None else q.max_size
        if offset == REG_QUEUE_READY:
            return int(q is not None and q.ready)
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH):
            return 0xFFFF_FFFF  # all ones: no shared memory region
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation & 0xFFFF_FFFF
        return 0  # write-only or reserved

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == REG_STATUS:
            self._write_status(value)
            return
        if offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self._update_irq()
            return
        if offset == REG_QUEUE_NOTIFY:
            self.notify_queue(value)
            return
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            # Features are fixed once FEATURES_OK is set; later writes are ignored.
            if self.driver_features_sel <= 1 and not self.status & STATUS_FEATURES_OK:
                shift = 32 * self.driver_features_sel
                mask = 0xFFFF_FFFF << shift
                self.driver_features = (self.driver_features & ~mask) | (value << shift)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        else:
            self._write_queue_reg(offset, value)

    def _write_queue_reg(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        if q is None or self.needs_reset_pending:
            return
        if offset == REG_QUEUE_READY:
            if value == 0:
                q.ready = False
            elif not q.ready:
                err = q.layout_error()
                if err is not None:
                    self.needs_reset(f"queue {self.queue_sel}: {err}")
                    return
                q.indirect = bool(self.driver_features & F_INDIRECT_DESC)
                q.ready = True
            return
        if q.ready:
            return  # size and addresses are frozen while the queue is live
        if offset == REG_QUEUE_NUM:
            q.size = value
        elif offset in _ADDR_REGS:
            name, shift = _ADDR_REGS[offset]
            old = getattr(q, name)
            setattr(q, name, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_registers()
            return
        value &= _STATUS_DRIVER_BITS  # NEEDS_RESET belongs to the device
        old = self.status & _STATUS_DRIVER_BITS
        if value & old != old:
            return  # only a reset may clear status bits
        new = value & ~old
        if new & STATUS_FEATURES_OK and not self._features_acceptable():
            value &= ~STATUS_FEATURES_OK  # the driver re-reads Status and sees the refusal
        if new & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK:
            value &= ~STATUS_DRIVER_OK
        self.status = value | (self.status & STATUS_NEEDS_RESET)
        if value & STATUS_FEATURES_OK:
            self.device.driver_features = self.driver_features
        if new & value & STATUS_DRIVER_OK and not self.needs_reset_pending:
            try:
                self.device.activate()
            except SporeError as e:
                self.needs_reset(str(e))

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        return bool(f & F_VERSION_1) and f & ~self.offered_features == 0

    # -- queue notifications and interrupts ---------------------------------

    def notify_queue(self, index: int) -> None:
        """The driver kicked queue ``index`` (QueueNotify write, or later an ioeventfd)."""
        with self.lock:
            if (
                not self.device.active
                or self.needs_reset_pending
                or not 0 <= index < len(self.queues)
                or not self.queues[index].ready
            ):
                return
            try:
                self.device.notify(index)
            except SporeError as e:
                self.needs_reset(str(e))

    def signal_used(self, queue: int) -> None:
        if self.queues[queue].needs_interrupt():
            self.interrupt_status |= INT_VRING
            self._update_irq()

    def needs_reset(self, reason: str) -> None:
        with self.lock:
            if self.needs_reset_pending:
                return
            self.status |= STATUS_NEEDS_RESET
            self.error = reason[:500]
            self.device.active = False
            if self.status & STATUS_DRIVER_OK:
                self.interrupt_status |= INT_CONFIG
                self._update_irq()

    def config_changed(self) -> None:
        """A device changed its config space: bump the generation and tell a live driver."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            if self.status & STATUS_DRIVER_OK:
                self.interrupt_status |= INT_CONFIG
                self._update_irq()

    def _update_irq(self) -> None:
        high = self.interrupt_status != 0
        if high != self._irq_high:
            self._irq_high = high
            self.irq.set_level(high)

    # -- snapshot -----------------------------------------------------------

    def state(self) -> State:
        with self.lock:
            return {
                "version": STATE_VERSION,
                "device_id": self.device.device_id,
                "status": self.status,
                "device_features_sel": self.device_features_sel,
                "driver_features": self.driver_features,
                "driver_features_sel": self.driver_features_sel,
                "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation,
                "error": self.error,
                "queues": [q.state() for q in self.queues],
                "device": self.device.state(),
            }

    def restore(self, state: object) -> None:
        """Load ``state()`` output. On any invalid field: VirtioStateError, device left reset."""
        with self.lock:
            try:
                self._restore(state)
            except VirtioStateError:
                self.device.reset()
                self._reset_registers()
                raise

    def _restore(self, state: object) -> None:
        w = "virtio-mmio"
        s = expect_keys(state, w, _STATE_KEYS)
        u32 = 0xFFFF_FFFF
        get_int(s, w, "version", STATE_VERSION, STATE_VERSION)
        dev_id = self.device.device_id
        get_int(s, w, "device_id", dev_id, dev_id)
        status = get_int(s, w, "status", 0, 0xFF)
        if status & ~(_STATUS_DRIVER_BITS | STATUS_NEEDS_RESET):
            raise VirtioStateError(f"{w}.status: unknown bits in {status:#x}")
        driver_features = get_int(s, w, "driver_features", 0, (1 << 64) - 1)
        # Before FEATURES_OK the register holds whatever the driver wrote (refused
        # bits included); only an accepted feature set must be one we offer.
        if status & STATUS_FEATURES_OK and driver_features & ~self.offered_features:
            raise VirtioStateError(f"{w}.driver_features: bits this device does not offer")
        if status & STATUS_FEATURES_OK and not driver_features & F_VERSION_1:
            raise VirtioStateError(f"{w}: FEATURES_OK without VIRTIO_F_VERSION_1")
        if status & STATUS_DRIVER_OK and not status & STATUS_FEATURES_OK:
            raise VirtioStateError(f"{w}: DRIVER_OK without FEATURES_OK")
        queues = s["queues"]
        if not isinstance(queues, list) or len(queues) != len(self.queues):
            raise VirtioStateError(f"{w}.queues: expected a list of {len(self.queues)} queues")
        device_features_sel = get_int(s, w, "device_features_sel", 0, u32)
        driver_features_sel = get_int(s, w, "driver_features_sel", 0, u32)
        queue_sel = get_int(s, w, "queue_sel", 0, u32)
        interrupt_status = get_int(s, w, "interrupt_status", 0, INT_VRING | INT_CONFIG)
        config_generation = get_int(s, w, "config_generation", 0, u32)
        error = get_str(s, w, "error", 500)
        for i, (q, qs) in enumerate(zip(self.queues, queues, strict=True)):
            q.restore(qs, f"{w}.queues[{i}]")
        self.device.restore(s["device"])
        self.status = status
        self.driver_features = driver_features
        self.device_features_sel = device_features_sel
        self.driver_features_sel = driver_features_sel
        self.queue_sel = queue_sel
        self.interrupt_status = interrupt_status
        self.config_generation = config_generation
        self.error = error
        self.device.driver_features = driver_features if status & STATUS_FEATURES_OK else 0
        self.device.active = bool(status & STATUS_DRIVER_OK) and not status & STATUS_NEEDS_RESET
        # The irqchip snapshot holds the line level; re-assert ours to match.
        self._irq_high = not (interrupt_status != 0)
        self._update_irq()
