"""From a fetched image to a published rootfs: apply layers, make ext4, record the key.

The rootfs key names everything the image bytes depend on; when any of it
changes, the key changes and the rootfs is rebuilt (a conservative miss,
never a stale hit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sporevm.atomic import atomic_output
from sporevm.build.cachekeys import ROOTFS_BUILDER, rootfs_key
from sporevm.build.fileslayer import MEDIA_TYPE as FILES_MEDIA_TYPE
from sporevm.build.fileslayer import FilesLayer
from sporevm.build.layers import Layer, apply_layers
from sporevm.build.oci import OCIClient, ResolvedImage, parse_ref
from sporevm.build.progress import Reporter
from sporevm.build.rootfs import make_ext4
from sporevm.errors import LayerError, StoreError
from sporevm.spore.blocktable import (
    MAX_BLOCK,
    MIN_BLOCK,
    BlockTableError,
    Hashed,
    hash_image,
    install_rootfs,
)
from sporevm.spore.chunks import ChunkStore
from sporevm.spore.manifest import RootfsTable
from sporevm.store import BLAKE3_DIGEST, SHA256_DIGEST, Store


@dataclass(frozen=True)
class RootfsRecord:
    digest: str  # blake3:<hex> of the ext4 bytes
    size: int
    path: Path
    image: str  # the image manifest digest it was built from
    key: str
    builder: str
    # Its block table in the chunk store (blocktable.py); None only for a record
    # written before tables existed, until ``ensure_rootfs`` adds it.
    table: RootfsTable | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "digest": self.digest,
            "size": self.size,
            "path": str(self.path),
            "image": self.image,
            "key": self.key,
            "builder": self.builder,
        }
        if self.table is not None:
            doc["table"] = {"digest": self.table.digest, "block_size": self.table.block_size}
        return doc

    @classmethod
    def lookup(cls, store: Store, key: str) -> RootfsRecord | None:
        """The cached rootfs for ``key``, or None if absent or inconsistent."""
        rec = store.get_key("rootfs", key)
        base = {"digest", "size", "image", "builder"}
        if rec is None or set(rec) not in (base, base | {"table", "block_size"}):
            return None
        digest, size = rec["digest"], rec["size"]
        if not (isinstance(digest, str) and BLAKE3_DIGEST.fullmatch(digest)):
            return None
        table = None
        if "table" in rec:
            tdig, bs = rec["table"], rec["block_size"]
            if not (isinstance(tdig, str) and BLAKE3_DIGEST.fullmatch(tdig)):
                return None
            if not (isinstance(bs, int) and MIN_BLOCK <= bs <= MAX_BLOCK):
                return None
            table = RootfsTable(tdig, bs)
        if not (
            isinstance(size, int)
            and isinstance(rec["image"], str)
            and SHA256_DIGEST.fullmatch(rec["image"])
            and isinstance(rec["builder"], str)
        ):
            return None
        path = store.rootfs_path(digest)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        if not path.is_file() or path.is_symlink() or st.st_size != size:
            return None
        store.touch(path)
        return cls(digest, size, path, rec["image"], key, rec["builder"], table)


def _put_record(store: Store, rec: RootfsRecord) -> None:
    doc: dict[str, Any] = {
        "digest": rec.digest,
        "size": rec.size,
        "image": rec.image,
        "builder": rec.builder,
    }
    if rec.table is not None:
        doc.update(table=rec.table.digest, block_size=rec.table.block_size)
    store.put_key("rootfs", rec.key, doc)


def _store_table(store: Store, hashed: Hashed) -> RootfsTable:
    digest = ChunkStore(store).put(hashed.table, expect=hashed.table_digest)
    return RootfsTable(digest, hashed.block_size)


def with_table(store: Store, rec: RootfsRecord) -> RootfsRecord | None:
    """``rec`` with its block table in the chunk store: kept if there, else made again
    from the store's image in one read that also re-checks the image's digest (a record
    from before tables, or a table pruned away). None if the image is not intact."""
    if rec.table is not None and ChunkStore(store).has(rec.table.digest):
        return rec
    try:
        fd = os.open(rec.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        hashed = hash_image(fd)
    except (OSError, BlockTableError):
        return None
    finally:
        os.close(fd)
    if (hashed.digest, hashed.size) != (rec.digest, rec.size):
        return None  # rot: rebuild it
    rec = replace(rec, table=_store_table(store, hashed))
    _put_record(store, rec)
    return rec


def ensure_rootfs(
    store: Store,
    image: ResolvedImage,
    reporter: Reporter,
    *,
    force: bool = False,
    files: FilesLayer | None = None,
) -> RootfsRecord:
    """The rootfs of ``image`` with the Sporefile's ``files`` applied last (as one more layer)."""
    key = rootfs_key(image, files)
    previous = RootfsRecord.lookup(store, key)
    if previous is not None and not force:
        found = with_table(store, previous)
        if found is not None:
            return found
    layers = [Layer(d.digest, d.media_type, store.blob_path(d.digest)) for d in image.layers]
    for layer in layers:
        if not store.has_blob(layer.digest):
            raise StoreError(
                f"layer {layer.digest} of {image.manifest_digest} is not in the store; "
                "rerun the build to fetch it"
            )
    total = sum(d.size for d in image.layers)
    with store.staging_dir("rootfs") as stage:
        if files is not None:
            files_digest, files_size = files.write_file(stage / "files.tar")
            layers.append(Layer(files_digest, FILES_MEDIA_TYPE, stage / "files.tar"))
            total += files_size
        tree = stage / "tree"
        try:
            apply_layers(layers, tree, progress=reporter.byte_counter("apply layers", total))
        except LayerError as exc:
            named = files.explain(exc, len(layers)) if files is not None else None
            if named is not None:
                raise named from None
            raise
        out = stage / "rootfs.ext4"
        make_ext4(tree, image.manifest_digest, out)
        hashed = install_rootfs(store, out)
        table = _store_table(store, hashed)
    digest = hashed.digest
    if previous is not None and previous.digest != digest:
        reporter.warn(
            f"rebuilt rootfs {digest} differs from the cached {previous.digest} for the "
            "same inputs: the rootfs build is not reproducible on this host"
        )
    rec = RootfsRecord(
        digest,
        hashed.size,
        store.rootfs_path(digest),
        image.manifest_digest,
        key,
        ROOTFS_BUILDER,
        table,
    )
    _put_record(store, rec)
    return rec


def export_rootfs(record: RootfsRecord, dest: Path) -> None:
    """Copy a store rootfs to a user path atomically (``spore rootfs -o``)."""
    with open(record.path, "rb") as src, atomic_output(dest) as out:
        while block := src.read(1 << 20):
            out.write(block)


def build_rootfs_record(
    ref_text: str,
    store: Store,
    reporter: Reporter,
    *,
    platform: str,
    insecure_registries: frozenset[str] = frozenset(),
) -> RootfsRecord:
    """Resolve, fetch and build (cached) the rootfs of one image, outside any Sporefile."""
    ref = parse_ref(ref_text, Path.cwd())
    client = OCIClient(store, insecure_registries=insecure_registries)
    with store.lock():
        digest = client.resolve(ref, platform)
        image = client.fetch(ref.pinned(digest), digest, platform, reporter.fetch_progress)
        return ensure_rootfs(store, image, reporter)


def build_rootfs(
    ref_text: str,
    dest: Path,
    store: Store,
    reporter: Reporter,
    *,
    platform: str,
    insecure_registries: frozenset[str] = frozenset(),
) -> RootfsRecord:
    """`spore rootfs REF -o FILE`: build (cached) and export one rootfs."""
    with store.lock():  # until the copy is done: a prune must not take the entry first
        record = build_rootfs_record(
            ref_text, store, reporter, platform=platform, insecure_registries=insecure_registries
        )
        export_rootfs(record, dest)
    return record
