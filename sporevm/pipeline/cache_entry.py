"""The guest entry of a remote build cache: the managed kernel and the agent initramfs.

A cache entry is a set of files moved by the bundle transports (sporevm.dist). Step
snapshots travel as ordinary bundles; the guest platform is not a spore, so its entry
is its own small format, one metadata file ``guest.json``:

    {"format": "spore-cache-guest/v1", "host_class": "kvm",
     "kernel_key": <hex64>, "agent_key": <hex64>,
     "kernel": <blake3 of bzImage>, "vmlinux": <blake3>, "agent": <blake3>, "initrd": <blake3>,
     "files": {"bzImage": {"size": N, "sha256": <hex64>}, "vmlinux": …, "config": …,
               "agent": …, "initrd": …}}

Canonical JSON (sorted keys, no whitespace, ASCII), exact field sets, and only this
format: a reader refuses anything else (one line). Files are fetched against their size
and sha256, then their BLAKE3 digests are checked against the entry before anything is
installed (remote_cache.py).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from sporevm.dist.docjson import canonical
from sporevm.errors import DistError
from sporevm.strictjson import load_versioned_object

FORMAT = "spore-cache-guest/v1"
NAME = "guest.json"
DOMAIN = b"spore-cache-guest/v1\0"
MAX_ENTRY = 64 * 1024
MAX_FILE = 1 << 30  # a kernel image or an initramfs: far smaller in practice
FILES = ("bzImage", "vmlinux", "config", "agent", "initrd")
HOST_CLASSES = ("kvm", "kvm-pvm")
_HEX = re.compile(r"[0-9a-f]{64}\Z")
_B3 = re.compile(r"blake3:[0-9a-f]{64}\Z")
_FIELDS = {
    "format",
    "host_class",
    "kernel_key",
    "agent_key",
    "kernel",
    "vmlinux",
    "agent",
    "initrd",
    "files",
}


class CacheEntryError(DistError):
    """A remote cache entry is malformed (a miss, never a result)."""


@dataclass(frozen=True)
class FileRef:
    size: int
    sha256: str  # bare hex


@dataclass(frozen=True)
class GuestEntry:
    host_class: str
    kernel_key: str
    agent_key: str
    kernel: str  # blake3:… of bzImage
    vmlinux: str
    agent: str
    initrd: str
    files: dict[str, FileRef]

    def encode(self) -> bytes:
        return canonical(
            {
                "format": FORMAT,
                "host_class": self.host_class,
                "kernel_key": self.kernel_key,
                "agent_key": self.agent_key,
                "kernel": self.kernel,
                "vmlinux": self.vmlinux,
                "agent": self.agent,
                "initrd": self.initrd,
                "files": {
                    n: {"size": f.size, "sha256": f.sha256} for n, f in sorted(self.files.items())
                },
            }
        )

    def blake3_of(self, name: str) -> str:
        """The BLAKE3 digest the entry claims for a file (config has none: it is checked
        by sha256 only and never reaches a VM)."""
        return {
            "bzImage": self.kernel,
            "vmlinux": self.vmlinux,
            "agent": self.agent,
            "initrd": self.initrd,
        }.get(name, "")


def digest(data: bytes) -> str:
    """The entry's identity (what a transport pins): sha256 over a domain and the bytes."""
    return "sha256:" + hashlib.sha256(DOMAIN + data).hexdigest()


def _fail(what: str, why: str) -> CacheEntryError:
    return CacheEntryError(f"{what}: {why}; the cache entry is not usable (building locally)")


def decode(data: bytes, what: str = NAME) -> GuestEntry:
    if len(data) > MAX_ENTRY:
        raise _fail(what, f"larger than {MAX_ENTRY} bytes")
    doc: dict[str, Any] = load_versioned_object(
        data, what, limit=MAX_ENTRY, encoding="ascii", fmt=FORMAT, error=CacheEntryError
    )
    if set(doc) != _FIELDS:
        extra = sorted(set(doc) ^ _FIELDS)
        raise _fail(what, f"fields differ from {FORMAT}'s (at {extra[0][:40]!r})")
    if doc["host_class"] not in HOST_CLASSES:
        raise _fail(what, f"host_class {str(doc['host_class'])[:40]!r} is unknown")
    for key in ("kernel_key", "agent_key"):
        if not (isinstance(doc[key], str) and _HEX.match(doc[key])):
            raise _fail(what, f"{key} is not 64 lowercase hex digits")
    for key in ("kernel", "vmlinux", "agent", "initrd"):
        if not (isinstance(doc[key], str) and _B3.match(doc[key])):
            raise _fail(what, f"{key} is not a blake3:<64 hex> digest")
    files = doc["files"]
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise _fail(what, f"files must name exactly {', '.join(FILES)}")
    refs: dict[str, FileRef] = {}
    for name in FILES:
        ref = files[name]
        if not isinstance(ref, dict) or set(ref) != {"size", "sha256"}:
            raise _fail(what, f"files.{name} must have exactly size and sha256")
        size, sha = ref["size"], ref["sha256"]
        if type(size) is not int or not 0 < size <= MAX_FILE:
            raise _fail(what, f"files.{name}.size must be an integer in 1..{MAX_FILE}")
        if not (isinstance(sha, str) and _HEX.match(sha)):
            raise _fail(what, f"files.{name}.sha256 is not 64 lowercase hex digits")
        refs[name] = FileRef(size, sha)
    entry = GuestEntry(
        doc["host_class"],
        doc["kernel_key"],
        doc["agent_key"],
        doc["kernel"],
        doc["vmlinux"],
        doc["agent"],
        doc["initrd"],
        refs,
    )
    if entry.encode() != data:
        raise _fail(what, "not in canonical form (sorted keys, no whitespace, ASCII)")
    return entry


# -- pointers: what a cache key names ------------------------------------------------

REF_FORMAT = "spore-cache-ref/v1"
REF_NAME = "ref.json"
REF_DOMAIN = b"spore-cache-ref/v1\0"
MAX_REF = 4096
KINDS = ("bundle", "guest")
_SHA = re.compile(r"sha256:[0-9a-f]{64}\Z")
_REF_FIELDS = {"format", "kind", "digest", "pin", "manifest"}


@dataclass(frozen=True)
class Ref:
    """A key's pointer: the entry (a bundle or a guest entry) stored content-addressed,
    the transport's pin for it, and for bundles the manifest to take out of it."""

    kind: str
    digest: str  # sha256:… the entry's own identity (bundle digest / guest entry digest)
    pin: str  # sha256:… what the transport pins (oci: the OCI manifest digest)
    manifest: str | None  # bundle: the spore (parent or child) this key names

    def encode(self) -> bytes:
        return canonical(
            {
                "format": REF_FORMAT,
                "kind": self.kind,
                "digest": self.digest,
                "pin": self.pin,
                "manifest": self.manifest,
            }
        )


def ref_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(REF_DOMAIN + data).hexdigest()


def decode_ref(data: bytes, what: str = REF_NAME) -> Ref:
    if len(data) > MAX_REF:
        raise _fail(what, f"larger than {MAX_REF} bytes")
    doc: dict[str, Any] = load_versioned_object(
        data, what, limit=MAX_REF, encoding="ascii", fmt=REF_FORMAT, error=CacheEntryError
    )
    if set(doc) != _REF_FIELDS:
        extra = sorted(set(doc) ^ _REF_FIELDS)
        raise _fail(what, f"fields differ from {REF_FORMAT}'s (at {extra[0][:40]!r})")
    kind, mid = doc["kind"], doc["manifest"]
    if kind not in KINDS:
        raise _fail(what, f"kind {str(kind)[:40]!r} is unknown")
    for key in ("digest", "pin"):
        if not (isinstance(doc[key], str) and _SHA.match(doc[key])):
            raise _fail(what, f"{key} is not a sha256:<64 hex> digest")
    if kind == "bundle" and not (isinstance(mid, str) and _B3.match(mid)):
        raise _fail(what, "manifest is not a blake3:<64 hex> manifest id")
    if kind == "guest" and mid is not None:
        raise _fail(what, "a guest entry names no manifest")
    ref = Ref(kind, doc["digest"], doc["pin"], mid)
    if ref.encode() != data:
        raise _fail(what, "not in canonical form (sorted keys, no whitespace, ASCII)")
    return ref
