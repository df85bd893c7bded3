"""DNS messages (RFC 1035): the guest's queries and the host resolver's answers.

Parsed, not trusted: a message is at most ``MAX_MESSAGE`` bytes, every count is
checked against what is left before anything is read, names follow compression
pointers only to strictly lower offsets than any seen before (so a pointer loop
cannot exist, and ``MAX_POINTER_HOPS`` bounds the work), are ≤ 255 bytes on the wire
with labels ≤ 63 of ``[A-Za-z0-9_-]``; anything else is ``DnsError``. Addresses come
out of an answer only through ``chain``: A records of the name that an in-order
CNAME chain from the question leads to; every other record is ignored.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

MAX_MESSAGE = 4096  # one message, either direction
MAX_QUESTIONS = 4
MAX_RECORDS = 128  # per section
MAX_POINTER_HOPS = 32
MAX_NAME_WIRE = 255
MAX_CNAME_CHAIN = 8
EDNS_PAYLOAD = 1232  # what our upstream queries advertise (the DNS flag day value)
GUEST_MAX_ANSWER = 512  # replies to the guest fit a plain (non-EDNS) UDP answer

TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_OPT = 1, 5, 28, 41
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
FLAG_QR, FLAG_AA, FLAG_TC, FLAG_RD, FLAG_RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080

_HEADER = struct.Struct("!HHHHHH")
_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}")


class DnsError(ValueError):
    """A message that is malformed or outside the bounds; ``str(e)`` is a short reason."""


@dataclass(frozen=True)
class Question:
    name: str  # as sent (case kept: it is echoed back)
    qtype: int
    qclass: int


@dataclass(frozen=True)
class Record:
    name: str
    rtype: int
    rclass: int
    ttl: int
    address: int | None = None  # A
    target: str | None = None  # CNAME


@dataclass(frozen=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...]
    answers: tuple[Record, ...]
    edns_payload: int | None  # from an OPT record, if any

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)


def read_name(data: bytes, off: int) -> tuple[str, int]:
    """The name at ``off`` and the offset just past it (past its first pointer, if any)."""
    labels: list[str] = []
    pos, floor, after, hops, wire = off, off, -1, 0, 1
    while True:
        if pos >= len(data):
            raise DnsError("name-truncated")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsError("name-truncated")
            target = ((n & 0x3F) << 8) | data[pos + 1]
            if target >= floor:
                raise DnsError("name-pointer-forward")  # the only way a loop could start
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise DnsError("name-pointer-hops")
            if after < 0:
                after = pos + 2
            pos = floor = target
            continue
        if n & 0xC0:
            raise DnsError("name-label-type")
        if n == 0:
            return ".".join(labels), (after if after >= 0 else pos + 1)
        wire += n + 1
        if wire > MAX_NAME_WIRE:
            raise DnsError("name-too-long")
        label = data[pos + 1 : pos + 1 + n]
        if len(label) != n:
            raise DnsError("name-truncated")
        if not _LABEL.fullmatch(label):
            raise DnsError("name-characters")
        labels.append(label.decode("ascii"))
        pos += 1 + n


def parse(data: bytes) -> Message:
    if len(data) > MAX_MESSAGE:
        raise DnsError("message-too-long")
    if len(data) < _HEADER.size:
        raise DnsError("header-short")
    ident, flags, qd, an, ns, ar = _HEADER.unpack_from(data, 0)
    if qd > MAX_QUESTIONS or max(an, ns, ar) > MAX_RECORDS:
        raise DnsError("too-many-entries")
    # Each question takes ≥ 5 bytes and each record ≥ 11: refuse counts the bytes cannot hold.
    if _HEADER.size + 5 * qd + 11 * (an + ns + ar) > len(data):
        raise DnsError("counts-exceed-message")
    off = _HEADER.size
    questions = []
    for _ in range(qd):
        name, off = read_name(data, off)
        if off + 4 > len(data):
            raise DnsError("question-truncated")
        qtype, qclass = struct.unpack_from("!HH", data, off)
        off += 4
        questions.append(Question(name, qtype, qclass))
    answers: list[Record] = []
    edns: int | None = None
    for section, count in ((0, an), (1, ns), (2, ar)):
        for _ in range(count):
            rec, off = _read_record(data, off)
            if section == 0:
                answers.append(rec)
            elif section == 2 and rec.rtype == TYPE_OPT:
                if edns is not None or rec.name:
                    raise DnsError("opt-record")
                edns = rec.rclass  # an OPT record's class field is the UDP payload size
    if off != len(data):
        raise DnsError("trailing-bytes")
    return Message(ident, flags, tuple(questions), tuple(answers), edns)


def _read_record(data: bytes, off: int) -> tuple[Record, int]:
    name, off = read_name(data, off)
    if off + _FIXED.size > len(data):
        raise DnsError("record-truncated")
    rtype, rclass, ttl, rdlen = _FIXED.unpack_from(data, off)
    off += _FIXED.size
    end = off + rdlen
    if end > len(data):
        raise DnsError("rdata-truncated")
    ttl = ttl if ttl < 0x80000000 else 0  # RFC 2181 §8: a TTL with the top bit set is 0
    if rtype == TYPE_A and rclass == CLASS_IN:
        if rdlen != 4:
            raise DnsError("a-rdata-length")
        return Record(name, rtype, rclass, ttl, address=int.from_bytes(data[off:end], "big")), end
    if rtype == TYPE_CNAME and rclass == CLASS_IN:
        target, after = read_name(data[:end], off)
        if after != end:
            raise DnsError("cname-rdata-length")
        return Record(name, rtype, rclass, ttl, target=target), end
    return Record(name, rtype, rclass, ttl), end


@dataclass(frozen=True)
class Chain:
    """Where a question's name leads in an answer: CNAME names in order, final A records."""

    names: tuple[str, ...]  # the question's name first, lowercased
    addresses: tuple[int, ...]
    ttl: int  # the smallest TTL along the way


def chain(message: Message, qname: str) -> Chain:
    """Follow CNAMEs from ``qname`` through the answer section in order, then take the A
    records of the last name that come after the last CNAME. A loop, two CNAMEs for one
    name, or a chain longer than ``MAX_CNAME_CHAIN`` is ``DnsError``."""
    current = qname.lower()
    names = [current]
    ttl: int | None = None
    start = 0
    for i, rec in enumerate(message.answers):
        if rec.rtype == TYPE_CNAME and rec.target is not None and rec.name.lower() == current:
            target = rec.target.lower()
            if target in names:
                raise DnsError("cname-loop")
            if len(names) > MAX_CNAME_CHAIN:
                raise DnsError("cname-chain-too-long")
            names.append(target)
            current = target
            ttl = rec.ttl if ttl is None else min(ttl, rec.ttl)
            start = i + 1
        elif rec.rtype == TYPE_CNAME and rec.name.lower() in names[:-1]:
            raise DnsError("cname-conflict")
    addresses: list[int] = []
    for rec in message.answers[start:]:
        if rec.address is not None and rec.name.lower() == current:
            if rec.address not in addresses:
                addresses.append(rec.address)
            ttl = rec.ttl if ttl is None else min(ttl, rec.ttl)
    return Chain(tuple(names), tuple(addresses), ttl or 0)


# --- building ---------------------------------------------------------------------------


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.split(".") if name else []:
        raw = label.encode("ascii")
        if not _LABEL.fullmatch(raw):
            raise DnsError("name-characters")
        out += bytes((len(raw),)) + raw
    out.append(0)
    if len(out) > MAX_NAME_WIRE:
        raise DnsError("name-too-long")
    return bytes(out)


def build_query(ident: int, name: str, qtype: int = TYPE_A) -> bytes:
    """A recursive query for ``name`` with an EDNS OPT record (payload ``EDNS_PAYLOAD``)."""
    opt = b"\0" + _FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, 0, 0)
    return (
        _HEADER.pack(ident, FLAG_RD, 1, 0, 0, 1)
        + encode_name(name)
        + struct.pack("!HH", qtype, CLASS_IN)
        + opt
    )


def build_response(
    query: Message, rcode: int, addresses: tuple[int, ...] = (), ttl: int = 0
) -> bytes:
    """The gateway's answer to the guest: the question echoed, then A records owned by the
    question's name (a CNAME chain is flattened), as many as fit in 512 bytes."""
    flags = FLAG_QR | FLAG_RA | (query.flags & FLAG_RD) | (rcode & 0xF)
    if len(query.questions) != 1:
        return _HEADER.pack(query.id, flags, 0, 0, 0, 0)
    q = query.questions[0]
    question = encode_name(q.name) + struct.pack("!HH", q.qtype, q.qclass)
    room = (GUEST_MAX_ANSWER - _HEADER.size - len(question)) // (2 + _FIXED.size + 4)
    addresses = addresses[: max(room, 0)]
    body = b"".join(
        struct.pack("!H", 0xC000 | _HEADER.size)
        + _FIXED.pack(TYPE_A, CLASS_IN, ttl, 4)
        + a.to_bytes(4, "big")
        for a in addresses
    )
    return _HEADER.pack(query.id, flags, 1, len(addresses), 0, 0) + question + body
