"""virtio-net (device id 1) over a frame channel: one rx/tx queue pair, no offloads.

Queues: 0 = receiveq (host -> guest), 1 = transmitq (guest -> host). Features:
VIRTIO_NET_F_MAC always, VIRTIO_NET_F_MTU when an MTU is given, VIRTIO_NET_F_STATUS
unless turned off. No checksum/GSO offloads, no mergeable rx buffers, no control
queue, so every buffer carries exactly one 12-byte virtio_net_hdr_v1 and one frame.

The host side is an already-open file descriptor (not owned, never closed here):
one end of a SOCK_STREAM socketpair carrying QEMU's stream protocol, a 4-byte
big-endian length then the Ethernet frame, which is what the egress gateway speaks
(sporevm/egress/frames.py; the vmm may not import it, so the few lines of framing
are repeated here). The monitor only reads and writes that descriptor: no sockets.

- guest -> host: each transmit chain is read once (at most 12 + 64 KiB), its header
  stripped, and the frame queued for the channel; a writer thread (``start``) or
  ``flush`` writes the queue outside the device lock, so a slow channel never
  holds a vCPU or a snapshot. While ``TX_BACKLOG`` frames wait, transmit chains stay
  in the ring (backpressure: Linux stops its queue) until the writer makes room.
- host -> guest: a reader thread (``start``) splits frames off the channel and calls
  ``receive``; a frame goes straight into the next rx chain, or waits in a bounded
  host queue until the guest posts one. When that queue is full the reader stops
  reading the channel until the guest takes frames (backpressure: the gateway and
  passt then hold the data, and passt's TCP resends nothing the guest did not miss);
  ``receive`` called directly drops (counts) a frame beyond the bound instead. A guest
  kernel emulated in software takes frames far slower than passt sends them: dropping
  there turned a 2 MiB download into hundreds of MB of retransmissions.

Every guest-memory write happens under the device lock (shared with the
transport), so a capture holding every transport lock sees consistent RAM.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from collections.abc import Callable

from sporevm.errors import SporeError

from .device import VirtioDevice
from .state import State, VirtioStateError, expect_keys, get_bool, get_hex, get_int

DEVICE_ID = 1
RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256

F_MTU = 1 << 3
F_MAC = 1 << 5
F_STATUS = 1 << 16
S_LINK_UP = 1

HDR = 12  # virtio_net_hdr_v1: every VERSION_1 driver uses it, with or without MRG_RXBUF
ETH_HLEN = 14
MAX_FRAME = 65536  # the frame stream's bound (egress/frames.py MAX_FRAME)
MIN_MTU, MAX_MTU = 68, MAX_FRAME - ETH_HLEN
DEFAULT_MTU = 1500  # what a driver assumes when VIRTIO_NET_F_MTU is not offered
MAX_TX_CHAIN = HDR + MAX_FRAME  # bytes read from one transmit chain, at most
RX_BACKLOG = 256  # frames waiting for rx buffers
RX_BACKLOG_BYTES = 4 << 20  # ... and their bytes: jumbo frames hit this first
TX_BACKLOG = 64  # frames taken from the guest and not yet written (<= ~4 MiB)
READ_CHUNK = 1 << 17  # one read of the channel: more than a whole maximal frame

_RX_HDR = bytes(10) + struct.pack("<H", 1)  # no flags, GSO_NONE, num_buffers = 1
_LEN = struct.Struct("!I")
COUNTERS = (
    "rx_frames",
    "rx_dropped_queue_full",
    "rx_dropped_inactive",
    "rx_dropped_short_buffer",
    "rx_dropped_bad_length",
    "tx_frames",
    "tx_dropped_bad_length",
    "tx_dropped_channel",
)


class FrameError(SporeError):
    """The channel broke its framing (a length over MAX_FRAME): nothing after it is safe."""


class FrameSplitter:
    """Reassembles length-prefixed frames from arbitrary chunks; holds one partial frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        buf, off, frames = self._buf, 0, []
        while len(buf) - off >= 4:
            (n,) = _LEN.unpack_from(buf, off)
            if n > MAX_FRAME:
                buf.clear()
                raise FrameError(f"frame length {n} > {MAX_FRAME}")
            if len(buf) - off - 4 < n:
                break
            frames.append(bytes(buf[off + 4 : off + 4 + n]))
            off += 4 + n
        del buf[:off]
        return frames


def _valid_mac(mac: bytes) -> bool:
    return len(mac) == 6 and not mac[0] & 1 and mac != bytes(6)  # unicast, not zero


class NetDevice(VirtioDevice):
    device_id = DEVICE_ID
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(
        self,
        fd: int,
        mac: bytes,
        *,
        mtu: int | None = None,
        link_status: bool = True,
        rx_backlog: int = RX_BACKLOG,
    ) -> None:
        super().__init__()
        if not _valid_mac(mac):
            raise ValueError(f"MAC {mac.hex(':')} is not a 6-byte unicast address")
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} not in [{MIN_MTU}, {MAX_MTU}]")
        if not 0 < rx_backlog <= RX_BACKLOG:
            raise ValueError(f"rx_backlog {rx_backlog} not in (0, {RX_BACKLOG}]")
        self.fd = fd
        self.mac = mac
        self.mtu = mtu
        self.link_status = link_status
        self.rx_backlog = rx_backlog
        self.max_rx_frame = (mtu or DEFAULT_MTU) + ETH_HLEN
        self.link_up = True  # until the channel ends
        self.channel_error = ""
        self._rx: deque[bytes] = deque()
        self._rx_bytes = 0
        self._rx_room = threading.Condition(self.lock)  # the reader waits here when full
        # The tx queue has its own lock so the writer never needs the device lock to
        # take frames. Order: device lock, then _tx_cond; never the other way round.
        self._tx_cond = threading.Condition(threading.Lock())
        self._tx: list[bytes] = []
        self._tx_stalled = False  # chains left in the ring because the tx queue was full
        self._closing = False
        self._count = dict.fromkeys(COUNTERS, 0)
        self.threads: list[threading.Thread] = []

    # -- description ------------------------------------------------------------

    def features(self) -> int:
        return (
            F_MAC | (F_MTU if self.mtu is not None else 0) | (F_STATUS if self.link_status else 0)
        )

    def config(self) -> bytes:
        # mac, status, max_virtqueue_pairs (1: no MQ), mtu (0 when not offered).
        status = S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HHH", status, 1, self.mtu or 0)

    # -- host side ----------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        with self.lock, self._tx_cond:
            return dict(self._count)

    @property
    def rx_pending(self) -> int:
        """Frames waiting for the guest to post rx buffers."""
        with self.lock:
            return len(self._rx)

    @property
    def tx_pending(self) -> int:
        with self._tx_cond:
            return len(self._tx)

    @property
    def tx_stalled(self) -> bool:
        with self._tx_cond:
            return self._tx_stalled

    def start(self) -> None:
        """Start the channel reader and writer threads (daemons)."""
        if self.threads:
            raise RuntimeError("virtio-net channel threads already started")
        self.threads = [
            threading.Thread(target=self._reader, name="net-rx", daemon=True),
            threading.Thread(target=self._writer, name="net-tx", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        """Stop the writer; the reader ends when the channel does (the caller closes it)."""
        with self._tx_cond:
            self._closing = True
            self._tx_cond.notify_all()

    def receive(self, frame: bytes) -> bool:
        """Hand one frame to the guest (any thread); False if it was dropped."""
        with self.lock:
            return self._receive(frame)

    def _receive(self, frame: bytes) -> bool:
        if not ETH_HLEN <= len(frame) <= self.max_rx_frame:
            self._count["rx_dropped_bad_length"] += 1
            return False
        if not self.active:
            self._count["rx_dropped_inactive"] += 1
            return False
        if len(self._rx) >= self.rx_backlog or self._rx_bytes + len(frame) > RX_BACKLOG_BYTES:
            self._count["rx_dropped_queue_full"] += 1
            return False
        self._rx.append(frame)
        self._rx_bytes += len(frame)
        self._guarded(self._deliver)
        return True

    def flush(self) -> int:
        """Write every queued frame to the channel (blocking, outside the device lock).

        What the writer thread does each round; returns the frames written.
        """
        with self._tx_cond:
            frames, self._tx = self._tx, []
            stalled, self._tx_stalled = self._tx_stalled, False
            dead = not self.link_up
        if stalled:
            with self.lock:
                self._guarded(self._transmit)  # the ring waited for room: take more
        if not frames:
            return 0
        if dead:
            return self._dropped_tx(len(frames))
        view = memoryview(b"".join(frames))
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            self._channel_down(f"channel write: {e.strerror or e}")
            return self._dropped_tx(len(frames))
        with self._tx_cond:
            self._count["tx_frames"] += len(frames)
        return len(frames)

    def _dropped_tx(self, n: int) -> int:
        with self._tx_cond:
            self._count["tx_dropped_channel"] += n
        return 0

    def _guarded(self, work: Callable[[], None]) -> None:
        """Run queue work from a host thread: guest corruption resets the device, never raises."""
        if not self.active:
            return
        try:
            work()
        except SporeError as e:
            self.link.needs_reset(str(e))

    def _reader(self) -> None:
        splitter = FrameSplitter()
        while True:
            try:
                data = os.read(self.fd, READ_CHUNK)
            except OSError as e:
                self._channel_down(f"channel read: {e.strerror or e}")
                return
            if not data:
                self._channel_down("channel closed")
                return
            try:
                frames = splitter.feed(data)
            except FrameError as e:
                self._channel_down(str(e))
                return
            if frames:
                with self._rx_room:  # the device lock: one round per read, not per frame
                    for f in frames:
                        while self._backlog_full(len(f)) and not self._closing:
                            self._rx_room.wait(0.5)  # released while waiting
                        self._receive(f)

    def _backlog_full(self, n: int) -> bool:
        """The rx queue has no room for ``n`` more bytes while a guest could empty it."""
        full = len(self._rx) >= self.rx_backlog or self._rx_bytes + n > RX_BACKLOG_BYTES
        return full and self.active and self.link_up

    def _writer(self) -> None:
        while True:
            with self._tx_cond:
                while not (self._tx or self._tx_stalled or self._closing):
                    self._tx_cond.wait()
                if self._closing:
                    return
            self.flush()

    def _channel_down(self, reason: str) -> None:
        """The channel ended or broke: link down (a config change the driver sees)."""
        with self.lock:
            if not self.link_up:
                return
            self.link_up = False
            self.channel_error = reason[:500]
            if self.link_status and self._link is not None:
                self.link.config_changed()
        with self._tx_cond:
            self._tx_cond.notify_all()

    # -- guest side ---------------------------------------------------------------

    def notify(self, index: int) -> None:
        if index == RX_QUEUE:
            self._deliver()
        elif index == TX_QUEUE:
            self._transmit()

    def reset(self) -> None:
        super().reset()
        # A reset NIC loses its receive queue; frames already taken from the guest
        # for transmission are the host's and still go out.
        self._count["rx_dropped_inactive"] += len(self._rx)
        self._rx.clear()
        self._rx_bytes = 0
        self._rx_room.notify_all()
        with self._tx_cond:
            self._tx_stalled = False

    def _deliver(self) -> None:
        q = self.queues[RX_QUEUE]
        if not self._rx or not q.ready:
            return
        done = False
        with q.used_batch():
            for _ in range(q.size):
                if not self._rx:
                    break
                chain = q.pop()
                if chain is None:
                    break
                frame = self._rx.popleft()
                self._rx_bytes -= len(frame)
                self._rx_room.notify_all()
                need = HDR + len(frame)
                if chain.writable_len < need:
                    # No mergeable buffers: one chain must hold the whole frame.
                    self._count["rx_dropped_short_buffer"] += 1
                    q.push_used(chain.head, 0)
                else:
                    chain.scatter(self.mem, 0, _RX_HDR + frame)
                    self._count["rx_frames"] += 1
                    q.push_used(chain.head, need)
                done = True
        if done:
            self.link.signal_used(RX_QUEUE)

    def _transmit(self) -> None:
        q = self.queues[TX_QUEUE]
        if not q.ready:
            return
        done = False
        with q.used_batch():
            for _ in range(q.size):
                with self._tx_cond:
                    if len(self._tx) >= TX_BACKLOG:
                        self._tx_stalled = q.has_pending()
                        if self._tx_stalled:
                            self._tx_cond.notify_all()
                        break
                chain = q.pop()
                if chain is None:
                    break
                total = chain.readable_len
                # Nothing is gathered from an oversized chain: the copy stays bounded.
                ok = HDR + ETH_HLEN <= total <= MAX_TX_CHAIN
                frame = chain.gather(self.mem, HDR, total - HDR) if ok else b""  # header ignored
                with self._tx_cond:  # tx counters live under the tx lock (the writer's side)
                    if not ok:
                        self._count["tx_dropped_bad_length"] += 1
                    elif not self.link_up:
                        self._count["tx_dropped_channel"] += 1
                    else:
                        self._tx.append(_LEN.pack(len(frame)) + frame)
                        self._tx_cond.notify_all()
                q.push_used(chain.head, 0)
                done = True
        if done:
            self.link.signal_used(TX_QUEUE)

    # -- snapshot -----------------------------------------------------------------

    def state(self) -> State:
        # Identity only. Queued frames are not carried: a network may drop any frame,
        # and flows do not survive a snapshot anyway (docs/network.md).
        return {"mac": self.mac.hex(), "mtu": self.mtu or 0, "link_status": self.link_status}

    def restore(self, state: object) -> None:
        where = "virtio-net"
        s = expect_keys(state, where, {"mac", "mtu", "link_status"})
        mac = get_hex(s, where, "mac", 6)
        mtu = get_int(s, where, "mtu", 0, MAX_MTU)
        link_status = get_bool(s, where, "link_status")
        if (mac, mtu, link_status) != (self.mac, self.mtu or 0, self.link_status):
            raise VirtioStateError(
                f"{where}: snapshot was taken with a different MAC, MTU or feature set"
            )
