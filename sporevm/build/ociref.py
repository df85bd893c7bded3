"""Image references: docker-style registry refs and local ``oci-layout:`` refs.

The registry grammar follows distribution/reference (the one docker, podman and
skopeo share), so a ref means the same thing here as on the command line of
those tools: ``busybox`` is ``docker.io/library/busybox:latest``; the first path
component is a registry host only if it contains ``.`` or ``:`` or is
``localhost``. Only sha256 digests are accepted because the store is keyed by
sha256.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sporevm.errors import OCIError
from sporevm.net.auth import DOCKER_HUB as DOCKER_HUB  # re-exported
from sporevm.net.auth import DOCKER_HUB_API
from sporevm.net.hosts import host_name as host_name  # re-exported
from sporevm.net.hosts import is_loopback as is_loopback  # re-exported

DEFAULT_TAG = "latest"
LAYOUT_PREFIX = "oci-layout:"
MAX_REF_LEN = 4096  # a path plus a name; anything longer is not a reference
MAX_NAME_LEN = 255  # distribution/reference's limit on registry/repository

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DOMAIN_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference; ``str()`` is its canonical form."""

    kind: Literal["registry", "oci-layout"]
    registry: str | None
    repository: str | None
    tag: str | None
    digest: str | None
    layout_path: Path | None

    def __str__(self) -> str:
        if self.kind == "registry":
            base = f"{self.registry}/{self.repository}"
        else:
            base = f"{LAYOUT_PREFIX}{self.layout_path}"
        if self.tag is not None:
            base += f":{self.tag}"
        if self.digest is not None:
            base += f"@{self.digest}"
        return base

    def pinned(self, digest: str) -> ImageRef:
        """The same reference pinned to ``digest`` (the tag is kept for readability)."""
        check_digest(digest, str(self))
        return dataclasses.replace(self, digest=digest)


def check_digest(digest: str, where: str) -> str:
    if _DIGEST.fullmatch(digest):
        return digest
    if _ANY_DIGEST.fullmatch(digest) and not digest.startswith("sha256:"):
        raise OCIError(
            f"{where}: digest {digest[:80]!r} uses an unsupported algorithm; "
            "only sha256 digests are supported"
        )
    raise OCIError(
        f"{where}: {digest[:80]!r} is not a valid digest (expected sha256:<64 lowercase hex>)"
    )


def parse_ref(text: str, base_dir: Path) -> ImageRef:
    """Parse a registry ref or ``oci-layout:PATH[:TAG][@DIGEST]`` (PATH relative to base_dir)."""
    if len(text) > MAX_REF_LEN:
        raise OCIError(f"image reference {text[:60]!r}...: longer than {MAX_REF_LEN} characters")
    if not text or not text.isprintable() or any(ch.isspace() for ch in text):
        raise OCIError(
            f"image reference {text[:200]!r}: empty or contains whitespace/control "
            "characters; write it as [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]"
        )
    if text.startswith(LAYOUT_PREFIX):
        return _parse_layout(text, base_dir)
    return _parse_registry(text)


def _parse_layout(text: str, base_dir: Path) -> ImageRef:
    rest = text[len(LAYOUT_PREFIX) :]
    digest: str | None = None
    tag: str | None = None
    head, sep, candidate = rest.rpartition("@")
    if sep and "/" not in candidate:  # '@' inside a directory name stays part of the path
        rest, digest = head, check_digest(candidate, f"image reference {text!r}")
    # A trailing ":TAG" is a tag only if it has no '/', so paths with ':' still work
    # as long as the last ':' is followed by a '/'.
    head, sep, candidate = rest.rpartition(":")
    if sep and "/" not in candidate:
        if not _TAG.fullmatch(candidate):
            raise OCIError(
                f"image reference {text!r}: {candidate!r} is not a valid tag "
                "(letters, digits, '_', '.', '-'; at most 128)"
            )
        rest, tag = head, candidate
    if not rest:
        raise OCIError(
            f"image reference {text!r}: missing layout directory; "
            "write oci-layout:PATH[:TAG|@sha256:DIGEST]"
        )
    if "\x00" in rest:
        raise OCIError(f"image reference {text!r}: NUL byte in layout path")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    path = Path(os.path.normpath(Path(base_dir, rest).absolute()))
    if ":" in path.name or "@" in path.name:
        # The canonical form PATH:TAG / PATH@DIGEST would read back differently.
        raise OCIError(
            f"image reference {text!r}: the layout directory name {path.name!r} "
            "contains ':' or '@'; rename the directory"
        )
    return ImageRef("oci-layout", None, None, tag, digest, path)


def _parse_registry(text: str) -> ImageRef:
    where = f"image reference {text!r}"
    if "://" in text:
        raise OCIError(
            f"{where}: URL schemes are not part of an image reference; "
            "drop the scheme (e.g. 127.0.0.1:5000/repo:tag)"
        )
    name, digest = text, None
    if "@" in text:
        name, digest = text.rsplit("@", 1)
        check_digest(digest, where)
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:  # a ':' after the last '/' separates the tag (else it is a port)
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise OCIError(
                f"{where}: {tag!r} is not a valid tag "
                "(letters, digits, '_', '.', '-'; at most 128; no leading '.'/'-')"
            )
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.fullmatch(first):
            raise OCIError(f"{where}: {first!r} is not a valid registry host[:port]")
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, name
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    for component in repository.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            hint = " (repository names are lowercase)" if component.lower() != component else ""
            raise OCIError(
                f"{where}: {component!r} is not a valid repository path component"
                f"{hint}; write [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]"
            )
    if len(registry) + 1 + len(repository) > MAX_NAME_LEN:
        raise OCIError(f"{where}: name longer than {MAX_NAME_LEN} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef("registry", registry, repository, tag, digest, None)


def api_host(registry: str) -> str:
    """The host[:port] that serves the /v2/ API for a registry name."""
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry
