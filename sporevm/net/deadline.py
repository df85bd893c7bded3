"""Deadlines for network transfers: one for the response headers, one for the whole body.

Socket timeouts bound one read, and every byte that arrives restarts them: a server
trickling a header line every few seconds, or one byte of the body, would hold a pull
or a build (and the store lock it takes) for as long as it liked. So every transfer
(bundle pulls over http(s)://, s3:// and oci://, and every image fetch, through the
one registry client in registry.py) gets a :class:`Deadline`, counted from when its
request starts:

- the status line and headers within ``HEADERS`` seconds (connect and TLS included);
- the whole body within ``BASE + expected bytes / MIN_RATE`` seconds.

It is enforced two ways, by one implementation shared by every transport:

- as bytes arrive (:meth:`Deadline.guard` wraps a transport's byte iterator), so a
  transfer that is merely slow fails at the first piece past its deadline;
- by a watchdog thread that shuts the transfer's sockets down when the deadline
  passes. That is what ends a read blocked on a stalled or trickling server, in the
  headers as in the body (no byte arrives to be checked): the blocked ``recv`` returns
  EOF or an error, and the transport's failure is reported as the deadline. A
  whole-request timeout in urllib3 or botocore would not do: theirs too are per read.
  ``shutdown`` rather than ``close``: it wakes a thread blocked on the socket (``close``
  does not), and the descriptor stays with its owner, so fd reuse cannot make us hit
  another file.

Sockets are found through the connection classes of :func:`watched_pools`: every
connection a request uses (urllib3's for requests, botocore's own subclasses for S3)
registers its socket with the deadline active on its thread (:meth:`Deadline.open`)
when it connects and when it sends, so redirects, auth round trips and reused
keep-alive connections are all covered. A connect in progress has no socket yet; it
is bounded by its own timeout (``request_timeout`` gives it at most what is left of the
header deadline), and a connection that comes up after expiry is refused at once.

The constants are read on every use, so tests shorten them (docs/limits.md).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sporevm.errors import DistError, SporeError

TIMEOUT = 30.0  # connect, and each socket read
HEADERS = 30.0  # request start -> complete response headers
BASE = 90.0  # request start -> last byte: BASE + expected bytes / MIN_RATE
MIN_RATE = 64 << 10  # bytes/s
_POLL = 0.05  # after expiry: how soon a socket that was still connecting is shut

T = TypeVar("T")
_local = threading.local()


class _Expired(BaseException):
    """Raised inside a library (urllib3, botocore) when a request starts after its
    deadline passed. A BaseException so that their ``except Exception`` retry loops let it
    through; :meth:`Deadline.open` turns it into the deadline's error, and a deadline
    is only ever active inside ``open``."""

    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline


def _stack() -> list[Deadline]:
    stack: list[Deadline] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current() -> Deadline | None:
    """The deadline whose request is running on this thread (inside :meth:`Deadline.open`)."""
    stack = _stack()
    return stack[-1] if stack else None


def request_timeout() -> tuple[float, float]:
    """(connect, read) timeouts for a request: a connect may use at most what is left of
    the active header deadline, since nothing can interrupt it before it has a socket."""
    d = current()
    left = d.headers_left() if d is not None else TIMEOUT
    return max(min(TIMEOUT, left), 0.001), TIMEOUT


class Deadline:
    """The time budget of one transfer: ``what`` (reference and file) from ``server``.

    ``expected`` is the body's size, exact when ``resume`` (a fetch that a rerun resumes)
    or an upper bound (a small document read whole). A passed deadline is an ``error``
    (the caller's kind: DistError for pulls, OCIError for image fetches) whose hint
    ends with ``again``, what the user runs to retry."""

    def __init__(
        self,
        what: str,
        server: str,
        expected: int,
        *,
        resume: bool = False,
        error: type[SporeError] = DistError,
        again: str = "run the pull again",
    ) -> None:
        self.what, self.server, self.expected, self.resume = what, server, expected, resume
        self.error_type, self.again = error, again
        self.started = time.monotonic()
        self.allowed = BASE + expected / MIN_RATE
        self.headers_allowed = min(HEADERS, self.allowed)
        self.received = 0
        self._in_headers = True
        self._expired: str | None = None  # "headers" or "body" once the deadline passed
        self._socks: list[socket.socket] = []
        self._cond = threading.Condition()
        self._closed = False
        self._watchdog: threading.Thread | None = None

    # -- the two ways in: a request, then its body ------------------------------------
    def open(self, request: Callable[[], T]) -> T:
        """Run ``request`` (connect, send, read the headers) under the header deadline;
        any failure it ends in after the deadline passed is reported as the deadline."""
        stack = _stack()
        stack.append(self)
        try:
            result = request()
        except _Expired as exc:
            raise exc.deadline.error() from None
        except Exception:
            if self._passed():
                raise self.error() from None
            raise
        finally:
            stack.remove(self)
        with self._cond:
            self._lapsed()
            self._in_headers = False
            self._cond.notify_all()  # the watchdog now waits for the body deadline
        return result

    def guard(self, blocks: Iterator[bytes]) -> Iterator[bytes]:
        """``blocks``, checked against the deadline as each piece arrives; a stream that
        broke or ended because the watchdog shut it down raises the deadline error."""
        try:
            for block in blocks:
                self.received += len(block)
                self.check()
                yield block
        except SporeError:
            if self._passed():
                raise self.error() from None
            raise
        self.check()

    def grow(self, more: int) -> None:
        """``more`` bytes beyond those expected are coming (a server that ignored a Range
        request sends the whole file): the transfer gets their time too."""
        with self._cond:
            self.expected += more
            self.allowed += more / MIN_RATE
            self._cond.notify_all()

    def check(self) -> None:
        with self._cond:
            self._lapsed()

    def close(self) -> None:
        """The transfer is over (done or failed): stop watching its sockets."""
        with self._cond:
            self._closed = True
            self._socks.clear()
            self._cond.notify_all()

    # -- state -------------------------------------------------------------------------
    def _passed(self) -> bool:
        try:
            self.check()
        except SporeError:
            return True
        return False

    def headers_left(self) -> float:
        return self.started + self.headers_allowed - time.monotonic()

    def _limit(self) -> float:
        return self.started + (self.headers_allowed if self._in_headers else self.allowed)

    def _lapsed(self) -> None:
        """Raise the deadline error if it passed (the lock is held)."""
        if self._expired is None and time.monotonic() > self._limit():
            self._expired = "headers" if self._in_headers else "body"
        if self._expired is not None:
            raise self.error()

    def error(self) -> SporeError:
        rate = f"{MIN_RATE >> 10} KiB/s"
        if self._expired == "headers":
            return self.error_type(
                f"{self.what}: {self.server} sent no complete response headers within "
                f"{self.headers_allowed:g} s; it is stalled or too slow — check it, then "
                f"{self.again}"
            )
        hint = f"{self.again} to resume" if self.resume else f"check the server, then {self.again}"
        bound = "" if self.resume else "at most "
        return self.error_type(
            f"{self.what}: {self.server} sent {self.received} of {bound}{self.expected} bytes "
            f"in the {self.allowed:.0f} s allowed ({BASE:g} s + the size at {rate}); it is "
            f"stalled or slower than {rate} — {hint}"
        )

    # -- the watchdog --------------------------------------------------------------------
    def attach(self, sock: Any) -> None:
        """A connection of this transfer connects or sends: watch its socket (None while
        it is not connected yet). Refused once the deadline passed."""
        with self._cond:
            if self._closed:
                return
            try:
                self._lapsed()
            except SporeError:
                raise _Expired(self) from None
            if isinstance(sock, socket.socket) and all(s is not sock for s in self._socks):
                self._socks.append(sock)
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, daemon=True, name="spore-deadline"
                )
                self._watchdog.start()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                left = self._limit() - time.monotonic()
                if self._expired is None and left > 0:
                    self._cond.wait(left)
                    continue
                if self._expired is None:
                    self._expired = "headers" if self._in_headers else "body"
                for sock in self._socks:
                    _shut_down(sock)
                self._cond.wait(_POLL)


def _shut_down(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSLSocket: ssl's override drops the TLS
    # object under the reading thread. A socket closed meanwhile has no fd: EBADF.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _watch_sock(sock: Any) -> None:
    d = current()
    if d is not None:
        d.attach(sock)


def _watched_connection(base: type[Any]) -> type[Any]:
    class Watched(base):  # type: ignore[misc]
        def connect(self) -> None:
            _watch_sock(None)  # refused if the deadline passed before we connect
            super().connect()
            _watch_sock(self.sock)

        def request(self, *args: Any, **kwargs: Any) -> Any:
            _watch_sock(self.sock)  # None if not connected yet: connect() registers it
            return super().request(*args, **kwargs)

    Watched.__name__ = Watched.__qualname__ = f"Watched{base.__name__}"
    return Watched


_watched: dict[type[Any], type[Any]] = {}
_watched_lock = threading.Lock()


def _watched_pool(pool: type[Any]) -> type[Any]:
    if getattr(pool, "_spore_watched", False):
        return pool
    with _watched_lock:  # one subclass per pool class, however many sessions ask
        if pool not in _watched:
            _watched[pool] = type(
                f"Watched{pool.__name__}",
                (pool,),
                {"ConnectionCls": _watched_connection(pool.ConnectionCls), "_spore_watched": True},
            )
        return _watched[pool]


def watched_pools(classes: dict[str, type[Any]]) -> dict[str, type[Any]]:
    """A new ``pool_classes_by_scheme`` for an urllib3 PoolManager (or botocore's): the
    same pool classes, whose connections register their sockets with the active deadline.
    Without an active deadline they behave exactly like the originals."""
    return {scheme: _watched_pool(cls) for scheme, cls in classes.items()}
