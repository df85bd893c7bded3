"""Registry auth challenges and token bounds, shared by every registry client.

``build/ociauth.py`` (image pulls) and ``dist/transport_oci.py`` (bundle
push/pull through oras-py) both answer ``WWW-Authenticate`` challenges and
fetch bearer tokens from servers we do not trust; the parser and the bounds
live here, below both, so neither floor imports the other.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from sporevm.errors import OCIError

MAX_TOKEN_RESPONSE = 1 << 20  # bytes of a token server's JSON answer
MAX_TOKEN_LEN = 64 << 10      # characters of the token itself
MAX_CHALLENGE_LEN = 8192
MAX_CHALLENGE_PARAMS = 32

_BEARER = re.compile(r"[\x21-\x7e]+")  # what may go into an Authorization header


def valid_bearer(token: str) -> bool:
    """Whether ``token`` may be sent as ``Authorization: Bearer <token>``."""
    return 0 < len(token) <= MAX_TOKEN_LEN and _BEARER.fullmatch(token) is not None


def realm_allowed(realm: str,
                  plain_http_ok: Callable[[urllib.parse.SplitResult], bool]) -> bool:
    """Whether a challenge's token realm may be fetched, credentials included: an
    absolute https URL, or http where ``plain_http_ok`` allows it. Malformed: no."""
    try:
        parts = urllib.parse.urlsplit(realm)
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        return False
    return bool(parts.hostname) and (
        parts.scheme == "https" or (parts.scheme == "http" and plain_http_ok(parts)))


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PARAM = re.compile(r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*"""
                    r"""(?:"((?:[^"\\]|\\.)*)"|([!#$%&'*+.^_`|~0-9A-Za-z-]+))""")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercased: "bearer", "basic", ...
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value (RFC 7235) into challenges; junk is an error."""
    if len(header) > MAX_CHALLENGE_LEN:
        raise OCIError(f"registry auth challenge longer than {MAX_CHALLENGE_LEN} characters")
    out: list[Challenge] = []
    pos, end = 0, len(header)
    while True:
        pos = _skip(header, pos, ", \t")
        if pos >= end:
            break
        m = _TOKEN.match(header, pos)
        if not m:
            raise OCIError(f"registry auth challenge {header[:120]!r}: expected an auth scheme")
        scheme = m.group(0).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while True:
            p = _PARAM.match(header, _skip(header, pos, " \t"))
            if not p:
                break
            if len(params) >= MAX_CHALLENGE_PARAMS:
                raise OCIError("registry auth challenge has too many parameters")
            quoted = p.group(2)
            params[p.group(1).lower()] = (re.sub(r"\\(.)", r"\1", quoted)
                                          if quoted is not None else p.group(3))
            pos = _skip(header, p.end(), " \t")
            if pos < end and header[pos] == ",":
                after = _skip(header, pos + 1, " \t")
                if _PARAM.match(header, after):  # another parameter of this challenge
                    pos = after
                    continue
                pos += 1  # the comma ends this challenge; the next token is a scheme
            break
        pos = _skip(header, pos, " \t")
        if not params and pos < end and header[pos] not in ", \t":
            # token68 form ("Negotiate abc=="): keep the scheme, skip the blob
            tail = re.compile(r"[A-Za-z0-9._~+/-]+=*").match(header, pos)
            if not tail:
                raise OCIError(f"registry auth challenge {header[:120]!r}: cannot parse it")
            pos = tail.end()
        out.append(Challenge(scheme, params))
        if len(out) > MAX_CHALLENGE_PARAMS:
            raise OCIError("registry auth challenge lists too many schemes")
    if not out:
        raise OCIError("registry asked for authentication without a WWW-Authenticate challenge")
    return out


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos
