"""A VM's network: its policy, its egress gateway, and what the monitor and agent get.

A VM has a network only when its Sporefile says ``network:`` (or ``spore run`` says
``--net-allow``): then, before its monitor starts, the caller makes a socketpair,
starts the VM's egress gateway on one end (``sporevm.egress.launch``) and hands the
other to the monitor, which reads and writes it and creates no sockets. Without a
network there is no gateway and no NIC at all. docs/network.md has the design.

    caller ── socketpair ──┬─► gateway (policy, DNS, passt) ─► host sockets
                           └─► monitor ─ virtio-net ─ guest eth0

The guest's side of the link is fixed (``egress.filter.Link``): the agent configures
it from ``interface_config()`` before the first command and after every restore.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sporevm.egress import launch
from sporevm.egress.filter import Link
from sporevm.egress.policy import Policy
from sporevm.runtime.agent_messages import NetConfig
from sporevm.runtime.monitor_config import NetWiring
from sporevm.spore.platform import GUEST_MAC, GUEST_MTU

LINK = Link()


@dataclass(frozen=True)
class NetworkSpec:
    """A VM's network: the allow entries in canonical form (sorted, duplicates gone;
    what manifests and cache keys record), and where decisions are logged."""

    allow: tuple[str, ...]
    log: Path | None = None
    jail: bool = True  # False only to debug the gateway (docs/network.md)

    @classmethod
    def parse(cls, entries: Iterable[str], log: Path | None = None) -> NetworkSpec:
        """Checked now, before any process starts: a bad entry is one PolicyError line."""
        return cls(tuple(canonical_allow(entries)), log)


def canonical_allow(entries: Iterable[str]) -> list[str]:
    return Policy.parse(entries, LINK.gateway_ip).canonical()


def interface_config() -> NetConfig:
    """What the guest agent applies to its NIC (address, route, resolv.conf, MTU)."""
    return NetConfig(
        address=LINK.guest_ip,
        prefix=LINK.prefix,
        gateway=LINK.gateway_ip,
        nameserver=LINK.gateway_ip,
        mtu=GUEST_MTU,
    )


class Network:
    """A started gateway and the monitor's end of its frame channel.

    ``monitor_fd`` goes to the monitor (inherited or passed as SCM_RIGHTS), then
    ``handed_over`` closes this process's copy, so the gateway sees the channel end
    when the monitor does. ``stop`` ends the gateway (and its passt)."""

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._monitor_end: socket.socket | None = ours
        try:
            self.gateway = launch.start(theirs.fileno(), spec.allow, log=spec.log, jail=spec.jail)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    @property
    def monitor_fd(self) -> int:
        if self._monitor_end is None:
            raise RuntimeError("the NIC channel was already handed to the monitor")
        return self._monitor_end.fileno()

    def wiring(self, fd_in_monitor: int) -> NetWiring:
        return NetWiring(fd_in_monitor, GUEST_MAC, GUEST_MTU)

    def handed_over(self) -> None:
        if self._monitor_end is not None:
            self._monitor_end.close()
            self._monitor_end = None

    def stop(self) -> int:
        """End the gateway: it normally leaves by itself once the monitor has gone."""
        self.handed_over()
        with contextlib.suppress(OSError):
            return self.gateway.stop(timeout=2.0)
        return -1
