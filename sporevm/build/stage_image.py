"""The image stages: resolve the base image into the lock, fetch it, build the rootfs.

resolve:base ─► fetch:base ─► rootfs
"""

from __future__ import annotations

from sporevm.build import lockfile
from sporevm.build.cached import Cached
from sporevm.build.context import BuildInputs
from sporevm.build.imagefs import RootfsRecord, ensure_rootfs
from sporevm.build.tasks import Handoff, TaskSpec
from sporevm.errors import LockMismatchError, SporeError


class ImageStages:
    def __init__(self, inputs: BuildInputs, cached: Cached, handoff: Handoff) -> None:
        self.inputs, self.cached, self.handoff = inputs, cached, handoff

    def tasks(self) -> list[TaskSpec]:
        i = self.inputs
        return [
            TaskSpec(
                "resolve:base",
                f"resolve {i.sf.base.image} ({i.platform}) to a digest, lock it",
                self.resolve,
                self.resolve_uptodate,
            ),
            TaskSpec(
                "fetch:base",
                "fetch manifest, config and layers into the store, sha256-verified",
                self.fetch,
                self.fetch_uptodate,
                ("resolve:base",),
            ),
            TaskSpec(
                "rootfs",
                "apply the layers path-safely and build the reproducible ext4 rootfs",
                self.rootfs,
                self.rootfs_uptodate,
                ("fetch:base",),
            ),
        ]

    # -- resolve ------------------------------------------------------------
    def resolve_uptodate(self) -> bool:
        return not self.inputs.options.update_lock and self.cached.locked_entry() is not None

    def resolve(self) -> None:
        i = self.inputs
        old = self.cached.locked_entry() if not i.options.update_lock else None
        digest = i.client.resolve(i.ref, i.platform)
        image = i.client.fetch(i.ref, digest, i.platform, layers=False)
        entry = lockfile.LockedImage(i.sf.base.image, i.platform, digest, image.manifest_digest)
        lock = lockfile.load(i.lock_path)
        if lock.find(entry.image, entry.platform) == entry:
            return
        if i.options.locked:
            was = old.digest if old else "nothing"
            raise LockMismatchError(
                f"{i.lock_path}: --locked, but {i.sf.base.image} ({i.platform}) "
                f"resolves to {digest} and the lock has {was}; "
                "run without --locked to update the lock"
            )
        lockfile.save(i.lock_path, lock.with_image(entry))

    # -- fetch --------------------------------------------------------------
    def fetch_uptodate(self) -> bool:
        try:
            image = self.cached.image()
        except SporeError:
            return False
        return all(self.inputs.store.has_blob(layer.digest) for layer in image.layers)

    def fetch(self) -> None:
        i = self.inputs
        entry = self.cached.entry()
        if i.options.no_cache:
            self._reverify_cached()
        image = i.client.fetch(
            i.ref.pinned(entry.digest), entry.digest, i.platform, i.reporter.fetch_progress
        )
        if image.manifest_digest != entry.manifest:
            raise LockMismatchError(
                f"{i.lock_path}: {entry.digest} selects manifest "
                f"{image.manifest_digest} for {i.platform}, the lock says "
                f"{entry.manifest}; delete the lock entry to re-resolve"
            )

    def _reverify_cached(self) -> None:
        """--no-cache: re-hash every cached blob of the image; drop any that no longer match."""
        try:
            image = self.cached.image()
        except SporeError:
            return
        for digest in (image.config_digest, *(layer.digest for layer in image.layers)):
            if self.inputs.store.evict_if_corrupt(digest):
                self.inputs.reporter.warn(f"store entry {digest} was corrupt; fetching it again")

    # -- rootfs -------------------------------------------------------------
    def rootfs_uptodate(self) -> bool:
        return self.cached.rootfs() is not None

    def rootfs(self) -> None:
        i = self.inputs
        record: RootfsRecord = ensure_rootfs(
            i.store, self.cached.image(), i.reporter, force=i.options.no_cache, files=i.files
        )
        self.handoff.give(record)
