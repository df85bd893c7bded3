"""Fuzz guest port and MMIO accesses: the guest chooses every port, address, width and value.

Input: a sequence of operations, each a header byte and its operands:

* ``h & 3 == 0..2`` - a direct BusDevice access to the serial UART (0), the
  i8042 (1) or the spore power port (2): offset byte, size byte (0..8), and
  for writes (``h & 4``) ``size`` data bytes.
* ``h & 3 == 3`` and ``h & 8`` clear - the host feeds ``h >> 4`` bytes to the
  serial (what the user types), taken from the input.
* ``h & 3 == 3`` and ``h & 8`` set - a Machine dispatch (``pio_*`` or, with
  ``h & 16``, ``mmio_*``): port (2 bytes) or address (8 bytes), size byte,
  write data. Only when /dev/kvm is usable; one Machine per process, 64 MiB,
  strict_io=False.

Devices must never raise, reads return exactly ``size`` bytes, the serial's
receive buffer stays within RX_LIMIT and its interrupt line tracks IIR, power
events happen only for the documented writes, and Machine dispatch counts
every unmapped access instead of failing.
"""

import os
import sys

import atheris

with atheris.instrument_imports():
    from sporevm.vmm.devices import power, serial
    from sporevm.vmm.machine import SERIAL_TAIL, Machine, Stats

PIO_SIZES = (1, 2, 4)


class _Irq:
    def __init__(self) -> None:
        self.level = False
        self.changes = 0

    def set_level(self, high: bool) -> None:
        assert high != self.level  # the serial only reports edges
        self.level = high
        self.changes += 1


_machine: Machine | None = None
if os.access("/dev/kvm", os.R_OK | os.W_OK):
    _machine = Machine(64 << 20, strict_io=False)


def _machine_op(m: Machine, h: int, data: bytes, pos: int) -> int:
    mmio = bool(h & 16)
    width = 8 if mmio else 2
    if len(data) < pos + width + 1:
        return len(data)
    addr = int.from_bytes(data[pos : pos + width], "little")
    pos += width
    size = data[pos] % 8 + 1 if mmio else PIO_SIZES[data[pos] % 3]
    pos += 1
    bus = m.mmio if mmio else m.pio
    mapped = bus.find(addr) is not None
    before = sum(m.stats.unhandled_mmio.values()) + sum(m.stats.unhandled_pio.values())
    if h & 4:
        value = data[pos : pos + size].ljust(size, b"\0")
        pos += size
        (m.mmio_write if mmio else m.pio_write)(0, addr, value)
    else:
        got = (m.mmio_read if mmio else m.pio_read)(0, addr, size)
        assert len(got) == size
        if not mapped:
            assert got == b"\xff" * size
    after = sum(m.stats.unhandled_mmio.values()) + sum(m.stats.unhandled_pio.values())
    assert after == before + (0 if mapped else 1)
    assert len(m.serial_tail) <= 2 * SERIAL_TAIL
    return pos


def TestOneInput(data: bytes) -> None:
    events: list[tuple[power.PowerEvent, int]] = []
    out = [0]
    writes = [0]

    def sink(event: power.PowerEvent, status: int) -> None:
        events.append((event, status))

    def output(b: bytes) -> None:
        assert len(b) == 1
        out[0] += 1

    irq = _Irq()
    uart = serial.Serial(irq, output)
    devices = (uart, power.I8042(sink), power.PowerPort(sink))
    m = _machine
    if m is not None:
        m.stats = Stats()  # per input: the counters would otherwise grow across inputs
        m.run_control.begin()  # no stop carried over from the previous input
    pos = 0
    while pos < len(data):
        h = data[pos]
        pos += 1
        kind = h & 3
        if kind == 3:
            if h & 8:
                if m is not None:
                    pos = _machine_op(m, h, data, pos)
                continue
            chunk = data[pos : pos + (h >> 4)]
            pos += len(chunk)
            accepted = uart.feed(chunk)
            assert 0 <= accepted <= len(chunk)
        else:
            if len(data) < pos + 2:
                return
            offset, size = data[pos], data[pos + 1] % 9
            pos += 2
            dev = devices[kind]
            n_events = len(events)
            if h & 4:
                value = data[pos : pos + size]
                pos += len(value)
                if kind == 0 and offset == serial.RBR_THR and value:
                    writes[0] += 1
                dev.write(offset, value)
                new = events[n_events:]
                if kind == 1:
                    ok = offset == power.I8042_CMD - power.I8042_DATA and value[:1] == b"\xfe"
                    assert new == ([(power.PowerEvent.RESET, 0)] if ok else [])
                elif kind == 2:
                    ok = offset == 0 and len(value) == 4
                    status = int.from_bytes(value, "little")
                    assert new == ([(power.PowerEvent.POWEROFF, status)] if ok else [])
            else:
                got = dev.read(offset, size)
                assert len(got) == size, (kind, offset, size, got)
                assert len(events) == n_events
        assert len(uart._rx) <= serial.RX_LIMIT
        assert irq.level == (uart._iir() != serial.IIR_NO_INT)
    assert out[0] <= writes[0]  # one byte out per THR write at most (loopback keeps it)
    if m is not None:
        stop = m.run_control.result()
        assert stop is None or stop.reason.name in ("POWEROFF", "RESET")


def encode_machine(mmio: bool, write: bool, addr: int, size_byte: int, value: bytes = b"") -> bytes:
    """One Machine-dispatch operation; used to write the seed corpus."""
    h = 3 | 8 | (16 if mmio else 0) | (4 if write else 0)
    return bytes([h]) + addr.to_bytes(8 if mmio else 2, "little") + bytes([size_byte]) + value


def encode_dev(kind: int, write: bool, offset: int, size: int, value: bytes = b"") -> bytes:
    """One direct device access; used to write the seed corpus."""
    return bytes([kind | (4 if write else 0), offset, size]) + value


def encode_feed(chunk: bytes) -> bytes:
    assert len(chunk) < 16
    return bytes([3 | len(chunk) << 4]) + chunk


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
