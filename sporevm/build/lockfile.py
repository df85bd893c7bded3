"""Sporefile.lock: every digest that resolution chose, so builds repeat exactly.

The lock is authoritative for what it records: a tag that is in the lock is
not re-resolved (``spore build --update-lock`` does that). ``--locked`` turns
"the lock would change" into an error instead of a write.

Format (canonical JSON, keys sorted, one trailing newline)::

    {"lockVersion": 1,
     "images": [{"image": REF, "platform": "linux/amd64",
                 "digest": "sha256:…",      # what the ref pointed at (index or manifest)
                 "manifest": "sha256:…"}],  # the platform's image manifest
     "guests": [{"hostClass": "kvm-pvm",    # per host class: what the VMM boots
                 "kernel": "blake3:…", "initrd": "blake3:…"}]}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sporevm.atomic import atomic_write
from sporevm.errors import SporefileError

LOCK_VERSION = 1
MAX_LOCK_BYTES = 1 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_BLAKE3 = re.compile(r"blake3:[0-9a-f]{64}")
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?")


@dataclass(frozen=True)
class LockedImage:
    image: str
    platform: str
    digest: str
    manifest: str


@dataclass(frozen=True)
class LockedGuest:
    host_class: str
    kernel: str  # blake3 of the kernel image the VMM boots
    initrd: str  # blake3 of the agent initramfs


@dataclass(frozen=True)
class Lock:
    images: tuple[LockedImage, ...] = ()
    guests: tuple[LockedGuest, ...] = ()

    def find_guest(self, host_class: str) -> LockedGuest | None:
        for entry in self.guests:
            if entry.host_class == host_class:
                return entry
        return None

    def with_guest(self, entry: LockedGuest) -> Lock:
        rest = [g for g in self.guests if g.host_class != entry.host_class]
        return Lock(self.images, tuple(sorted([*rest, entry], key=lambda g: g.host_class)))

    def find(self, image: str, platform: str) -> LockedImage | None:
        for entry in self.images:
            if entry.image == image and entry.platform == platform:
                return entry
        return None

    def with_image(self, entry: LockedImage) -> Lock:
        rest = [e for e in self.images if (e.image, e.platform) != (entry.image, entry.platform)]
        images = tuple(sorted([*rest, entry], key=lambda e: (e.image, e.platform)))
        return Lock(images, self.guests)

    def encode(self) -> bytes:
        doc = {
            "lockVersion": LOCK_VERSION,
            "images": [
                {
                    "image": e.image,
                    "platform": e.platform,
                    "digest": e.digest,
                    "manifest": e.manifest,
                }
                for e in self.images
            ],
            "guests": [
                {"hostClass": g.host_class, "kernel": g.kernel, "initrd": g.initrd}
                for g in self.guests
            ],
        }
        return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()


def lock_path(sporefile: Path) -> Path:
    return sporefile.with_name(sporefile.name + ".lock")


def _fail(path: Path, where: str, what: str) -> SporefileError:
    return SporefileError(
        f"{path}: {where}: {what}; fix it or delete the lock and rebuild "
        "without --locked to re-resolve"
    )


def decode(data: bytes, path: Path) -> Lock:
    if len(data) > MAX_LOCK_BYTES:
        raise _fail(path, "file", f"larger than {MAX_LOCK_BYTES} bytes")
    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(path, "file", f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _fail(path, "file", "top level must be an object")
    unknown = sorted(set(doc) - {"lockVersion", "images", "guests"})
    if unknown:
        raise _fail(path, unknown[0], "unknown key")
    version = doc.get("lockVersion")
    if type(version) is not int or version != LOCK_VERSION:
        raise _fail(
            path, "lockVersion", f"{version!r} is not supported (this spore writes {LOCK_VERSION})"
        )
    images = doc.get("images")
    if not isinstance(images, list):
        raise _fail(path, "images", "must be a list")
    out: list[LockedImage] = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(item, dict) or set(item) != {"image", "platform", "digest", "manifest"}:
            raise _fail(path, where, "must have exactly the keys digest, image, manifest, platform")
        if not all(isinstance(v, str) for v in item.values()):
            raise _fail(path, where, "values must be strings")
        if not 0 < len(item["image"]) <= 1024:
            raise _fail(path, where + ".image", "must be a non-empty image reference")
        if not _PLATFORM.fullmatch(item["platform"]):
            raise _fail(path, where + ".platform", f"{item['platform']!r} is not os/arch[/variant]")
        for key in ("digest", "manifest"):
            if not _DIGEST.fullmatch(item[key]):
                raise _fail(path, f"{where}.{key}", f"{item[key]!r} is not sha256:<64 hex>")
        ident = (item["image"], item["platform"])
        if ident in seen:
            raise _fail(path, where, "duplicate entry for this image and platform")
        seen.add(ident)
        out.append(LockedImage(item["image"], item["platform"], item["digest"], item["manifest"]))
    return Lock(tuple(out), _decode_guests(doc.get("guests", []), path))


def _decode_guests(guests: Any, path: Path) -> tuple[LockedGuest, ...]:
    if not isinstance(guests, list):
        raise _fail(path, "guests", "must be a list")
    out: list[LockedGuest] = []
    for i, item in enumerate(guests):
        where = f"guests[{i}]"
        if not isinstance(item, dict) or set(item) != {"hostClass", "kernel", "initrd"}:
            raise _fail(path, where, "must have exactly the keys hostClass, initrd, kernel")
        if not all(isinstance(v, str) for v in item.values()):
            raise _fail(path, where, "values must be strings")
        if item["hostClass"] not in ("kvm", "kvm-pvm"):
            raise _fail(path, where + ".hostClass", f"{item['hostClass']!r} is not kvm or kvm-pvm")
        for key in ("kernel", "initrd"):
            if not _BLAKE3.fullmatch(item[key]):
                raise _fail(path, f"{where}.{key}", f"{item[key]!r} is not blake3:<64 hex>")
        if any(g.host_class == item["hostClass"] for g in out):
            raise _fail(path, where, "duplicate entry for this host class")
        out.append(LockedGuest(item["hostClass"], item["kernel"], item["initrd"]))
    return tuple(out)


def load(path: Path) -> Lock:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_LOCK_BYTES + 1)
    except FileNotFoundError:
        return Lock()
    return decode(data, path)


def save(path: Path, lock: Lock) -> None:
    atomic_write(path, lock.encode())
