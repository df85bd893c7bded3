"""The build as a doit task graph generated from a Sporefile.

Every task is up to date exactly when the content it would produce is already
in the store under its content key; doit's own database only remembers task
history, never results, so a stale doit database cannot yield stale output.

    resolve:base ─► fetch:base ─► rootfs, guest ─► boot ─► steps ─► snapshot ─► verify
        ─► bundle ─► push

This module defines the tasks (``_Build``); driver.py runs them with doit.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import blake3
from doit.exceptions import TaskFailed

from sporevm.build import lockfile
from sporevm.build.fileslayer import FilesLayer, files_layer
from sporevm.build.guest import GuestPlatform, ensure_guest, lookup_guest
from sporevm.build.imagefs import RootfsRecord, ensure_rootfs, rootfs_key
from sporevm.build.oci import OCIClient, ResolvedImage, parse_ref
from sporevm.build.progress import Reporter
from sporevm.build.steps import StepResult, boot_key, run_checks, run_steps, step_keys
from sporevm.errors import LockMismatchError, SporeError
from sporevm.spore import manifest
from sporevm.spore.chunks import ChunkStore
from sporevm.spore.sporedir import ID_FILE, MANIFEST, read_spore, write_spore
from sporevm.sporefile import Sporefile
from sporevm.store import Store

if TYPE_CHECKING:  # the VM side is imported where a task runs a VM: a no-op build never does
    from sporevm.runtime.launcher import VmProcess


_T = TypeVar("_T")


def _needed(value: _T | None, what: str) -> _T:
    """A task's input that an earlier task makes (doit orders them; ``doit -s TASK`` or a
    store changed under the build can still leave it missing): one line, never an assert."""
    if value is None:
        raise SporeError(
            f"build: {what} is not available: the task that makes it did not run "
            "(run the whole graph; with doit, not -s)"
        )
    return value


@dataclass
class BuildOptions:
    locked: bool = False
    no_cache: bool = False
    update_lock: bool = False
    insecure_registries: frozenset[str] = frozenset()
    until: str | None = None  # stop after this task (and what it depends on)


@dataclass
class BuildResult:
    sporefile: Path
    lock: Path
    image: str = ""
    manifest: str = ""
    rootfs: RootfsRecord | None = None
    tasks: dict[str, str] = field(default_factory=dict)  # task -> executed | up-to-date | failed
    spore: str | None = None
    manifest_id: str | None = None
    bundle: str | None = None
    bundle_digest: str | None = None
    pushed: list[str] = field(default_factory=list)  # pinned references, one per push: URI

    def to_json(self) -> dict[str, Any]:
        return {
            "sporefile": str(self.sporefile),
            "lock": str(self.lock),
            "image": self.image,
            "manifest": self.manifest,
            "rootfs": self.rootfs.to_json() if self.rootfs else None,
            "tasks": self.tasks,
            "spore": self.spore,
            "manifest_id": self.manifest_id,
            "bundle": self.bundle,
            "bundle_digest": self.bundle_digest,
            "pushed": self.pushed,
        }


class _Build:
    """State shared by the tasks of one build (the doit actions close over it)."""

    def __init__(self, sf: Sporefile, store: Store, options: BuildOptions, reporter: Reporter):
        self.sf = sf
        self.store = store
        self.options = options
        self.reporter = reporter
        self.pid = os.getpid()
        self.lock_path = lockfile.lock_path(sf.path)
        self.ref = parse_ref(sf.base.image, sf.context)
        self.platform = sf.base.platform
        self.client = OCIClient(store, insecure_registries=options.insecure_registries)
        self.result = BuildResult(sporefile=sf.path, lock=self.lock_path)
        self.error: SporeError | None = None
        self.kernel = sf.machine.kernel_path
        self.vm: VmProcess | None = None
        self.resume_from = 0  # steps restored from a cached snapshot instead of run
        self._chain_uptodate: bool | None = None
        self.final_manifest: str | None = None
        self._guest: GuestPlatform | None = None
        self.files: FilesLayer | None = files_layer(
            sf.files, sf.context, sf.path, (sf.output.spore, sf.output.bundle)
        )

    def guest_platform(self) -> GuestPlatform | None:
        """lookup_guest once per build (it hashes the kernel inputs); reset when built."""
        if self._guest is None:
            self._guest = lookup_guest(self.store, self.kernel)
        return self._guest

    # -- lock ------------------------------------------------------------
    def locked_entry(self) -> lockfile.LockedImage | None:
        entry = lockfile.load(self.lock_path).find(self.sf.base.image, self.platform)
        if entry is not None and self.ref.digest and self.ref.digest != entry.digest:
            return None  # the Sporefile pins another digest than the lock: re-resolve
        return entry

    def resolve_uptodate(self) -> bool:
        return not self.options.update_lock and self.locked_entry() is not None

    def resolve(self) -> None:
        old = self.locked_entry() if not self.options.update_lock else None
        digest = self.client.resolve(self.ref, self.platform)
        image = self.client.fetch(self.ref, digest, self.platform, layers=False)
        entry = lockfile.LockedImage(
            self.sf.base.image, self.platform, digest, image.manifest_digest
        )
        lock = lockfile.load(self.lock_path)
        if lock.find(entry.image, entry.platform) == entry:
            return
        if self.options.locked:
            was = old.digest if old else "nothing"
            raise LockMismatchError(
                f"{self.lock_path}: --locked, but {self.sf.base.image} ({self.platform}) "
                f"resolves to {digest} and the lock has {was}; "
                "run without --locked to update the lock"
            )
        lockfile.save(self.lock_path, lock.with_image(entry))

    # -- fetch -----------------------------------------------------------
    def entry(self) -> lockfile.LockedImage:
        entry = self.locked_entry()
        if entry is None:
            raise LockMismatchError(
                f"{self.lock_path}: no entry for {self.sf.base.image}; "
                "run without --locked to resolve it"
            )
        return entry

    def image(self) -> ResolvedImage:
        return self.client.load_cached(self.entry().digest, self.platform)

    def fetch_uptodate(self) -> bool:
        try:
            image = self.image()
        except SporeError:
            return False
        return all(self.store.has_blob(layer.digest) for layer in image.layers)

    def fetch(self) -> None:
        entry = self.entry()
        pinned = self.ref.pinned(entry.digest)
        if self.options.no_cache:
            self.reverify_cached()
        image = self.client.fetch(pinned, entry.digest, self.platform, self.reporter.fetch_progress)
        if image.manifest_digest != entry.manifest:
            raise LockMismatchError(
                f"{self.lock_path}: {entry.digest} selects manifest "
                f"{image.manifest_digest} for {self.platform}, the lock says "
                f"{entry.manifest}; delete the lock entry to re-resolve"
            )

    def reverify_cached(self) -> None:
        """--no-cache: re-hash every cached blob of the image; drop any that no longer match."""
        try:
            image = self.image()
        except SporeError:
            return
        for digest in (image.config_digest, *(layer.digest for layer in image.layers)):
            if self.store.evict_if_corrupt(digest):
                self.reporter.warn(f"store entry {digest} was corrupt; fetching it again")

    # -- rootfs ----------------------------------------------------------
    def rootfs_cache_key(self) -> str:
        """The image and, when the Sporefile copies files, the digest of their layer."""
        return rootfs_key(self.image(), self.files)

    def rootfs_uptodate(self) -> bool:
        try:
            key = self.rootfs_cache_key()
        except SporeError:
            return False
        record = RootfsRecord.lookup(self.store, key)
        return record is not None

    def rootfs(self) -> None:
        image = self.image()
        self.result.rootfs = ensure_rootfs(
            self.store, image, self.reporter, force=self.options.no_cache, files=self.files
        )

    # -- guest platform, boot, steps ---------------------------------------
    def guest_uptodate(self) -> bool:
        if self.options.no_cache or self.options.update_lock:
            return False
        guest = self.guest_platform()
        return guest is not None and self._locked_guest(guest) == self._guest_entry(guest)

    def _guest_entry(self, guest: GuestPlatform) -> lockfile.LockedGuest:
        return lockfile.LockedGuest(guest.host_class, guest.kernel_digest, guest.initrd_digest)

    def _locked_guest(self, guest: GuestPlatform) -> lockfile.LockedGuest | None:
        return lockfile.load(self.lock_path).find_guest(guest.host_class)

    def guest(self) -> None:
        """Build or find kernel and initramfs; their digests go into the lock."""
        guest = self._guest = ensure_guest(self.store, self.reporter, self.kernel)
        entry, old = self._guest_entry(guest), self._locked_guest(guest)
        if old == entry:
            return
        if self.options.locked:
            raise LockMismatchError(
                f"{self.lock_path}: --locked, but the guest for {guest.host_class} is kernel "
                f"{entry.kernel} + initrd {entry.initrd} and the lock has "
                + (f"{old.kernel} + {old.initrd}" if old else "no entry")
                + "; run without --locked to update the lock"
            )
        if old is not None:
            self.reporter.warn(
                f"guest for {guest.host_class} changed from the lock "
                f"(kernel {old.kernel} → {entry.kernel}); updating the lock"
            )
        lockfile.save(self.lock_path, lockfile.load(self.lock_path).with_guest(entry))

    def chain_keys(self) -> list[str] | None:
        """Boot key followed by every step key, or None while inputs are missing."""
        try:
            record = RootfsRecord.lookup(self.store, self.rootfs_cache_key())
        except SporeError:
            return None
        guest = self.guest_platform()
        if record is None or guest is None:
            return None
        boot = boot_key(self.sf, record.digest, guest)
        return [boot, *step_keys(self.sf, boot)]

    def steps_uptodate(self) -> bool:
        """Every step has a snapshot for exactly these inputs and the spore is in place.

        Decided once, before boot runs: boot, steps and snapshot stand or fall together
        (steps recorded during this build must not make its own snapshot look done)."""
        if self._chain_uptodate is None:
            keys = None if self.options.no_cache else self.chain_keys()
            self._chain_uptodate = (
                keys is not None
                and self.cached_prefix(keys)[0] == len(self.sf.steps)
                and self.spore_uptodate(keys[-1])
            )
        return self._chain_uptodate

    def step_snapshot(self, key: str) -> str | None:
        """The manifest id recorded for a step key, if it and all it names are in the store."""
        rec = self.store.get_key("step", key)
        mid = rec.get("manifest") if rec else None
        if not isinstance(mid, str):
            return None
        chunks = ChunkStore(self.store)
        try:
            m = manifest.decode(chunks.get(mid), mid)
        except SporeError:
            return None
        ok = all(chunks.has(c) for c in m.memory.stored()) and all(
            chunks.has(o.digest) for o in m.state.values()
        )
        return mid if ok else None

    def cached_prefix(self, keys: list[str]) -> tuple[int, str | None]:
        """How many leading steps have usable snapshots, and the last one's manifest id."""
        if self.options.no_cache:
            return 0, None
        done, last = 0, None
        for key in keys[1:]:
            mid = self.step_snapshot(key)
            if mid is None:
                break
            done, last = done + 1, mid
        return done, last

    def spore_key(self, last_key: str) -> str:
        """The published spore depends on the whole chain, snapshot.after and the checks."""
        checks = [
            [c.run if isinstance(c.run, str) else list(c.run), c.timeout] for c in self.sf.verify
        ]
        material = json.dumps(
            {"chain": last_key, "after": self.after_index(), "verify": checks}, sort_keys=True
        )
        return blake3.blake3(b"spore/spore-key/v1\0" + material.encode()).hexdigest()

    def spore_uptodate(self, last_key: str) -> bool:
        rec = self.store.get_key("spore", self.spore_key(last_key))
        mpath = self.sf.output.spore / MANIFEST
        if rec is None or not mpath.is_file():
            return False
        try:
            data = mpath.read_bytes()
            m = manifest.decode(data, str(mpath))
        except (OSError, SporeError):
            return False
        if manifest.manifest_id(data) != rec.get("manifest"):
            return False
        try:
            if (self.sf.output.spore / ID_FILE).read_text().strip() != rec.get("manifest"):
                return False
        except (OSError, UnicodeDecodeError):
            return False
        chunks = ChunkStore(self.store)
        return all(chunks.has(c) for c in m.memory.stored()) and all(
            chunks.has(o.digest) for o in m.state.values()
        )

    def boot(self) -> None:
        """Boot fresh, or resume the snapshot of the last step whose inputs are unchanged."""
        guest = self.guest_platform()
        record = RootfsRecord.lookup(self.store, self.rootfs_cache_key())
        keys = self.chain_keys()
        guest, record, keys = (
            _needed(guest, "the guest platform"),
            _needed(record, "the rootfs"),
            _needed(keys, "the step keys"),
        )
        self.resume_from, mid = self.cached_prefix(keys)
        if self.resume_from == len(self.sf.steps) and self.sf.steps:
            self.final_manifest = mid  # every step cached: nothing to run, no VM needed
            return
        if mid is not None:
            name = self.sf.steps[self.resume_from - 1].name
            self.reporter.info(
                f"resuming from the snapshot after step {name} "
                f"({self.resume_from} of {len(self.sf.steps)} steps cached)"
            )
            from sporevm.build.runner import resume_vm

            self.vm = resume_vm(
                ChunkStore(self.store).path(mid), self.store, self.reporter, self.kernel
            )
        else:
            from sporevm.build.runner import DEFAULT_BOOT_TIMEOUT, boot_vm

            self.vm = boot_vm(
                guest,
                record.path,
                self.sf.machine.memory,
                self.sf.machine.vcpus,
                DEFAULT_BOOT_TIMEOUT,
                store_root=self.store.root,
            )

    def _seal_and_record(self, upto: int, res: StepResult | None) -> str:
        """Snapshot the VM after ``upto`` steps; store the manifest in the chunk CAS."""
        keys = self.chain_keys()
        guest = self.guest_platform()
        record = RootfsRecord.lookup(self.store, self.rootfs_cache_key())
        vm = _needed(self.vm, "the build VM")
        guest, record, keys = (
            _needed(guest, "the guest platform"),
            _needed(record, "the rootfs"),
            _needed(keys, "the step keys"),
        )
        from sporevm.build.sealing import seal

        m = seal(vm, self.sf, record, guest, keys[1 : upto + 1], self.lock_path)
        chunks = ChunkStore(self.store)
        mid = chunks.put(manifest.encode(m))
        # Unchanged chunks are reused by id, not rewritten: mark them used now, or a
        # prune by last use could take chunks this fresh snapshot depends on.
        for cid in [*m.memory.stored(), *(o.digest for o in m.state.values())]:
            self.store.touch(chunks.path(cid))
        if res is not None:
            self.store.put_key(
                "step",
                keys[upto],
                {
                    "step": res.name,
                    "seconds": round(res.seconds, 3),
                    "exit": res.exit_code,
                    "manifest": mid,
                },
            )
        return mid

    def run_steps(self) -> None:
        """Run the steps not cached; snapshot after each so a later change resumes there."""
        if self.vm is None:
            return  # boot found every step cached
        try:
            for i in range(self.resume_from, len(self.sf.steps)):
                (res,) = run_steps(self.vm.session, [self.sf.steps[i]], self.reporter)
                self.final_manifest = self._seal_and_record(i + 1, res)
                self.vm.command("resume")
        except BaseException:
            self.vm.close()
            self.vm = None
            raise

    def after_index(self) -> int:
        """How many steps the spore includes (snapshot.after; default: all of them)."""
        if self.sf.snapshot_after is None:
            return len(self.sf.steps)
        return [st.name for st in self.sf.steps].index(self.sf.snapshot_after) + 1

    def snapshot(self) -> None:
        """Pick the snapshot that is the spore (after snapshot.after) and stop the build VM."""
        keys = _needed(self.chain_keys(), "the step keys")
        try:
            if not self.sf.steps:  # no steps: seal the booted VM itself
                _needed(self.vm, "the build VM")
                self.final_manifest = self._seal_and_record(0, None)
            else:
                self.final_manifest = self.step_snapshot(keys[self.after_index()])
                if self.final_manifest is None:
                    raise SporeError(
                        f"the snapshot after step {self.sf.snapshot_after} "
                        "is missing from the store; rebuild with --no-cache"
                    )
        finally:
            if self.vm is not None:
                with contextlib.suppress(SporeError):
                    self.vm.command("stop")
                self.vm.wait_exit(30.0)
                self.vm.close()
                self.vm = None

    def verify(self) -> None:
        """Run the verify checks in a fresh restore of the spore, then publish it."""
        keys = _needed(self.chain_keys(), "the step keys")
        final = _needed(self.final_manifest, "the sealed spore")
        chunks = ChunkStore(self.store)
        if self.sf.verify:
            from sporevm.build.runner import resume_vm, shutdown_vm

            vm = resume_vm(chunks.path(final), self.store, self.reporter, self.kernel)
            try:
                run_checks(
                    vm.session,
                    self.sf.verify,
                    self.reporter,
                    env=dict(self.sf.env),
                    workdir=self.sf.workdir,
                )
                shutdown_vm(vm)
            finally:
                vm.close()
        m = manifest.decode(chunks.get(final), final)
        mid = write_spore(m, self.sf.output.spore, self.store)
        # "steps": the whole chain, so prune keeps the snapshots of steps after
        # snapshot.after too and an unchanged Sporefile stays a no-op build.
        self.store.put_key("spore", self.spore_key(keys[-1]), {"manifest": mid, "steps": keys[1:]})
        self.result.spore = str(self.sf.output.spore)
        self.result.manifest_id = mid

    # -- bundle and push (sporevm.dist) ----------------------------------
    def bundle_key(self) -> str | None:
        """The bundle is a pure function of the published spore's manifest (and the format)."""
        from sporevm.dist.bundle import FORMAT

        try:
            mid, _, _ = read_spore(str(self.sf.output.spore))
        except SporeError:
            return None
        return blake3.blake3(f"spore/bundle-key/v1\0{FORMAT}\0{mid}".encode()).hexdigest()

    def bundle_uptodate(self) -> bool:
        from sporevm.dist import bundle as bundle_mod

        key = self.bundle_key()
        rec = self.store.get_key("bundle", key) if key else None
        if rec is None:
            return False
        out = self.sf.output.bundle
        try:
            files, digest = bundle_mod.read_metadata(
                lambda name, limit: _read_bounded(out / name, limit)
            )
            meta = bundle_mod.assemble(files)
        except (OSError, SporeError):
            return False
        pieces = [(p.name, p.size) for p in meta.chunkpack.packs]
        pieces += [(s.name, s.size) for img in meta.rootfs.images for s in img.segments]
        if digest != rec.get("digest") or not all(
            (out / n).is_file() and (out / n).stat().st_size == size for n, size in pieces
        ):
            return False
        self.result.bundle, self.result.bundle_digest = str(out), digest
        return True

    def bundle(self) -> None:
        from sporevm.dist.pack import pack

        res = pack(str(self.sf.output.spore), None, self.sf.output.bundle, self.store)
        key = _needed(self.bundle_key(), "the bundle key")
        # "manifest": prune keeps this record while the spore it packs is live.
        self.store.put_key("bundle", key, {"digest": res.digest, "manifest": res.parent})
        self.result.bundle, self.result.bundle_digest = str(res.path), res.digest
        self.reporter.info(
            f"bundle  {res.path}  {res.digest}  ({res.objects} objects in "
            f"{res.packs} pack(s), {res.bytes >> 20} MiB)"
        )

    def push(self) -> None:
        """Push every time: cheap when the destination has it, and never trusts a record."""
        from sporevm.dist.push import push
        from sporevm.dist.transports import open_sink
        from sporevm.dist.uri import parse_push_uri

        self.result.pushed = []
        for uri in self.sf.push:
            res = push(self.sf.output.bundle, open_sink(parse_push_uri(uri)))
            self.result.pushed.append(res.reference)
            self.reporter.info(f"pushed  {res.reference}")

    # -- doit glue -------------------------------------------------------
    def action(self, fn: Callable[[], None]) -> Callable[[], TaskFailed | None]:
        def run() -> TaskFailed | None:
            if os.getpid() != self.pid:
                # doit -n N -P process: a forked worker has none of this state (the VM).
                return TaskFailed(
                    "spore's tasks share one build VM and run in one process; "
                    "drop -P process (doit -n N runs them in threads)"
                )
            try:
                fn()
            except SporeError as exc:
                self.error = exc
                return TaskFailed(str(exc))
            return None

        return run

    def tasks(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "resolve:base",
                "doc": f"resolve {self.sf.base.image} ({self.platform}) to a digest, lock it",
                "actions": [self.action(self.resolve)],
                "uptodate": [self.resolve_uptodate],
            },
            {
                "name": "fetch:base",
                "doc": "fetch manifest, config and layers into the store, sha256-verified",
                "actions": [self.action(self.fetch)],
                "uptodate": [self.fetch_uptodate],
                "task_dep": ["resolve:base"],
            },
            {
                "name": "rootfs",
                "doc": "apply the layers path-safely and build the reproducible ext4 rootfs",
                "actions": [self.action(self.rootfs)],
                "uptodate": [self.rootfs_uptodate],
                "task_dep": ["fetch:base"],
            },
            {
                "name": "guest",
                "doc": "the managed kernel and the agent initramfs (first build: minutes)",
                "actions": [self.action(self.guest)],
                "uptodate": [self.guest_uptodate],
            },
            {
                "name": "boot",
                "doc": "boot the VM on the rootfs and wait for the guest agent",
                "actions": [self.action(self.boot)],
                "uptodate": [self.steps_uptodate],
                "task_dep": ["rootfs", "guest"],
            },
            {
                "name": "steps",
                "doc": "run "
                + (", ".join(s.name for s in self.sf.steps) or "no steps")
                + " in order, streaming output",
                "actions": [self.action(self.run_steps)],
                "uptodate": [self.steps_uptodate],
                "task_dep": ["boot"],
            },
            {
                "name": "snapshot",
                "doc": f"seal the warm VM into {self.sf.output.spore}",
                "actions": [self.action(self.snapshot)],
                "uptodate": [self.steps_uptodate],
                "task_dep": ["steps"],
            },
            {
                "name": "verify",
                "doc": f"run {len(self.sf.verify)} verify check(s) in a fresh restore, "
                f"then publish {self.sf.output.spore}",
                "actions": [self.action(self.verify)],
                "uptodate": [self.steps_uptodate],
                "task_dep": ["snapshot"],
            },
            {
                "name": "bundle",
                "doc": f"pack {self.sf.output.spore} into {self.sf.output.bundle}",
                "actions": [self.action(self.bundle)],
                "uptodate": [self.bundle_uptodate],
                "task_dep": ["verify"],
            },
            *(
                [
                    {
                        "name": "push",
                        "doc": "push the bundle to " + ", ".join(self.sf.push),
                        "actions": [self.action(self.push)],
                        "uptodate": [False],
                        "task_dep": ["bundle"],
                    }
                ]
                if self.sf.push
                else []
            ),
        ]


def _read_bounded(path: Path, limit: int) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise SporeError(f"{path}: larger than {limit} bytes")
    return data
