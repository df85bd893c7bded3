"""Decoding of OCI / Docker schema-2 manifests, indexes and image configs.

Pure functions over bytes that were already verified against their digest.
They fail closed: unknown schema versions and media types, documents that could
be read as both an index and a manifest, duplicate JSON keys (two parsers could
disagree on which value counts) and layer types the layer applier cannot handle
are all errors. Unknown *fields* are ignored, as the OCI spec requires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from sporevm.build.ociref import check_digest
from sporevm.errors import OCIError
from sporevm.strictjson import load_object

MAX_DOC_SIZE = 4 << 20  # manifests, indexes, configs, index.json
MAX_LAYERS = 500  # far above any real image (overlayfs stops at 128)
MAX_INDEX_ENTRIES = 1000
MAX_LAYER_SIZE = 8 << 30  # one compressed layer
MAX_IMAGE_SIZE = 32 << 30  # all layers of one image together
MAX_CONFIG_LIST = 10_000  # Env / Cmd / Entrypoint entries

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
# What resolve/fetch send as Accept: registry 2.8 answers 404 for an index unless asked.
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

Compression = Literal["gzip", "zstd", "none"]
# Exactly the set the layer applier supports.
LAYER_TYPES: dict[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
_FOREIGN_LAYER = re.compile(
    r"application/vnd\.(docker\.image\.rootfs\.foreign\.diff|"
    r"oci\.image\.layer\.nondistributable\.v1)"
)
_PLATFORM_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    def normalized(self) -> tuple[str, str, str]:
        """Compare platforms the way containerd does: arm64 means arm64/v8, arm means arm/v7."""
        variant = self.variant or ""
        if self.architecture == "arm64" and variant == "":
            variant = "v8"
        elif self.architecture == "arm" and variant == "":
            variant = "v7"
        elif self.architecture == "amd64" and variant == "v1":
            variant = ""
        return self.os, self.architecture, variant


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(_PLATFORM_PART.fullmatch(p) for p in parts):
        raise OCIError(f"platform {text[:80]!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


@dataclass(frozen=True)
class LayerDesc:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    ref_name: str | None = None  # org.opencontainers.image.ref.name (OCI layouts)


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[LayerDesc, ...]


@dataclass(frozen=True)
class ImageConfig:
    os: str
    architecture: str
    variant: str | None
    diff_ids: tuple[str, ...]
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()


def layer_compression(media_type: str) -> Compression:
    """How a layer blob of this (already checked) media type is compressed."""
    try:
        return LAYER_TYPES[media_type]
    except KeyError:
        raise OCIError(f"layer media type {media_type[:120]!r} is not supported") from None


# -- JSON primitives -----------------------------------------------------------


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """Strict JSON object: UTF-8, bounded, no duplicate keys, no NaN/Infinity."""
    if len(data) > MAX_DOC_SIZE:
        raise OCIError(f"{what}: larger than {MAX_DOC_SIZE} bytes; refusing to parse it")
    return load_object(data, what, OCIError)


def _text(value: Any, what: str, field: str, *, limit: int = 4096) -> str:
    if not isinstance(value, str):
        raise OCIError(f"{what}: field {field!r} must be a string")
    if len(value) > limit:
        raise OCIError(f"{what}: field {field!r} is longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise OCIError(f"{what}: field {field!r} contains an unpaired surrogate") from None
    return value


def _opt_text(doc: dict[str, Any], key: str, what: str, *, limit: int = 4096) -> str | None:
    value = doc.get(key)
    return None if value is None else _text(value, what, key, limit=limit)


def _size(value: Any, what: str, field: str) -> int:
    if type(value) is not int or value < 0:
        raise OCIError(f"{what}: field {field!r} must be a non-negative integer")
    return value


def _list(value: Any, what: str, field: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise OCIError(f"{what}: field {field!r} must be a list")
    if len(value) > limit:
        raise OCIError(f"{what}: field {field!r} has more than {limit} entries")
    return value


def _dict(value: Any, what: str, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OCIError(f"{what}: field {field!r} must be an object")
    return value


def _str_list(value: Any, what: str, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(
        _text(v, what, field, limit=1 << 16) for v in _list(value, what, field, MAX_CONFIG_LIST)
    )


# -- descriptors ---------------------------------------------------------------


def _platform(value: Any, what: str) -> Platform:
    doc = _dict(value, what, "platform")
    os_ = _text(doc.get("os"), what, "platform.os", limit=64)
    arch = _text(doc.get("architecture"), what, "platform.architecture", limit=64)
    variant = _opt_text(doc, "variant", what, limit=64)
    return Platform(os_, arch, variant or None)


def _descriptor(value: Any, what: str, field: str) -> Descriptor:
    doc = _dict(value, what, field)
    media_type = _text(doc.get("mediaType"), what, f"{field}.mediaType", limit=256)
    digest = check_digest(
        _text(doc.get("digest"), what, f"{field}.digest", limit=256), f"{what} {field}"
    )
    size = _size(doc.get("size"), what, f"{field}.size")
    urls = doc.get("urls")
    if urls is not None and urls != []:
        raise OCIError(
            f"{what}: {field} {digest} must be fetched from external URLs "
            "(foreign/non-distributable content); not supported"
        )
    platform = _platform(doc["platform"], what) if doc.get("platform") is not None else None
    ref_name = None
    annotations = doc.get("annotations")
    if annotations is not None:
        ann = _dict(annotations, what, f"{field}.annotations")
        ref_name = _opt_text(ann, "org.opencontainers.image.ref.name", what, limit=1024)
    return Descriptor(media_type, digest, size, platform, ref_name)


# -- manifests and indexes -----------------------------------------------------


def _content_type(value: str | None) -> str | None:
    if value is None:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def decode_manifest_or_index(
    data: bytes, *, what: str, media_type: str | None = None
) -> ImageManifest | ImageIndex:
    """Decode a manifest or index; ``media_type`` is the Content-Type or descriptor type."""
    hint = _content_type(media_type)
    if hint in DOCKER_SCHEMA1:
        raise _schema1(what)
    doc = load_json(data, what)
    version = doc.get("schemaVersion")
    if version == 1:
        raise _schema1(what)
    if type(version) is not int or version != 2:
        raise OCIError(
            f"{what}: unsupported schemaVersion {str(version)[:20]!r} "
            "(only schema version 2 manifests and indexes are supported)"
        )
    field = _opt_text(doc, "mediaType", what, limit=256)
    if field in DOCKER_SCHEMA1:
        raise _schema1(what)
    has_manifests = "manifests" in doc
    has_image = "config" in doc or "layers" in doc
    if has_manifests and has_image:
        # Ambiguous documents are how one digest gets read two ways (CVE-2021-41190).
        raise OCIError(
            f"{what}: has both 'manifests' and 'config'/'layers'; ambiguous document rejected"
        )
    known = MANIFEST_TYPES | INDEX_TYPES
    # The document decides, never the transport: bytes read back from the store (no
    # Content-Type) must decode exactly as they did when fetched.
    if field is not None:
        if hint in known and hint != field:
            raise OCIError(f"{what}: served as {hint} but declares mediaType {field}")
        kind = field
    else:  # OCI lets mediaType be omitted; the shape decides
        kind = OCI_INDEX if has_manifests else OCI_MANIFEST
        if hint in known and hint != kind:
            raise OCIError(f"{what}: served as {hint} but the document is shaped like {kind}")
    if kind not in known:
        raise OCIError(
            f"{what}: unsupported media type {kind[:120]!r}; expected an OCI or "
            "Docker schema 2 image manifest or index (an artifact, not an image?)"
        )
    if kind in INDEX_TYPES:
        if has_image:
            raise OCIError(f"{what}: declared {kind} but has 'config'/'layers'")
        return _index(doc, kind, what)
    if has_manifests:
        raise OCIError(f"{what}: declared {kind} but has 'manifests'")
    return _manifest(doc, kind, what)


def _schema1(what: str) -> OCIError:
    return OCIError(
        f"{what}: Docker schema 1 manifest (deprecated, unsigned digests) is not "
        "supported; re-push the image with a current docker/buildah/skopeo"
    )


def _index(doc: dict[str, Any], kind: str, what: str) -> ImageIndex:
    entries = _list(doc.get("manifests"), what, "manifests", MAX_INDEX_ENTRIES)
    return ImageIndex(
        kind, tuple(_descriptor(e, what, f"manifests[{i}]") for i, e in enumerate(entries))
    )


def _manifest(doc: dict[str, Any], kind: str, what: str) -> ImageManifest:
    config = _descriptor(doc.get("config"), what, "config")
    if config.media_type not in CONFIG_TYPES:
        raise OCIError(
            f"{what}: config media type {config.media_type[:120]!r} is not a "
            "container image config (is this an OCI artifact?)"
        )
    if config.size > MAX_DOC_SIZE:
        raise OCIError(f"{what}: config is {config.size} bytes, above the {MAX_DOC_SIZE} limit")
    layers: list[LayerDesc] = []
    total = 0
    for i, entry in enumerate(_list(doc.get("layers"), what, "layers", MAX_LAYERS)):
        desc = _descriptor(entry, what, f"layers[{i}]")
        if _FOREIGN_LAYER.match(desc.media_type):
            raise OCIError(
                f"{what}: layer {desc.digest} is foreign/non-distributable "
                f"({desc.media_type}); not supported"
            )
        if desc.media_type not in LAYER_TYPES:
            raise OCIError(
                f"{what}: layer {desc.digest} has unsupported media type "
                f"{desc.media_type[:120]!r}; supported: {', '.join(LAYER_TYPES)}"
            )
        if desc.size > MAX_LAYER_SIZE:
            raise OCIError(
                f"{what}: layer {desc.digest} is {desc.size} bytes, above the "
                f"{MAX_LAYER_SIZE}-byte limit per layer"
            )
        total += desc.size
        layers.append(LayerDesc(desc.digest, desc.media_type, desc.size))
    if total > MAX_IMAGE_SIZE:
        raise OCIError(f"{what}: layers total {total} bytes, above the {MAX_IMAGE_SIZE}-byte limit")
    return ImageManifest(kind, config, tuple(layers))


def select_platform(index: ImageIndex, platform: Platform, *, what: str) -> Descriptor:
    """The index entry for ``platform``; the error lists what the index offers."""
    want = platform.normalized()
    offered: list[str] = []
    nested = False
    for entry in index.manifests:
        if entry.platform is None or entry.platform.os == "unknown":
            continue  # attestations and other non-runnable entries
        offered.append(str(entry.platform))
        if entry.platform.normalized() != want:
            continue
        if entry.media_type in MANIFEST_TYPES:
            return entry
        nested = nested or entry.media_type in INDEX_TYPES
    if nested:
        raise OCIError(
            f"{what}: the {platform} entry is itself an index; nested indexes are not supported"
        )
    available = ", ".join(sorted(set(offered))) or "none"
    raise OCIError(
        f"{what}: no image for platform {platform} (available: {available}); "
        "set base.platform to one of these"
    )


# -- image config --------------------------------------------------------------


def decode_config(data: bytes, *, what: str) -> ImageConfig:
    doc = load_json(data, what)
    os_ = _text(doc.get("os"), what, "os", limit=64)
    arch = _text(doc.get("architecture"), what, "architecture", limit=64)
    variant = _opt_text(doc, "variant", what, limit=64) or None
    rootfs = _dict(doc.get("rootfs"), what, "rootfs")
    if rootfs.get("type") != "layers":
        raise OCIError(f"{what}: rootfs.type must be 'layers'")
    diff_ids = tuple(
        check_digest(_text(d, what, "rootfs.diff_ids", limit=256), what)
        for d in _list(rootfs.get("diff_ids"), what, "rootfs.diff_ids", MAX_LAYERS)
    )
    run = doc.get("config")
    run = {} if run is None else _dict(run, what, "config")
    env = _str_list(run.get("Env"), what, "config.Env")
    for entry in env:
        if "=" not in entry or "\x00" in entry:
            raise OCIError(f"{what}: config.Env entry {entry[:60]!r} is not KEY=VALUE")
    return ImageConfig(
        os=os_,
        architecture=arch,
        variant=variant,
        diff_ids=diff_ids,
        env=env,
        working_dir=_opt_text(run, "WorkingDir", what) or "",
        user=_opt_text(run, "User", what, limit=256) or "",
        entrypoint=_str_list(run.get("Entrypoint"), what, "config.Entrypoint"),
        cmd=_str_list(run.get("Cmd"), what, "config.Cmd"),
    )


def check_config(
    config: ImageConfig, manifest: ImageManifest, platform: Platform, *, what: str
) -> None:
    """The config must describe exactly these layers, for the requested platform."""
    if len(config.diff_ids) != len(manifest.layers):
        raise OCIError(
            f"{what}: config lists {len(config.diff_ids)} diff_ids but the manifest "
            f"has {len(manifest.layers)} layers; the image is inconsistent"
        )
    got = Platform(config.os, config.architecture, config.variant)
    same = (got.os, got.architecture) == (platform.os, platform.architecture)
    if same and config.variant is not None and platform.variant is not None:
        same = got.normalized() == platform.normalized()
    if not same:
        raise OCIError(
            f"{what}: image is for {got}, not the requested {platform}; "
            f"set base.platform to {got} or pick another image"
        )
