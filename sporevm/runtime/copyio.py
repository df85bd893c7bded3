"""Copy streams over the guest agent channel: an archive to the guest, an archive back.

``CopyInStream`` is a write-only file: tar bytes written to it leave in
COPY_DATA frames of at most ``FRAME_DATA`` bytes, and only when the channel
can take them (a guest that stops reading fails the copy after ``stall``
seconds instead of hanging it). ``CopyOutStream`` is a read-only file over
the COPY_OUT_DATA frames of one stream: ``read`` pumps the session only while
nothing is buffered, so at most what one receive brings is held, and it stops
with CopyError past ``limit`` archive bytes. Neither side ever holds a whole
archive. What the archive holds is the build floor's business
(``sporevm/build/copy_archive.py``, ``copy_extract.py``).
"""

from __future__ import annotations

import signal
import time
from collections import deque

from sporevm.errors import CopyError
from sporevm.runtime.agent import AgentProtocolError, MsgType
from sporevm.runtime.agent_messages import (
    CopyData,
    CopyIn,
    CopyOut,
    CopyOutData,
    Done,
    Error,
    Message,
    Signal,
)
from sporevm.runtime.agent_session import AgentSession

FRAME_DATA = 60 << 10  # archive bytes per frame: a frame stays under the 64 KiB payload bound
STALL = 60.0  # seconds a guest may leave the channel full, or stay silent in a copy-out
FINISH = 300.0  # seconds for the guest to finish a copy-in after the last byte (the console
# buffers up to ~1 MiB between us and the agent, and kvm_pvm feeds it at tens of KiB/s)
COPY_CAPS = (1 << MsgType.COPY_IN) | (1 << MsgType.COPY_DATA) | (1 << MsgType.COPY_OUT)


def check_caps(session: AgentSession, what: str) -> None:
    """Refuse early when the guest's agent predates copies (a spore built before them)."""
    if session.caps is not None and session.caps & COPY_CAPS != COPY_CAPS:
        raise CopyError(
            f"{what}: the guest agent of this VM cannot copy files (an initramfs from "
            "before copy-in/copy-out); rebuild the spore with this spore version"
        )


class CopyInStream:
    """Write a tar archive into the guest at ``dest`` (see module doc)."""

    def __init__(
        self,
        session: AgentSession,
        dest: str,
        uid: int = 0,
        gid: int = 0,
        *,
        what: str = "copy-in",
        stall: float = STALL,
    ) -> None:
        check_caps(session, what)
        self.session = session
        self.what = what
        self.stall = stall
        self.sent = 0
        self.error: str | None = None
        self.done = False
        self._buf = bytearray()
        self.sid = session.open_stream(self)
        session.send(CopyIn(dest, uid, gid), self.sid)

    def _on(self, msg: Message) -> None:
        if isinstance(msg, Done):
            self.done = True
        elif isinstance(msg, Error):
            self.error = msg.message
        else:
            raise AgentProtocolError(
                f"guest agent sent {type(msg).__name__} on copy-in stream {self.sid}"
            )
        self.session.close_stream(self.sid)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        while len(self._buf) >= FRAME_DATA:
            self._frame(bytes(self._buf[:FRAME_DATA]))
            del self._buf[:FRAME_DATA]
        return len(data)

    def _frame(self, chunk: bytes) -> None:
        # Dispatch what the guest sent meanwhile: its ERROR stops us early, and other
        # streams' output must not pile up behind our writes.
        while self.session.pump(0):
            pass
        if self.error is not None:
            self._end()
            raise CopyError(f"{self.what}: {self.error}")
        if self.done:
            raise AgentProtocolError(f"guest agent ended {self.what} before the archive did")
        wait = getattr(self.session.channel, "wait_writable", None)
        if wait is not None:
            deadline = time.monotonic() + self.stall
            while not wait(0.05):
                while self.session.pump(0):
                    pass
                if time.monotonic() > deadline:
                    raise CopyError(
                        f"{self.what}: the guest has not read its channel for {self.stall:.0f} s"
                    )
        self.session.send(CopyData(chunk), self.sid)
        self.sent += len(chunk)

    def _end(self) -> None:
        self.session.send(CopyData(b""), self.sid)

    def finish(self, timeout: float = FINISH) -> None:
        """Send what is buffered and the end of the archive; wait for the guest's DONE."""
        if self._buf:
            self._frame(bytes(self._buf))
            self._buf.clear()
        self._end()
        self.session.wait_for(lambda: self.done or self.error is not None, timeout, self.what)
        if self.error is not None:
            raise CopyError(f"{self.what}: {self.error}")

    def abandon(self) -> None:
        """After a host-side failure: end the archive so the guest frees the stream."""
        if not self.done and self.error is None:
            self._end()
        self.session.close_stream(self.sid)


class CopyOutStream:
    """Read the tar archive of guest ``path`` (see module doc)."""

    def __init__(
        self,
        session: AgentSession,
        path: str,
        max_bytes: int,
        max_entries: int,
        limit: int,
        *,
        what: str = "copy-out",
        idle: float = STALL,
    ) -> None:
        check_caps(session, what)
        self.session = session
        self.what = what
        self.limit = limit
        self.idle = idle
        self.received = 0
        self.error: str | None = None
        self.finished = False
        self._chunks: deque[bytes] = deque()
        self._head = b""
        self.sid = session.open_stream(self)
        session.send(CopyOut(path, max_bytes, max_entries), self.sid)

    def _on(self, msg: Message) -> None:
        if isinstance(msg, CopyOutData):
            if self.finished:
                raise AgentProtocolError(f"guest agent sent data after ending {self.what}")
            self.received += len(msg.data)
            if self.received > self.limit:
                self.abandon()
                self.error = (
                    f"the guest sent more than {self.limit} archive bytes; refused "
                    "(raise --copy-out-max-bytes / --copy-out-max-entries if expected)"
                )
                return
            if msg.data:
                self._chunks.append(msg.data)
            return
        if isinstance(msg, Done):
            self.finished = True
        elif isinstance(msg, Error):
            self.error = msg.message
        elif isinstance(msg, CopyData):  # a host type: the decoder never yields it here
            raise AgentProtocolError(f"guest agent sent COPY_DATA on {self.what}")
        else:
            raise AgentProtocolError(
                f"guest agent sent {type(msg).__name__} on copy-out stream {self.sid}"
            )
        self.session.close_stream(self.sid)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while not self._head:
            if self._chunks:
                self._head = self._chunks.popleft()
                break
            if self.error is not None:
                raise CopyError(self.error)  # the extractor names the copy
            if self.finished:
                return b""
            self.session.wait_for(
                lambda: bool(self._chunks) or self.finished or self.error is not None,
                self.idle,
                self.what,
            )
        if n < 0 or n >= len(self._head):
            out, self._head = self._head, b""
        else:
            out, self._head = self._head[:n], self._head[n:]
        return out

    def abandon(self) -> None:
        """Stop taking the archive: the guest is told to stop, what it still sends is dropped."""
        if not self.finished and self.error is None:
            self.session.close_stream(self.sid)
            self.session.send(Signal(int(signal.SIGTERM)), self.sid)
        self._chunks.clear()
        self._head = b""
