"""``oci://host[:port]/repo[:tag]``: a bundle as an OCI artifact in a registry.

Every bundle file is one layer (media type ``application/vnd.spore.bundle.file.v1``,
its name in ``org.opencontainers.image.title``, its sha256 as the layer digest, so
the registry verifies it natively); the config is the OCI empty descriptor; the
manifest's ``artifactType`` is ``application/vnd.spore.bundle.v1`` and its
``org.spore.bundle.digest`` annotation carries the bundle digest. Push returns
``oci://host/repo@sha256:<manifest digest>``; pull fetches that manifest by
digest, checks its sha256 against the pin, and only then trusts the annotation
and the name → blob map.

Every request goes through the one registry client (``net/registry.py``, shared
with image fetches): its redirect, token, retry, size, plain-HTTP and deadline
policy. Uploads are streamed from disk (oras-py's ``put_upload`` would read a
whole blob into memory). Plain HTTP only to loopback registries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sporevm.dist.transport_http import ranged_body
from sporevm.dist.transports import (
    StreamSource,
    check_name,
    check_sha256,
    check_size,
)
from sporevm.dist.uri import BundleURI
from sporevm.errors import DistError
from sporevm.net.auth import MAX_ERROR_BODY
from sporevm.net.hosts import Policy
from sporevm.net.registry import Repository
from sporevm.strictjson import no_duplicate_keys, reject_constant, reject_float

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.spore.bundle.v1"
FILE_MEDIA_TYPE = "application/vnd.spore.bundle.file.v1"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_BLOB).hexdigest()
TITLE = "org.opencontainers.image.title"
BUNDLE_DIGEST = "org.spore.bundle.digest"
MAX_MANIFEST = 4 << 20  # distribution's own manifest limit
MAX_LAYERS = 100_000
_EMPTY_CONFIG = {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_BLOB)}


def encode_artifact(files: list[tuple[str, str, int]], bundle_digest: str) -> bytes:
    """The canonical manifest bytes for (name, 'sha256:<hex>', size) layers, in order."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": _EMPTY_CONFIG,
        "layers": [
            {
                "mediaType": FILE_MEDIA_TYPE,
                "digest": digest,
                "size": size,
                "annotations": {TITLE: name},
            }
            for name, digest, size in files
        ],
        "annotations": {BUNDLE_DIGEST: bundle_digest},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def decode_artifact(data: bytes, what: str) -> tuple[dict[str, tuple[str, int]], str]:
    """Manifest bytes → ({name: ('sha256:<hex>', size)}, bundle digest). Strict and canonical."""
    if len(data) > MAX_MANIFEST:
        raise DistError(f"{what}: OCI manifest larger than {MAX_MANIFEST} bytes")
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=no_duplicate_keys,
            parse_constant=reject_constant,
            parse_float=reject_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DistError(f"{what}: OCI manifest is not strict JSON ({str(exc)[:100]})") from None

    def fail(why: str) -> DistError:
        return DistError(f"{what}: not a spore bundle artifact: {why}")

    if not isinstance(doc, dict) or set(doc) != {
        "schemaVersion",
        "mediaType",
        "artifactType",
        "config",
        "layers",
        "annotations",
    }:
        raise fail(
            "expected exactly schemaVersion, mediaType, artifactType, config, layers, annotations"
        )
    if doc["schemaVersion"] != 2 or isinstance(doc["schemaVersion"], bool):
        raise fail("schemaVersion must be 2")
    if doc["mediaType"] != OCI_MANIFEST or doc["artifactType"] != ARTIFACT_TYPE:
        raise fail(f"mediaType/artifactType must be {OCI_MANIFEST} / {ARTIFACT_TYPE}")
    if doc["config"] != _EMPTY_CONFIG:
        raise fail("config must be the OCI empty descriptor")
    notes = doc["annotations"]
    if (
        not isinstance(notes, dict)
        or set(notes) != {BUNDLE_DIGEST}
        or not isinstance(notes[BUNDLE_DIGEST], str)
    ):
        raise fail(f"annotations must hold exactly {BUNDLE_DIGEST}")
    bundle_digest = "sha256:" + check_sha256(notes[BUNDLE_DIGEST], what)
    if bundle_digest != notes[BUNDLE_DIGEST]:
        raise fail(f"{BUNDLE_DIGEST} must be sha256:<hex>")
    layers = doc["layers"]
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise fail(f"layers must be a list of at most {MAX_LAYERS}")
    files: dict[str, tuple[str, int]] = {}
    for i, layer in enumerate(layers):
        if (
            not isinstance(layer, dict)
            or set(layer) != {"mediaType", "digest", "size", "annotations"}
            or layer["mediaType"] != FILE_MEDIA_TYPE
        ):
            raise fail(
                f"layers[{i}] must be a {FILE_MEDIA_TYPE} descriptor with exactly "
                "mediaType, digest, size, annotations"
            )
        ann = layer["annotations"]
        if not isinstance(ann, dict) or set(ann) != {TITLE} or not isinstance(ann[TITLE], str):
            raise fail(f"layers[{i}].annotations must hold exactly {TITLE}")
        name = check_name(ann[TITLE], f"{what}: layers[{i}]")
        digest = layer["digest"]
        if not isinstance(digest, str) or "sha256:" + check_sha256(digest, what) != digest:
            raise fail(f"layers[{i}].digest must be sha256:<hex>")
        size = layer["size"]
        check_size(size, f"{what}: layers[{i}]")
        if name in files:
            raise fail(f"{name} appears twice")
        files[name] = (digest, size)
    if encode_artifact([(n, d, s) for n, (d, s) in files.items()], bundle_digest) != data:
        raise fail("not in canonical form (spore push writes sorted, compact JSON)")
    return files, bundle_digest


def _repository(uri: BundleURI, *, push: bool) -> Repository:
    """The one registry client (net/registry.py) for ``uri``: plain HTTP only to loopback
    (bundle commands have no --insecure-registry), DistErrors."""
    return Repository(
        uri.netloc,
        uri.repo,
        policy=Policy(),
        error=DistError,
        actions="pull,push" if push else "pull",
        again="run the push again" if push else "run the pull again",
    )


class OciSource(StreamSource):
    def __init__(self, uri: BundleURI) -> None:
        ref = uri.pin or uri.tag
        if ref is None:
            raise DistError(
                f"{uri}: oci pulls need @sha256:<manifest digest> (or a tag with --allow-mutable)"
            )
        self.reg = _repository(uri, push=False)
        self.bytes_received = 0
        what = f"{uri}: manifest"
        self.server = self.reg.server
        data, resp = self.reg.read(
            f"manifests/{ref}", what, limit=MAX_MANIFEST, accept=OCI_MANIFEST
        )
        self.bytes_received += len(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if uri.pin is not None and digest != uri.pin:
            raise DistError(
                f"{what}: the registry served a manifest with digest {digest}, "
                "not the pinned one; refusing it"
            )
        served = resp.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise DistError(f"{what}: {self.reg.server} says {served[:80]} but served {digest}")
        # For a tag: what it pointed at just now, as the pinned reference to print.
        self.resolved = dataclasses.replace(uri, tag=None, pin=digest)
        self.reference = str(self.resolved)
        self.files, self.pinned_bundle_digest = decode_artifact(data, self.reference)

    def layer(self, name: str, what: str) -> tuple[str, int]:
        entry = self.files.get(name)
        if entry is None:
            raise DistError(
                f"{what}: not a layer of the OCI artifact; the bundle and its "
                "artifact manifest disagree"
            )
        return entry

    def read_small(self, name: str, limit: int) -> bytes:
        what = self._what(check_name(name, self.reference))
        digest, size = self.layer(name, what)
        if size > limit:
            raise DistError(f"{what}: {size} bytes is over the {limit}-byte limit")
        data = super().read_small(name, limit)
        # The pinned manifest names this blob by digest: hold the registry to it here,
        # not only through the bundle digest computed later.
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if (got, len(data)) != (digest, size):
            raise DistError(
                f"{what}: the registry sent {len(data)} bytes hashing to "
                f"{got[:23]}…; the manifest says {digest[:23]}… ({size} bytes)"
            )
        return data

    def fetch(self, name: str, dest: Path, size: int, sha256: str) -> None:
        what = self._what(check_name(name, self.reference))
        digest, layer_size = self.layer(name, what)
        if (layer_size, check_sha256(digest, what)) != (size, check_sha256(sha256, what)):
            raise DistError(
                f"{what}: the bundle metadata (sha256 {check_sha256(sha256, what)[:16]}"
                f"…, {size} bytes) and the OCI manifest ({digest[7:23]}…, "
                f"{layer_size} bytes) disagree"
            )
        super().fetch(name, dest, size, sha256)

    def _open(
        self, name: str, start: int, size: int | None, what: str
    ) -> tuple[int, Iterator[bytes]]:
        digest, layer_size = self.layer(name, what)
        headers = {"Range": f"bytes={start}-"} if start > 0 else {}
        # Inside StreamSource's deadline (deadline=None): the request, an error body and
        # then the body are all watched by it.
        resp = self.reg.request("GET", f"blobs/{digest}", what, deadline=None, headers=headers)
        self.reg.check(resp, what, ok=(200, 206))
        return ranged_body(resp, start, layer_size, what, self.reg.server)


class OciSink:
    def __init__(self, uri: BundleURI) -> None:
        self.uri = uri
        self.reg = _repository(uri, push=True)
        self.files: dict[str, tuple[str, int]] = {}
        self.bytes_sent = 0

    def _exists(self, digest: str, size: int, what: str) -> bool:
        with contextlib.closing(self.reg.transfer(what, 0)) as deadline:
            resp = self.reg.request("HEAD", f"blobs/{digest}", what, deadline=deadline)
        resp.close()
        return resp.status_code == 200 and resp.headers.get("Content-Length") == str(size)

    def _upload(self, data: Any, digest: str, size: int, what: str) -> None:
        if self._exists(digest, size, what):
            return
        start = f"{what}: starting the upload"
        with contextlib.closing(self.reg.transfer(start, MAX_ERROR_BODY)) as deadline:
            resp = self.reg.request("POST", "blobs/uploads/", start, deadline=deadline)
            self.reg.check(resp, start, deadline, ok=(202,))
        resp.close()
        if not resp.headers.get("Location"):
            raise DistError(f"{start}: {self.reg.server} sent no upload location")
        url = self.reg.same_origin(resp.headers["Location"], what)
        url += ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(
            {"digest": digest}
        )
        # An upload: our body, of any size, bounded by the per-read timeout (no deadline).
        resp = self.reg.request(
            "PUT",
            url,
            what,
            deadline=None,
            data=data,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        self.reg.check(resp, f"{what}: upload", ok=(201,))
        resp.close()
        self.bytes_sent += size

    def put(self, name: str, src: Path, size: int, sha256: str) -> None:
        what = f"{self.uri}: {check_name(name, str(self.uri))}"
        digest = "sha256:" + check_sha256(sha256, what)
        check_size(size, what)
        if name in self.files:
            raise DistError(f"{what}: pushed twice")
        with open(src, "rb") as fh:
            if os.fstat(fh.fileno()).st_size != size:
                raise DistError(f"{what}: {src} is not {size} bytes; pack again")
            # The registry checks the digest of what it receives and refuses a mismatch.
            self._upload(fh, digest, size, what)
        self.files[name] = (digest, size)

    def finish(self, bundle_digest: str, metadata_names: list[str]) -> str:
        pin = "sha256:" + check_sha256(bundle_digest, str(self.uri))
        missing = [n for n in metadata_names if n not in self.files]
        if missing:
            raise DistError(f"{self.uri}: metadata {missing[0]} was never pushed")
        # Metadata first, in the caller's order, then the rest by name: a stable manifest.
        order = list(dict.fromkeys(metadata_names)) + sorted(set(self.files) - set(metadata_names))
        manifest = encode_artifact([(n, *self.files[n]) for n in order], pin)
        what = f"{self.uri}: manifest"
        if len(manifest) > MAX_MANIFEST:
            raise DistError(
                f"{what}: {len(self.files)} files make a manifest over "
                f"{MAX_MANIFEST} bytes; pack with larger segments"
            )
        self._upload(EMPTY_BLOB, EMPTY_DIGEST, len(EMPTY_BLOB), f"{self.uri}: config")
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        ref = self.uri.tag or digest
        resp = self.reg.request(
            "PUT",
            f"manifests/{ref}",
            what,
            deadline=None,
            data=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        self.reg.check(resp, what, ok=(201,))
        resp.close()
        served = resp.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise DistError(f"{what}: {self.reg.server} stored it as {served[:80]}, not {digest}")
        return str(
            BundleURI("oci", host=self.uri.host, port=self.uri.port, repo=self.uri.repo, pin=digest)
        )

    def abort(self) -> None:
        """Blobs already pushed stay: without a manifest nothing references them."""
