"""Registry authentication inputs: challenges, token responses, credentials, error bodies.

All of these come from a registry (or its token server) we do not trust, or from
the user's docker config, so they are parsed here with bounds and fail closed;
the HTTP flow that uses them is the one registry client (``registry.py``). The
token flow is the distribution "token authentication" spec that docker.io,
ghcr.io and quay.io use: a 401 carrying
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` is answered by a
GET on the realm, optionally with Basic credentials from ~/.docker/config.json.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sporevm.errors import OCIError
from sporevm.strictjson import load_object

MAX_TOKEN_RESPONSE = 1 << 20  # bytes of a token server's JSON answer
MAX_TOKEN_LEN = 64 << 10  # characters of the token itself
MAX_CHALLENGE_LEN = 8192
MAX_CHALLENGE_PARAMS = 32
MAX_ERROR_BODY = 64 << 10
MAX_DOCKER_CONFIG = 4 << 20

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB, DOCKER_HUB_API)
_BEARER = re.compile(r"[\x21-\x7e]+")  # what may go into an Authorization header


def valid_bearer(token: str) -> bool:
    """Whether ``token`` may be sent as ``Authorization: Bearer <token>``."""
    return 0 < len(token) <= MAX_TOKEN_LEN and _BEARER.fullmatch(token) is not None


def realm_allowed(realm: str, plain_http_ok: Callable[[urllib.parse.SplitResult], bool]) -> bool:
    """Whether a challenge's token realm may be fetched, credentials included: an
    absolute https URL without userinfo, or http where ``plain_http_ok`` allows it.
    Malformed: no."""
    try:
        parts = urllib.parse.urlsplit(realm)
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        return False
    return (
        bool(parts.hostname)
        and "@" not in parts.netloc
        and (parts.scheme == "https" or (parts.scheme == "http" and plain_http_ok(parts)))
    )


# -- WWW-Authenticate (RFC 7235) ---------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PARAM = re.compile(
    r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*"""
    r"""(?:"((?:[^"\\]|\\.)*)"|([!#$%&'*+.^_`|~0-9A-Za-z-]+))"""
)


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
            params[p.group(1).lower()] = (
                re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else p.group(3)
            )
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


# -- JSON answers and the docker config ----------------------------------------------------


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    """Strict JSON object: UTF-8, no duplicate keys, no NaN/Infinity (bounded by callers)."""
    return load_object(data, what, OCIError)


def decode_token_response(data: bytes, *, what: str) -> str:
    """The bearer token from a token server's JSON answer."""
    if len(data) > MAX_TOKEN_RESPONSE:
        raise OCIError(f"{what}: token response larger than {MAX_TOKEN_RESPONSE} bytes")
    doc = _json_object(data, what)
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise OCIError(f"{what}: token response has no 'token' or 'access_token'")
    if not valid_bearer(token):
        raise OCIError(
            f"{what}: token response carries a malformed token (not 1 to "
            f"{MAX_TOKEN_LEN} printable ASCII characters)"
        )
    return token


def summarize_errors(body: bytes) -> str:
    """One printable line from a registry JSON error body ('' if there is nothing usable)."""
    try:
        doc = json.loads(body[:MAX_ERROR_BODY].decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return ""
    parts: list[str] = []
    for err in errors[:3]:
        if not isinstance(err, dict):
            continue
        code, message = err.get("code"), err.get("message")
        text = ": ".join(str(x) for x in (code, message) if isinstance(x, str) and x)
        if text:
            parts.append(text)
    line = "; ".join(parts)
    line = "".join(ch if ch.isprintable() else "?" for ch in line)
    return line[:200]


def docker_config_path() -> Path:
    """$DOCKER_CONFIG/config.json, else ~/.docker/config.json (as docker reads it)."""
    env = os.environ.get("DOCKER_CONFIG")
    return (Path(env) if env else Path.home() / ".docker") / "config.json"


def load_credentials(registry: str, config: Path | None = None) -> str | None:
    """Basic credentials ('user:password' base64) for ``registry`` from a docker config.json.

    Only inline ``auths`` entries are used; credential helpers (credsStore,
    credHelpers) are not run, so such registries are accessed anonymously.
    """
    path = config or docker_config_path()
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_DOCKER_CONFIG + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OCIError(f"{path}: cannot read docker credentials ({exc.strerror})") from None
    if len(data) > MAX_DOCKER_CONFIG:
        raise OCIError(f"{path}: larger than {MAX_DOCKER_CONFIG} bytes; refusing to parse it")
    doc = _json_object(data, str(path))
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return None
    wanted = _HUB_KEYS if registry == DOCKER_HUB else (registry,)
    for key, entry in auths.items():
        host = re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]
        if (key not in wanted and host not in wanted) or not isinstance(entry, dict):
            continue
        auth = entry.get("auth")
        if isinstance(auth, str) and auth:
            try:
                decoded = base64.b64decode(auth, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise OCIError(
                    f"{path}: auths[{key!r}].auth is not base64 of user:password; "
                    f"run `docker login {registry}` again"
                ) from None
            if ":" not in decoded:
                raise OCIError(f"{path}: auths[{key!r}].auth is not base64 of user:password")
            return auth
        user, password = entry.get("username"), entry.get("password")
        if isinstance(user, str) and isinstance(password, str):
            return base64.b64encode(f"{user}:{password}".encode()).decode()
    return None
