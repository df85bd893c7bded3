"""Bounds on registry token-server answers, shared by every registry client.

``build/ociauth.py`` (image pulls) and ``dist/transport_oci.py`` (bundle
push/pull through oras-py) both fetch bearer tokens from servers we do not
trust; the bounds live here, below both, so neither floor imports the other.
"""

from __future__ import annotations

import re

MAX_TOKEN_RESPONSE = 1 << 20  # bytes of a token server's JSON answer
MAX_TOKEN_LEN = 64 << 10      # characters of the token itself

_BEARER = re.compile(r"[\x21-\x7e]+")  # what may go into an Authorization header


def valid_bearer(token: str) -> bool:
    """Whether ``token`` may be sent as ``Authorization: Bearer <token>``."""
    return 0 < len(token) <= MAX_TOKEN_LEN and _BEARER.fullmatch(token) is not None
