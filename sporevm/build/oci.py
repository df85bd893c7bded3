"""Fetch OCI images (registry or local OCI layout) into the store, verified.

Every manifest, index, config and layer is streamed into the store through
``Store.ingest_blob``, which checks the size bound and the sha256 over the exact
bytes received before anything is parsed. Blobs already in the store are never
fetched again, so a digest-pinned image whose blobs are cached needs no network.

Registries are spoken to through the one registry client (``net/registry.py``,
shared with the ``oci://`` bundle transport): its redirect, token, retry, size,
insecure-registry and deadline policy (every blob within a header deadline and
a whole-transfer deadline enforced by a watchdog, so a trickling registry
cannot hold a build). OCI layouts are read through the shared no-follow walker
(``nofollow.py``). Manifest decoding is in ``ocimanifest.py``; ref parsing in
``ociref.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sporevm import nofollow
from sporevm.build.ocimanifest import (
    ACCEPT,
    MAX_DOC_SIZE,
    MAX_LAYER_SIZE,
    OCI_INDEX,
    Descriptor,
    ImageConfig,
    ImageIndex,
    ImageManifest,
    LayerDesc,
    check_config,
    decode_config,
    decode_manifest_or_index,
    load_json,
    parse_platform,
    select_platform,
)
from sporevm.build.ociref import ImageRef, api_host, check_digest, parse_ref
from sporevm.errors import OCIError, StoreError
from sporevm.net.hosts import Policy
from sporevm.store import Store

# The public API other floors use; refs and layer descriptors are re-exported from here.
__all__ = [
    "ImageConfig",
    "ImageRef",
    "LayerDesc",
    "OCIClient",
    "Progress",
    "ResolvedImage",
    "parse_ref",
]

Progress = Callable[[str, int, int], None]  # (blob digest, bytes done, bytes total)
Blob = tuple[Iterator[bytes], str | None, int | None]  # chunks, content type, length


@dataclass(frozen=True)
class ResolvedImage:
    ref: ImageRef | None  # None when decoded from the store without a reference
    index_digest: str | None  # set if the ref pointed at an index
    manifest_digest: str
    platform: str
    config_digest: str
    layers: tuple[LayerDesc, ...]
    diff_ids: tuple[str, ...]
    config: ImageConfig | None = None  # Env, WorkingDir, User, Entrypoint, Cmd


# -- sources ---------------------------------------------------------------------


class _Source:
    """Where blobs that are not in the store come from."""

    name: str

    def blob(
        self, digest: str, *, manifest: bool, size_hint: int | None, what: str
    ) -> contextlib.AbstractContextManager[Blob]:
        """(chunks, content type, length) of one blob, valid inside the with-block."""
        raise NotImplementedError


class _StoreOnly(_Source):
    def __init__(self, name: str) -> None:
        self.name = name

    def blob(
        self, digest: str, *, manifest: bool, size_hint: int | None, what: str
    ) -> contextlib.AbstractContextManager[Blob]:
        raise OCIError(
            f"{what}: not in the local store and no source to fetch it from; "
            "fetch the image first (with its registry reachable)"
        )


class _LayoutSource(_Source):
    """An OCI image layout directory. Blob paths come from digests only and no
    symlink is followed below the layout root (nofollow.py: every open is
    O_NOFOLLOW, relative to directory fds), so a layout cannot make us read files
    outside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"oci-layout:{root}"

    def _open(self, parts: tuple[str, ...], what: str) -> int:
        try:
            root_fd = nofollow.open_root(self.root)
        except OSError as exc:
            raise OCIError(
                f"{self.name}: cannot open the layout directory ({exc.strerror}); "
                "check the path in the reference"
            ) from None
        rel = "/".join(parts)
        try:
            return nofollow.open_file(root_fd, parts)
        except nofollow.NotARegularFile as exc:
            if not exc.symlink:
                raise OCIError(f"{what}: {rel} in {self.name} is not a regular file") from None
            reason = "a symlink (not followed)"
        except OSError as exc:
            symlink = isinstance(exc, nofollow.NotADirectoryInPath) and exc.symlink
            reason = "a symlink (not followed)" if symlink else os.strerror(exc.errno or 0)
        finally:
            os.close(root_fd)
        raise OCIError(
            f"{what}: {rel} in {self.name}: {reason}; the layout is incomplete "
            "or not an OCI image layout"
        )

    def read_small(self, parts: tuple[str, ...], what: str) -> bytes:
        with os.fdopen(self._open(parts, what), "rb") as fh:
            data = fh.read(MAX_DOC_SIZE + 1)
        if len(data) > MAX_DOC_SIZE:
            raise OCIError(f"{what}: larger than {MAX_DOC_SIZE} bytes")
        return data

    def index(self) -> ImageIndex:
        what = f"{self.name}"
        marker = load_json(self.read_small(("oci-layout",), what), f"{what}/oci-layout")
        version = marker.get("imageLayoutVersion")
        if version != "1.0.0":
            raise OCIError(
                f"{what}: imageLayoutVersion {str(version)[:20]!r} is not supported "
                "(expected 1.0.0)"
            )
        doc = decode_manifest_or_index(
            self.read_small(("index.json",), what), what=f"{what}/index.json", media_type=OCI_INDEX
        )
        if not isinstance(doc, ImageIndex):
            raise OCIError(f"{what}/index.json: is not an image index")
        return doc

    def find_tag(self, tag: str) -> str:
        entries = self.index().manifests
        digests = {e.digest for e in entries if e.ref_name == tag}
        if len(digests) == 1:
            return digests.pop()
        if digests:
            raise OCIError(
                f"{self.name}: tag {tag!r} names {len(digests)} different images; "
                "use @sha256:DIGEST to choose one"
            )
        tags = sorted({e.ref_name for e in entries if e.ref_name}) or ["none"]
        raise OCIError(f"{self.name}: no image tagged {tag!r} (tags: {', '.join(tags)[:200]})")

    @contextlib.contextmanager
    def blob(
        self, digest: str, *, manifest: bool, size_hint: int | None, what: str
    ) -> Iterator[Blob]:
        with os.fdopen(self._open(("blobs", "sha256", digest[len("sha256:") :]), what), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size_hint is not None and size != size_hint:
                raise OCIError(
                    f"{what}: {self.name} has {size} bytes, its descriptor says "
                    f"{size_hint}; the layout is inconsistent"
                )
            yield iter(lambda: fh.read(1 << 20), b""), None, size


class _RegistrySource(_Source):
    """One registry repository over the distribution HTTP API, through the one client."""

    def __init__(self, client: OCIClient, ref: ImageRef) -> None:
        if ref.registry is None or ref.repository is None:
            raise OCIError(f"{ref}: not a registry reference")
        # Imported here: the registry client brings requests/urllib3 (~35 ms), which a
        # build whose image is cached (every no-op build) never needs.
        from sporevm.net.registry import Repository

        self.client = client
        self.name = f"{ref.registry}/{ref.repository}"
        self.repo = Repository(
            api_host(ref.registry),
            ref.repository,
            policy=client.policy,
            error=OCIError,
            registry=ref.registry,
            auth_config=client.auth_config,
            again="try again",
            unreachable_hint=", or use a digest-pinned ref whose blobs are cached",
        )

    @contextlib.contextmanager
    def blob(
        self, digest: str, *, manifest: bool, size_hint: int | None, what: str
    ) -> Iterator[Blob]:
        path = f"manifests/{digest}" if manifest else f"blobs/{digest}"
        limit = MAX_DOC_SIZE if manifest else (size_hint if size_hint is not None else 0)
        expected = size_hint if size_hint is not None else limit
        with contextlib.closing(self.repo.transfer(what, expected)) as deadline:
            resp = self.repo.request(
                "GET", path, what, deadline=deadline, accept=ACCEPT if manifest else None
            )
            self.repo.check(resp, what, deadline)
            try:
                yield (
                    self.repo.body(resp, limit, what, deadline),
                    resp.headers.get("Content-Type"),
                    size_hint,
                )
            finally:
                resp.close()

    def resolve_tag(self, tag: str, what: str) -> str:
        with contextlib.closing(self.repo.transfer(what, 0)) as deadline:
            resp = self.repo.request(
                "HEAD", f"manifests/{tag}", what, deadline=deadline, accept=ACCEPT
            )
        resp.close()
        header = resp.headers.get("Docker-Content-Digest", "")
        if resp.status_code == 200 and header.startswith("sha256:"):
            return check_digest(header, what)
        # No usable HEAD answer (or an error, whose JSON body only a GET carries):
        # GET the document and hash it ourselves.
        body, resp = self.repo.read(f"manifests/{tag}", what, limit=MAX_DOC_SIZE, accept=ACCEPT)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        served = resp.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise OCIError(
                f"{what}: {self.repo.server} says the tag is {served[:80]} but served {digest}"
            )
        self.client.store.ingest_blob_bytes(digest, body, what=what)
        return digest


# -- the client ------------------------------------------------------------------


class OCIClient:
    """Resolves and fetches images. Time, size, retry and redirect bounds are those of
    the one registry client (net/registry.py, net/deadline.py); ``insecure_registries``
    (``--insecure-registry``) may be spoken to over plain HTTP, as loopback may."""

    def __init__(
        self,
        store: Store,
        *,
        insecure_registries: frozenset[str] = frozenset(),
        auth_config: Path | None = None,
    ) -> None:
        self.store = store
        self.policy = Policy(insecure_registries, insecure_option=True)
        self.auth_config = auth_config  # docker config.json; None: $DOCKER_CONFIG or ~/.docker
        self._sources: dict[str, _Source] = {}

    def plain_http_allowed(self, hostport: str) -> bool:
        """Plain HTTP only to loopback or to hosts the user named as insecure."""
        return self.policy.plain_http_allowed(hostport)

    def _source(self, ref: ImageRef) -> _Source:
        key = f"{ref.kind}:{ref.registry}/{ref.repository}:{ref.layout_path}"
        if key not in self._sources:
            if ref.kind == "oci-layout" and ref.layout_path is not None:
                self._sources[key] = _LayoutSource(ref.layout_path)
            else:
                self._sources[key] = _RegistrySource(self, ref)
        return self._sources[key]

    def resolve(self, ref: ImageRef, platform: str) -> str:
        """The digest the reference points at (an index or a manifest)."""
        parse_platform(platform)
        if ref.digest is not None:
            return check_digest(ref.digest, str(ref))
        if ref.tag is None:
            raise OCIError(f"{ref}: neither a tag nor a digest to resolve")
        source = self._source(ref)
        if isinstance(source, _LayoutSource):
            return source.find_tag(ref.tag)
        if not isinstance(source, _RegistrySource):
            raise OCIError(f"{ref}: nowhere to resolve the tag")
        return source.resolve_tag(ref.tag, str(ref))

    def fetch(
        self,
        ref: ImageRef,
        digest: str,
        platform: str,
        progress: Progress | None = None,
        *,
        layers: bool = True,
    ) -> ResolvedImage:
        """Fetch everything the image for ``platform`` needs into the store and decode it.

        ``layers=False`` stops after manifests and config (what resolution needs)."""
        return self._load(self._source(ref), ref, digest, platform, progress, layers)

    def load_cached(self, digest: str, platform: str, ref: ImageRef | None = None) -> ResolvedImage:
        """Decode an image purely from the store; raises if any blob is missing."""
        return self._load(_StoreOnly("store"), ref, digest, platform, None, True)

    # -- internals -----------------------------------------------------------------
    def _load(
        self,
        source: _Source,
        ref: ImageRef | None,
        digest: str,
        platform: str,
        progress: Progress | None,
        layers: bool,
    ) -> ResolvedImage:
        name = str(ref) if ref is not None else "local store"
        check_digest(digest, name)
        plat = parse_platform(platform)
        top_what = f"{name}: manifest {digest}"
        data, ctype = self._document(source, digest, None, top_what, manifest=True)
        doc = decode_manifest_or_index(data, what=top_what, media_type=ctype)
        index_digest: str | None = None
        manifest_digest = digest
        if isinstance(doc, ImageIndex):
            entry: Descriptor = select_platform(doc, plat, what=f"{name}: index {digest}")
            index_digest, manifest_digest = digest, entry.digest
            what = f"{name}: manifest {entry.digest} ({plat})"
            data, _ = self._document(source, entry.digest, entry.size, what, manifest=True)
            doc = decode_manifest_or_index(data, what=what, media_type=entry.media_type)
            if not isinstance(doc, ImageManifest):
                raise OCIError(
                    f"{what}: the index entry is itself an index; nested indexes are not supported"
                )
        manifest: ImageManifest = doc
        cfg_what = f"{name}: config {manifest.config.digest}"
        cfg_data, _ = self._document(
            source, manifest.config.digest, manifest.config.size, cfg_what, manifest=False
        )
        config = decode_config(cfg_data, what=cfg_what)
        check_config(config, manifest, plat, what=cfg_what)
        for layer in manifest.layers if layers else ():
            self._layer(source, name, layer, progress)
        return ResolvedImage(
            ref=ref,
            index_digest=index_digest,
            manifest_digest=manifest_digest,
            platform=str(plat),
            config_digest=manifest.config.digest,
            layers=manifest.layers,
            diff_ids=config.diff_ids,
            config=config,
        )

    def _document(
        self, source: _Source, digest: str, size: int | None, what: str, *, manifest: bool
    ) -> tuple[bytes, str | None]:
        """A small JSON blob: from the store (re-verified) or fetched, verified, stored."""
        ctype: str | None = None
        if not self.store.has_blob(digest):
            with source.blob(digest, manifest=manifest, size_hint=size, what=what) as blob:
                chunks, ctype, _ = blob
                limit = MAX_DOC_SIZE if size is None else min(size, MAX_DOC_SIZE)
                self._ingest(digest, chunks, limit, size, what)
        try:
            data = self.store.read_blob(digest, max_size=MAX_DOC_SIZE, what=what)
        except StoreError as exc:
            raise OCIError(str(exc)) from None
        if size is not None and len(data) != size:
            raise OCIError(
                f"{what}: is {len(data)} bytes but its descriptor says {size}; "
                "the image is inconsistent"
            )
        return data, ctype

    def _layer(
        self, source: _Source, name: str, layer: LayerDesc, progress: Progress | None
    ) -> None:
        what = f"{name}: layer {layer.digest}"
        if self.store.has_blob(layer.digest):
            if progress:
                progress(layer.digest, layer.size, layer.size)
            return
        if layer.size > MAX_LAYER_SIZE:
            raise OCIError(f"{what}: {layer.size} bytes is above the {MAX_LAYER_SIZE} limit")
        with source.blob(layer.digest, manifest=False, size_hint=layer.size, what=what) as (
            chunks,
            _,
            length,
        ):
            if length is not None and length != layer.size:
                raise OCIError(f"{what}: source has {length} bytes, descriptor says {layer.size}")

            def counted() -> Iterator[bytes]:
                done = 0
                for block in chunks:
                    done += len(block)
                    if progress:
                        progress(layer.digest, done, layer.size)
                    yield block

            self._ingest(layer.digest, counted(), layer.size, layer.size, what)

    def _ingest(
        self, digest: str, chunks: Iterator[bytes], limit: int, size: int | None, what: str
    ) -> None:
        def exact() -> Iterator[bytes]:
            total = 0
            for block in chunks:
                total += len(block)
                yield block
            if size is not None and total != size:  # raised before the blob is published
                raise OCIError(f"{what}: received {total} bytes, descriptor says {size}")

        try:
            self.store.ingest_blob(digest, exact(), max_size=limit, what=what)
        except StoreError as exc:
            raise OCIError(str(exc)) from None
