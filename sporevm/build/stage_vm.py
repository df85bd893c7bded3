"""The VM stages: the guest platform, boot (or resume), steps, snapshot, verify.

    guest ─┐
    rootfs ┴► boot ─► steps ─► snapshot ─► verify

Boot, steps and snapshot stand or fall together: they are up to date exactly when
every step has a snapshot for these inputs and the spore is in place, decided once
before boot runs (steps recorded during this build must not make its own snapshot
look done). Each hands the next a typed value: ``Booted`` (the build VM, or none when
every step was cached), ``Sealed`` (the spore's manifest), ``Published``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sporevm.build import cachekeys, lockfile
from sporevm.build.cached import Cached
from sporevm.build.context import BuildInputs
from sporevm.build.guest import GuestPlatform, ensure_guest
from sporevm.build.tasks import Handoff, TaskSpec, missing
from sporevm.errors import LockMismatchError, SporeError
from sporevm.spore import manifest
from sporevm.spore.chunks import ChunkStore
from sporevm.spore.sporedir import write_spore

if TYPE_CHECKING:  # the VM side is imported where a task runs a VM: a no-op build never does
    from sporevm.build.steps import StepResult
    from sporevm.runtime.launcher import VmProcess


@dataclass
class Booted:
    """boot → steps → snapshot: the build VM (None when every step was cached) and how
    many steps its memory already holds."""

    vm: VmProcess | None
    resume_from: int

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None


@dataclass(frozen=True)
class Sealed:
    """snapshot → verify: the manifest id of the snapshot that is the spore."""

    manifest_id: str


@dataclass(frozen=True)
class Published:
    """verify → bundle: the spore directory written and the manifest id it holds."""

    path: Path
    manifest_id: str


class VmStages:
    def __init__(self, inputs: BuildInputs, cached: Cached, handoff: Handoff) -> None:
        self.inputs, self.cached, self.handoff = inputs, cached, handoff
        self._chain_uptodate: bool | None = None

    def tasks(self) -> list[TaskSpec]:
        sf = self.inputs.sf
        chain = self.chain_uptodate
        return [
            TaskSpec(
                "guest",
                "the managed kernel and the agent initramfs (first build: minutes)",
                self.guest,
                self.guest_uptodate,
            ),
            TaskSpec(
                "boot",
                "boot the VM on the rootfs and wait for the guest agent",
                self.boot,
                chain,
                ("rootfs", "guest"),
            ),
            TaskSpec(
                "steps",
                "run " + (", ".join(s.name for s in sf.steps) or "no steps") + " in order, "
                "streaming output",
                self.steps,
                chain,
                ("boot",),
            ),
            TaskSpec(
                "snapshot",
                f"seal the warm VM into {sf.output.spore}",
                self.snapshot,
                chain,
                ("steps",),
            ),
            TaskSpec(
                "verify",
                f"run {len(sf.verify)} verify check(s) in a fresh restore, "
                f"then publish {sf.output.spore}",
                self.verify,
                chain,
                ("snapshot",),
            ),
        ]

    # -- guest ----------------------------------------------------------------
    def guest_uptodate(self) -> bool:
        if self.inputs.options.no_cache or self.inputs.options.update_lock:
            return False
        guest = self.cached.guest_platform()
        return guest is not None and self._locked_guest(guest) == _guest_entry(guest)

    def _locked_guest(self, guest: GuestPlatform) -> lockfile.LockedGuest | None:
        return lockfile.load(self.inputs.lock_path).find_guest(guest.host_class)

    def guest(self) -> None:
        """Build or find kernel and initramfs; their digests go into the lock."""
        i = self.inputs
        if i.remote is not None and i.kernel is None and self.cached.guest_platform() is None:
            i.remote.restore_guest()  # a cache hit makes ensure_guest find it: no compile
        guest = ensure_guest(i.store, i.reporter, i.kernel)
        self.handoff.give(guest)
        entry, old = _guest_entry(guest), self._locked_guest(guest)
        if old == entry:
            return
        if i.options.locked:
            raise LockMismatchError(
                f"{i.lock_path}: --locked, but the guest for {guest.host_class} is kernel "
                f"{entry.kernel} + initrd {entry.initrd} and the lock has "
                + (f"{old.kernel} + {old.initrd}" if old else "no entry")
                + "; run without --locked to update the lock"
            )
        if old is not None:
            i.reporter.warn(
                f"guest for {guest.host_class} changed from the lock "
                f"(kernel {old.kernel} → {entry.kernel}); updating the lock"
            )
        lockfile.save(i.lock_path, lockfile.load(i.lock_path).with_guest(entry))

    # -- the chain: boot, steps, snapshot, verify --------------------------------
    def chain_uptodate(self) -> bool:
        if self._chain_uptodate is None:
            keys = None if self.inputs.options.no_cache else self.cached.chain_keys()
            self._chain_uptodate = (
                keys is not None
                and self.cached.cached_prefix(keys)[0] == len(self.inputs.sf.steps)
                and self.cached.published_spore(keys[-1]) is not None
            )
        return self._chain_uptodate

    def _keys(self) -> list[str]:
        keys = self.cached.chain_keys()
        if keys is None:
            raise missing("the rootfs or the guest platform")
        return keys

    def boot(self) -> None:
        """Boot fresh, or resume the snapshot of the last step whose inputs are unchanged."""
        i = self.inputs
        keys = self._keys()
        guest, record = self.cached.guest_platform(), self.cached.rootfs()
        if guest is None or record is None:
            raise missing("the rootfs or the guest platform")
        resume_from, mid = self.cached.cached_prefix(keys)
        if i.remote is not None and resume_from < len(i.sf.steps) and not i.options.no_cache:
            if i.remote.restore_steps(keys, resume_from) > resume_from:
                resume_from, mid = self.cached.cached_prefix(keys)
            after = cachekeys.after_index(i.sf)
            if resume_from == len(i.sf.steps) and self.cached.step_snapshot(keys[after]) is None:
                i.remote.restore_steps(keys[: after + 1], 0)  # the spore: snapshot.after
        if resume_from == len(i.sf.steps) and i.sf.steps:
            self.handoff.give(Booted(None, resume_from))  # every step cached: no VM needed
            return
        if mid is not None:
            name = i.sf.steps[resume_from - 1].name
            i.reporter.info(
                f"resuming from the snapshot after step {name} "
                f"({resume_from} of {len(i.sf.steps)} steps cached)"
            )
            from sporevm.build.runner import resume_vm

            vm = resume_vm(ChunkStore(i.store).path(mid), i.store, i.reporter, i.kernel)
        else:
            from sporevm.build.runner import DEFAULT_BOOT_TIMEOUT, boot_vm, sporefile_network

            vm = boot_vm(
                guest,
                record.path,
                i.sf.machine.memory,
                i.sf.machine.vcpus,
                DEFAULT_BOOT_TIMEOUT,
                store_root=i.store.root,
                network=sporefile_network(i.sf),  # resumed snapshots carry their own
            )
        self.handoff.give(Booted(vm, resume_from))

    def _seal_and_record(self, vm: VmProcess, upto: int, res: StepResult | None) -> str:
        """Snapshot the VM after ``upto`` steps; store the manifest in the chunk CAS."""
        i = self.inputs
        keys = self._keys()
        guest, record = self.cached.guest_platform(), self.cached.rootfs()
        if guest is None or record is None:
            raise missing("the rootfs or the guest platform")
        from sporevm.build.sealing import seal

        m = seal(vm, i.sf, record, guest, keys[1 : upto + 1], i.lock_path)
        chunks = ChunkStore(i.store)
        mid = chunks.put(manifest.encode(m))
        # Unchanged chunks are reused by id, not rewritten: mark them used now, or a
        # prune by last use could take chunks this fresh snapshot depends on.
        for cid in [*m.memory.stored(), *(o.digest for o in m.state.values())]:
            i.store.touch(chunks.path(cid))
        if res is not None:
            i.store.put_key(
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

    def steps(self) -> None:
        """Run the steps not cached; snapshot after each so a later change resumes there."""
        booted = self.handoff.need(Booted, "the build VM")
        if booted.vm is None:
            return  # boot found every step cached
        from sporevm.build.steps import run_steps

        steps = self.inputs.sf.steps
        try:
            for n in range(booted.resume_from, len(steps)):
                (res,) = run_steps(booted.vm.session, [steps[n]], self.inputs.reporter)
                self._seal_and_record(booted.vm, n + 1, res)
                booted.vm.command("resume")
        except BaseException:
            self.handoff.take(Booted, "the build VM").close()
            raise

    def snapshot(self) -> None:
        """Pick the snapshot that is the spore (after snapshot.after) and stop the build VM."""
        sf = self.inputs.sf
        keys = self._keys()
        booted = self.handoff.get(Booted)
        try:
            if not sf.steps:  # no steps: seal the booted VM itself
                if booted is None or booted.vm is None:
                    raise missing("the build VM")
                mid = self._seal_and_record(booted.vm, 0, None)
            else:
                found = self.cached.step_snapshot(keys[cachekeys.after_index(sf)])
                if found is None:
                    raise SporeError(
                        f"the snapshot after step {sf.snapshot_after} "
                        "is missing from the store; rebuild with --no-cache"
                    )
                mid = found
        finally:
            if booted is not None:
                self.handoff.take(Booted, "the build VM")
                if booted.vm is not None:
                    with contextlib.suppress(SporeError):
                        booted.vm.command("stop")
                    booted.vm.wait_exit(30.0)
                booted.close()
        self.handoff.give(Sealed(mid))

    def verify(self) -> None:
        """Run the verify checks in a fresh restore of the spore, then publish it."""
        i, sf = self.inputs, self.inputs.sf
        keys = self._keys()
        final = self.handoff.need(Sealed, "the sealed spore").manifest_id
        chunks = ChunkStore(i.store)
        if sf.verify:
            from sporevm.build.runner import resume_vm, shutdown_vm
            from sporevm.build.steps import run_checks

            vm = resume_vm(chunks.path(final), i.store, i.reporter, i.kernel)
            try:
                run_checks(vm.session, sf.verify, i.reporter, env=dict(sf.env), workdir=sf.workdir)
                shutdown_vm(vm)
            finally:
                vm.close()
        m = manifest.decode(chunks.get(final), final)
        mid = write_spore(m, sf.output.spore, i.store)
        # "steps": the whole chain, so prune keeps the snapshots of steps after
        # snapshot.after too and an unchanged Sporefile stays a no-op build.
        i.store.put_key(
            "spore", cachekeys.spore_key(sf, keys[-1]), {"manifest": mid, "steps": keys[1:]}
        )
        self.handoff.give(Published(sf.output.spore, mid))


def _guest_entry(guest: GuestPlatform) -> lockfile.LockedGuest:
    return lockfile.LockedGuest(guest.host_class, guest.kernel_digest, guest.initrd_digest)
