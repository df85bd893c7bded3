"""The guest initramfs: the static init/agent from ``guest/`` packed as newc cpio.

The agent is linked statically against musl (``musl-gcc`` from Debian's
musl-tools): 70 KB instead of ~700 KB with static glibc, which matters where the
guest kernel is emulated and unpacking the initramfs costs real time.

Reproducible: same sources + same compiler + same static libc + same flags →
bit-identical agent and initramfs. What makes that true:

- musl-gcc runs with ``-ffile-prefix-map`` (no build paths), ``-Wl,--build-id=none``,
  stripped output, ``SOURCE_DATE_EPOCH=0`` and ``LC_ALL=C``, sources in sorted order;
- the cpio is written here: uncompressed ``newc``, entries sorted, inode
  numbers assigned in that order, mtime 0, uid/gid 0.

Both results are cached by a content key (BLAKE3 over the sources, the
compiler version, musl's specs file and ``libc.a``, and the flags) and stored
under ``guest/blake3/<hex>`` in the store, named by the BLAKE3 of their bytes.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import blake3

from sporevm.atomic import publish
from sporevm.build.filememo import files_identity, remember
from sporevm.errors import SporeError
from sporevm.store import Store, blake3_file, check_blake3

GUEST_SRC = Path(__file__).resolve().parents[2] / "guest"
RECIPE = "spore-initrd/1"  # bump when the packing below changes
CC = "musl-gcc"
CFLAGS = (
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-static",
    "-fstack-protector-strong",
    "-fno-ident",
    "-Wl,--build-id=none",
    "-s",
)
CPIO_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class InitrdError(SporeError):
    """The guest agent or its initramfs could not be built."""


@dataclass(frozen=True)
class InitrdArtifact:
    digest: str  # blake3:<hex> of the initramfs bytes
    path: Path
    agent_digest: str  # blake3:<hex> of the static /init binary
    size: int


@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative, no leading "/" (e.g. "dev/console")
    mode: int  # full st_mode (type bits + permissions)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


# -- cpio ----------------------------------------------------------------------


def _hex8(v: int) -> bytes:
    if not 0 <= v <= 0xFFFFFFFF:
        raise InitrdError(f"cpio field value {v} does not fit newc's 8 hex digits")
    return b"%08x" % v


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _record(
    ino: int, mode: int, nlink: int, data: bytes, name: str, rdev: tuple[int, int]
) -> bytes:
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
    head = CPIO_MAGIC + b"".join(_hex8(f) for f in fields) + raw
    return head + _pad4(len(head)) + data + _pad4(len(data))


def pack_cpio(entries: list[CpioEntry]) -> bytes:
    """An uncompressed newc archive; entries sorted by name, parents first."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise InitrdError("duplicate cpio entry names")
    out = bytearray()
    for ino, e in enumerate(sorted(entries, key=lambda e: e.name), start=1):
        if not e.name or e.name.startswith("/") or ".." in e.name.split("/"):
            raise InitrdError(f"bad cpio entry name {e.name!r}")
        if e.data and not stat.S_ISREG(e.mode):
            raise InitrdError(f"cpio entry {e.name!r} has data but is not a regular file")
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        out += _record(ino, e.mode, nlink, e.data, e.name, e.rdev)
    out += _record(0, 0, 1, b"", _TRAILER, (0, 0))
    out += b"\0" * (-len(out) % 512)  # block padding, as cpio(1) writes it
    return bytes(out)


def initramfs_entries(agent: bytes) -> list[CpioEntry]:
    d = stat.S_IFDIR | 0o755
    return [
        CpioEntry("dev", d),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),  # early printk/stdio
        CpioEntry("init", stat.S_IFREG | 0o755, agent),
        CpioEntry("newroot", d),
        CpioEntry("proc", d),
        CpioEntry("run", d),
        CpioEntry("sys", d),
    ]


# -- agent build -----------------------------------------------------------------


def _sources() -> list[Path]:
    if not GUEST_SRC.is_dir():
        raise InitrdError(
            f"guest agent sources not found at {GUEST_SRC}; run spore from a source checkout"
        )
    files = sorted(p for p in GUEST_SRC.iterdir() if p.suffix in (".c", ".h") and p.is_file())
    if not any(p.suffix == ".c" for p in files):
        raise InitrdError(f"no C sources in {GUEST_SRC}")
    return files


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "TMPDIR")}
    env.update(LC_ALL="C", SOURCE_DATE_EPOCH="0")
    return env


def _tool(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True, env=_env())
    except FileNotFoundError:
        raise InitrdError(
            f"{argv[0]} not found; install gcc and musl-tools (scripts/setup does)"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise InitrdError(f"{' '.join(argv)} failed: {exc.stderr.strip()[:300]}") from None
    return out.stdout.strip()


def build_key(store: Store | None = None) -> str:
    """Content key of the agent binary: what its bytes depend on; remembered in ``store``
    while none of the files it reads (sources, compiler, musl) changes (filememo)."""
    sources = _sources()
    cc = shutil.which(CC)
    gcc = shutil.which("gcc")  # what the musl-gcc wrapper runs
    if cc is None or gcc is None:
        raise InitrdError(f"{CC} or gcc not found; install gcc and musl-tools (scripts/setup does)")
    tools = [Path(cc).resolve(), Path(gcc).resolve()]
    recipe = "\0".join((RECIPE, *CFLAGS))  # the code's own inputs: a change is a miss
    musl = _musl_files()
    ident = recipe + "\n" + files_identity([*sources, *tools, *musl])
    return remember(store, "guest-agent-key", ident, lambda: _build_key(sources, musl))


def _build_key(sources: list[Path], musl: list[Path]) -> str:
    h = blake3.blake3(RECIPE.encode() + b"\0")
    for p in sources:
        data = p.read_bytes()
        h.update(f"{p.name}\0{len(data)}\0".encode() + data)
    h.update(_tool([CC, "--version"]).splitlines()[0].encode() + b"\0")
    for dep in musl:
        h.update(f"{dep.name}\0{blake3_file(dep)[0]}\0".encode())
    h.update("\0".join(CFLAGS).encode())
    return h.hexdigest()


def _musl_files() -> list[Path]:
    """musl's specs file and libc.a: the musl-gcc wrapper names the specs, libc sits beside it."""
    wrapper = shutil.which(CC)
    if wrapper is None:
        raise InitrdError(f"{CC} not found; install musl-tools (scripts/setup does)")
    try:
        text = Path(wrapper).read_text(errors="replace")[:4096]
    except OSError as exc:
        raise InitrdError(f"cannot read {wrapper}: {exc.strerror}") from None
    m = re.search(r'-specs\s+"?([^"\s]+)', text)
    specs = Path(m.group(1)) if m else None
    if specs is None or not specs.is_file() or not (specs.parent / "libc.a").is_file():
        raise InitrdError(f"{wrapper} does not name a musl specs file next to libc.a")
    return [specs, specs.parent / "libc.a"]


def initrd_key(agent_digest: str) -> str:
    """The initramfs's content key: the recipe and the agent it wraps."""
    return blake3.blake3(f"{RECIPE}\0{agent_digest}".encode()).hexdigest()


def guest_path(store: Store, digest: str) -> Path:
    return store.root / "guest" / "blake3" / check_blake3(digest, "guest artifact")


def _install(store: Store, tmp: Path) -> str:
    digest, _ = blake3_file(tmp)
    publish(tmp, guest_path(store, digest))
    return digest


def cached_artifact(
    store: Store, kind: str, key: str, field: str, verify: bool = True
) -> tuple[str, Path] | None:
    """The recorded artifact if present and intact (re-hashed: these files are small).

    ``verify=False``: present is enough, for a caller that only compares the recorded
    digest and never hands the file to a VM (a restore)."""
    rec = store.get_key(kind, key)
    if rec is None or not isinstance(rec.get(field), str):
        return None
    try:
        path = guest_path(store, rec[field])
    except SporeError:
        return None
    if not path.is_file() or (verify and blake3_file(path)[0] != rec[field]):
        return None
    store.touch(path)
    return rec[field], path


def ensure_agent(store: Store, verify: bool = True) -> tuple[str, Path]:
    """Build (or reuse) the static agent; returns (blake3 digest, path in the store)."""
    key = build_key(store)
    hit = cached_artifact(store, "guest-agent", key, "agent", verify)
    if hit:
        return hit
    with store.staging_dir("agent") as tmp:
        out = tmp / "init"
        srcs = _sources()
        argv = [
            CC,
            *CFLAGS,
            f"-ffile-prefix-map={GUEST_SRC}=guest",
            f"-fdebug-prefix-map={tmp}=build",
            "-o",
            str(out),
            *(str(p) for p in srcs if p.suffix == ".c"),
        ]
        res = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=tmp)
        if res.returncode != 0:
            raise InitrdError(f"compiling the guest agent failed:\n{res.stderr.strip()[-2000:]}")
        digest = _install(store, out)
    store.put_key("guest-agent", key, {"agent": digest})
    return digest, guest_path(store, digest)


def ensure_initrd(store: Store, verify: bool = True) -> InitrdArtifact:
    """The initramfs for the current guest sources, built once per content key;
    ``verify=False`` as for ``cached_artifact``."""
    agent_digest, agent_path = ensure_agent(store, verify)
    key = initrd_key(agent_digest)
    hit = cached_artifact(store, "initrd", key, "initrd", verify)
    if hit:
        digest, path = hit
        return InitrdArtifact(digest, path, agent_digest, path.stat().st_size)
    data = pack_cpio(initramfs_entries(agent_path.read_bytes()))
    tmp = store.temp_path("initrd")
    try:
        tmp.write_bytes(data)
        digest = _install(store, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    store.put_key("initrd", key, {"initrd": digest, "agent": agent_digest, "size": len(data)})
    path = guest_path(store, digest)
    return InitrdArtifact(digest, path, agent_digest, len(data))


def install_guest(store: Store, agent_key: str, agent: Path, initrd: Path) -> InitrdArtifact:
    """Publish an agent and its initramfs made elsewhere (a remote cache) under the keys a
    local build would use; both files are in the store's staging (same file system)."""
    agent_digest = _install(store, agent)
    store.put_key("guest-agent", agent_key, {"agent": agent_digest})
    size = initrd.stat().st_size
    digest = _install(store, initrd)
    key = initrd_key(agent_digest)
    store.put_key("initrd", key, {"initrd": digest, "agent": agent_digest, "size": size})
    return InitrdArtifact(digest, guest_path(store, digest), agent_digest, size)


def copy_agent(store: Store, dest: Path) -> Path:
    """A runnable copy of the agent (tests run it with --serve-fd)."""
    _, path = ensure_agent(store)
    shutil.copyfile(path, dest)
    dest.chmod(0o755)
    return dest
