"""requests plumbing every HTTP client of spore shares: watched connections, raw bodies.

Imported by the registry client and the http(s):// transport only, so that a
command that moves no bytes over HTTP never loads requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import requests
import requests.adapters
import urllib3

from sporevm.errors import SporeError
from sporevm.net.deadline import watched_pools

USER_AGENT = "sporevm/0.1"
BLOCK = 1 << 20  # the largest piece a body is handed out in
BROKEN = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError)


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections register with the active Deadline, so that
    its watchdog can end a read blocked on a stalled server (deadline.py)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = watched_pools(
            self.poolmanager.pool_classes_by_scheme
        )

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = watched_pools(manager.pool_classes_by_scheme)
        return manager


def no_netrc(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """A session ``auth`` that adds nothing: requests consults ~/.netrc only for a
    session without auth, and .netrc credentials must never go to a server we name."""
    return request


def watched_session(session: requests.Session | None = None) -> requests.Session:
    """``session`` (or a new one) with watched adapters and no .netrc credentials."""
    session = session if session is not None else requests.Session()
    for prefix in ("https://", "http://"):
        session.mount(prefix, WatchedAdapter())
    session.auth = no_netrc
    return session


def raw_stream(resp: requests.Response, broke: Callable[[str], SporeError]) -> Iterator[bytes]:
    """The raw body (no Content-Encoding decoding), in whatever pieces arrive (``read1``:
    a deadline is checked as bytes come in, not once per full block). A connection that
    breaks raises ``broke(name of the failure)``; the response is closed at the end."""
    try:
        while block := resp.raw.read1(BLOCK, decode_content=False):
            yield block
    except BROKEN as exc:
        raise broke(type(exc).__name__) from None
    finally:
        resp.close()
