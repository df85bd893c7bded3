"""What the store already holds for one build: read-only questions every task asks.

Up-to-date checks and actions share these answers so that doit and ``spore build`` agree
on what is done; nothing here writes the store.
"""

from __future__ import annotations

from pathlib import Path

from sporevm.build import cachekeys, lockfile
from sporevm.build.context import BuildInputs
from sporevm.build.guest import GuestPlatform, lookup_guest
from sporevm.build.imagefs import RootfsRecord, with_table
from sporevm.build.oci import ResolvedImage
from sporevm.build.tasks import Handoff
from sporevm.errors import LockMismatchError, SporeError
from sporevm.spore import manifest
from sporevm.spore.chunks import ChunkStore
from sporevm.spore.sporedir import ID_FILE, MANIFEST


class Cached:
    def __init__(self, inputs: BuildInputs, handoff: Handoff) -> None:
        self.inputs = inputs
        self.handoff = handoff
        self._looked_up: GuestPlatform | None = None

    # -- the base image, by the lock ---------------------------------------
    def locked_entry(self) -> lockfile.LockedImage | None:
        i = self.inputs
        entry = lockfile.load(i.lock_path).find(i.sf.base.image, i.platform)
        if entry is not None and i.ref.digest and i.ref.digest != entry.digest:
            return None  # the Sporefile pins another digest than the lock: re-resolve
        return entry

    def entry(self) -> lockfile.LockedImage:
        entry = self.locked_entry()
        if entry is None:
            raise LockMismatchError(
                f"{self.inputs.lock_path}: no entry for {self.inputs.sf.base.image}; "
                "run without --locked to resolve it"
            )
        return entry

    def image(self) -> ResolvedImage:
        return self.inputs.client.load_cached(self.entry().digest, self.inputs.platform)

    # -- rootfs and guest platform -----------------------------------------
    def rootfs_key(self) -> str:
        return cachekeys.rootfs_key(self.image(), self.inputs.files)

    def rootfs(self) -> RootfsRecord | None:
        try:
            rec = RootfsRecord.lookup(self.inputs.store, self.rootfs_key())
            # A record from before block tables gets its table here (one read of the image).
            return None if rec is None else with_table(self.inputs.store, rec)
        except SporeError:
            return None

    def guest_platform(self) -> GuestPlatform | None:
        """The one the guest task made in this build, else the store's (looked up once:
        it hashes the kernel inputs)."""
        made = self.handoff.get(GuestPlatform)
        if made is not None:
            return made
        if self._looked_up is None:
            self._looked_up = lookup_guest(self.inputs.store, self.inputs.kernel)
        return self._looked_up

    # -- step snapshots and the spore --------------------------------------
    def chain_keys(self) -> list[str] | None:
        """Boot key followed by every step key, or None while inputs are missing."""
        record, guest = self.rootfs(), self.guest_platform()
        if record is None or guest is None:
            return None
        boot = cachekeys.boot_key(self.inputs.sf, record.digest, guest)
        return [boot, *cachekeys.step_keys(self.inputs.sf, boot)]

    def step_snapshot(self, key: str) -> str | None:
        """The manifest id recorded for a step key, if it and all it names are in the store."""
        rec = self.inputs.store.get_key("step", key)
        mid = rec.get("manifest") if rec else None
        if not isinstance(mid, str):
            return None
        chunks = ChunkStore(self.inputs.store)
        try:
            # The bytes are the chunk named mid (get checks the hash), which this store's
            # build encoded (encode validates) before recording mid: the schema pass need
            # not run again, and an unchanged build need not load jsonschema.
            m = manifest.decode_vouched(chunks.get(mid), mid, mid)
        except SporeError:
            return None
        return mid if _complete(chunks, m) else None

    def cached_prefix(self, keys: list[str]) -> tuple[int, str | None]:
        """The deepest step with a usable snapshot (how many steps it holds), and its
        manifest id. A step's snapshot holds every step before it, so the search goes
        from the last step down and the earlier ones need not be in the store (a
        remote cache may have installed only the deepest)."""
        if self.inputs.options.no_cache:
            return 0, None
        for n in range(len(keys) - 1, 0, -1):
            mid = self.step_snapshot(keys[n])
            if mid is not None:
                return n, mid
        return 0, None

    def published_spore(self, last_step_key: str) -> str | None:
        """The manifest id of the spore in output.spore if it is this chain's and whole."""
        i = self.inputs
        rec = i.store.get_key("spore", cachekeys.spore_key(i.sf, last_step_key))
        spore: Path = i.sf.output.spore
        if rec is None or not (spore / MANIFEST).is_file():
            return None
        mid = rec.get("manifest")
        try:
            data = (spore / MANIFEST).read_bytes()
            ident = (spore / ID_FILE).read_text().strip()
            if not isinstance(mid, str) or ident != mid:
                return None
            # Only the very bytes the build published (id recorded) decode, as above.
            m = manifest.decode_vouched(data, mid, str(spore / MANIFEST))
        except (OSError, UnicodeDecodeError, SporeError):
            return None
        return mid if _complete(ChunkStore(i.store), m) else None


def _complete(chunks: ChunkStore, m: manifest.Manifest) -> bool:
    return all(chunks.has(c) for c in m.memory.stored()) and all(
        chunks.has(o.digest) for o in m.state.values()
    )
