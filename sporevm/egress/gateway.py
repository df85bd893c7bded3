"""The gateway process: ``python -m sporevm.egress.gateway --vm-fd N --allow ENTRY …``.

One per VM, started by the caller with the VM side of the frame channel already open
(a socketpair: the monitor gets the other end and creates no sockets). It opens what
it needs — the decision log, an rtnetlink socket for this machine's addresses, UDP
sockets connected to the host's resolvers, and passt — then jails itself
(``confine``) and prints one ``ready`` JSON line on stdout. From then on it is a
single-threaded poll loop:

* guest frames are classified by ``EgressFilter`` (forwarded to passt, answered,
  resolved, or dropped);
* passt's frames go to the guest after the stream's framing is checked;
* each direction buffers at most ``MAX_BUFFERED`` bytes, then stops reading the
  other side (the TCP windows inside passt and the guest do the rest).

It exits when the VM side closes (0), or on a broken stream or a dead passt (1),
with one line on stderr; usage errors exit 2. docs/network.md has the whole design.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sporevm.egress import EgressError, PolicyError, confine, frames, passt, resolver
from sporevm.egress.decisionlog import DecisionLog
from sporevm.egress.filter import FORWARD, DnsTask, EgressFilter, Link, Reply
from sporevm.egress.hostaddrs import HostAddresses
from sporevm.egress.policy import Policy, ntoa
from sporevm.errors import SporeError
from sporevm.vmm.jail import JailError

MAX_BUFFERED = 4 << 20  # per direction
RECV = 256 << 10
SEND = 1 << 20
MAX_PASST_STDERR = 64 << 10  # passed on to our stderr over the gateway's life


class Gateway:
    def __init__(
        self,
        vm: socket.socket,
        filt: EgressFilter,
        upstream: passt.Passt,
        res: resolver.Resolver,
        hosts: HostAddresses | None,
        log: DecisionLog,
    ) -> None:
        self.vm = vm
        self.filter = filt
        self.passt = upstream
        self.resolver = res
        self.hosts = hosts
        self.log = log
        self.vm_reader = frames.FrameReader()
        self.passt_reader = frames.FrameReader()
        self.to_vm = bytearray()
        self.to_passt = bytearray()
        self.stop: str | None = None
        self.status = 0
        self.stderr_budget = MAX_PASST_STDERR
        self.counts = {
            "guest_frames": 0,
            "forwarded": 0,
            "passt_frames": 0,
            "guest_bytes": 0,
            "passt_bytes": 0,
        }
        for s in (vm, upstream.sock):
            s.setblocking(False)  # an ioctl (FIONBIO): before the jail, which refuses it

    # --- the loop --------------------------------------------------------------------

    def run(self) -> int:
        poller = select.poll()
        vm_fd, passt_fd = self.vm.fileno(), self.passt.sock.fileno()
        by_fd = {s.fileno(): s for s in self.resolver.sockets}
        assert self.passt.proc.stderr is not None
        err_fd = self.passt.proc.stderr.fileno()
        poller.register(err_fd, select.POLLIN)
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        if self.hosts is not None:
            poller.register(self.hosts.sock.fileno(), select.POLLIN)
        while self.stop is None:
            poller.register(
                vm_fd,
                (select.POLLIN if len(self.to_passt) < MAX_BUFFERED else 0)
                | (select.POLLOUT if self.to_vm else 0),
            )
            poller.register(
                passt_fd,
                (select.POLLIN if len(self.to_vm) < MAX_BUFFERED else 0)
                | (select.POLLOUT if self.to_passt else 0),
            )
            deadline = self.resolver.next_deadline()
            timeout = (
                None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
            )
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd, ev in events:
                if fd == vm_fd:
                    self._vm_events(ev, now)
                elif fd == passt_fd:
                    self._passt_events(ev)
                elif fd in by_fd:
                    self._answers(self.resolver.readable(by_fd[fd], now), now)
                elif self.hosts is not None and fd == self.hosts.sock.fileno():
                    self._host_addresses()
                elif fd == err_fd:
                    self._passt_stderr(ev, poller, err_fd)
                if self.stop is not None:
                    break
            self._answers(self.resolver.expire(now), now)
        self.log(
            {
                "event": "stop",
                "why": self.stop,
                "drops": self.filter.drops,
                **self.counts,
                "log_suppressed": self.log.suppressed,
            }
        )
        return self.status

    def _vm_events(self, ev: int, now: float) -> None:
        if ev & select.POLLOUT:
            self._flush(self.vm, self.to_vm)
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            try:
                data = self.vm.recv(RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                return self._end(f"vm channel: {e.strerror}", 1)
            if not data:
                return self._end("vm channel closed", 0)
            self.counts["guest_bytes"] += len(data)
            try:
                got = self.vm_reader.feed(data)
            except frames.FrameError as e:
                return self._end(f"vm channel: {e}", 1)
            for frame in got:
                self._guest_frame(frame, now)
            self._flush(self.passt.sock, self.to_passt)
            self._flush(self.vm, self.to_vm)

    def _guest_frame(self, frame: bytes, now: float) -> None:
        self.counts["guest_frames"] += 1
        verdict = self.filter.from_guest(frame, now)
        if verdict is FORWARD:
            self.counts["forwarded"] += 1
            self.to_passt += frames.encode(frame)
        elif isinstance(verdict, Reply):
            self.to_vm += frames.encode(verdict.frame)
        elif isinstance(verdict, DnsTask):
            self._answers(self.resolver.submit(verdict, now), now)

    def _answers(self, done: list[tuple[DnsTask, resolver.Result]], now: float) -> None:
        for task, result in done:
            self.to_vm += frames.encode(self.filter.dns_answer(task, result, now).frame)
        if done:
            self._flush(self.vm, self.to_vm)

    def _passt_events(self, ev: int) -> None:
        if ev & select.POLLOUT:
            self._flush(self.passt.sock, self.to_passt)
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            try:
                data = self.passt.sock.recv(RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                return self._end(f"passt: {e.strerror}", 1)
            if not data:
                return self._end("passt closed its socket", 1)
            self.counts["passt_bytes"] += len(data)
            try:
                chunk, n = self.passt_reader.split(data)
            except frames.FrameError as e:
                return self._end(f"passt stream: {e}", 1)
            self.counts["passt_frames"] += n
            if chunk:
                if self.to_vm:
                    self.to_vm += chunk
                else:  # the common case: straight out, buffer only what the VM won't take
                    sent = self._send(self.vm, chunk)
                    self.to_vm += chunk[sent:]

    def _send(self, sock: socket.socket, data: bytes | memoryview) -> int:
        try:
            return sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            self._end(
                f"{'vm channel' if sock is self.vm else 'passt'}: {e.strerror}",
                0 if sock is self.vm else 1,
            )
            return 0

    def _flush(self, sock: socket.socket, buf: bytearray) -> None:
        while buf and self.stop is None:
            with memoryview(buf) as view:
                sent = self._send(sock, view[:SEND])
            if not sent:
                return
            del buf[:sent]

    def _host_addresses(self) -> None:
        assert self.hosts is not None
        new = self.hosts.readable()
        if new:
            self.filter.policy = self.filter.policy.with_host_addresses(new)
            self.filter.flows.clear()  # a cached "allow" may now point at this machine
            self.log({"event": "host-addresses", "added": sorted(ntoa(a) for a in new)})

    def _passt_stderr(self, ev: int, poller: Any, fd: int) -> None:
        text = self.passt.drain_stderr()
        if text and self.stderr_budget > 0:
            out = text[: self.stderr_budget]
            self.stderr_budget -= len(out)
            sys.stderr.write("".join(f"spore-egress: passt: {ln}\n" for ln in out.splitlines()))
            sys.stderr.flush()
        if ev & (select.POLLHUP | select.POLLERR) and not ev & select.POLLIN:
            poller.unregister(fd)

    def _end(self, why: str, status: int) -> None:
        if self.stop is None:
            self.stop, self.status = why, status


# --- the process -----------------------------------------------------------------------


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sporevm.egress.gateway",
        description="A guest's egress gateway (docs/network.md).",
    )
    p.add_argument(
        "--vm-fd",
        type=int,
        required=True,
        help="the VM side of the frame channel (a connected stream socket)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="ENTRY",
        help="host, host:port, IPv4 CIDR or address, addr:port, or 'public'",
    )
    p.add_argument("--log", metavar="FILE", help="append JSON-lines decisions to FILE")
    p.add_argument(
        "--resolver",
        action="append",
        default=[],
        metavar="ADDR[:PORT]",
        help="ask this DNS server (default: /etc/resolv.conf's nameservers)",
    )
    p.add_argument(
        "--hosts",
        default="/etc/hosts",
        metavar="FILE",
        help="hosts file consulted first ('' for none)",
    )
    p.add_argument("--passt", default="passt", metavar="BINARY")
    p.add_argument(
        "--runtime-dir",
        default="/run",
        type=Path,
        help="where passt's socket lives for the moment it takes to connect",
    )
    p.add_argument("--no-jail", action="store_true", help="debug only: no Landlock, no seccomp")
    return p.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    link = Link()
    policy = Policy.parse(args.allow, link.gateway_ip)
    try:
        vm = socket.socket(fileno=args.vm_fd)
    except OSError as e:
        raise EgressError(f"--vm-fd {args.vm_fd}: {e.strerror}") from None
    if vm.type != socket.SOCK_STREAM:
        raise EgressError(f"--vm-fd {args.vm_fd}: not a stream socket")
    log = DecisionLog.open(args.log)
    hosts = HostAddresses()
    policy = policy.with_host_addresses(hosts.addresses)
    try:
        servers = [resolver.parse_server(s) for s in args.resolver] or resolver.nameservers()
    except (ValueError, OSError) as e:
        raise EgressError(f"--resolver: {e}") from None
    upstreams = resolver.connect_servers(servers)
    hosts_table = resolver.read_hosts(Path(args.hosts) if args.hosts else None)
    if not args.no_jail:
        confine.prepare()
    upstream = passt.start(link, args.runtime_dir, args.passt)
    try:
        filt = EgressFilter(link, policy, log)
        gw = Gateway(vm, filt, upstream, resolver.Resolver(upstreams, hosts_table), hosts, log)
        jailed = "none (--no-jail)"
        if not args.no_jail:
            jailed = confine.enter(upstream.proc.pid)
        else:
            sys.stderr.write("spore-egress: WARNING: running WITHOUT its jail (--no-jail)\n")
        log(
            {
                "event": "start",
                "policy": policy.canonical(),
                "guest": ntoa(link.guest_ip),
                "gateway": ntoa(link.gateway_ip),
                "host_addresses": sorted(ntoa(a) for a in policy.host_addresses),
                "resolvers": [f"{h}:{p}" for h, p in servers],
                "jail": jailed,
            }
        )
        sys.stdout.write(
            json.dumps({"event": "ready", "jail": jailed, "passt_pid": upstream.proc.pid}) + "\n"
        )
        sys.stdout.flush()
        status = gw.run()
        if status:
            sys.stderr.write(f"spore-egress: {gw.stop}\n")
        return status
    finally:
        upstream.close()
        log.close()


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        return serve(args)
    except PolicyError as e:
        sys.stderr.write(f"spore-egress: {e}\n")
        return 2
    except (SporeError, JailError) as e:
        sys.stderr.write(f"spore-egress: {e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"spore-egress: {e.filename or ''}: {e.strerror}\n")
        return 1


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
