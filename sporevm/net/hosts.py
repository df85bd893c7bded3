"""Which hosts may be spoken to over plain HTTP: the one insecure-registry policy.

Kept apart from the client (and free of requests) so the reference parser can say
what a reference means without loading an HTTP stack.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


def host_name(hostport: str) -> str:
    """``host`` from ``host[:port]`` or ``[v6]:port``."""
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


def is_loopback(hostport: str) -> bool:
    """localhost, 127.0.0.0/8 and ::1: the only hosts plain HTTP may go to by default."""
    host = host_name(hostport).lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Policy:
    """Plain HTTP only to loopback, or to hosts the user named insecure.

    ``insecure`` holds ``HOST`` (every port) or ``HOST:PORT`` entries, as given with
    ``--insecure-registry``; ``insecure_option`` says whether the running command
    offers that flag at all (so a TLS failure can suggest it, or not)."""

    insecure: frozenset[str] = frozenset()
    insecure_option: bool = False

    def plain_http_allowed(self, hostport: str) -> bool:
        return (
            is_loopback(hostport)
            or hostport in self.insecure
            or host_name(hostport) in self.insecure
        )

    def plain_http_hosts(self) -> str:
        """Where plain HTTP may go, for error messages."""
        return "loopback or --insecure-registry hosts" if self.insecure else "loopback"
