"""Registry authentication inputs: challenges, token responses, credentials, error bodies.

All of these come from a registry (or its token server) we do not trust, so
they are parsed here with bounds and fail closed; the HTTP flow that uses them
lives in ``oci.py``. The token flow is the distribution "token authentication"
spec that docker.io, ghcr.io and quay.io use: a 401 carrying
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` is answered by a
GET on the realm, optionally with Basic credentials from ~/.docker/config.json.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from pathlib import Path

from sporevm.bearer import MAX_CHALLENGE_LEN as MAX_CHALLENGE_LEN  # re-exported
from sporevm.bearer import MAX_CHALLENGE_PARAMS as MAX_CHALLENGE_PARAMS  # re-exported
from sporevm.bearer import MAX_TOKEN_LEN as MAX_TOKEN_LEN  # re-exported
from sporevm.bearer import MAX_TOKEN_RESPONSE as MAX_TOKEN_RESPONSE  # re-exported
from sporevm.bearer import Challenge as Challenge  # re-exported
from sporevm.bearer import parse_challenges as parse_challenges  # re-exported
from sporevm.bearer import valid_bearer
from sporevm.build.ocimanifest import load_json
from sporevm.build.ociref import DOCKER_HUB, DOCKER_HUB_API
from sporevm.errors import OCIError

MAX_ERROR_BODY = 64 << 10
MAX_DOCKER_CONFIG = 4 << 20

_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB, DOCKER_HUB_API)


def decode_token_response(data: bytes, *, what: str) -> str:
    """The bearer token from a token server's JSON answer."""
    if len(data) > MAX_TOKEN_RESPONSE:
        raise OCIError(f"{what}: token response larger than {MAX_TOKEN_RESPONSE} bytes")
    doc = load_json(data, what)
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise OCIError(f"{what}: token response has no 'token' or 'access_token'")
    if not valid_bearer(token):
        raise OCIError(f"{what}: token response carries a malformed token")
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
    doc = load_json(data, str(path))
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
                raise OCIError(f"{path}: auths[{key!r}].auth is not base64 of user:password; "
                               f"run `docker login {registry}` again") from None
            if ":" not in decoded:
                raise OCIError(f"{path}: auths[{key!r}].auth is not base64 of user:password")
            return auth
        user, password = entry.get("username"), entry.get("password")
        if isinstance(user, str) and isinstance(password, str):
            return base64.b64encode(f"{user}:{password}".encode()).decode()
    return None
