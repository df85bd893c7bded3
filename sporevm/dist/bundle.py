"""Spore bundles (format ``spore-bundle/v1``): the top-level file, identity, cross-checks.

A bundle is a directory (or the same files in a blob store or OCI artifact)::

    bundle.json             parent manifest id, children ids -> manifest paths, index names
    manifests/<hex>.json    the exact canonical spore manifests, named by BLAKE3 id
    chunkpack.index.json    object id -> [pack, offset, size]; every pack's size and sha256
    packs/NNNNNN.pack       distinct chunks and state objects, concatenated raw
    rootfs.index.json       every ext4 image's BLAKE3 and size; its segments' sizes and sha256
    rootfs/NNNNNN.seg       the images, cut into segments

Identity: sha256 over a domain string and, for each *metadata* file in
canonical order (``bundle.json``, ``chunkpack.index.json``,
``rootfs.index.json``, then the manifests by name), its path, size and bytes,
length-prefixed. Packs and segments are bound through their sha256 in the
indexes, so a pull verifies the identity before fetching any of them. The
format is documented in docs/bundle.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sporevm.dist import chunkpack, rootfs_artifact
from sporevm.dist.docjson import (
    B3,
    BundleError,
    canonical,
    load,
    obj,
    require_canonical,
    string,
    validate,
)
from sporevm.atomic import DirKind
from sporevm.errors import SporeError
from sporevm.spore import manifest

FORMAT = "spore-bundle/v1"
NAME = "bundle.json"
DOMAIN = b"spore-bundle/v1\0"
MAX_BUNDLE_JSON = 1024 * 1024
MAX_CHILDREN = 1024
MAX_METADATA = 256 * 1024 * 1024  # all metadata files of one bundle together
_MANIFEST_PATH = r"^manifests/[0-9a-f]{64}\.json$"
# ``pack --out`` replaces an existing directory only if it is empty or one of these.
BUNDLE_DIR = DirKind(
    "bundle directory",
    NAME,
    frozenset({NAME, chunkpack.NAME, rootfs_artifact.NAME, "manifests", "packs", "rootfs"}),
)

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **obj(
        {
            "format": {"const": FORMAT},
            "parent": string(B3),
            "children": {"type": "array", "maxItems": MAX_CHILDREN, "items": string(B3)},
            "manifests": {
                "type": "object",
                "maxProperties": MAX_CHILDREN + 1,
                "propertyNames": {"pattern": B3},
                "additionalProperties": string(_MANIFEST_PATH),
            },
            "chunkpack": {"const": chunkpack.NAME},
            "rootfs": {"const": rootfs_artifact.NAME},
        }
    ),
}


def manifest_name(mid: str) -> str:
    return f"manifests/{mid.removeprefix('blake3:')}.json"


@dataclass(frozen=True)
class BundleDoc:
    parent: str
    children: tuple[str, ...]  # sorted, distinct, never the parent

    def manifest_ids(self) -> list[str]:
        return [self.parent, *self.children]


def to_document(doc: BundleDoc) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "parent": doc.parent,
        "children": list(doc.children),
        "manifests": {m: manifest_name(m) for m in doc.manifest_ids()},
        "chunkpack": chunkpack.NAME,
        "rootfs": rootfs_artifact.NAME,
    }


def _check(doc: BundleDoc, raw_manifests: Mapping[str, str], what: str) -> None:
    for i, c in enumerate(doc.children):
        if i and c <= doc.children[i - 1]:
            raise BundleError(f"{what}: at children.{i}: children must be sorted, each once")
        if c == doc.parent:
            raise BundleError(f"{what}: at children.{i}: the parent cannot be its own child")
    want = {m: manifest_name(m) for m in doc.manifest_ids()}
    if dict(raw_manifests) != want:
        raise BundleError(
            f"{what}: at manifests: must map exactly the parent and the children "
            "to manifests/<hex>.json"
        )


def encode(doc: BundleDoc, what: str = NAME) -> bytes:
    d = to_document(doc)
    validate(d, SCHEMA, what)
    _check(doc, d["manifests"], what)
    return canonical(d)


def decode(data: bytes, what: str = NAME) -> BundleDoc:
    d = load(data, what, MAX_BUNDLE_JSON, FORMAT)
    validate(d, SCHEMA, what)
    doc = BundleDoc(d["parent"], tuple(d["children"]))
    _check(doc, d["manifests"], what)
    require_canonical(to_document(doc), data, what)
    return doc


def metadata_names(doc: BundleDoc) -> list[str]:
    """The metadata files in identity order."""
    return [
        NAME,
        chunkpack.NAME,
        rootfs_artifact.NAME,
        *sorted(manifest_name(m) for m in doc.manifest_ids()),
    ]


def identity(files: list[tuple[str, bytes]]) -> str:
    """``sha256:`` over the domain and each (path, size, bytes), length-prefixed."""
    h = hashlib.sha256(DOMAIN)
    for name, data in files:
        raw = name.encode("ascii")
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return "sha256:" + h.hexdigest()


def read_metadata(read: Callable[[str, int], bytes]) -> tuple[list[tuple[str, bytes]], str]:
    """Every metadata file, each read with a bound, and the bundle digest over them.

    ``read(name, limit)`` returns the whole file or raises; only ``bundle.json``
    is parsed here (it names the others), everything else is parsed by
    ``assemble`` after the caller has compared the digest with its pin.
    """
    first = read(NAME, MAX_BUNDLE_JSON)
    doc = decode(first)
    limits = {chunkpack.NAME: chunkpack.MAX_INDEX, rootfs_artifact.NAME: rootfs_artifact.MAX_INDEX}
    files = [(NAME, first)]
    total = len(first)
    for name in metadata_names(doc)[1:]:
        data = read(name, limits.get(name, manifest.MAX_MANIFEST))
        total += len(data)
        if total > MAX_METADATA:
            raise BundleError(f"bundle metadata exceeds {MAX_METADATA} bytes; refusing it")
        files.append((name, data))
    return files, identity(files)


@dataclass(frozen=True)
class Metadata:
    doc: BundleDoc
    chunkpack: chunkpack.ChunkpackIndex
    rootfs: rootfs_artifact.RootfsIndex
    manifests: dict[str, tuple[manifest.Manifest, bytes]]  # id -> (decoded, exact bytes)
    files: tuple[tuple[str, bytes], ...]  # identity order
    digest: str

    def select(self, child: str | None) -> str:
        """The manifest id to materialize: the parent, or one spore by id (the parent's
        own id selects the parent)."""
        if child is None or child == self.doc.parent:
            return self.doc.parent
        if child not in self.doc.children:
            raise BundleError(
                f"--child {child[:80]}: not a child of this bundle "
                f"({len(self.doc.children)} children; `spore inspect BUNDLE` "
                "lists them)"
            )
        return child


def objects_of(m: manifest.Manifest, what: str) -> dict[str, int]:
    """Every stored object a manifest needs: id -> size (chunks first, address order)."""
    out: dict[str, int] = {}
    for cid, size, name in manifest.objects(m):  # chunks, state objects, rootfs block table
        if out.setdefault(cid, size) != size:
            raise BundleError(
                f"{what}: {name} has size {size}, but the same id is used with size {out[cid]}"
            )
    return out


def assemble(files: list[tuple[str, bytes]]) -> Metadata:
    """Parse and cross-check every metadata file (in identity order, as read_metadata gives)."""
    by_name = dict(files)
    doc = decode(by_name[NAME])
    if [n for n, _ in files] != metadata_names(doc):
        raise BundleError("bundle metadata: files are not the ones bundle.json names")
    cp = chunkpack.decode(by_name[chunkpack.NAME])
    rf = rootfs_artifact.decode(by_name[rootfs_artifact.NAME])
    manifests: dict[str, tuple[manifest.Manifest, bytes]] = {}
    needed: dict[str, int] = {}
    images: set[tuple[str, int]] = set()
    for mid in doc.manifest_ids():
        name = manifest_name(mid)
        data = by_name[name]
        if manifest.manifest_id(data) != mid:
            raise BundleError(
                f"{name}: manifest id is {manifest.manifest_id(data)}, bundle.json "
                f"says {mid}; the manifest was modified"
            )
        try:
            m = manifest.decode(data, name)
        except SporeError as exc:
            raise BundleError(str(exc)) from None
        manifests[mid] = (m, data)
        images.add((m.rootfs.digest, m.rootfs.size))
        for cid, size in objects_of(m, name).items():
            if needed.setdefault(cid, size) != size:
                raise BundleError(
                    f"{name}: object {cid} has size {size} here and "
                    f"{needed[cid]} in another manifest"
                )
    for cid, size in needed.items():
        pl = cp.objects.get(cid)
        if pl is None:
            raise BundleError(f"{chunkpack.NAME}: object {cid} a manifest needs is not packed")
        if pl.size != size:
            raise BundleError(
                f"{chunkpack.NAME}: object {cid} is {pl.size} bytes; the manifests say {size}"
            )
    if len(cp.objects) != len(needed):
        raise BundleError(
            f"{chunkpack.NAME}: packs {len(cp.objects) - len(needed)} object(s) no manifest uses"
        )
    if {(i.digest, i.size) for i in rf.images} != images:
        raise BundleError(
            f"{rootfs_artifact.NAME}: images do not match the manifests' rootfs digests and sizes"
        )
    return Metadata(doc, cp, rf, manifests, tuple(files), identity(files))
