"""The egress gateway: a per-VM process between a guest's frames and the host's network.

The guest's Ethernet frames arrive on an already-open descriptor (the VM monitor holds
the other end and creates no sockets). Each frame is parsed just far enough to decide
its flow under a default-deny policy (``policy.decide``): the hard floor first, then
CIDR rules, then addresses learned from DNS answers for allowed names, then exact
host:port rules. Allowed frames go on to Debian's ``passt``, which maps guest flows
onto host sockets; the gateway answers ARP and DNS itself. docs/network.md has the
design and what each piece may do; docs/limits.md the bounds.

Modules: ``frames`` (the length-prefixed stream), ``packets`` (Ethernet/ARP/IPv4/UDP/
TCP headers), ``dns`` (messages), ``policy`` (entries, floor, decisions), ``learned``
(addresses learned from DNS), ``filter`` (one frame in, actions out; no I/O),
``resolver`` (upstream queries), ``hostaddrs`` (this machine's own addresses),
``decisionlog`` (JSON lines), ``passt``, ``confine`` (the jail), ``gateway`` (the
process), ``launch`` (what a caller uses to start one).
"""

from sporevm.errors import SporeError


class EgressError(SporeError):
    """The gateway cannot start or continue as asked (one line, names what and why)."""


class PolicyError(SporeError):
    """A network allow entry is malformed or can never match."""

    exit_code = 2
