"""The spore manifest (`manifest.json`, format ``spore/v1``): model, canonical bytes, checks.

A manifest names everything a restore needs and nothing else: the platform
contract the host must satisfy exactly, the rootfs, the memory index, the
state objects, the generation and where it came from. Its identity is BLAKE3
of its canonical bytes, and ``decode`` accepts only those bytes (re-encoding
must reproduce the input), so a manifest has exactly one byte form and one id.

Manifests may come from untrusted peers: decoding is bounded, strict (no
duplicate keys, no floats, no unknown fields or versions) and checked by the
JSON Schema below plus the cross-field rules it cannot express. The format is
documented field by field in docs/spore-format.md.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, fields
from typing import Any

import blake3

from sporevm.errors import SporeError
from sporevm.spore import blocktable
from sporevm.spore.chunks import CHUNK, MAX_OBJECT, ChunkError, ChunkStore, MemoryIndex
from sporevm.spore.platform import BOARD_MODELS, DEVICE_MODEL_NET, SLOT_BLK
from sporevm.strictjson import (
    ecma_pattern_keyword,
    load_versioned_object,
)

FORMAT = "spore/v1"
MAX_MANIFEST = 16 * 1024 * 1024
MAX_MEMORY = 256 * 1024**3  # 131072 chunk entries: a worst-case index stays well under 16 MiB
MAX_VCPUS = 64
MAX_ANNOTATIONS = 64
MAX_STATE_OBJECTS = 1024
MAX_STEPS = 256
MAX_NET_ENTRIES = 256  # egress/policy.py MAX_RULES
MAX_NET_ENTRY = 260  # and MAX_ENTRY_LEN
ROOTFS_KIND = "ext4-immutable"


class ManifestError(SporeError):
    """A spore manifest is malformed, non-canonical, or names content that is not there."""


class PlatformMismatchError(ManifestError):
    """This host cannot satisfy the spore's platform contract."""


_B3 = "^blake3:[0-9a-f]{64}$"
_SHA = "^sha256:[0-9a-f]{64}$"
_VERSIONED = "^[a-z0-9][a-z0-9._-]{0,63}/[a-z0-9][a-z0-9._-]{0,31}$"  # "kvm-pvm/v1"
_NAME = "^[a-z0-9][a-z0-9._-]{0,63}(/[a-z0-9][a-z0-9._-]{0,63}){0,3}$"  # "vcpu/0"
_KEY = "^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
# The device models whose board has a NIC: a spore with network: names one of them.
_NIC_MODELS = frozenset(k for k, b in BOARD_MODELS.items() if b.net)
_UUID4 = "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


def _obj(props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": sorted(props),
        "additionalProperties": False,
    }


def _str(pattern: str) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern}


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://sporevm.dev/schemas/spore-manifest-v1.json",
    **_obj(
        {
            "format": {"const": FORMAT},
            "platform": _obj(
                {
                    "arch": {"const": "x86_64"},
                    "cpu_profile": _str(_VERSIONED),
                    "device_model": _str(_VERSIONED),
                    "memory": {**_int(CHUNK, MAX_MEMORY), "multipleOf": CHUNK},
                    "vcpus": _int(1, MAX_VCPUS),
                    "kernel": _str(_B3),
                    "initrd": _str(_B3),
                    # printable ASCII: what the kernel parses, no control characters
                    "cmdline": {"type": "string", "pattern": "^[ -~]*$", "maxLength": 4096},
                }
            ),
            "rootfs": _obj(
                {
                    "kind": {"const": ROOTFS_KIND},
                    "digest": _str(_B3),
                    "size": _int(1, 2**50),
                    "source_image": _str(_SHA),
                    "builder": _str(_VERSIONED),
                    "blk_slot": {"const": SLOT_BLK},
                    # Optional: absent in spores sealed before block tables existed (they
                    # keep their bytes and ids, and are verified whole before the VM).
                    "table": _obj(
                        {
                            "digest": _str(_B3),
                            "block_size": _int(blocktable.MIN_BLOCK, blocktable.MAX_BLOCK),
                        }
                    ),
                }
            ),
            "memory": _obj(
                {
                    "chunk_size": {"const": CHUNK},
                    "chunks": {
                        "type": "array",
                        "maxItems": MAX_MEMORY // CHUNK,
                        "items": {"anyOf": [{"type": "null"}, _str(_B3)]},
                    },
                }
            ),
            "state": _obj(
                {
                    "objects": {
                        "type": "object",
                        "maxProperties": MAX_STATE_OBJECTS,
                        "propertyNames": {"pattern": _NAME},
                        "additionalProperties": _obj(
                            {"digest": _str(_B3), "size": _int(0, MAX_OBJECT)}
                        ),
                    }
                }
            ),
            "generation": _obj(
                {
                    "id": _str(_UUID4),
                    "parent": {"anyOf": [{"type": "null"}, _str(_B3)]},
                    "index": _int(0, 2**20 - 1),
                    "count": _int(1, 2**20),
                }
            ),
            "annotations": {
                "type": "object",
                "maxProperties": MAX_ANNOTATIONS,
                "propertyNames": {"pattern": _KEY},
                "additionalProperties": {"type": "string", "maxLength": 4096},
            },
            # Optional: absent for a spore without a NIC (so older spores keep their
            # bytes and ids). The policy its VM ran under, canonical (sorted, unique);
            # `spore run --from` applies it again (docs/network.md).
            "network": _obj(
                {
                    "allow": {
                        "type": "array",
                        "maxItems": MAX_NET_ENTRIES,
                        "uniqueItems": True,
                        "items": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_NET_ENTRY,
                            "pattern": "^[a-z0-9_.:/-]+$",
                        },
                    }
                }
            ),
            "provenance": _obj(
                {
                    "sporefile": {"anyOf": [{"type": "null"}, _str(_B3)]},
                    "lock": {"anyOf": [{"type": "null"}, _str(_B3)]},
                    "steps": {
                        "type": "array",
                        "maxItems": MAX_STEPS,
                        "items": _str("^[0-9a-f]{64}$"),
                    },
                    "builder": _str(_VERSIONED),
                }
            ),
        }
    ),
}


SCHEMA["required"].remove("network")  # optional: no network, no NIC
SCHEMA["properties"]["rootfs"]["required"].remove("table")  # optional: older spores


@dataclass(frozen=True)
class PlatformContract:
    """What the host must provide, exactly, before a VM is created from the spore."""

    arch: str
    cpu_profile: str
    device_model: str
    memory: int
    vcpus: int
    kernel: str
    initrd: str
    cmdline: str


@dataclass(frozen=True)
class RootfsTable:
    """The rootfs block table (sporevm/spore/blocktable.py), a chunk-store object."""

    digest: str
    block_size: int

    def size(self, image_size: int) -> int:
        return blocktable.table_size(image_size, self.block_size)


@dataclass(frozen=True)
class RootfsRef:
    kind: str
    digest: str
    size: int
    source_image: str
    builder: str
    blk_slot: int
    table: RootfsTable | None = None  # None: a spore from before tables; verified whole


@dataclass(frozen=True)
class StateObject:
    digest: str
    size: int


@dataclass(frozen=True)
class Generation:
    id: str
    parent: str | None
    index: int
    count: int


@dataclass(frozen=True)
class Provenance:
    sporefile: str | None
    lock: str | None
    steps: tuple[str, ...]
    builder: str


@dataclass(frozen=True)
class Manifest:
    platform: PlatformContract
    rootfs: RootfsRef
    memory: MemoryIndex
    state: dict[str, StateObject]  # name -> object; treat as read-only
    generation: Generation
    annotations: dict[str, str]  # treat as read-only
    provenance: Provenance
    network: tuple[str, ...] | None = None  # allow entries, canonical; None: no NIC


# -- JSON -------------------------------------------------------------------------------------


def canonical(doc: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8 (not \\u escapes), integers only."""
    try:
        text = json.dumps(
            doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (UnicodeEncodeError, ValueError) as exc:  # lone surrogates, NaN
        raise ManifestError(f"manifest: cannot be encoded canonically ({exc})") from None


def manifest_id(data: bytes) -> str:
    """The identity of a manifest: BLAKE3 of its canonical bytes."""
    return "blake3:" + blake3.blake3(data).hexdigest()


def id_of(m: Manifest) -> str:
    """The id of a decoded manifest: decode accepts only canonical bytes, so re-encoding
    gives back exactly the bytes that were checked (no second read of the file)."""
    return manifest_id(canonical(to_document(m)))


@functools.cache
def _validator() -> Any:
    # Imported here: the VM monitor decodes only vouched manifests (decode_vouched) and
    # should not pay ~0.1 s of jsonschema import on every restore.
    import jsonschema.validators

    base = jsonschema.Draft202012Validator  # SCHEMA itself is checked by the tests
    cls = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        base, validators={"pattern": ecma_pattern_keyword}
    )
    return cls(SCHEMA)


def _where(err: Any) -> str:
    path = ".".join(str(p) for p in err.absolute_path)
    return path or "(top level)"


def _load(data: bytes, what: str) -> dict[str, Any]:
    doc = load_versioned_object(
        data, what, limit=MAX_MANIFEST, encoding="utf-8", fmt=FORMAT, error=ManifestError
    )
    _validate(doc, what)
    return doc


_CHUNK_RE = re.compile(_B3[1:-1])
_ID_LEN = len("blake3:") + 64
_CHUNK_LIST = re.compile(r"(?:blake3:[0-9a-f]{64}\n)*")


def _validate(doc: dict[str, Any], what: str) -> None:
    """SCHEMA, with memory.chunks items checked by hand: the same rule, ~100x faster.

    jsonschema costs ~90 us per chunk entry (anyOf + pattern): 3 s for a 64 GiB guest,
    which would dominate a restore that should take milliseconds.
    """
    mem = doc.get("memory")
    chunks = mem.get("chunks") if isinstance(mem, dict) else None
    if isinstance(mem, dict) and isinstance(chunks, list) and len(chunks) <= MAX_MEMORY // CHUNK:
        doc = {**doc, "memory": {**mem, "chunks": []}}
    else:
        chunks = None  # let the schema report it
    import jsonschema.exceptions

    err = jsonschema.exceptions.best_match(_validator().iter_errors(doc))
    if err is not None:
        raise ManifestError(f"{what}: at {_where(err)}: {err.message[:200]}")
    ids = [c for c in chunks or () if c is not None]
    # One regex pass in C over the joined ids; every id has the same length, so no item can
    # smuggle a newline and pose as two. The loop below only finds which entry is wrong.
    if all(isinstance(c, str) and len(c) == _ID_LEN for c in ids) and _CHUNK_LIST.fullmatch(
        "".join(c + "\n" for c in ids)
    ):
        return
    for i, cid in enumerate(chunks or ()):
        if cid is not None and not (isinstance(cid, str) and _CHUNK_RE.fullmatch(cid)):
            raise ManifestError(
                f"{what}: at memory.chunks.{i}: {str(cid)[:80]!r} is neither null nor a "
                "chunk id (blake3:<64 lowercase hex>)"
            )


# -- model <-> document -----------------------------------------------------------------------


def _check(m: Manifest, what: str) -> None:
    """Cross-field rules the schema cannot state."""
    p = m.platform
    if len(m.memory.chunks) * CHUNK != p.memory:
        raise ManifestError(
            f"{what}: memory.chunks has {len(m.memory.chunks)} entries; platform.memory "
            f"{p.memory} needs exactly {p.memory // CHUNK} (one per {CHUNK}-byte chunk)"
        )
    if m.network is not None:
        if list(m.network) != sorted(set(m.network)):
            raise ManifestError(f"{what}: network.allow is not sorted and unique")
        if p.device_model not in _NIC_MODELS:
            raise ManifestError(
                f"{what}: a spore with network: needs platform.device_model {DEVICE_MODEL_NET}"
            )
    elif p.device_model in _NIC_MODELS:
        raise ManifestError(
            f"{what}: platform.device_model {p.device_model} needs a network: entry"
        )
    if m.rootfs.table is not None:
        try:
            blocktable.check_geometry(m.rootfs.size, m.rootfs.table.block_size, "rootfs.table")
        except blocktable.BlockTableError as exc:
            raise ManifestError(f"{what}: {exc}") from None
    g = m.generation
    if g.index >= g.count:
        raise ManifestError(f"{what}: generation.index {g.index} is not below count {g.count}")


def to_document(m: Manifest) -> dict[str, Any]:
    def plain(obj: Any) -> dict[str, Any]:
        return {f.name: getattr(obj, f.name) for f in fields(obj)}

    rootfs = plain(m.rootfs)
    if m.rootfs.table is None:
        del rootfs["table"]  # absent, not null: older spores keep their bytes
    else:
        rootfs["table"] = plain(m.rootfs.table)
    doc = {
        "format": FORMAT,
        "platform": plain(m.platform),
        "rootfs": rootfs,
        "memory": {"chunk_size": m.memory.chunk_size, "chunks": list(m.memory.chunks)},
        "state": {"objects": {k: plain(v) for k, v in m.state.items()}},
        "generation": plain(m.generation),
        "annotations": dict(m.annotations),
        "provenance": {**plain(m.provenance), "steps": list(m.provenance.steps)},
    }
    if m.network is not None:
        doc["network"] = {"allow": list(m.network)}
    return doc


def from_document(doc: dict[str, Any], what: str = "manifest") -> Manifest:
    """Build a Manifest from a schema-valid document (``decode`` validates first)."""
    prov = doc["provenance"]
    m = Manifest(
        platform=PlatformContract(**doc["platform"]),
        rootfs=RootfsRef(
            **{k: v for k, v in doc["rootfs"].items() if k != "table"},
            table=RootfsTable(**doc["rootfs"]["table"]) if "table" in doc["rootfs"] else None,
        ),
        memory=MemoryIndex(doc["memory"]["chunk_size"], tuple(doc["memory"]["chunks"])),
        state={k: StateObject(**v) for k, v in doc["state"]["objects"].items()},
        generation=Generation(**doc["generation"]),
        annotations=dict(doc["annotations"]),
        provenance=Provenance(
            prov["sporefile"], prov["lock"], tuple(prov["steps"]), prov["builder"]
        ),
        network=tuple(doc["network"]["allow"]) if "network" in doc else None,
    )
    _check(m, what)
    return m


def encode(m: Manifest, what: str = "manifest") -> bytes:
    """Canonical bytes of a valid manifest; an invalid one is refused, never written."""
    doc = to_document(m)
    _validate(doc, what)
    _check(m, what)
    return canonical(doc)


def decode(data: bytes, what: str = "manifest") -> Manifest:
    """Parse and check a manifest; only its canonical byte form is accepted."""
    m = from_document(_load(data, what), what)
    if canonical(to_document(m)) != data:
        raise ManifestError(
            f"{what}: not in canonical form (sorted keys, no whitespace, raw UTF-8); "
            "the manifest was edited or produced by another tool"
        )
    return m


@functools.cache
def schema_fingerprint() -> str:
    """Names this code's schema pass: a record that some bytes passed it (sporedir's
    checked-manifest records) is valid only for the very schema that checked them."""
    return blake3.blake3(json.dumps(SCHEMA, sort_keys=True).encode()).hexdigest()


def decode_vouched(data: bytes, expect_id: str, what: str = "manifest") -> Manifest:
    """Decode bytes a trusted caller already passed through ``decode``.

    Only bytes whose id is ``expect_id`` are accepted, so they are exactly the bytes
    that were fully validated; what is skipped is the schema pass, not any check of
    content (cross-field rules and the canonical form are checked again).
    """
    if len(data) > MAX_MANIFEST:
        raise ManifestError(f"{what}: larger than {MAX_MANIFEST} bytes; refusing to parse it")
    got = manifest_id(data)
    if got != expect_id:
        raise ManifestError(
            f"{what}: changed since it was checked (id {got}, expected "
            f"{expect_id}); refusing to restore it"
        )
    try:
        doc = json.loads(data.decode("utf-8"))
        m = from_document(doc, what)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{what}: not a manifest this caller checked ({exc})") from None
    if canonical(to_document(m)) != data:
        raise ManifestError(f"{what}: not in canonical form")
    return m


# -- checks before a VM exists -----------------------------------------------------------------


def check_platform(m: Manifest, host: PlatformContract) -> None:
    """Fail, naming the first differing field, unless ``host`` is exactly the contract.

    The one exception is the device model: ``host`` names the model this host builds,
    and a host restores every model in ``BOARD_MODELS`` with the same NIC-ness (the
    monitor then builds that model's board)."""
    for f in fields(PlatformContract):
        want, have = getattr(m.platform, f.name), getattr(host, f.name)
        if f.name == "device_model":
            spore, ours = BOARD_MODELS.get(want), BOARD_MODELS.get(have)
            if spore is not None and ours is not None:
                if spore.net != ours.net:
                    raise PlatformMismatchError(
                        "the spore has a NIC (it was built with network:) but this VM has "
                        "none; restore it with its network (spore run --from applies it)"
                        if spore.net
                        else "the spore has no NIC but this VM was given one; "
                        "restore it without --net-allow"
                    )
                continue
            if spore is None:
                raise PlatformMismatchError(
                    f"spore needs platform.device_model = {_show(want)}, this host restores "
                    f"only {', '.join(sorted(BOARD_MODELS))}; rebuild the spore or restore "
                    "it with a sporevm that knows that model"
                )
        if want != have:
            raise PlatformMismatchError(
                f"spore needs platform.{f.name} = {_show(want)}, this host provides "
                f"{_show(have)}; restore it on a matching host or rebuild the spore"
            )


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def objects(m: Manifest) -> list[tuple[str, int, str]]:
    """Every chunk-store object the manifest names: (id, size, what), memory chunks first
    (address order, each distinct id once), then state objects, then the rootfs table."""
    out: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    for c, cid in enumerate(m.memory.chunks):
        if cid is None or cid in seen:
            continue
        seen.add(cid)
        out.append((cid, CHUNK, f"memory chunk {c} ({cid})"))
    for name, obj in sorted(m.state.items()):
        out.append((obj.digest, obj.size, f"state object {name!r} ({obj.digest})"))
    t = m.rootfs.table
    if t is not None:
        out.append((t.digest, t.size(m.rootfs.size), f"rootfs block table ({t.digest})"))
    return out


def verify_chunks(m: Manifest, store: ChunkStore, *, rehash: bool = True) -> None:
    """Every chunk-store object the manifest names is present (and, by default, intact).

    With ``rehash`` each entry is read and hashed (``spore verify``); without it only
    presence is checked and ``ChunkStore.get`` verifies each chunk when it is used.
    """
    for cid, size, what in objects(m):
        _one(store, cid, size, what, rehash)


def rootfs_table(m: Manifest, store: ChunkStore) -> blocktable.BlockTable | None:
    """The rootfs block table, fetched through the chunk store (re-hashed against the
    manifest's digest) and checked against the manifest's sizes; None for a spore
    sealed before tables, whose rootfs is verified whole instead."""
    t = m.rootfs.table
    if t is None:
        return None
    what = f"rootfs block table {t.digest}"
    try:
        data = store.get(t.digest, size=t.size(m.rootfs.size))
        return blocktable.BlockTable.from_table(
            data, block_size=t.block_size, image_size=m.rootfs.size
        )
    except (ChunkError, blocktable.BlockTableError) as exc:
        raise ManifestError(f"{what}: {exc}") from None


def _one(store: ChunkStore, cid: str, size: int, what: str, rehash: bool) -> None:
    if not store.has(cid):
        raise ManifestError(f"{what} is missing from the store {store.store.root}")
    if rehash:
        try:
            store.get(cid, size=size)
        except ChunkError as exc:
            raise ManifestError(f"{what}: {exc}") from None
