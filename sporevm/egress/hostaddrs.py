"""This machine's own IPv4 addresses, which belong to the floor, kept current.

A guest flow to one of them would reach a service on the host through passt's host
sockets, so every address of every interface in the gateway's network namespace is
refused. They are read with an rtnetlink dump at start, and the same socket (opened
before the jail, subscribed to address changes before the dump, so nothing falls in
between) reports addresses added later. Removed addresses stay refused: the floor
only grows. Messages come from the kernel; they are still parsed with bounds.
"""

from __future__ import annotations

import socket
import struct

NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
MAX_MESSAGE = 1 << 16

_NLMSG = struct.Struct("=IHHII")
_IFADDR = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse(data: bytes) -> tuple[set[int], bool]:
    """IPv4 addresses announced in one netlink datagram, and whether a dump ended here."""
    found: set[int] = set()
    done = False
    off = 0
    while len(data) - off >= _NLMSG.size:
        length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or length > len(data) - off:
            break
        if mtype in (NLMSG_DONE, NLMSG_ERROR):
            done = True
        elif mtype == RTM_NEWADDR and length >= _NLMSG.size + _IFADDR.size:
            family = _IFADDR.unpack_from(data, off + _NLMSG.size)[0]
            if family == socket.AF_INET:
                found |= _addresses(data, off + _NLMSG.size + _IFADDR.size, off + length)
        off += _align(length)
    return found, done


def _addresses(data: bytes, off: int, end: int) -> set[int]:
    local: set[int] = set()
    other: set[int] = set()
    while end - off >= _RTA.size:
        rlen, rtype = _RTA.unpack_from(data, off)
        if rlen < _RTA.size or rlen > end - off:
            break
        if rlen == _RTA.size + 4 and rtype in (IFA_LOCAL, IFA_ADDRESS):
            addr = int.from_bytes(data[off + 4 : off + 8], "big")
            (local if rtype == IFA_LOCAL else other).add(addr)
        off += _align(rlen)
    return local or other  # point-to-point links: IFA_LOCAL is ours, IFA_ADDRESS the peer


_DUMP = _NLMSG.pack(
    _NLMSG.size + _IFADDR.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
) + _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0)


class HostAddresses:
    """The netlink socket and what it has reported so far."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_IPV4_IFADDR))
        self.addresses: set[int] = set()
        self.sock.send(_DUMP)
        done = False
        while not done:
            found, done = parse(self.sock.recv(MAX_MESSAGE))
            self.addresses |= found
        self.sock.setblocking(False)

    def readable(self) -> set[int]:
        """Addresses announced since the last call (new ones only)."""
        new: set[int] = set()
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS: changes were lost; ask for everything again
                try:
                    self.sock.send(_DUMP)
                except OSError:
                    pass
                break
            found, _ = parse(data)
            new |= found - self.addresses
        self.addresses |= new
        return new

    def close(self) -> None:
        self.sock.close()
