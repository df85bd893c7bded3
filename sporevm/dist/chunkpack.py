"""The chunk pack index (``chunkpack.index.json``, format ``spore-chunkpack/v1``).

A bundle stores every distinct memory chunk and state object once, concatenated
raw into numbered packs (``packs/000000.pack`` …, each ≤ 256 MiB). The index
maps each object id to ``[pack, offset, size]`` and lists every pack's size and
sha256, so a blob store or registry can verify a pack natively and a pull can
fetch only the packs it needs. Objects tile their pack exactly (no gaps, no
overlaps), which makes the index a pure function of the layout.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sporevm.dist.docjson import (
    PIECE_MAX,
    SHA,
    BundleError,
    canonical,
    integer,
    load,
    obj,
    require_canonical,
    string,
    validate,
)
from sporevm.spore.chunks import MAX_OBJECT

FORMAT = "spore-chunkpack/v1"
NAME = "chunkpack.index.json"
MAX_INDEX = 64 * 1024 * 1024
MAX_OBJECTS = 262_144  # 512 GiB of distinct 2 MiB chunks
_ID = re.compile(r"blake3:[0-9a-f]{64}")

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **obj(
        {
            "format": {"const": FORMAT},
            "packs": {
                "type": "array",
                "maxItems": MAX_OBJECTS,
                "items": obj(
                    {
                        "name": string(r"^packs/[0-9]{6}\.pack$"),
                        "size": integer(0, PIECE_MAX),
                        "sha256": string(SHA),
                    }
                ),
            },
            "objects": {"type": "object"},  # checked by hand below: jsonschema is ~100x slower
        }
    ),
}


def pack_name(i: int) -> str:
    return f"packs/{i:06d}.pack"


@dataclass(frozen=True)
class Pack:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Placement:
    pack: int
    offset: int
    size: int


@dataclass(frozen=True)
class ChunkpackIndex:
    packs: tuple[Pack, ...]
    objects: dict[str, Placement]  # treat as read-only

    @functools.cached_property
    def _by_pack(self) -> dict[int, list[tuple[str, Placement]]]:
        out: dict[int, list[tuple[str, Placement]]] = {}
        for cid, pl in sorted(self.objects.items(), key=lambda item: item[1].offset):
            out.setdefault(pl.pack, []).append((cid, pl))
        return out

    def contents(self, pack: int) -> list[tuple[str, Placement]]:
        """The objects of one pack in offset order (grouped once: packs x objects adds up)."""
        return list(self._by_pack.get(pack, ()))


def _check(index: ChunkpackIndex, what: str) -> None:
    if len(index.objects) > MAX_OBJECTS:
        raise BundleError(f"{what}: more than {MAX_OBJECTS} objects")
    for i, p in enumerate(index.packs):
        if p.name != pack_name(i):
            raise BundleError(f"{what}: at packs.{i}: name {p.name!r} must be {pack_name(i)!r}")
    per_pack: list[list[tuple[int, int, str]]] = [[] for _ in index.packs]
    for cid, pl in index.objects.items():
        if not _ID.fullmatch(cid):
            raise BundleError(
                f"{what}: at objects: {cid[:80]!r} is not a chunk id (blake3:<64 lowercase hex>)"
            )
        if not 0 <= pl.pack < len(index.packs):
            raise BundleError(f"{what}: at objects.{cid}: pack {pl.pack} does not exist")
        if not 0 <= pl.size <= MAX_OBJECT or pl.offset < 0:
            raise BundleError(
                f"{what}: at objects.{cid}: offset {pl.offset} / size {pl.size} "
                f"out of range (size 0..{MAX_OBJECT})"
            )
        per_pack[pl.pack].append((pl.offset, pl.size, cid))
    for i, items in enumerate(per_pack):
        end = 0
        for offset, size, cid in sorted(items):
            if offset != end:
                raise BundleError(
                    f"{what}: at objects.{cid}: offset {offset} leaves a gap or "
                    f"overlap in {pack_name(i)} (expected {end})"
                )
            end += size
        if end != index.packs[i].size:
            raise BundleError(
                f"{what}: at packs.{i}: size {index.packs[i].size} but its "
                f"objects cover {end} bytes"
            )


def to_document(index: ChunkpackIndex) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "packs": [{"name": p.name, "size": p.size, "sha256": p.sha256} for p in index.packs],
        "objects": {c: [p.pack, p.offset, p.size] for c, p in index.objects.items()},
    }


def encode(index: ChunkpackIndex, what: str = NAME) -> bytes:
    doc = to_document(index)
    validate(doc, SCHEMA, what)
    _check(index, what)
    return canonical(doc)


def _placement(value: Any, cid: str, what: str) -> Placement:
    if (
        not isinstance(value, list) or len(value) != 3 or not all(type(v) is int for v in value)
    ):  # bools are ints: refuse them too
        raise BundleError(
            f"{what}: at objects.{cid[:80]}: expected [pack, offset, size] (three integers)"
        )
    return Placement(value[0], value[1], value[2])


def decode(data: bytes, what: str = NAME) -> ChunkpackIndex:
    doc = load(data, what, MAX_INDEX, FORMAT)
    validate(doc, SCHEMA, what)
    raw = doc["objects"]
    if len(raw) > MAX_OBJECTS:
        raise BundleError(f"{what}: more than {MAX_OBJECTS} objects")
    index = ChunkpackIndex(
        packs=tuple(Pack(p["name"], p["size"], p["sha256"]) for p in doc["packs"]),
        objects={c: _placement(v, c, what) for c, v in raw.items()},
    )
    _check(index, what)
    require_canonical(to_document(index), data, what)
    return index


def plan(
    groups: Sequence[Sequence[tuple[str, int]]], limit: int = PIECE_MAX
) -> list[list[tuple[str, int]]]:
    """Lay objects out in packs: each distinct id once, in first-seen order.

    Each group (the parent's objects, then each child's) starts a new pack, so a
    child's private objects never share a pack with the parent's: a node that
    holds the parent fetches only the packs with what differs.
    """
    if not MAX_OBJECT <= limit <= PIECE_MAX:
        raise BundleError(f"pack size limit {limit} must be {MAX_OBJECT}..{PIECE_MAX}")
    seen: set[str] = set()
    packs: list[list[tuple[str, int]]] = []
    for group in groups:
        current: list[tuple[str, int]] = []
        used = 0
        for cid, size in group:
            if cid in seen:
                continue
            seen.add(cid)
            if current and used + size > limit:
                packs.append(current)
                current, used = [], 0
            current.append((cid, size))
            used += size
        if current:
            packs.append(current)
    return packs
