"""Power-off and reset: the i8042 reset line and the spore power port.

* i8042 (ports 0x60, 0x64): writing 0xFE to the command port pulses the CPU
  reset line. Linux uses it for ``reboot=k``; we report it as a reset.
* spore power port (port 0x510, 4 bytes): a 32-bit write powers the machine
  off with that value as the exit status; reads return ``SPORE_POWER_MAGIC`` so
  a guest can check the port exists. The probe guest uses it, and so can a
  guest's PID 1 from user mode after ``ioperm(0x510, 4, 1)``. There is no ACPI
  on this board, so this port is the one clean power-off path.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class PowerEvent(enum.Enum):
    POWEROFF = "poweroff"
    RESET = "reset"


PowerSink = Callable[[PowerEvent, int], None]

I8042_DATA = 0x60
I8042_CMD = 0x64
I8042_RESET = 0xFE

SPORE_POWER_PORT = 0x510
SPORE_POWER_LEN = 4
SPORE_POWER_MAGIC = int.from_bytes(b"SPOR", "little")  # the bytes "SPOR" in guest memory


class I8042:
    """Only the reset command; no keyboard, no mouse (status reads 0: nothing to read)."""

    def __init__(self, sink: PowerSink) -> None:
        self._sink = sink

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == I8042_CMD - I8042_DATA and data[:1] == bytes([I8042_RESET]):
            self._sink(PowerEvent.RESET, 0)


class PowerPort:
    def __init__(self, sink: PowerSink) -> None:
        self._sink = sink

    def read(self, offset: int, size: int) -> bytes:
        return SPORE_POWER_MAGIC.to_bytes(4, "little")[offset : offset + size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == SPORE_POWER_LEN:  # 32-bit writes only; others ignored
            self._sink(PowerEvent.POWEROFF, int.from_bytes(data, "little"))
