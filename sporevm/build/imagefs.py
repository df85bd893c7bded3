"""From a fetched image to a published rootfs: apply layers, make ext4, record the key.

The rootfs key names everything the image bytes depend on; when any of it
changes, the key changes and the rootfs is rebuilt (a conservative miss,
never a stale hit).
"""

from __future__ import annotations

from dataclasses import dataclass
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
from sporevm.store import BLAKE3_DIGEST, SHA256_DIGEST, Store


@dataclass(frozen=True)
class RootfsRecord:
    digest: str  # blake3:<hex> of the ext4 bytes
    size: int
    path: Path
    image: str  # the image manifest digest it was built from
    key: str
    builder: str

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "size": self.size,
            "path": str(self.path),
            "image": self.image,
            "key": self.key,
            "builder": self.builder,
        }

    @classmethod
    def lookup(cls, store: Store, key: str) -> RootfsRecord | None:
        """The cached rootfs for ``key``, or None if absent or inconsistent."""
        rec = store.get_key("rootfs", key)
        if rec is None or set(rec) != {"digest", "size", "image", "builder"}:
            return None
        digest, size = rec["digest"], rec["size"]
        if not (isinstance(digest, str) and BLAKE3_DIGEST.fullmatch(digest)):
            return None
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
        return cls(digest, size, path, rec["image"], key, rec["builder"])


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
        return previous
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
        digest, size = store.install_rootfs(out)
    if previous is not None and previous.digest != digest:
        reporter.warn(
            f"rebuilt rootfs {digest} differs from the cached {previous.digest} for the "
            "same inputs: the rootfs build is not reproducible on this host"
        )
    store.put_key(
        "rootfs",
        key,
        {"digest": digest, "size": size, "image": image.manifest_digest, "builder": ROOTFS_BUILDER},
    )
    return RootfsRecord(
        digest, size, store.rootfs_path(digest), image.manifest_digest, key, ROOTFS_BUILDER
    )


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
