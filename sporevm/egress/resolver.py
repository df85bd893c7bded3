"""Resolving allowed names through the host's resolver, asynchronously.

What glibc's default ``hosts: files dns`` does, within the jail: ``/etc/hosts``
first (read once, at start), then the nameservers of ``/etc/resolv.conf`` in order,
over UDP sockets connected before the jail (so the gateway creates no socket later,
and a connected socket accepts datagrams only from its server). Answers are parsed
by ``dns.parse`` (bounded) and must carry the id and question we sent; addresses
come only through ``dns.chain``. Other NSS sources (mDNS, LDAP, …) are not consulted.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sporevm.egress import EgressError, dns
from sporevm.egress.filter import DnsTask
from sporevm.egress.policy import aton, normalize_name

MAX_PENDING = 64  # questions waiting for an upstream answer
MAX_SERVERS = 3  # like glibc's MAXNS
QUERY_TIMEOUT_S = 2.0  # per server and attempt
ATTEMPTS = 2  # rounds over the servers
HOSTS_TTL = 60
MAX_CONFIG_FILE = 1 << 20  # /etc/hosts, /etc/resolv.conf

Result = dns.Chain | str  # a chain, or why there is none (nxdomain, timeout, …)


def _read_config(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_FILE + 1)
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise EgressError(f"{path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_FILE:
        raise EgressError(f"{path}: larger than {MAX_CONFIG_FILE} bytes")
    return data.decode("utf-8", "replace")


def nameservers(path: Path = Path("/etc/resolv.conf")) -> list[tuple[str, int]]:
    """The ``nameserver`` lines (IPv4 and IPv6), at most ``MAX_SERVERS``, port 53."""
    out = []
    for line in _read_config(path).splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            addr = words[1].split("%")[0]
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
            except OSError:
                continue
            out.append((addr, 53))
    return out[:MAX_SERVERS]


def read_hosts(path: Path | None = Path("/etc/hosts")) -> dict[str, tuple[int, ...]]:
    """IPv4 entries of a hosts file: normalized name → addresses, in file order."""
    table: dict[str, list[int]] = {}
    if path is None:
        return {}
    for line in _read_config(path).splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        try:
            addr = aton(words[0])
        except ValueError:
            continue  # IPv6 and malformed lines
        for alias in words[1:]:
            name = normalize_name(alias)
            if name is not None and addr not in table.setdefault(name, []):
                table[name].append(addr)
    return {k: tuple(v) for k, v in table.items()}


def parse_server(text: str) -> tuple[str, int]:
    """``ADDR`` or ``ADDR:PORT`` (IPv4), ``[ADDR6]:PORT`` or ``ADDR6``."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    if not 0 < port < 65536:
        raise ValueError(f"port {port}")
    return host, port


def connect_servers(servers: list[tuple[str, int]]) -> list[socket.socket]:
    """One connected, non-blocking UDP socket per server (made before the jail)."""
    socks = []
    for host, port in servers[:MAX_SERVERS]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.connect((host, port))
        except OSError as e:
            s.close()
            raise EgressError(f"resolver {host}:{port}: {e.strerror}") from None
        s.setblocking(False)
        socks.append(s)
    return socks


@dataclass
class _Pending:
    task: DnsTask
    qid: int
    server: int
    tries: int
    deadline: float


class Resolver:
    """Questions out, ``(task, result)`` pairs back; the caller polls ``sockets``."""

    def __init__(
        self,
        sockets: list[socket.socket],
        hosts: dict[str, tuple[int, ...]],
        random16: Callable[[], int] | None = None,
    ) -> None:
        self.sockets = sockets
        self.hosts = hosts
        self._pending: dict[int, _Pending] = {}
        self._random16 = random16 or (lambda: struct.unpack("!H", os.urandom(2))[0])

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, task: DnsTask, now: float) -> list[tuple[DnsTask, Result]]:
        if task.name in self.hosts:
            return [(task, dns.Chain((task.name,), self.hosts[task.name], HOSTS_TTL))]
        if not self.sockets:
            return [(task, "no-resolver")]
        if len(self._pending) >= MAX_PENDING:
            return [(task, "resolver-busy")]
        qid = self._random16()
        while qid in self._pending:
            qid = (qid + 1) & 0xFFFF
        p = _Pending(task, qid, 0, 1, now + QUERY_TIMEOUT_S)
        self._pending[qid] = p
        return self._send(p, now)

    def _send(self, p: _Pending, now: float) -> list[tuple[DnsTask, Result]]:
        query = dns.build_query(p.qid, p.task.name)
        try:
            self.sockets[p.server].send(query)
        except OSError:
            return self._next_server(p, now)  # refused, unreachable: try the next one
        return []

    def _next_server(self, p: _Pending, now: float) -> list[tuple[DnsTask, Result]]:
        p.server += 1
        if p.server >= len(self.sockets):
            p.server = 0
            p.tries += 1
        if p.tries > ATTEMPTS:
            del self._pending[p.qid]
            return [(p.task, "timeout")]
        p.deadline = now + QUERY_TIMEOUT_S
        return self._send(p, now)

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._pending.values()), default=None)

    def expire(self, now: float) -> list[tuple[DnsTask, Result]]:
        done: list[tuple[DnsTask, Result]] = []
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            done += self._next_server(p, now)
        return done

    def readable(self, sock: socket.socket, now: float) -> list[tuple[DnsTask, Result]]:
        done: list[tuple[DnsTask, Result]] = []
        for _ in range(MAX_PENDING):
            try:
                data = sock.recv(dns.MAX_MESSAGE + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP unreachable reported on the connected socket
                break
            done += self.answer(data, now)
        return done

    def answer(self, data: bytes, now: float) -> list[tuple[DnsTask, Result]]:
        """One upstream datagram: the finished question, or nothing if it matches none."""
        try:
            msg = dns.parse(data)
        except dns.DnsError:
            return []  # not ours, or unusable: the question times out or gets another try
        p = self._pending.get(msg.id)
        if p is None or not msg.is_response or len(msg.questions) != 1:
            return []
        q = msg.questions[0]
        if q.name.lower() != p.task.name or (q.qtype, q.qclass) != (dns.TYPE_A, dns.CLASS_IN):
            return []
        del self._pending[p.qid]
        if msg.rcode == dns.NXDOMAIN:
            return [(p.task, "nxdomain")]
        if msg.rcode != dns.NOERROR:
            return [(p.task, f"upstream-rcode-{msg.rcode}")]
        if msg.truncated:
            return [(p.task, "upstream-truncated")]  # no TCP after the jail; fail closed
        try:
            return [(p.task, dns.chain(msg, p.task.name))]
        except dns.DnsError as e:
            return [(p.task, f"upstream-{e}")]
