"""The monitor's config line: one JSON object the caller writes on the monitor's stdin,
before any command (docs/vmm.md, "The spore microVM and the monitor process"; the
commands and events that follow are ``protocol.py``'s).

    caller ──stdin: one config line (MonitorConfig), then Command lines──► monitor

A ``MonitorConfig`` is a ``VmConfig`` (paths of kernel, initramfs and rootfs, cmdline,
memory, vCPUs, a wall-clock bound, the store, and for a restore a ``Restore`` with the
manifest, its id, the verified kernel/initrd digests and the ``RestoreStrategy``) plus the
agent socket's fd, the serial log path, for a VM with a network ``NetWiring``, and for an
eager restore from a caller's sealed RAM image ``RamImageWiring`` (ramimage.py).

Trust. The config comes from the caller, which the monitor still checks strictly
(``MonitorConfig.decode``); any defect is one ProtocolError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sporevm.runtime.protocol import (
    DIGEST,
    MAX_CONFIG,
    MAX_MEMORY,
    MAX_TIMEOUT,
    ProtocolError,
    RestoreStrategy,
)
from sporevm.strictjson import no_duplicate_keys

MIN_MEMORY = 2 << 20  # boot.e820_map's minimum
PAGE = 4096
MAX_VCPUS = 64
MAX_FD = (1 << 31) - 1


@dataclass(frozen=True)
class Restore:
    """A spore to resume instead of booting: its manifest, as the caller checked it."""

    manifest: Path  # the spore's manifest.json
    # The id of the manifest the caller decoded and checked in full; the monitor accepts
    # only bytes with this id, so it can skip the schema pass (and importing jsonschema).
    manifest_id: str
    # The caller's verified digests of the host's kernel and initrd (the platform
    # contract's); the restored RAM already holds the kernel, so the monitor neither reads
    # nor re-hashes the two files (~25 ms and ~16 MiB of heap per VM).
    kernel_digest: str
    initrd_digest: str
    ram: RestoreStrategy = RestoreStrategy.EAGER


@dataclass(frozen=True)
class VmConfig:
    """One VM: what to boot (or resume) and on what. The caller's ``VmSpec`` holds one."""

    kernel: Path
    initrd: Path
    rootfs: Path  # opened read-only by the monitor
    cmdline: str  # the kernel's own options; the board appends its device declarations
    memory: int
    vcpus: int = 1
    timeout: float | None = None  # wall-clock safety net for the whole VM
    store: Path | None = None  # store root: memory chunks and state objects (spores)
    restore: Restore | None = None
    # False: this VM is never snapshotted (a one-off `spore run`): KVM's dirty log is never
    # turned on (its RAM keeps 2 MiB mappings after a restore) and the jail refuses
    # KVM_SET_USER_MEMORY_REGION from its stage 2 on. A VM without a store cannot be
    # snapshotted either way.
    snapshots: bool = True


@dataclass(frozen=True)
class NetWiring:
    """The VM's NIC: the monitor's end of the frame channel to its egress gateway (an
    already-open socket; the monitor creates none), the guest's MAC and MTU."""

    fd: int
    mac: bytes
    mtu: int


@dataclass(frozen=True)
class RamImageWiring:
    """An eager restore's RAM, already read and verified by the caller into a sealed
    memfd (``sporevm.runtime.ramimage``): the monitor's fd of it, and the memory index
    it holds (which must be the restored manifest's)."""

    fd: int
    index: str  # "blake3:<hex>": ramimage.image_id of the index


@dataclass(frozen=True)
class MonitorConfig:
    """The config line: the VM, plus what the launcher wired for this monitor process."""

    vm: VmConfig
    agent_fd: int  # the monitor's end of the agent socket
    serial_log: Path  # where the serial console goes (a private runtime directory)
    net: NetWiring | None = None  # None: the VM has no NIC
    ram_image: RamImageWiring | None = None  # None: an eager restore reads the chunks

    def wire(self) -> dict[str, Any]:
        """The flat JSON object of the config line (the field names are the protocol's)."""
        vm, r = self.vm, self.vm.restore
        return {
            "kernel": str(vm.kernel),
            "initrd": str(vm.initrd),
            "rootfs": str(vm.rootfs),
            "cmdline": vm.cmdline,
            "memory": vm.memory,
            "vcpus": vm.vcpus,
            "agent_fd": self.agent_fd,
            "serial_log": str(self.serial_log),
            "timeout": vm.timeout,
            "store": str(vm.store) if vm.store is not None else "",
            "restore": str(r.manifest) if r else None,
            "ram": (r.ram if r else RestoreStrategy.EAGER).value,
            "restore_id": r.manifest_id if r else None,
            "kernel_digest": r.kernel_digest if r else None,
            "initrd_digest": r.initrd_digest if r else None,
            "net_fd": self.net.fd if self.net else None,
            "net_mac": self.net.mac.hex() if self.net else None,
            "net_mtu": self.net.mtu if self.net else None,
            "snapshots": vm.snapshots,
            "ram_image_fd": self.ram_image.fd if self.ram_image else None,
            "ram_image_index": self.ram_image.index if self.ram_image else None,
        }

    def encode(self) -> bytes:
        return json.dumps(self.wire(), sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> MonitorConfig:
        """Parse and check the config line; any defect is a one-line SporeError."""
        if len(line) > MAX_CONFIG:
            raise ProtocolError("monitor: config line too long")
        try:
            doc = json.loads(line, object_pairs_hook=no_duplicate_keys)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ProtocolError(f"monitor: config line is not JSON ({type(e).__name__})") from None
        if isinstance(doc, dict):
            doc.setdefault("ram", "eager")  # optional fields: older callers omit them
            doc.setdefault("restore_id", None)
            doc.setdefault("kernel_digest", None)
            doc.setdefault("initrd_digest", None)
            for name in ("net_fd", "net_mac", "net_mtu"):
                doc.setdefault(name, None)
            doc.setdefault("snapshots", True)
            doc.setdefault("ram_image_fd", None)
            doc.setdefault("ram_image_index", None)
        if not isinstance(doc, dict) or set(doc) != _CONFIG_FIELDS:
            raise ProtocolError("monitor: config has unexpected or missing fields")
        paths = {
            name: _config_str(doc, name, path=True)
            for name in ("kernel", "initrd", "rootfs", "serial_log")
        }
        store = _config_str(doc, "store", path=True) if doc["store"] != "" else None
        restoring = doc["restore"] is not None
        manifest = _config_str(doc, "restore", path=True) if restoring else None
        rid = doc["restore_id"]
        if (rid is None) == restoring or (rid is not None and not _digest(rid)):
            raise ProtocolError(
                "monitor: config restore_id must be the restored manifest's "
                "blake3:<64 hex> id, exactly when restore is set"
            )
        for name in ("kernel_digest", "initrd_digest"):
            value = doc[name]
            if (value is None) == restoring or (value is not None and not _digest(value)):
                raise ProtocolError(
                    f"monitor: config {name} must be a blake3:<64 hex> digest, "
                    "exactly when restore is set"
                )
        cmdline = _config_str(doc, "cmdline", path=False)
        if doc["ram"] not in _STRATEGIES:
            raise ProtocolError(f"monitor: config ram must be one of {', '.join(_STRATEGIES)}")
        memory = _config_int(doc, "memory", MIN_MEMORY, MAX_MEMORY)
        if memory % PAGE:
            raise ProtocolError(f"monitor: config memory {memory} is not a multiple of {PAGE}")
        vcpus = _config_int(doc, "vcpus", 1, MAX_VCPUS)
        agent_fd = _config_int(doc, "agent_fd", 3, MAX_FD)
        timeout = doc["timeout"]
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_TIMEOUT
        ):
            raise ProtocolError("monitor: config timeout must be null or a number in (0, 1e9]")
        if not isinstance(doc["snapshots"], bool):
            raise ProtocolError("monitor: config snapshots must be true or false")
        restore = None
        if manifest is not None:
            restore = Restore(
                Path(manifest),
                rid,
                doc["kernel_digest"],
                doc["initrd_digest"],
                RestoreStrategy(doc["ram"]),
            )
        vm = VmConfig(
            kernel=Path(paths["kernel"]),
            initrd=Path(paths["initrd"]),
            rootfs=Path(paths["rootfs"]),
            cmdline=cmdline,
            memory=memory,
            vcpus=vcpus,
            timeout=None if timeout is None else float(timeout),
            store=Path(store) if store is not None else None,
            restore=restore,
            snapshots=doc["snapshots"],
        )
        net = _config_net(doc, agent_fd)
        image = _config_ram_image(doc, restore, {agent_fd} | ({net.fd} if net else set()))
        return cls(vm, agent_fd, Path(paths["serial_log"]), net, image)


_CONFIG_FIELDS = {
    "kernel",
    "initrd",
    "rootfs",
    "cmdline",
    "memory",
    "vcpus",
    "agent_fd",
    "serial_log",
    "timeout",
    "store",
    "restore",
    "ram",
    "restore_id",
    "kernel_digest",
    "initrd_digest",
    "net_fd",
    "net_mac",
    "net_mtu",
    "snapshots",
    "ram_image_fd",
    "ram_image_index",
}
MIN_MTU, MAX_MTU = 68, 65522  # virtio-net's bounds (a frame <= 64 KiB with its header)
_MAC = re.compile(r"[0-9a-f]{12}")
_STRATEGIES = tuple(s.value for s in RestoreStrategy)


def _config_net(doc: dict[str, Any], agent_fd: int) -> NetWiring | None:
    """net_fd, net_mac, net_mtu: all null (no NIC) or all set."""
    names = ("net_fd", "net_mac", "net_mtu")
    if all(doc[n] is None for n in names):
        return None
    if any(doc[n] is None for n in names):
        raise ProtocolError(
            "monitor: config net_fd, net_mac and net_mtu must be all set or all null"
        )
    fd = _config_int(doc, "net_fd", 3, MAX_FD)
    if fd == agent_fd:
        raise ProtocolError("monitor: config net_fd must differ from agent_fd")
    mac = doc["net_mac"]
    if not isinstance(mac, str) or not _MAC.fullmatch(mac):
        raise ProtocolError("monitor: config net_mac must be 12 lowercase hex digits")
    raw = bytes.fromhex(mac)
    if raw[0] & 1 or raw == bytes(6):
        raise ProtocolError("monitor: config net_mac must be a unicast, non-zero MAC")
    return NetWiring(fd, raw, _config_int(doc, "net_mtu", MIN_MTU, MAX_MTU))


def _config_ram_image(
    doc: dict[str, Any], restore: Restore | None, taken: set[int]
) -> RamImageWiring | None:
    """ram_image_fd and ram_image_index: both null, or both set for an eager restore."""
    fd, index = doc["ram_image_fd"], doc["ram_image_index"]
    if fd is None and index is None:
        return None
    if fd is None or index is None:
        raise ProtocolError(
            "monitor: config ram_image_fd and ram_image_index must be both set or both null"
        )
    if restore is None or restore.ram is not RestoreStrategy.EAGER:
        raise ProtocolError("monitor: config ram_image_fd is for an eager restore only")
    number = _config_int(doc, "ram_image_fd", 3, MAX_FD)
    if number in taken:
        raise ProtocolError("monitor: config ram_image_fd must differ from agent_fd and net_fd")
    if not _digest(index):
        raise ProtocolError("monitor: config ram_image_index must be a blake3:<64 hex> id")
    return RamImageWiring(number, index)


def _config_str(doc: dict[str, Any], name: str, *, path: bool) -> str:
    value = doc[name]
    if not isinstance(value, str) or "\0" in value or (path and not value):
        what = "a non-empty string" if path else "a string"
        raise ProtocolError(f"monitor: config {name} must be {what} without NUL")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ProtocolError(f"monitor: config {name} is not valid UTF-8 (lone surrogate)") from None
    return value


def _config_int(doc: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"monitor: config {name} must be an integer in [{lo}, {hi}]")
    return value


def _digest(value: object) -> bool:
    return isinstance(value, str) and DIGEST.fullmatch(value) is not None
