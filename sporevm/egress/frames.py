"""The frame stream: a 4-byte big-endian length, then one Ethernet frame, repeated.

QEMU's stream netdev protocol, which passt speaks on its UNIX socket; the VM side of
the gateway uses the same framing, so the monitor's virtio-net device only adds and
strips four bytes. A length over ``MAX_FRAME`` cannot be skipped safely (the
stream's framing is then unknown), so it poisons the reader: every later call raises
``FrameError`` and the gateway closes that side. A frame shorter than an Ethernet
header is still delimited and is handed on for the caller to drop.
"""

from __future__ import annotations

import struct

MAX_FRAME = 65536  # passt's largest frame is its 65520-byte MTU plus a 14-byte header
_LEN = struct.Struct("!I")


class FrameError(ValueError):
    """The stream broke its framing; nothing after this point can be trusted."""


def encode(frame: bytes) -> bytes:
    if len(frame) > MAX_FRAME:
        raise FrameError(f"frame of {len(frame)} bytes; at most {MAX_FRAME}")
    return _LEN.pack(len(frame)) + frame


class FrameReader:
    """Reassembles frames from arbitrary chunks; holds at most one partial frame."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: str | None = None

    @property
    def pending(self) -> int:
        """Bytes held for a frame not yet complete (≤ max_frame + 4)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Every frame ``data`` completes, in order."""
        if self._error is not None:
            raise FrameError(self._error)
        self._buf += data
        frames: list[bytes] = []
        buf = self._buf
        off = 0
        while len(buf) - off >= 4:
            (n,) = _LEN.unpack_from(buf, off)
            if n > self.max_frame:
                self._error = f"frame length {n} > {self.max_frame}"
                del buf[:]
                raise FrameError(self._error)
            if len(buf) - off - 4 < n:
                break
            frames.append(bytes(buf[off + 4 : off + 4 + n]))
            off += 4 + n
        del buf[:off]
        return frames

    def split(self, data: bytes) -> tuple[bytes, int]:
        """The longest run of whole frames now available, still length-prefixed, and how
        many frames it holds: the bulk path (passt → guest) forwards it unchanged."""
        if self._error is not None:
            raise FrameError(self._error)
        self._buf += data
        buf = self._buf
        off = count = 0
        while len(buf) - off >= 4:
            (n,) = _LEN.unpack_from(buf, off)
            if n > self.max_frame:
                self._error = f"frame length {n} > {self.max_frame}"
                del buf[:]
                raise FrameError(self._error)
            if len(buf) - off - 4 < n:
                break
            off += 4 + n
            count += 1
        out = bytes(buf[:off])
        del buf[:off]
        return out, count
