"""The rootfs artifact index (``rootfs.index.json``, format ``spore-rootfs/v1``).

Each distinct ext4 image the bundle's manifests name is stored once, cut into
numbered segments (``rootfs/000000.seg`` …, each ≤ 256 MiB, numbered across
all images) so blob stores and registries can hold and verify them natively.
The index gives every image's BLAKE3 digest and size (what the manifests name)
and every segment's size and sha256, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sporevm.dist.docjson import (
    B3,
    PIECE_MAX,
    SHA,
    BundleError,
    canonical,
    integer,
    load,
    obj,
    require_canonical,
    string,
    validate,
)

FORMAT = "spore-rootfs/v1"
NAME = "rootfs.index.json"
MAX_INDEX = 4 * 1024 * 1024
MAX_IMAGES = 64
MAX_SEGMENTS = 65_536
MAX_IMAGE = 2**50  # the manifest's bound on rootfs.size

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **obj(
        {
            "format": {"const": FORMAT},
            "images": {
                "type": "array",
                "maxItems": MAX_IMAGES,
                "items": obj(
                    {
                        "digest": string(B3),
                        "size": integer(1, MAX_IMAGE),
                        "segments": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_SEGMENTS,
                            "items": obj(
                                {
                                    "name": string(r"^rootfs/[0-9]{6}\.seg$"),
                                    "size": integer(1, PIECE_MAX),
                                    "sha256": string(SHA),
                                }
                            ),
                        },
                    }
                ),
            },
        }
    ),
}


def segment_name(i: int) -> str:
    return f"rootfs/{i:06d}.seg"


@dataclass(frozen=True)
class Segment:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class RootfsImage:
    digest: str
    size: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class RootfsIndex:
    images: tuple[RootfsImage, ...]

    def image(self, digest: str) -> RootfsImage:
        for img in self.images:
            if img.digest == digest:
                return img
        raise BundleError(f"{NAME}: no rootfs image {digest}")


def _check(index: RootfsIndex, what: str) -> None:
    n = 0
    for i, img in enumerate(index.images):
        if i and img.digest <= index.images[i - 1].digest:
            raise BundleError(f"{what}: at images.{i}: images must be sorted by digest, each once")
        for j, seg in enumerate(img.segments):
            if seg.name != segment_name(n):
                raise BundleError(
                    f"{what}: at images.{i}.segments.{j}: name {seg.name!r} "
                    f"must be {segment_name(n)!r}"
                )
            n += 1
        if sum(s.size for s in img.segments) != img.size:
            raise BundleError(
                f"{what}: at images.{i}: segments add up to "
                f"{sum(s.size for s in img.segments)} bytes, image is {img.size}"
            )
    if n > MAX_SEGMENTS:
        raise BundleError(f"{what}: more than {MAX_SEGMENTS} segments")


def to_document(index: RootfsIndex) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "images": [
            {
                "digest": img.digest,
                "size": img.size,
                "segments": [
                    {"name": s.name, "size": s.size, "sha256": s.sha256} for s in img.segments
                ],
            }
            for img in index.images
        ],
    }


def encode(index: RootfsIndex, what: str = NAME) -> bytes:
    doc = to_document(index)
    validate(doc, SCHEMA, what)
    _check(index, what)
    return canonical(doc)


def decode(data: bytes, what: str = NAME) -> RootfsIndex:
    doc = load(data, what, MAX_INDEX, FORMAT)
    validate(doc, SCHEMA, what)
    index = RootfsIndex(
        tuple(
            RootfsImage(
                img["digest"],
                img["size"],
                tuple(Segment(s["name"], s["size"], s["sha256"]) for s in img["segments"]),
            )
            for img in doc["images"]
        )
    )
    _check(index, what)
    require_canonical(to_document(index), data, what)
    return index
