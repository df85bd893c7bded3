"""virtio-console (device id 3), one port, no multiport: the guest agent's byte pipe.

Queues: 0 = receiveq (host -> guest), 1 = transmitq (guest -> host). In the
guest the port is /dev/hvc0. The host sees a plain byte stream:

- guest -> host: every transmitq buffer is passed to ``on_output`` in pieces
  of at most 64 KiB, in order, on the thread that handled the kick. Back-
  pressure: while ``pause_output()`` is in effect, transmit buffers stay in the
  ring; once the guest runs out of them its writes block. ``on_output`` runs
  under the device lock: it must not wait for another thread that calls
  ``send``.
- host -> guest: ``send`` appends to a bounded host buffer (``host_buffer``
  bytes, 1 MiB by default) and returns how many bytes it accepted, like a
  non-blocking write; bytes move into receiveq buffers as the guest posts
  them. ``on_writable`` (optional) is called when guest buffers drained some
  of the host buffer, so a writer knows to retry.

Pending host -> guest bytes survive a device reset (the host stream goes on)
and are part of the snapshot state.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from sporevm.errors import SporeError

from .device import VirtioDevice
from .queue import ChainError
from .state import State, VirtioStateError, expect_keys, get_bool, get_hex

DEVICE_ID = 3
RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 128
TX_PIECE = 64 * 1024
# Linux sends at most a page (hvc) or 32 KiB (port writes) per buffer; a bigger
# chain is a hostile guest trying to make one kick cost gigabytes of output.
MAX_TX_CHAIN = 1 << 20
DEFAULT_HOST_BUFFER = 1 << 20
MAX_HOST_BUFFER = 16 << 20  # the snapshot carries this as hex: keep it bounded


class ConsoleDevice(VirtioDevice):
    device_id = DEVICE_ID
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(
        self,
        on_output: Callable[[bytes], None] | None = None,
        *,
        host_buffer: int = DEFAULT_HOST_BUFFER,
        on_writable: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < host_buffer <= MAX_HOST_BUFFER:
            raise ValueError(f"host_buffer {host_buffer} not in (0, {MAX_HOST_BUFFER}]")
        self.on_output = on_output
        self.on_writable = on_writable
        self.host_buffer = host_buffer
        self._pending = bytearray()
        self.tx_paused = False

    def config(self) -> bytes:
        # cols, rows (VIRTIO_CONSOLE_F_SIZE not offered), max_nr_ports, emerg_wr.
        return struct.pack("<HHII", 0, 0, 1, 0)

    # -- host side ------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Host -> guest bytes accepted by ``send`` and not yet delivered."""
        with self.lock:
            return len(self._pending)

    def send(self, data: bytes) -> int:
        """Queue bytes for the guest; returns how many fit in the host buffer (maybe 0)."""
        with self.lock:
            room = self.host_buffer - len(self._pending)
            taken = min(room, len(data))
            self._pending += data[:taken]
            self._guarded(self._deliver)
            return taken

    def pause_output(self) -> None:
        with self.lock:
            self.tx_paused = True

    def resume_output(self) -> None:
        with self.lock:
            self.tx_paused = False
            self._guarded(self._transmit)

    def _guarded(self, work: Callable[[], None]) -> None:
        """Run queue work from a host thread: guest corruption resets the device, never raises."""
        if not self.active:
            return
        try:
            work()
        except SporeError as e:
            self.link.needs_reset(str(e))

    # -- guest side -------------------------------------------------------------

    def activate(self) -> None:
        super().activate()
        self._deliver()

    def notify(self, index: int) -> None:
        if index == RX_QUEUE:
            before = len(self._pending)
            self._deliver()
            if self.on_writable is not None and len(self._pending) < before:
                self.on_writable()
        elif index == TX_QUEUE:
            self._transmit()

    def _deliver(self) -> None:
        q = self.queues[RX_QUEUE]
        if not self._pending or not q.ready:
            return
        done = False
        for _ in range(q.size):
            if not self._pending:
                break
            chain = q.pop()
            if chain is None:
                break
            n = min(len(self._pending), chain.writable_len)
            written = chain.scatter(self.mem, 0, bytes(self._pending[:n]))
            del self._pending[:written]
            q.push_used(chain.head, written)
            done = True
        if done:
            self.link.signal_used(RX_QUEUE)

    def _transmit(self) -> None:
        q = self.queues[TX_QUEUE]
        if self.tx_paused or not q.ready:
            return
        done = False
        for _ in range(q.size):
            chain = q.pop()
            if chain is None:
                break
            total, off = chain.readable_len, 0
            if total > MAX_TX_CHAIN:
                raise ChainError(chain.head, f"transmit buffer of {total} bytes > {MAX_TX_CHAIN}")
            while off < total:
                piece = chain.gather(self.mem, off, TX_PIECE)
                off += len(piece)
                if self.on_output is not None:
                    self.on_output(piece)
            q.push_used(chain.head, 0)
            done = True
        if done:
            self.link.signal_used(TX_QUEUE)

    # -- snapshot ---------------------------------------------------------------

    def state(self) -> State:
        with self.lock:
            return {"pending": self._pending.hex(), "tx_paused": self.tx_paused}

    def restore(self, state: object) -> None:
        where = "virtio-console"
        s = expect_keys(state, where, {"pending", "tx_paused"})
        pending = get_hex(s, where, "pending", MAX_HOST_BUFFER)
        tx_paused = get_bool(s, where, "tx_paused")
        if len(pending) > self.host_buffer:
            raise VirtioStateError(f"{where}.pending: more than the host buffer holds")
        self._pending = bytearray(pending)
        self.tx_paused = tx_paused
