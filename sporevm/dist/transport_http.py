"""``http(s)://host/path@sha256:…``: read-only pulls from any static file server.

The pin makes plain HTTP safe for integrity (every byte is verified against
digest-pinned metadata) but not for confidentiality. Redirects are refused
rather than followed: the URI names exactly one server. Bodies are read raw
(no Content-Encoding decoding) and bounded in size and time (deadline.py);
Range requests resume.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import requests
import requests.adapters
import urllib3

from sporevm.dist.deadline import request_timeout, watched_pools
from sporevm.dist.transports import BLOCK, StreamSource
from sporevm.dist.uri import BundleURI
from sporevm.errors import DistError

USER_AGENT = "sporevm/0.1"
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)\Z")
_BROKEN = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError)


def ranged_body(resp: requests.Response, start: int, size: int | None, what: str,
                server: str) -> tuple[int, Iterator[bytes]]:
    """Check a (possibly ranged) GET answer; return the served offset and its raw body.

    200 means the whole file (offset 0, the caller starts over); 206 must cover
    exactly ``start`` to the end of a file of ``size`` bytes."""
    status = resp.status_code
    if status == 206 and start > 0:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != start or (
                size is not None and (int(m.group(2)) != size - 1
                                      or m.group(3) not in ("*", str(size)))):
            resp.close()
            raise DistError(f"{what}: {server} answered a range other than bytes {start}- of "
                            f"{size}; the file does not match the bundle metadata")
        served = start
    elif status == 200:
        served = 0
    else:
        resp.close()
        raise DistError(f"{what}: {status_text(status, server)}")
    expected = None if size is None else size - served
    length = resp.headers.get("Content-Length")
    if expected is not None and length is not None and length.isdigit() \
            and int(length) != expected:
        resp.close()
        raise DistError(f"{what}: {server} announces {length} bytes, the bundle metadata "
                        f"says {expected}; the file does not match")
    return served, stream(resp, what, server)


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections register with the active Deadline, so that
    its watchdog can end a read blocked on a stalled server (deadline.py)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = watched_pools(
            self.poolmanager.pool_classes_by_scheme)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = watched_pools(manager.pool_classes_by_scheme)
        return manager


def stream(resp: requests.Response, what: str, server: str) -> Iterator[bytes]:
    """The raw body, in whatever pieces arrive (``read1``: a deadline is checked as bytes
    come in, not once per full block)."""
    try:
        while block := resp.raw.read1(BLOCK, decode_content=False):
            yield block
    except _BROKEN as exc:
        raise DistError(f"{what}: connection to {server} broke while reading "
                        f"({type(exc).__name__}); run the pull again to resume") from None
    finally:
        resp.close()


def status_text(status: int, server: str) -> str:
    if 300 <= status < 400:
        return f"{server} answered a redirect (HTTP {status}); redirects are refused — " \
               "use the final URL"
    if status == 404:
        return f"not found on {server} (HTTP 404); check the URL"
    if status in (401, 403):
        return f"access denied by {server} (HTTP {status})"
    if status == 416:
        return f"{server} has fewer bytes than expected (HTTP 416); the file does not match"
    return f"{server} answered HTTP {status}"


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


class HttpSource(StreamSource):
    def __init__(self, uri: BundleURI) -> None:
        if uri.pin is None:
            raise DistError(f"{uri}: http(s) pulls must be pinned with @sha256:<bundle digest>")
        self.reference = str(uri)
        self.pinned_bundle_digest = uri.pin
        self.bytes_received = 0
        self.server = f"{uri.scheme}://{uri.netloc}"
        self.base = f"{self.server}{uri.path}/"
        self.session = requests.Session()
        for prefix in ("https://", "http://"):
            self.session.mount(prefix, WatchedAdapter())
        # Proxy and CA-bundle variables apply as for any HTTP client; .netrc credentials do
        # not (requests consults .netrc only when no auth is set, so set a no-op one).
        self.session.auth = _no_auth

    def _open(self, name: str, start: int, size: int | None,
              what: str) -> tuple[int, Iterator[bytes]]:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        try:
            resp = self.session.get(self.base + name, headers=headers, stream=True,
                                    allow_redirects=False, timeout=request_timeout())
        except requests.exceptions.RequestException as exc:
            kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else \
                "connection failed"
            raise DistError(f"{what}: cannot reach {self.server} ({kind}); check that it "
                            "is up") from None
        return ranged_body(resp, start, size, what, self.server)
