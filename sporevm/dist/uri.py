"""Bundle URIs: where ``spore push`` sends a bundle and where ``spore pull`` gets one.

    file:///abs/dir[@sha256:<bundle digest>]
    oci://host[:port]/repo[:tag][@sha256:<OCI manifest digest>]
    s3://bucket[/prefix][@sha256:<bundle digest>]
    http(s)://host[:port]/path@sha256:<bundle digest>      (pull only)

The grammar is deliberately narrower than RFC 3986: no percent-decoding (a
``%`` is refused rather than interpreted, so one URI names one place), no
userinfo, query or fragment, no empty, ``.`` or ``..`` path segments. The only
``@`` allowed is the one that introduces the pin. Every parsed URI prints back
to exactly one canonical text (``str(uri)``), which parses to the same value.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from sporevm.errors import UsageError

MAX_URI = 4096
SCHEMES = ("file", "oci", "s3", "http", "https")

_PIN = re.compile(r"sha256:[0-9a-f]{64}\Z")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
# distribution/reference: lowercase path components joined by . _ __ or dashes
_REPO_PART = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
# S3 key / HTTP path segments: unreserved characters only (nothing that a
# server or proxy might decode, normalise or treat as syntax).
_SEGMENT = re.compile(r"[A-Za-z0-9_~+=,-][A-Za-z0-9._~+=,-]*\Z")
_FILE_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f?#@\\]")


class URIError(UsageError):
    """A bundle URI is malformed, or is not allowed where it was used."""


@dataclass(frozen=True)
class BundleURI:
    """One parsed bundle location. Fields a scheme does not use are empty."""

    scheme: str  # 'file' | 'oci' | 's3' | 'http' | 'https'
    host: str = ""  # oci, http(s): lowercase DNS name or IP literal (IPv6 without brackets)
    port: int | None = None
    path: str = ""  # file: absolute directory; http(s): URL path without trailing '/'
    bucket: str = ""  # s3
    prefix: str = ""  # s3: key prefix, no leading/trailing '/'; '' = bucket root
    repo: str = ""  # oci: repository
    tag: str | None = None  # oci only
    pin: str | None = None  # 'sha256:<64 hex>'; for oci the OCI manifest digest

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    def unpinned(self) -> str:
        """The canonical text without the pin."""
        if self.scheme == "file":
            return f"file://{self.path}"
        if self.scheme == "s3":
            return f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        if self.scheme == "oci":
            return f"oci://{self.netloc}/{self.repo}" + (f":{self.tag}" if self.tag else "")
        return f"{self.scheme}://{self.netloc}{self.path or '/'}"

    def with_pin(self, pin: str) -> BundleURI:
        if not _PIN.match(pin):
            raise URIError(f"{pin[:80]!r}: not a sha256:<64 lowercase hex> digest")
        return replace(self, pin=pin)

    def __str__(self) -> str:
        return self.unpinned() + (f"@{self.pin}" if self.pin else "")


def _fail(text: str, why: str) -> URIError:
    return URIError(f"bundle URI {text[:200]!r}: {why}")


def _split_pin(text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    body, _, pin = text.rpartition("@")
    if "@" in body:
        raise _fail(
            text,
            "only one '@' is allowed, the one before the sha256 pin (userinfo is not supported)",
        )
    if not _PIN.match(pin):
        raise _fail(text, "the pin after '@' must be sha256: and 64 lowercase hex digits")
    return body, pin


def _split_host(text: str, netloc: str) -> tuple[str, int | None]:
    if not netloc:
        raise _fail(text, "missing host")
    port: int | None = None
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise _fail(text, "unterminated IPv6 literal")
        host, rest = netloc[1:end], netloc[end + 1 :]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise _fail(text, "invalid IPv6 literal in brackets") from None
        host = str(ipaddress.ip_address(host))
    else:
        host, sep, rest = netloc.partition(":")
        rest = sep + rest
        host = host.lower()
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            labels = host.split(".")
            if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
                raise _fail(text, "invalid host name") from None
            if labels[-1].isdigit():
                raise _fail(text, "invalid IPv4 address") from None
    if rest:
        digits = rest[1:]
        if not rest.startswith(":") or not _PORT.match(digits) or not 0 < int(digits) < 65536:
            raise _fail(text, "port must be a number 1..65535")
        port = int(digits)
    return host, port


def _segments(text: str, path: str, what: str) -> list[str]:
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise _fail(text, f"{what} has an empty, '.' or '..' segment")
        if not _SEGMENT.match(part):
            raise _fail(
                text,
                f"{what} segment {part[:60]!r} has characters outside "
                "A-Z a-z 0-9 . _ ~ + = , - (percent-encoding is not decoded)",
            )
    return parts


def _parse_file(text: str, rest: str, pin: str | None) -> BundleURI:
    if not rest.startswith("/"):
        raise _fail(text, "file URIs must be absolute: file:///abs/path (no host)")
    if _FILE_FORBIDDEN.search(rest):
        raise _fail(
            text,
            "file paths may not contain control characters, '?', '#', '@' "
            "or '\\' (no query, fragment or percent-decoding)",
        )
    if rest != "/":
        for part in rest[1:].split("/"):
            if part in ("", ".", ".."):
                raise _fail(
                    text,
                    "file path has an empty, '.' or '..' segment; "
                    "write the canonical absolute path",
                )
    if rest == "/":
        raise _fail(text, "the bundle directory cannot be '/'")
    return BundleURI("file", path=rest, pin=pin)


def _parse_oci(text: str, rest: str, pin: str | None) -> BundleURI:
    netloc, slash, repo = rest.partition("/")
    if not slash:
        raise _fail(text, "expected oci://host[:port]/repo[:tag]")
    host, port = _split_host(text, netloc)
    tag: str | None = None
    last = repo.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = repo.rpartition(":")
        if not _TAG.match(tag):
            raise _fail(text, "tag must match [A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
    if len(repo) > 255 or not all(_REPO_PART.match(p) for p in repo.split("/")):
        raise _fail(
            text,
            "repository must be lowercase path components "
            "(a-z 0-9 separated by . _ __ -), at most 255 characters",
        )
    return BundleURI("oci", host=host, port=port, repo=repo, tag=tag, pin=pin)


def _parse_s3(text: str, rest: str, pin: str | None) -> BundleURI:
    bucket, slash, prefix = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise _fail(
            text,
            "bucket name must be 3-63 characters of a-z 0-9 . - "
            "starting and ending with a letter or digit",
        )
    if slash:
        if not prefix:
            raise _fail(text, "drop the trailing '/' (s3://bucket names the bucket root)")
        if len(prefix) > 512:
            raise _fail(text, "key prefix longer than 512 characters")
        _segments(text, prefix, "key prefix")
    return BundleURI("s3", bucket=bucket, prefix=prefix, pin=pin)


def _parse_http(text: str, scheme: str, rest: str, pin: str | None) -> BundleURI:
    netloc, slash, path = rest.partition("/")
    host, port = _split_host(text, netloc)
    if not slash:
        raise _fail(text, "expected a path after the host, e.g. https://host/bundles/app")
    if path:
        if len(path) > 2048:
            raise _fail(text, "path longer than 2048 characters")
        _segments(text, path, "path")
    return BundleURI(scheme, host=host, port=port, path="/" + path if path else "", pin=pin)


def parse_uri(text: str) -> BundleURI:
    """Parse any bundle URI (pinned or not) without applying push/pull policy."""
    if not isinstance(text, str) or not text:
        raise URIError(
            "bundle URI is empty; use file:///abs/dir, oci://host/repo, "
            "s3://bucket/prefix or https://host/path"
        )
    if len(text) > MAX_URI:
        raise _fail(text, f"longer than {MAX_URI} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _fail(text, "whitespace or control characters are not allowed")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise _fail(text, "scheme must be one of file://, oci://, s3://, http://, https://")
    if scheme != "file" and ("?" in rest or "#" in rest or "%" in rest or "\\" in rest):
        raise _fail(text, "query strings, fragments, '%' escapes and '\\' are not allowed")
    body, pin = _split_pin(rest)
    if scheme == "file":
        return _parse_file(text, body, pin)
    if scheme == "oci":
        return _parse_oci(text, body, pin)
    if scheme == "s3":
        return _parse_s3(text, body, pin)
    return _parse_http(text, scheme, body, pin)


def parse_pull_uri(text: str, *, allow_mutable: bool = False) -> BundleURI:
    """A URI to pull from: pinned, except ``oci://…:tag`` with ``allow_mutable``."""
    uri = parse_uri(text)
    if uri.pin is not None:
        return uri
    if allow_mutable:
        if uri.scheme == "oci" and uri.tag:
            return uri
        raise _fail(
            text,
            "--allow-mutable only applies to oci://host/repo:tag; other "
            "sources must be pinned with @sha256:<bundle digest>",
        )
    what = "OCI manifest digest" if uri.scheme == "oci" else "bundle digest"
    hint = " (or pass --allow-mutable to resolve the tag)" if uri.tag else ""
    raise _fail(text, f"not pinned; append @sha256:<{what}> as printed by `spore push`{hint}")


def parse_push_uri(text: str) -> BundleURI:
    """A URI to push to: writable schemes only, and no pin (push computes it)."""
    uri = parse_uri(text)
    if uri.scheme in ("http", "https"):
        raise _fail(
            text, "http(s) is read-only; push to file://, oci:// or s3:// and serve that over HTTP"
        )
    if uri.pin is not None:
        raise _fail(text, "push URIs carry no @sha256 pin; push prints the pinned reference")
    return uri
