"""The managed guest kernel: a reproducible bzImage built from Debian's linux-source-6.1.

One build = extract the packaged tarball into store staging, apply the patch
series of the host class, ``make tinyconfig`` + our fragment, build with every
input of the output bytes pinned, publish into the store. The cache key covers
everything the bytes depend on (source package version and tarball sha256,
fragment, patches, host class, compiler and binutils versions); the digest is
BLAKE3 of the bzImage. Design and measurements: docs/kernel.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import blake3

from sporevm.atomic import fsync_dir
from sporevm.build.filememo import file_identity, remember
from sporevm.errors import SporeError
from sporevm.store import Store, blake3_file, check_blake3

HostClass = Literal["kvm", "kvm-pvm"]
HOST_CLASSES: tuple[HostClass, ...] = ("kvm", "kvm-pvm")
# Patch sets applied per host class, in order (each dir has a `series` file).
PATCH_SETS: Mapping[HostClass, tuple[str, ...]] = {
    "kvm": ("common",),
    "kvm-pvm": ("common", "kvm-pvm"),
}
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = "spore-6.1.config"
# Per-host-class additions, merged after FRAGMENT in this order (a later line wins).
# kvm: SMP. kvm-pvm has none, so its kernel and cache key are the same as before.
CLASS_FRAGMENTS: Mapping[HostClass, tuple[str, ...]] = {
    "kvm": ("spore-6.1-kvm.config",),
    "kvm-pvm": (),
}
KEY_KIND = "kernel"
KEY_DOMAIN = b"spore/kernel/v1"
LOCALVERSION = "-spore"
# Pinned into the image (uname -v): no wall clock, user or host name leaks in.
BUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "spore",
    "KBUILD_BUILD_HOST": "spore",
    "KBUILD_BUILD_VERSION": "1",
    "SOURCE_DATE_EPOCH": "0",
    "LC_ALL": "C",
    "TZ": "UTC",
}
# Tools the build runs; a missing one is one clear error, not a make failure.
NEEDED_TOOLS = ("make", "gcc", "ld", "bison", "flex", "bc", "perl", "patch", "lz4", "tar", "xz")
# Host CPU features the guest must not use on kvm_pvm (issue 3): SMAP's clac/stac
# and cmpxchg16b stop the emulator; erms/fsrm make rep movsb byte-wise there
# (clearing fsrm without erms made memmove loop forever); xsave: xrstor64 in FPU
# init (and every context switch) stops it, fxsave/fxrstor do not; the rest are
# instructions the emulator lacks. The kernel copies at most 127 characters.
PVM_CLEARCPUID = "smap,cx16,popcnt,rdrand,rdseed,rdpid,rdtscp,clflushopt,clwb,erms,fsrm,xsave"
CLEARCPUID_MAX = 127
Progress = Callable[[str], None]


class KernelError(SporeError):
    """The managed kernel could not be built or its store entry is damaged."""


@dataclass(frozen=True)
class KernelArtifact:
    digest: str  # blake3:<hex> of the bzImage
    path: Path  # bzImage (Linux boot protocol)
    config_path: Path  # the final .config
    host_class: HostClass
    cmdline: str  # default_cmdline(host_class); the VMM appends virtio_mmio.device=...
    vmlinux_path: Path  # uncompressed ELF: kvm_pvm boots this (no emulated decompression)
    vmlinux_digest: str


# -- host class and cmdline ----------------------------------------------------


def detect_host_class(sys_module: Path = Path("/sys/module")) -> HostClass:
    """``kvm-pvm`` when the host's /dev/kvm is the kvm_pvm module, else ``kvm``.

    /sys/module/<name> exists for every loaded module and every built-in one
    with parameters (kvm_pvm has them); /proc/modules is absent on hosts whose
    kernel has no module support, and CPUID cannot tell (the guest would see
    the *host's* hypervisor, not the one behind /dev/kvm). SPORE_HOST_CLASS
    overrides, for builds aimed at another machine.
    """
    forced = os.environ.get("SPORE_HOST_CLASS")
    if forced:
        if forced not in HOST_CLASSES:
            raise KernelError(
                f"SPORE_HOST_CLASS={forced!r} is not a host class; use one of "
                + ", ".join(HOST_CLASSES)
            )
        return forced
    return "kvm-pvm" if (sys_module / "kvm_pvm").is_dir() else "kvm"


def default_cmdline(host_class: str) -> str:
    """Kernel command line for the managed kernel (virtio_mmio.device= added by the VMM)."""
    _check_class(host_class)
    # panic=-1: a panic resets at once (the VMM sees it) instead of hanging.
    # reboot=k: reset through the keyboard controller (a port 0x64 write, one
    # PIO exit the VMM maps to "VM finished"); Linux falls back to a triple
    # fault (KVM_EXIT_SHUTDOWN) if that does not reset. No ACPI, so power-off
    # would only halt: the guest init ends the VM with reboot(RB_AUTOBOOT).
    parts = ["console=ttyS0", "quiet", "panic=-1", "reboot=k", "init=/init"]
    if host_class == "kvm-pvm":
        assert len(PVM_CLEARCPUID) <= CLEARCPUID_MAX
        # rodata=off: no text poking / large page splits under the emulator.
        # clocksource=kvm-clock: PVM guests read the host's raw TSC (no TSC offset
        # without hardware virtualization), so a TSC clocksource would jump by the
        # whole time a spore slept and the guest would spend its first moments after
        # a restore catching up; kvmclock is restored exactly (spore/restore.py).
        parts += ["rodata=off", "clearcpuid=" + PVM_CLEARCPUID, "clocksource=kvm-clock"]
    return " ".join(parts)


def _check_class(host_class: str) -> HostClass:
    if host_class not in HOST_CLASSES:
        raise KernelError(
            f"unknown host class {host_class!r}; use one of " + ", ".join(HOST_CLASSES)
        )
    return host_class


# -- inputs and cache key ----------------------------------------------------


def _resource_dir() -> Path:
    return Path(str(resources.files("sporevm.build").joinpath("kernel")))


def fragment_bytes() -> bytes:
    """The base fragment, shared by every host class."""
    return (_resource_dir() / FRAGMENT).read_bytes()


def class_fragments(host_class: str) -> list[Path]:
    """The host class's additions to the base fragment, in merge order."""
    return [_resource_dir() / name for name in CLASS_FRAGMENTS[_check_class(host_class)]]


def fragment_text(host_class: str) -> str:
    """Base fragment + the class's additions: what the final .config must agree with
    (``parse_config`` keeps the last value of a symbol, as merge_config.sh does)."""
    parts = [fragment_bytes().decode()] + [p.read_text() for p in class_fragments(host_class)]
    return "\n".join(parts)


def patch_series(host_class: str) -> list[Path]:
    """The patches of a host class, in application order (from each set's ``series``)."""
    out: list[Path] = []
    for name in PATCH_SETS[_check_class(host_class)]:
        d = _resource_dir() / "patches" / name
        for line in (d / "series").read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(d / line)
    return out


def _tool_version(argv: list[str], store: Store | None = None) -> str:
    """First line of ``argv`` (``gcc --version``), remembered per binary identity."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise KernelError(f"{argv[0]} not found; run scripts/setup --deps-only")

    def run() -> str:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, check=False)
        lines = (proc.stdout or proc.stderr).splitlines()
        return lines[0].strip() if lines else ""

    return remember(store, "tool-version", f"{argv}\0{file_identity(Path(exe).resolve())}", run)


def source_version(tarball: Path = SOURCE_TARBALL, store: Store | None = None) -> str:
    """The installed linux-source package version, e.g. ``6.1.192-3``."""
    if not tarball.is_file():
        raise KernelError(
            f"{tarball} not found; install Debian's {SOURCE_PACKAGE} "
            "(scripts/setup --deps-only does)"
        )

    def query() -> str:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        # Not from dpkg (e.g. copied in): the tarball hash in the key still pins it.
        return proc.stdout.strip() if proc.returncode == 0 else "unpackaged"

    # A package upgrade replaces the tarball: a new identity, so dpkg is asked again.
    return remember(store, "source-version", file_identity(tarball), query)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _sha256_memo(path: Path, store: Store | None) -> str:
    """sha256 of the source tarball, remembered per (inode, size, mtime, ctime) in the store.

    Hashing the 130 MB tarball cost ~0.1 s on every no-op build; a file whose inode,
    size, mtime and ctime are unchanged is taken to be unchanged (as make and git do).
    """
    return remember(
        store,
        "source-sha256",
        file_identity(path),
        lambda: _sha256(path),
        valid=lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None,
    )


def build_inputs(
    host_class: str, tarball: Path = SOURCE_TARBALL, store: Store | None = None
) -> dict[str, str]:
    """Everything the kernel's bytes depend on, as named strings (also the key record)."""
    hc = _check_class(host_class)
    inputs = {
        "host_class": hc,
        "source_package": f"{SOURCE_PACKAGE}={source_version(tarball, store)}",
        "source_sha256": _sha256_memo(tarball, store),
        "fragment": blake3.blake3(fragment_bytes()).hexdigest(),
        "gcc": _tool_version(["gcc", "--version"], store),
        "binutils": _tool_version(["ld", "--version"], store),
        "localversion": LOCALVERSION,
        "env": ",".join(f"{k}={v}" for k, v in sorted(BUILD_ENV.items())),
    }
    for p in class_fragments(hc):
        inputs[f"fragment:{p.name}"] = blake3.blake3(p.read_bytes()).hexdigest()
    for p in patch_series(hc):
        inputs[f"patch:{p.parent.name}/{p.name}"] = blake3.blake3(p.read_bytes()).hexdigest()
    return inputs


def cache_key(inputs: Mapping[str, str]) -> str:
    h = blake3.blake3(KEY_DOMAIN + b"\0")
    for k in sorted(inputs):
        for part in (k.encode(), inputs[k].encode()):
            h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


# -- the store -----------------------------------------------------------------


def kernel_dir(store: Store, digest: str) -> Path:
    """kernels/blake3/<hex of bzImage>/{bzImage,vmlinux,config}."""
    return store.root / "kernels" / "blake3" / check_blake3(digest, "kernel")


def _artifact(
    store: Store, record: Mapping[str, object], hc: HostClass, verify: bool = True
) -> KernelArtifact | None:
    """The cached artifact, or None if its entry is missing or damaged (a cache miss).

    ``verify=False`` skips re-hashing the images: for a caller that only compares the
    recorded digests and never hands the files to a VM (a restore, whose kernel is in
    the spore's memory)."""
    digest, vdigest = record.get("digest"), record.get("vmlinux_digest")
    if not isinstance(digest, str) or not isinstance(vdigest, str):
        return None
    try:
        d = kernel_dir(store, digest)
    except SporeError:
        return None
    paths = (d / "bzImage", d / "vmlinux", d / "config")
    if not all(p.is_file() for p in paths):
        return None
    if verify and (blake3_file(paths[0])[0] != digest or blake3_file(paths[1])[0] != vdigest):
        return None
    return KernelArtifact(digest, paths[0], paths[2], hc, default_cmdline(hc), paths[1], vdigest)


def ensure_kernel(
    store: Store,
    host_class: str,
    progress: Progress | None = None,
    *,
    jobs: int | None = None,
    tarball: Path = SOURCE_TARBALL,
    verify: bool = True,
) -> KernelArtifact:
    """The managed kernel for ``host_class``: from the store, or built (minutes) and
    published. ``verify=False``: a stored kernel is not re-hashed (``_artifact``)."""
    hc = _check_class(host_class)
    say = progress or (lambda _msg: None)
    inputs = build_inputs(hc, tarball, store)
    key = cache_key(inputs)
    if (art := cached_kernel(store, key, hc, verify)) is not None:
        return art
    # One build per key at a time: a second process waits here, then finds the result.
    with _build_lock(store, key):
        if (art := cached_kernel(store, key, hc)) is not None:
            return art
        return _build_and_publish(store, hc, key, inputs, say, jobs, tarball)


def cached_kernel(
    store: Store, key: str, hc: HostClass, verify: bool = True
) -> KernelArtifact | None:
    """The kernel recorded under ``key``, if its record and files are intact (no build)."""
    record = store.get_key(KEY_KIND, key)
    return None if record is None else _artifact(store, record, hc, verify)


@contextlib.contextmanager
def _build_lock(store: Store, key: str) -> Iterator[None]:
    path = store.root / "keys" / KEY_KIND / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build_and_publish(
    store: Store,
    hc: HostClass,
    key: str,
    inputs: Mapping[str, str],
    say: Progress,
    jobs: int | None,
    tarball: Path,
) -> KernelArtifact:
    with store.lock(), store.staging_dir("kernel") as stage:
        t0 = time.monotonic()
        out = build_kernel(stage, hc, say, jobs=jobs, tarball=tarball)
        art = _publish(store, hc, key, out, {"inputs": dict(inputs)}, t0)
        say(f"kernel {hc}: built {art.digest[:19]} in {round(time.monotonic() - t0, 1)} s")
    return art


def install_kernel(
    store: Store, host_class: str, key: str, out: Path, origin: str
) -> KernelArtifact:
    """Publish under ``key`` a kernel made elsewhere (a remote cache): ``out`` holds
    bzImage, vmlinux and config, already checked against the digests the caller trusts
    for this key; it is moved into the store (same file system: the store's staging)."""
    hc = _check_class(host_class)
    with _build_lock(store, key), store.lock():
        if (art := cached_kernel(store, key, hc)) is not None:
            return art
        inputs = build_inputs(hc, store=store)
        return _publish(store, hc, key, out, {"inputs": dict(inputs), "from": origin}, None)


def _publish(
    store: Store,
    hc: HostClass,
    key: str,
    out: Path,
    extra: dict[str, object],
    started: float | None,
) -> KernelArtifact:
    digest = blake3_file(out / "bzImage")[0]
    vdigest = blake3_file(out / "vmlinux")[0]
    dest = kernel_dir(store, digest)
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        for name in ("bzImage", "vmlinux", "config"):
            fd = os.open(out / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(out)
        try:
            os.rename(out, dest)  # a directory: all three files appear at once
        except OSError:
            if not dest.is_dir():  # a concurrent build published the same bytes
                raise
        fsync_dir(dest.parent)
    record: dict[str, object] = {"digest": digest, "vmlinux_digest": vdigest, **extra}
    if started is not None:
        record["seconds"] = round(time.monotonic() - started, 1)
    store.put_key(KEY_KIND, key, record)
    art = _artifact(store, {"digest": digest, "vmlinux_digest": vdigest}, hc)
    if art is None:
        raise KernelError(f"kernel {digest}: store entry vanished or changed after publishing")
    return art


# -- the build -----------------------------------------------------------------


# make imports the environment as variables: these would change the output
# (O=, CC=, KCFLAGS=, ...) or its verbosity behind our back.
_DROP_ENV = frozenset(
    ("MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES KCFLAGS KCPPFLAGS KAFLAGS KRUSTFLAGS "
     "ARCH SUBARCH SRCARCH CROSS_COMPILE CC HOSTCC HOSTCXX LD AS AR NM OBJCOPY STRIP LLVM "
     "LLVM_IAS O V W C M INSTALL_PATH LOCALVERSION DEPMOD INSTALLKERNEL").split()
)  # fmt: skip


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _DROP_ENV and not k.startswith(("KBUILD_", "KCONFIG_", "GCC_"))
    }
    env.update(BUILD_ENV)
    return env


def _run(argv: list[str], cwd: Path, what: str, log: Path) -> None:
    with open(log, "ab") as fh:
        fh.write(f"$ {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.run(argv, cwd=cwd, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_bytes()[-4000:].decode(errors="replace").strip().splitlines()[-6:]
        raise KernelError(f"kernel {what} failed (exit {proc.returncode}): " + " | ".join(tail))


def build_kernel(
    stage: Path,
    host_class: HostClass,
    say: Progress,
    *,
    jobs: int | None = None,
    tarball: Path = SOURCE_TARBALL,
) -> Path:
    """Build in ``stage``; returns a directory holding bzImage, vmlinux and config."""
    missing = [t for t in NEEDED_TOOLS if shutil.which(t) is None]
    if missing:
        raise KernelError(f"kernel build needs {', '.join(missing)}; run scripts/setup --deps-only")
    log = stage / "build.log"
    say(f"kernel {host_class}: extracting {tarball.name}")
    _run(["tar", "-xJf", str(tarball), "-C", str(stage)], stage, "extract", log)
    trees = [p for p in stage.iterdir() if p.is_dir()]
    if len(trees) != 1:
        raise KernelError(f"{tarball}: expected one top-level directory, found {len(trees)}")
    src = trees[0]
    for patch in patch_series(host_class):
        _run(
            ["patch", "-p1", "--batch", "--forward", "--fuzz=0", "--no-backup-if-mismatch",
             "-i", str(patch)],
            src, f"patch {patch.parent.name}/{patch.name}", log,
        )  # fmt: skip
    frags = [stage / FRAGMENT]
    frags[0].write_bytes(fragment_bytes())
    for extra in class_fragments(host_class):
        frags.append(stage / extra.name)
        frags[-1].write_bytes(extra.read_bytes())
    names = " + ".join(f.name for f in frags)
    make = ["make", f"-j{jobs or os.cpu_count() or 1}", f"LOCALVERSION={LOCALVERSION}"]
    say(f"kernel {host_class}: configuring (tinyconfig + {names})")
    _run([*make, "tinyconfig"], src, "tinyconfig", log)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", *map(str, frags)], src, "merge", log)
    _run([*make, "olddefconfig"], src, "olddefconfig", log)
    bad = config_mismatches(parse_config((src / ".config").read_text()), fragment_text(host_class))
    if bad:
        raise KernelError(
            f"{names}: Kconfig did not keep {', '.join(bad[:8])}; fix the fragment "
            "(a dependency is missing or the symbol does not exist in this source)"
        )
    say(f"kernel {host_class}: compiling (a few minutes on first use; cached afterwards)")
    _run([*make, "bzImage"], src, "build", log)
    out = stage / "out"
    out.mkdir()
    shutil.copyfile(src / "arch/x86/boot/bzImage", out / "bzImage")
    shutil.copyfile(src / "vmlinux", out / "vmlinux")
    shutil.copyfile(src / ".config", out / "config")
    return out


# -- .config checks --------------------------------------------------------


_SET = re.compile(r"(CONFIG_\w+)=(.*)")
_UNSET = re.compile(r"# (CONFIG_\w+) is not set")


def parse_config(text: str) -> dict[str, str]:
    """Kconfig output as {symbol: value}; ``n`` for '# X is not set'."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if m := _SET.fullmatch(line.strip()):
            out[m[1]] = m[2]
        elif m := _UNSET.fullmatch(line.strip()):
            out[m[1]] = "n"
    return out


def config_mismatches(final: Mapping[str, str], fragment: str) -> list[str]:
    """Fragment lines whose symbol ended up with another value (absent counts as n)."""
    bad = []
    for sym, want in parse_config(fragment).items():
        got = final.get(sym, "n")
        if got != want:
            bad.append(f"{sym}={want} (got {got})")
    return bad
