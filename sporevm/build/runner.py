"""`spore run`: boot a fresh VM on a rootfs, run one command, stream its output, return its code."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from sporevm.build.guest import GuestPlatform, check_vcpus, ensure_guest, guest_for_restore
from sporevm.build.kernel import detect_host_class
from sporevm.build.progress import Reporter
from sporevm.build.sealing import platform_contract
from sporevm.errors import CopyError, SporeError, UsageError
from sporevm.runtime import ramimage
from sporevm.runtime.agent_session import AgentClosedError, AgentTimeoutError
from sporevm.runtime.generation import generation_message
from sporevm.runtime.launcher import VmError, VmProcess, VmSpec
from sporevm.runtime.monitor_config import Restore, VmConfig
from sporevm.runtime.protocol import MonitorError, RestoreStrategy
from sporevm.spore import manifest
from sporevm.spore.manifest import check_platform
from sporevm.spore.sporedir import open_spore, split_pin
from sporevm.store import Store

if TYPE_CHECKING:  # types only: `spore run` does not load the YAML/schema stack, and
    # loads the copy (tar) and network (egress) code only when it copies or has a NIC
    from sporevm.build.copies import CopyPlan
    from sporevm.runtime.network import NetworkSpec
    from sporevm.runtime.ramimage import RamImageCache
    from sporevm.sporefile import Sporefile

DEFAULT_BOOT_TIMEOUT = 300.0  # kernel code is emulated on kvm_pvm: boot takes seconds to minutes
SHUTDOWN_TIMEOUT = 30.0
RESTORE_TIMEOUT = 60.0


@dataclass(frozen=True)
class RunRequest:
    argv: tuple[str, ...]
    image: str | None = None
    rootfs: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    memory: int = 256 << 20
    vcpus: int = 1
    timeout: float | None = None
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    kernel: Path | None = None
    platform: str = "linux/amd64"
    insecure_registries: frozenset[str] = frozenset()
    spore: Path | None = None  # resume this spore instead of booting
    restore: RestoreStrategy = RestoreStrategy.EAGER  # how that resume fills RAM
    copies: CopyPlan | None = None  # --copy-in / --copy-out
    # Fresh VMs: --net-allow (None: no NIC). --from: None applies the spore's recorded
    # policy; a spec replaces it (narrowing: list fewer entries, or none at all).
    network: NetworkSpec | None = None
    net_log: Path | None = None  # --net-log: the gateway's decisions, JSON lines


def sporefile_network(sf: Sporefile) -> NetworkSpec | None:
    """A Sporefile's network (its canonical policy, as in the step keys), or None: what
    the build hands ``boot_vm``. A resumed step snapshot carries the same policy in its
    manifest (the policy is part of every step key), so ``resume_vm`` needs nothing."""
    from sporevm.build.cachekeys import network_policy
    from sporevm.runtime.network import NetworkSpec

    policy = network_policy(sf)
    return None if policy is None else NetworkSpec(tuple(policy))


def boot_vm(
    guest: GuestPlatform,
    rootfs: Path,
    memory: int,
    vcpus: int,
    boot_timeout: float,
    store_root: Path | None = None,
    zygote: bool | None = None,
    setting: str = "machine.vcpus:",
    network: NetworkSpec | None = None,
    fork_here: bool = False,
) -> VmProcess:
    """Start a VM and wait for its agent's READY; on failure report what the VM did.

    ``setting`` names where ``vcpus`` came from, for the one-line refusal of a count
    the host class cannot give (the Sporefile's, unless ``spore run`` says otherwise).
    ``network``: the VM gets a NIC and an egress gateway under that policy, and its
    interface is configured before this returns (None: no NIC). ``fork_here``: see
    ``VmSpec.fork_here``."""
    check_vcpus(vcpus, guest.host_class, setting)
    vm = VmProcess(
        VmSpec(
            VmConfig(
                guest.kernel, guest.initrd, rootfs, guest.cmdline, memory, vcpus, store=store_root
            ),
            zygote=zygote,
            network=network,
            fork_here=fork_here,
        )
    )
    try:
        ready = vm.session.wait_ready(boot_timeout)
        if ready.cpus != vcpus:
            # Never a silent single CPU: a kernel without SMP (a custom --kernel), or
            # APs that did not start, leave the guest with fewer CPUs than asked for.
            raise VmError(
                f"the guest kernel brought up {ready.cpus} of the {vcpus} vCPUs "
                f"({setting} {vcpus}): it lacks SMP or could not start them; use a "
                "kernel with CONFIG_SMP (the managed one has it) or 1 vCPU"
            )
        if network is not None:
            # The first interface setup runs the guest's driver and netlink paths
            # cold: seconds of emulated kernel on kvm_pvm under load (10 s was not enough).
            from sporevm.runtime.network import interface_config

            vm.session.configure_network(interface_config(), timeout=RESTORE_TIMEOUT)
    except (AgentTimeoutError, AgentClosedError) as exc:
        vm.wait_exit(1.0)
        tail = vm.serial_tail().strip().splitlines()[-15:]
        vm.close()
        raise VmError(
            f"the guest agent did not come up: {vm.describe_exit()} ({exc})"
            + ("\n  serial: " + "\n  serial: ".join(tail) if tail else "")
        ) from None
    except BaseException:
        vm.close()
        raise
    return vm


def resume_vm(
    spore: Path,
    store: Store,
    reporter: Reporter,
    kernel: Path | None = None,
    hostname: str = "",
    ram: RestoreStrategy = RestoreStrategy.EAGER,
    zygote: bool | None = None,
    network: NetworkSpec | None = None,
    net_log: Path | None = None,
    fork_here: bool = False,
    snapshots: bool = True,
    ram_images: RamImageCache | None = None,
) -> VmProcess:
    """Restore a spore in a fresh monitor; the guest gets its generation (fresh entropy,
    clock, and for a forked child its hostname) before anything else runs, and a spore
    with a NIC its network again: the policy recorded in its manifest, or ``network``
    in its place (``net_log`` applies to the recorded one). Flows open at the snapshot
    do not survive it (docs/network.md). ``fork_here``: see ``VmSpec.fork_here``;
    ``snapshots``: see ``VmConfig.snapshots``. ``ram_images``: an eager restore takes
    its RAM from that cache of sealed, verified images (filled on a miss) instead of
    reading the chunks in the monitor (docs/restore.md, "Sealed RAM images")."""
    spore, pin = split_pin(str(spore))
    m, mpath, rootfs = open_spore(spore, store, pin)
    if m.network is None and network is not None:
        raise UsageError(
            f"{spore}: the spore has no NIC (it was built without network:); "
            "--net-allow applies only to spores built with one"
        )
    if m.network is not None and network is None:
        from sporevm.runtime.network import NetworkSpec

        network = NetworkSpec(m.network, net_log)
    guest = guest_for_restore(store, reporter, kernel)  # digests compared, not used
    check_platform(
        m,
        platform_contract(guest, m.platform.memory, m.platform.vcpus, net=m.network is not None),
    )
    started = time.monotonic()
    restore = Restore(mpath, manifest.id_of(m), guest.kernel_digest, guest.initrd_digest, ram)
    image = None
    if ram_images is not None and ram is RestoreStrategy.EAGER:
        from sporevm.spore.chunks import ChunkStore

        image = ram_images.image(m.memory, ChunkStore(store), m.platform.memory)
    try:
        vm = VmProcess(
            VmSpec(
                VmConfig(
                    guest.kernel,
                    guest.initrd,
                    rootfs,
                    guest.cmdline,
                    m.platform.memory,
                    m.platform.vcpus,
                    store=store.root,
                    restore=restore,
                    snapshots=snapshots,
                ),
                zygote=zygote,
                network=network,
                fork_here=fork_here,
                ram_image=image,
            )
        )
    finally:
        if image is not None:
            os.close(image.fd)  # the monitor holds its own copy by now
    try:
        # Every restore, forked or not, gets fresh entropy and a CRNG reseed: two runs
        # of one spore must never share the guest's random stream. It goes right behind
        # HELLO (one round trip) and is DONE before any command is sent; made once the
        # VM is about to run, so that the clock it sets is not behind by the restore.
        vm.wait_started(RESTORE_TIMEOUT)
        name = hostname
        if m.generation.parent is not None and not name:
            name = f"{m.annotations.get('org.spore.name', 'spore')}-{m.generation.index}"
        vm.session.hello(timeout=RESTORE_TIMEOUT, generation=generation_message(m, name))
        if network is not None:  # a new gateway: the guest resolves and connects afresh
            from sporevm.runtime.network import interface_config

            vm.session.configure_network(interface_config(), timeout=RESTORE_TIMEOUT)
    except (AgentTimeoutError, AgentClosedError) as exc:
        vm.wait_exit(1.0)
        vm.close()
        ev = vm.exit_event()
        if isinstance(ev, MonitorError):
            raise VmError(f"{spore}: {ev.message}") from None  # refused before any VM
        raise VmError(
            f"the restored guest agent did not answer: {vm.describe_exit()} ({exc})"
        ) from None
    except BaseException:
        vm.close()
        raise
    reporter.info(f"resumed {spore} in {time.monotonic() - started:.2f} s")
    return vm


def shutdown_vm(vm: VmProcess) -> None:
    try:
        vm.session.shutdown(timeout=SHUTDOWN_TIMEOUT)
    except SporeError:
        pass  # already gone; wait_exit reports how it ended
    vm.wait_exit(SHUTDOWN_TIMEOUT)


def _writer(stream: BinaryIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


def run(req: RunRequest, store: Store, reporter: Reporter) -> int:
    if not req.argv:
        raise UsageError(
            "spore run: give the command after --, e.g. spore run --rootfs r.ext4 -- ls /"
        )
    if sum(x is not None for x in (req.image, req.rootfs, req.spore)) != 1:
        raise UsageError("spore run: give exactly one of --image REF, --rootfs FILE, --from SPORE")
    if req.spore is None:  # a resume takes its vCPUs from the spore's platform contract
        check_vcpus(req.vcpus, detect_host_class(), "--vcpus")  # before any image work
    if req.copies is not None:
        from sporevm.build.copies import check_plan

        check_plan(req.copies)  # sources exist, targets new or empty: before any VM
    # Shared store lock for the VM's whole life: a lazy restore reads chunks until the
    # guest exits, so `spore cache prune` waits for this run (docs/publish-protocol.md).
    with store.lock():
        return _run_locked(req, store, reporter)


def _run_locked(req: RunRequest, store: Store, reporter: Reporter) -> int:
    if req.spore is not None:
        # RestoreStrategy(): the CLI hands the strategy's name (argparse choices)
        vm = resume_vm(
            req.spore,
            store,
            reporter,
            req.kernel,
            ram=RestoreStrategy(req.restore),
            network=req.network,
            net_log=req.net_log,
            # One VM, and this process read no credentials: no zygote interpreter.
            fork_here=True,
            snapshots=False,  # `spore run` never snapshots: no dirty log, a tighter jail
            # In a long-lived process (the resident server) restores of one spore share
            # one sealed, verified RAM image instead of re-reading every chunk.
            ram_images=ramimage.installed(),
        )
        return _run_in(vm, req, reporter)
    if req.rootfs is not None:
        if not req.rootfs.is_file():
            raise UsageError(f"--rootfs {req.rootfs}: no such file")
        rootfs = req.rootfs
    else:
        assert req.image is not None
        # Imported here: the OCI stack (requests, oras) costs ~0.3 s that
        # `spore run --from` and `--rootfs` never need.
        from sporevm.build.imagefs import build_rootfs_record

        rootfs = build_rootfs_record(
            req.image,
            store,
            reporter,
            platform=req.platform,
            insecure_registries=req.insecure_registries,
        ).path
    guest = ensure_guest(store, reporter, req.kernel)
    vm = boot_vm(
        guest,
        rootfs,
        req.memory,
        req.vcpus,
        req.boot_timeout,
        setting="--vcpus",
        network=req.network,
        # --image may have read registry credentials: then its monitor comes from the
        # zygote, which never held them; --rootfs read nothing secret.
        fork_here=req.image is None,
    )
    return _run_in(vm, req, reporter)


def _run_in(vm: VmProcess, req: RunRequest, reporter: Reporter) -> int:
    """Run the request's command in a ready VM, stream its output, end the VM."""
    if req.copies is not None:
        from sporevm.build.copies import copy_in, copy_out
    try:
        if req.copies is not None:  # before the command: it may need them
            copy_in(vm.session, req.copies, reporter)
        handle = vm.session.exec(
            list(req.argv),
            env=dict(req.env),
            cwd=req.cwd,
            timeout=req.timeout,
            on_stdout=_writer(sys.stdout.buffer),
            on_stderr=_writer(sys.stderr.buffer),
        )
        status = handle.wait()
        if status.timed_out:
            reporter.warn(f"command timed out after {req.timeout} s and was killed")
        # also after a failing command
        failed = copy_out(vm.session, req.copies, reporter) if req.copies is not None else 0
        # No guest power-off: the VM is thrown away, its rootfs is read-only and its
        # writes went to tmpfs, so there is nothing to sync. close() below SIGTERMs
        # the monitor, which pauses the vCPUs and exits (~0.2 s less per run in the
        # hardware-KVM lane, where the guest's power-off path is slow).
        if failed:
            # Its own code: CI must not take a missing report for the command's verdict.
            reporter.warn(f"the command {status.describe()}; {failed} copy-out(s) failed")
            return CopyError.exit_code
        return status.returncode
    except (AgentClosedError, AgentTimeoutError) as exc:
        vm.wait_exit(1.0)
        raise VmError(f"{exc}: {vm.describe_exit()}") from None
    finally:
        vm.close()
