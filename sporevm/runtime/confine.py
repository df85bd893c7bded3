"""The monitor's jail policy: what a VM monitor may still open and call (docs/jail.md).

The mechanisms are ``sporevm.vmm.jail``'s; this module decides the policy for
``sporevm.runtime.monitor``:

* Files (Landlock, entered before any thread starts, i.e. before the board and
  the lazy pager exist): read chunks and state objects, publish new ones through
  a staging directory private to this monitor, evict corrupt ones, publish and
  read local memfiles; open /dev/kvm (and /dev/userfaultfd) and the restored
  manifest; read Python's own library directories (lazy imports). Nothing else:
  no other store entry, no home directory, no writes outside the staging dir.
* Syscalls (seccomp, entered on every thread just before the first KVM_RUN):
  ``jail.SYSCALLS`` plus only the KVM and userfaultfd ioctls the run loop,
  snapshot and lazy pager issue — no KVM_CREATE_VM, and KVM_SET_USER_MEMORY_REGION
  only until the first snapshot turns the dirty log on (a third filter refuses it
  from then on: ``MonitorJail.seal_memory``).

``SPORE_NO_JAIL=1`` (``spore run/build --no-jail``) turns both off for
debugging, and the monitor says so on stderr every time it starts.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import sporevm
from sporevm.runtime import lazy
from sporevm.spore.backing import MEMFILES
from sporevm.store import Store
from sporevm.vmm import jail, kvm
from sporevm.vmm.machine import Machine

NO_JAIL_ENV = "SPORE_NO_JAIL"

# What the monitor issues once the VM runs: the run loop, IRQ lines, capture for a
# snapshot, dirty logs, and the lazy pager's fills.
IOCTLS = (
    kvm.KVM_RUN,
    kvm.KVM_SET_SIGNAL_MASK,
    kvm.KVM_IRQ_LINE,
    kvm.KVM_GET_REGS,
    kvm.KVM_GET_SREGS,
    kvm.KVM_GET_FPU,
    kvm.KVM_GET_XSAVE,
    kvm.KVM_GET_XCRS,
    kvm.KVM_GET_MSRS,
    kvm.KVM_GET_LAPIC,
    kvm.KVM_GET_VCPU_EVENTS,
    kvm.KVM_GET_MP_STATE,
    kvm.KVM_GET_IRQCHIP,
    kvm.KVM_GET_PIT2,
    kvm.KVM_GET_CLOCK,
    kvm.KVM_GET_DIRTY_LOG,
    # kvm_pvm fix-ups (cpu.host_fixup) rewrite a stopped vCPU's registers and events
    # at run time; without these every real-Linux guest dies at its first SYSCALL.
    kvm.KVM_SET_REGS,
    kvm.KVM_SET_VCPU_EVENTS,
    lazy.UFFDIO_COPY,
    lazy.UFFDIO_ZEROPAGE,
    lazy.UFFDIO_WAKE,
)

STORE_ENTRY = (
    jail.FS_READ_FILE | jail.FS_READ_DIR | jail.FS_MAKE_REG | jail.FS_REMOVE_FILE | jail.FS_REFER
)
STAGING = STORE_ENTRY | jail.FS_WRITE_FILE | jail.FS_TRUNCATE
_DEVICE = jail.FS_READ_FILE | jail.FS_WRITE_FILE | jail.FS_IOCTL_DEV
_LIBRARY = jail.FS_READ_FILE | jail.FS_READ_DIR
_PUBLISHED_READ = jail.FS_READ_FILE | jail.FS_READ_DIR | jail.FS_REMOVE_FILE


def _library_dirs() -> list[Path]:
    libs = {
        Path(p)
        for k, p in sysconfig.get_paths().items()
        if k in ("stdlib", "platstdlib", "purelib", "platlib") and os.path.isdir(p)
    }
    libs.add(Path(sporevm.__file__).parent)
    return sorted(libs)


# Python's own library directories (lazy imports stay possible in the jail). Worked out
# once, at import: in a monitor forked from the zygote, sysconfig.get_paths() would load
# the config-vars module and build its dicts again, ~1.4 MiB of private memory per VM.
_LIBRARY_DIRS = _library_dirs()


def jail_disabled() -> bool:
    return os.environ.get(NO_JAIL_ENV, "") not in ("", "0")


def warn_unjailed(who: str) -> None:
    sys.stderr.write(
        f"spore: WARNING: {who} runs WITHOUT its jail ({NO_JAIL_ENV}=1 / --no-jail): "
        "no seccomp allowlist, no Landlock; a guest that escapes into the VM monitor is "
        "not contained. Use this only to debug.\n"
    )
    sys.stderr.flush()


_live: list[MonitorJail] = []


def release_staging() -> None:
    """Remove the staging directories of this process's jails (the monitor's last step).

    Not atexit: a monitor forked from the zygote leaves through os._exit.
    """
    while _live:
        _live.pop().close()


def _private_dir(parent: Path, prefix: str) -> Path:
    """A new directory only this user can enter, named ``prefix`` + pid + random hex.

    What ``tempfile.mkdtemp`` does, without its per-process random generator: in a
    monitor forked from the zygote that costs ~250 KiB of private memory per VM.
    """
    for _ in range(100):
        path = parent / f"{prefix}{os.getpid()}-{os.urandom(6).hex()}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: no free name for a {prefix}… directory")


class _PrivateStaging(Store):
    """The store, with temp files in a directory only this monitor writes to."""

    def __init__(self, root: Path, staging: Path) -> None:
        super().__init__(root, checked=True)
        self.staging = staging

    def temp_path(self, prefix: str) -> Path:
        # Landlock ABI 1: no rename across directories, so a chunk is staged beside its
        # final name (".tmp-*", which prune sweeps) and renamed within chunks/.
        where = self.staging if self.publish_from_staging else self.root / "chunks" / "blake3"
        if prefix != "chunk":
            where = self.staging
        fd, name = tempfile.mkstemp(prefix=f".tmp-{prefix}-", dir=where)
        os.close(fd)
        return Path(name)


class MonitorJail:
    """One monitor's jail: build it first, ``files()`` before any thread, ``syscalls()``
    before the first KVM_RUN, ``close()`` at the end."""

    def __init__(self, store_root: Path | None, restore: Path | None) -> None:
        self.enabled = not jail_disabled()
        if self.enabled:
            jail.load_seccomp()  # before Landlock: importing it runs ldconfig
        self.restore = restore
        self.staging: Path | None = None
        self.store: Store | None = None
        self.plan: jail.LandlockPlan | None = None
        if not self.enabled:
            warn_unjailed("this VM monitor")
            self.store = Store(store_root, checked=True) if store_root is not None else None
            return
        if store_root is not None:
            # The caller made and checked the store's layout (Store()) before starting
            # this monitor; the monitor only makes the directories its rules name.
            root = Store(store_root, checked=True).root
            for sub in (Path("chunks") / "blake3", MEMFILES, Path("tmp")):
                (root / sub).mkdir(parents=True, exist_ok=True)  # Landlock rules need them
            self.staging = _private_dir(root / "tmp", "monitor-")
            self.store = _PrivateStaging(root, self.staging)
            _live.append(self)  # release_staging() removes it however serve() ends

    def rules(self) -> list[jail.PathRule]:
        rules = [jail.PathRule(Path("/dev/kvm"), _DEVICE)]
        if os.path.exists("/dev/userfaultfd"):
            rules.append(jail.PathRule(Path("/dev/userfaultfd"), _DEVICE))
        if self.restore is not None:
            rules.append(jail.PathRule(self.restore, jail.FS_READ_FILE))
        rules += [jail.PathRule(p, _LIBRARY) for p in _LIBRARY_DIRS]
        if self.store is not None and self.staging is not None:
            root = self.store.root
            # ABI 1 (no REFER): chunks are written in chunks/ itself, so the monitor may
            # also write there (every read re-verifies a chunk: a rewrite is denial of
            # service, as removal already is); memfiles, which other VMs map, stay
            # read-only and a local restore builds a private one (docs/jail.md).
            in_place = not jail.plan_for(jail.effective_abi()).cross_directory_publish
            rules += [
                jail.PathRule(
                    root / "chunks" / "blake3",
                    STORE_ENTRY | jail.FS_WRITE_FILE if in_place else STORE_ENTRY,
                ),
                jail.PathRule(root / MEMFILES, _PUBLISHED_READ if in_place else STORE_ENTRY),
                jail.PathRule(self.staging, STAGING),
                jail.PathRule(root / "tmp", jail.FS_REMOVE_DIR),  # our empty staging dir
            ]
        return rules

    def files(self) -> None:
        """Landlock: from here on only ``rules()`` can be opened (open fds stay usable)."""
        if self.enabled:
            self.plan = jail.restrict_filesystem(self.rules())
            if self.store is not None:
                self.store.publish_from_staging = self.plan.cross_directory_publish

    def syscalls(self, machine: Machine) -> None:
        """seccomp on every thread: from here on only the allowlist runs.

        While ``machine``'s dirty log is not on yet (a booted VM before its first
        snapshot), KVM_SET_USER_MEMORY_REGION stays allowed, for the flags-only call
        that turns it on; once it is on, a third filter refuses it (``seal_memory``)."""
        if self.enabled:
            if self.plan is None:
                raise jail.JailError("jail: seccomp before Landlock; the file jail comes first")
            ioctls: tuple[int, ...] = IOCTLS
            if machine.dirty_log and not machine.dirty_log_armed:
                ioctls += (kvm.KVM_SET_USER_MEMORY_REGION,)
                machine.on_log_armed = self.seal_memory
            jail.enter_seccomp(ioctls, deny_truncation=self.plan.seccomp_denies_truncation)

    def seal_memory(self) -> None:
        """Refuse KVM_SET_USER_MEMORY_REGION from now on, on every thread (the dirty
        log is on: nothing needs it any more)."""
        if self.enabled:
            jail.refuse_ioctls([kvm.KVM_SET_USER_MEMORY_REGION])

    def close(self) -> None:
        if self.staging is not None:
            try:
                os.rmdir(self.staging)
            except OSError:
                pass  # not empty after a failure: prune sweeps tmp/
            self.staging = None
