"""A 16550A UART (COM1: ports 0x3f8–0x3ff, IRQ 4), enough for Linux's 8250 driver.

Transmission is instantaneous: THR writes go straight to the output callback,
so LSR always reports THRE|TEMT and the "transmitter empty" interrupt fires as
soon as it is enabled or a byte is written. Received bytes come from ``feed``.
The interrupt output is a level (high while IIR reports a pending source);
the board wires it to the in-kernel irqchip through an IrqLine.

Snapshots: ``state()`` and ``restore()`` move the registers and the receive
buffer as the spore VM-state schema's ``SerialState`` (docs/vm-state.md,
``devices.serial``), under the device lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from threading import Lock

from sporevm.spore.vmstate import SERIAL_RX_LIMIT, SerialState, VmStateError
from sporevm.vmm.bus import IrqLine

COM1_BASE = 0x3F8
COM1_IRQ = 4
SERIAL_PORTS = 8

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 1, 2, 4, 8
IIR_NO_INT, IIR_THRI, IIR_RDI = 0x01, 0x02, 0x04
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE_FIFO, FCR_CLEAR_RCVR = 0x01, 0x02
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80

RX_LIMIT = SERIAL_RX_LIMIT  # bytes buffered for the guest before feed() drops input
FCR_KEPT = 0xC9  # the FCR bits this UART keeps


class Serial:
    def __init__(self, irq: IrqLine, output: Callable[[bytes], None]) -> None:
        self._irq = irq
        self._output = output
        self._lock = Lock()  # feed() runs on a host thread, register access on a vCPU thread
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1, as firmware leaves it
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.divisor = 12  # 9600 baud
        self._thre_pending = False
        self._irq_high = False

    # --- host side ---------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Queue bytes for the guest to read; returns how many were accepted."""
        with self._lock:
            n = max(0, min(len(data), RX_LIMIT - len(self._rx)))
            self._rx.extend(data[:n])
            self._update_irq()
            return n

    # --- snapshot ------------------------------------------------------------------
    def state(self) -> SerialState:
        """Registers and unread input, consistent under the device lock."""
        with self._lock:
            return SerialState(
                ier=self.ier,
                lcr=self.lcr,
                mcr=self.mcr,
                scr=self.scr,
                fcr=self.fcr,
                divisor=self.divisor,
                rx=bytes(self._rx),
                thre_pending=self._thre_pending,
            )

    def restore(self, s: SerialState) -> None:
        """Load ``state()`` output; a value this UART cannot hold is a VmStateError and
        changes nothing. The IRQ line is driven to the level the registers imply."""
        w = "devices.serial"
        for name, value, hi in (
            ("ier", s.ier, 0x0F),
            ("lcr", s.lcr, 0xFF),
            ("mcr", s.mcr, 0x1F),
            ("scr", s.scr, 0xFF),
            ("fcr", s.fcr, 0xFF),
            ("divisor", s.divisor, 0xFFFF),
        ):
            if not 0 <= value <= hi:
                raise VmStateError(f"{w}.{name}: expected an integer in [0, {hi}]")
        if s.fcr & ~FCR_KEPT:
            raise VmStateError(f"{w}.fcr: bits {s.fcr:#x} a 16550 does not keep")
        if len(s.rx) > RX_LIMIT:
            raise VmStateError(f"{w}.rx: more than {RX_LIMIT} bytes")
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr = s.ier, s.lcr, s.mcr, s.scr
            self.fcr, self.divisor, self._thre_pending = s.fcr, s.divisor, s.thre_pending
            self._rx.clear()
            self._rx.extend(s.rx)
            # Force the line to the level the registers imply (the irqchip state holds it
            # too; raising it again keeps KVM's per-source line state in step).
            self._irq_high = False
            self._update_irq()

    # --- BusDevice -----------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            val = self._read_reg(offset) if size == 1 else 0xFF
            self._update_irq()
        return bytes([val])[:size] + b"\xff" * (size - 1)  # exactly size bytes, even 0

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            self._write_reg(offset, data[0])
            self._update_irq()

    # --- registers -----------------------------------------------------------------
    def _read_reg(self, reg: int) -> int:
        if self.lcr & LCR_DLAB and reg in (RBR_THR, IER):
            return (self.divisor >> (8 * reg)) & 0xFF
        if reg == RBR_THR:
            return self._rx.popleft() if self._rx else 0
        if reg == IER:
            return self.ier
        if reg == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self._thre_pending = False  # reading IIR acknowledges THRE
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if reg == MSR:
            return self._msr()
        return self.scr

    def _write_reg(self, reg: int, val: int) -> None:
        if self.lcr & LCR_DLAB and reg in (RBR_THR, IER):
            shift = 8 * reg
            self.divisor = (self.divisor & ~(0xFF << shift)) | (val << shift)
            return
        if reg == RBR_THR:
            if self.mcr & MCR_LOOP:
                if len(self._rx) < RX_LIMIT:
                    self._rx.append(val)
            else:
                self._output(bytes([val]))
            self._thre_pending = True  # sent at once: the holding register is empty again
        elif reg == IER:
            if val & IER_THRI and not self.ier & IER_THRI:
                self._thre_pending = True
            self.ier = val & 0x0F
        elif reg == IIR_FCR:
            if val & FCR_CLEAR_RCVR:
                self._rx.clear()
            self.fcr = val & FCR_KEPT
        elif reg == LCR:
            self.lcr = val
        elif reg == MCR:
            self.mcr = val & 0x1F
        elif reg == SCR:
            self.scr = val
        # LSR and MSR are read-only.

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:  # loopback: modem outputs read back as inputs
            m = self.mcr
            return (
                (MSR_CTS if m & MCR_RTS else 0)
                | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0)
                | (MSR_DCD if m & MCR_OUT2 else 0)
            )
        return MSR_CTS | MSR_DSR | MSR_DCD  # a cable with everything asserted

    def _iir(self) -> int:
        if self.ier & IER_RDI and self._rx:
            return IIR_RDI
        if self.ier & IER_THRI and self._thre_pending:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        high = self._iir() != IIR_NO_INT
        if high != self._irq_high:
            self._irq_high = high
            self._irq.set_level(high)
