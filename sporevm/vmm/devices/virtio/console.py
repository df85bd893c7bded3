"""virtio-console (device id 3) with VIRTIO_CONSOLE_F_MULTIPORT: the guest agent's byte pipe.

Queues: 0 = port 0 receiveq (host -> guest), 1 = port 0 transmitq (guest ->
host), 2 = control receiveq, 3 = control transmitq (virtio 1.2, 5.3). The
device offers one generic port, id 0, named ``port_name`` (``org.spore.agent``
by default); in a Linux guest it is ``/dev/vportNp0``, found by that name under
``/sys/class/virtio-ports``. Not a console port: no hvc, no tty layer, so the
guest reads page-sized buffers and writes up to 32 KiB at a time instead of
hvc's 16-byte input polls.

The handshake, all on the control queues: the driver sends DEVICE_READY(1);
the device answers PORT_ADD(0); the driver sends PORT_READY(0, 1); the device
answers PORT_OPEN(0, 1) (the host end is always open) and PORT_NAME(0). When a
guest process opens the port the driver sends PORT_OPEN(0, 1), and only then
does the device move host bytes into port 0's receive buffers: Linux discards
data that arrives on a generic port nobody has open. Every control message
from the guest is hostile input: one that is not exactly 8 bytes, names a port
other than 0, carries an unknown or host-only event, a value other than the
one expected, or comes out of order is refused and counted (``refused``),
never raised. A driver that does not accept MULTIPORT gets the single-port
device (queues 0 and 1; port 0 is open from the start).

``legacy=True`` builds the device of the spore-board/1 models instead, for
restoring spores sealed with it (docs/devices.md): MULTIPORT not offered, two
queues, port 0 the guest's ``/dev/hvc0``, and the snapshot state of that
device (``pending`` and ``tx_paused`` only).

The host sees a plain byte stream:

- guest -> host: every transmitq buffer is passed to ``on_output`` in pieces
  of at most 64 KiB, in order, on the thread that handled the kick. Back-
  pressure: while ``pause_output()`` is in effect, transmit buffers stay in the
  ring; once the guest runs out of them its writes block. ``on_output`` runs
  under the device lock: it must not wait for another thread that calls
  ``send``.
- host -> guest: ``send`` appends to a bounded host buffer (``host_buffer``
  bytes, 1 MiB by default) and returns how many bytes it accepted, like a
  non-blocking write; bytes move into receiveq buffers as the guest posts
  them (and, with MULTIPORT, once the guest opened the port). ``on_writable``
  (optional) is called when guest buffers drained some of the host buffer, so
  a writer knows to retry.

Pending host -> guest bytes survive a device reset (the host stream goes on)
and are part of the snapshot state, with the handshake's progress and the
control messages not yet delivered.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from sporevm.errors import SporeError

from .device import VirtioDevice
from .queue import ChainError
from .state import State, VirtioStateError, expect_keys, get_bool, get_hex, get_str

DEVICE_ID = 3
RX_QUEUE = 0
TX_QUEUE = 1
CTRL_RX_QUEUE = 2
CTRL_TX_QUEUE = 3
QUEUE_SIZE = 128
CTRL_QUEUE_SIZE = 32
TX_PIECE = 64 * 1024
# Linux sends at most a page (hvc) or 32 KiB (port writes) per buffer; a bigger
# chain is a hostile guest trying to make one kick cost gigabytes of output.
MAX_TX_CHAIN = 1 << 20
DEFAULT_HOST_BUFFER = 1 << 20
MAX_HOST_BUFFER = 16 << 20  # the snapshot carries this as hex: keep it bounded

F_MULTIPORT = 1 << 1

# Control events (virtio 1.2, 5.3.6.2).
DEVICE_READY = 0
PORT_ADD = 1
PORT_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

CONTROL = struct.Struct("<IHH")  # port id, event, value
DEFAULT_PORT_NAME = b"org.spore.agent"
MAX_PORT_NAME = 64
# One handshake queues three messages (PORT_ADD, PORT_OPEN, PORT_NAME), each at
# most once per reset; the bound only guards the invariant.
MAX_CONTROL_PENDING = 8


# The only messages the device sends, by their name in the snapshot state (a
# comma-separated string: VM state objects carry scalar device fields only).
HOST_MESSAGES = {"port_add": PORT_ADD, "port_open": PORT_OPEN, "port_name": PORT_NAME}
_MESSAGE_NAMES = {event: name for name, event in HOST_MESSAGES.items()}


class ConsoleDevice(VirtioDevice):
    device_id = DEVICE_ID
    queue_max_sizes: tuple[int, ...] = (QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE, CTRL_QUEUE_SIZE)

    def __init__(
        self,
        on_output: Callable[[bytes], None] | None = None,
        *,
        host_buffer: int = DEFAULT_HOST_BUFFER,
        on_writable: Callable[[], None] | None = None,
        port_name: bytes = DEFAULT_PORT_NAME,
        legacy: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < host_buffer <= MAX_HOST_BUFFER:
            raise ValueError(f"host_buffer {host_buffer} not in (0, {MAX_HOST_BUFFER}]")
        if not 0 < len(port_name) <= MAX_PORT_NAME or b"\0" in port_name:
            raise ValueError(f"port name must be 1..{MAX_PORT_NAME} bytes without NUL")
        self.on_output = on_output
        self.on_writable = on_writable
        self.host_buffer = host_buffer
        self.port_name = port_name
        self.legacy = legacy
        if legacy:  # the spore-board/1 device has no control queues at all
            self.queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)
        self._pending = bytearray()
        self.tx_paused = False
        self._device_ready = False  # DEVICE_READY(1) seen, PORT_ADD queued
        self._port_ready = False  # PORT_READY(0, 1) seen, PORT_OPEN and PORT_NAME queued
        self._guest_open = False  # the guest has port 0 open
        self._control: list[int] = []  # events of host -> guest messages not yet delivered
        # Refused guest control messages: counted for diagnosis, never fatal.
        self.refused = 0
        self.last_refusal = ""

    def features(self) -> int:
        return 0 if self.legacy else F_MULTIPORT

    def config(self) -> bytes:
        # cols, rows (VIRTIO_CONSOLE_F_SIZE not offered), max_nr_ports, emerg_wr.
        return struct.pack("<HHII", 0, 0, 1, 0)

    @property
    def multiport(self) -> bool:
        return bool(self.driver_features & F_MULTIPORT)

    @property
    def port_open(self) -> bool:
        """May host bytes go into port 0's receive buffers (the guest has the port open)?"""
        return self._guest_open or not self.multiport

    @property
    def control_pending(self) -> int:
        return len(self._control)

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

    def reset(self) -> None:
        super().reset()
        self._device_ready = self._port_ready = self._guest_open = False
        self._control.clear()

    def notify(self, index: int) -> None:
        if index == RX_QUEUE:
            self._deliver_and_wake()
        elif index == TX_QUEUE:
            self._transmit()
        elif not self.multiport:
            return  # control queues exist only with MULTIPORT: a kick there is ignored
        elif index == CTRL_RX_QUEUE:
            self._deliver_control()
        elif index == CTRL_TX_QUEUE:
            self._receive_control()

    def _deliver_and_wake(self) -> None:
        before = len(self._pending)
        self._deliver()
        if self.on_writable is not None and len(self._pending) < before:
            self.on_writable()

    def _deliver(self) -> None:
        q = self.queues[RX_QUEUE]
        if not self._pending or not q.ready or not self.port_open:
            return
        done = False
        with q.used_batch():
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
        with q.used_batch():
            for _ in range(q.size):
                chain = q.pop()
                if chain is None:
                    break
                total, off = chain.readable_len, 0
                if total > MAX_TX_CHAIN:
                    raise ChainError(
                        chain.head, f"transmit buffer of {total} bytes > {MAX_TX_CHAIN}"
                    )
                while off < total:
                    piece = chain.gather(self.mem, off, TX_PIECE)
                    off += len(piece)
                    if self.on_output is not None:
                        self.on_output(piece)
                q.push_used(chain.head, 0)
                done = True
        if done:
            self.link.signal_used(TX_QUEUE)

    # -- control queues (MULTIPORT) -----------------------------------------------

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self.last_refusal = why

    def _queue_control(self, event: int) -> None:
        if len(self._control) >= MAX_CONTROL_PENDING:
            self._refuse("control queue full")
            return
        self._control.append(event)

    def _message(self, event: int) -> bytes:
        """A message for port 0: PORT_ADD, PORT_OPEN(1) (the host end is always open), PORT_NAME."""
        if event == PORT_NAME:
            return CONTROL.pack(0, PORT_NAME, 0) + self.port_name
        return CONTROL.pack(0, event, 1 if event == PORT_OPEN else 0)

    def _receive_control(self) -> None:
        q = self.queues[CTRL_TX_QUEUE]
        done = False
        with q.used_batch():
            for _ in range(q.size):
                chain = q.pop()
                if chain is None:
                    break
                # Only the 8 header bytes are ever read: a longer chain costs nothing.
                if chain.readable_len != CONTROL.size:
                    self._refuse(f"control message of {chain.readable_len} bytes")
                else:
                    self._on_control(*CONTROL.unpack(chain.gather(self.mem, 0, CONTROL.size)))
                q.push_used(chain.head, 0)
                done = True
        if done:
            self.link.signal_used(CTRL_TX_QUEUE)
        self._deliver_control()

    def _on_control(self, port: int, event: int, value: int) -> None:
        if event == DEVICE_READY:  # the port id is unused (Linux sends 0xffffffff)
            if value != 1 or self._device_ready:
                self._refuse(f"DEVICE_READY({value}) after ready={self._device_ready}")
                return
            self._device_ready = True
            self._queue_control(PORT_ADD)
        elif port != 0:
            self._refuse(f"event {event} for port {port}")
        elif event == PORT_READY:
            if value != 1 or not self._device_ready or self._port_ready:
                self._refuse(f"PORT_READY({value}) out of turn")
                return
            self._port_ready = True
            # Open before the name: the guest creates the name attribute last, so a
            # process that found the port by name never sees the host end closed.
            self._queue_control(PORT_OPEN)
            self._queue_control(PORT_NAME)
        elif event == PORT_OPEN:
            if value > 1 or not self._device_ready:
                self._refuse(f"PORT_OPEN({value}) out of turn")
                return
            self._guest_open = bool(value)
            if self._guest_open:
                self._deliver_and_wake()
        else:
            self._refuse(f"unknown or host-only control event {event}")

    def _deliver_control(self) -> None:
        q = self.queues[CTRL_RX_QUEUE]
        if not self._control or not q.ready:
            return
        done = False
        with q.used_batch():
            for _ in range(q.size):
                if not self._control:
                    break
                chain = q.pop()
                if chain is None:
                    break
                message = self._message(self._control.pop(0))
                if chain.writable_len < len(message):
                    # A Linux driver posts page-sized buffers; a short one loses the message.
                    self._refuse(f"control buffer of {chain.writable_len} bytes")
                    q.push_used(chain.head, 0)
                else:
                    q.push_used(chain.head, chain.scatter(self.mem, 0, message))
                done = True
        if done:
            self.link.signal_used(CTRL_RX_QUEUE)

    # -- snapshot ---------------------------------------------------------------

    def state(self) -> State:
        with self.lock:
            if self.legacy:
                return {"pending": self._pending.hex(), "tx_paused": self.tx_paused}
            return {
                "pending": self._pending.hex(),
                "tx_paused": self.tx_paused,
                "device_ready": self._device_ready,
                "port_ready": self._port_ready,
                "guest_open": self._guest_open,
                "control": ",".join(_MESSAGE_NAMES[e] for e in self._control),
            }

    def restore(self, state: object) -> None:
        where = "virtio-console"
        # Each mode accepts exactly its own keys: a legacy state on a multiport
        # device (or the other way round) is another device model, refused.
        keys = {"pending", "tx_paused"}
        if not self.legacy:
            keys |= {"device_ready", "port_ready", "guest_open", "control"}
        s = expect_keys(state, where, keys)
        pending = get_hex(s, where, "pending", MAX_HOST_BUFFER)
        tx_paused = get_bool(s, where, "tx_paused")
        if len(pending) > self.host_buffer:
            raise VirtioStateError(f"{where}.pending: more than the host buffer holds")
        if self.legacy:
            self._pending = bytearray(pending)
            self.tx_paused = tx_paused
            return
        device_ready = get_bool(s, where, "device_ready")
        port_ready = get_bool(s, where, "port_ready")
        guest_open = get_bool(s, where, "guest_open")
        if (port_ready or guest_open) and not device_ready:
            raise VirtioStateError(f"{where}: port state without DEVICE_READY")
        control = get_str(s, where, "control", 16 * MAX_CONTROL_PENDING)
        names = control.split(",") if control else []
        if len(names) > MAX_CONTROL_PENDING or any(n not in HOST_MESSAGES for n in names):
            raise VirtioStateError(
                f"{where}.control: expected <= {MAX_CONTROL_PENDING} of {sorted(HOST_MESSAGES)}"
            )
        self._pending = bytearray(pending)
        self.tx_paused = tx_paused
        self._device_ready, self._port_ready = device_ready, port_ready
        self._guest_open = guest_open
        self._control = [HOST_MESSAGES[n] for n in names]
