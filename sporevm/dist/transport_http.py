"""``http(s)://host/path@sha256:…``: read-only pulls from any static file server.

The pin makes plain HTTP safe for integrity (every byte is verified against
digest-pinned metadata) but not for confidentiality. Redirects are refused
rather than followed: the URI names exactly one server. Bodies are read raw
(no Content-Encoding decoding) and bounded in size and time (net/deadline.py);
Range requests resume.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import requests

from sporevm.dist.transports import StreamSource
from sporevm.dist.uri import BundleURI
from sporevm.errors import DistError
from sporevm.net.deadline import request_timeout
from sporevm.net.http import USER_AGENT, raw_stream, watched_session

_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)\Z")


def ranged_body(
    resp: requests.Response, start: int, size: int | None, what: str, server: str
) -> tuple[int, Iterator[bytes]]:
    """Check a (possibly ranged) GET answer; return the served offset and its raw body.

    200 means the whole file (offset 0, the caller starts over); 206 must cover
    exactly ``start`` to the end of a file of ``size`` bytes."""
    status = resp.status_code
    if status == 206 and start > 0:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if (
            not m
            or int(m.group(1)) != start
            or (
                size is not None
                and (int(m.group(2)) != size - 1 or m.group(3) not in ("*", str(size)))
            )
        ):
            resp.close()
            raise DistError(
                f"{what}: {server} answered a range other than bytes {start}- of "
                f"{size}; the file does not match the bundle metadata"
            )
        served = start
    elif status == 200:
        served = 0
    else:
        resp.close()
        raise DistError(f"{what}: {status_text(status, server)}")
    expected = None if size is None else size - served
    length = resp.headers.get("Content-Length")
    if expected is not None and length is not None and length.isdigit() and int(length) != expected:
        resp.close()
        raise DistError(
            f"{what}: {server} announces {length} bytes, the bundle metadata "
            f"says {expected}; the file does not match"
        )
    return served, stream(resp, what, server)


def stream(resp: requests.Response, what: str, server: str) -> Iterator[bytes]:
    """The raw body, in whatever pieces arrive (``read1``: a deadline is checked as bytes
    come in, not once per full block)."""
    return raw_stream(
        resp,
        lambda name: DistError(
            f"{what}: connection to {server} broke while reading ({name}); run the pull again "
            "to resume"
        ),
    )


def status_text(status: int, server: str) -> str:
    if 300 <= status < 400:
        return (
            f"{server} answered a redirect (HTTP {status}); redirects are refused — "
            "use the final URL"
        )
    if status == 404:
        return f"not found on {server} (HTTP 404); check the URL"
    if status in (401, 403):
        return f"access denied by {server} (HTTP {status})"
    if status == 416:
        return f"{server} has fewer bytes than expected (HTTP 416); the file does not match"
    return f"{server} answered HTTP {status}"


class HttpSource(StreamSource):
    def __init__(self, uri: BundleURI, *, mutable: bool = False) -> None:
        # mutable: a remote cache's pointers (as for S3Source)
        if uri.pin is None and not mutable:
            raise DistError(f"{uri}: http(s) pulls must be pinned with @sha256:<bundle digest>")
        self.reference = str(uri)
        self.pinned_bundle_digest = uri.pin
        self.bytes_received = 0
        self.server = f"{uri.scheme}://{uri.netloc}"
        self.base = f"{self.server}{uri.path}/"
        # Proxy and CA-bundle variables apply as for any HTTP client; .netrc credentials do
        # not (watched_session sets a no-op auth, so requests never consults .netrc).
        self.session = watched_session()

    def _open(
        self, name: str, start: int, size: int | None, what: str
    ) -> tuple[int, Iterator[bytes]]:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        try:
            resp = self.session.get(
                self.base + name,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=request_timeout(),
            )
        except requests.exceptions.RequestException as exc:
            kind = (
                "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
            )
            raise DistError(
                f"{what}: cannot reach {self.server} ({kind}); check that it is up"
            ) from None
        return ranged_body(resp, start, size, what, self.server)
