"""Fetch OCI images (registry or local OCI layout) into the store, verified.

Every manifest, index, config and layer is streamed into the store through
``Store.ingest_blob``, which checks the size bound and the sha256 over the exact
bytes received before anything is parsed. Blobs already in the store are never
fetched again, so a digest-pinned image whose blobs are cached needs no network.

The HTTP side uses oras-py's ``Registry`` for the session (cookie policy, URL
scheme). Its request path is bypassed: ``do_request`` retries for minutes on a
dead registry, has no timeouts, follows redirects without a scheme policy and
reads token bodies unbounded; here every request has connect/read timeouts, a
bounded number of attempts inside a deadline, bounded bodies, and redirects
that may not downgrade to plain HTTP. Challenge and token parsing is in
``ociauth.py``; manifest decoding in ``ocimanifest.py``; ref parsing in ``ociref.py``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3

from sporevm.bearer import realm_allowed
from sporevm.build.ociauth import (
    MAX_ERROR_BODY,
    MAX_TOKEN_RESPONSE,
    decode_token_response,
    load_credentials,
    parse_challenges,
    summarize_errors,
)
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
from sporevm.build.ociref import (
    ImageRef,
    api_host,
    check_digest,
    host_name,
    is_loopback,
    parse_ref,
)
from sporevm.errors import OCIError, StoreError
from sporevm.store import Store

# The public API other floors use; refs and layer descriptors are re-exported from here.
__all__ = [
    "ImageConfig", "ImageRef", "LayerDesc", "OCIClient", "Progress", "ResolvedImage", "parse_ref",
]

Progress = Callable[[str, int, int], None]  # (blob digest, bytes done, bytes total)
_CHUNK = 1 << 16
_MAX_REDIRECTS = 5
_MIN_RATE = 64 << 10  # bytes/s a blob download must average, on top of the base deadline
_USER_AGENT = "sporevm/0.1"


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

    def blob(self, digest: str, *, manifest: bool, size_hint: int | None,
             what: str) -> tuple[Iterator[bytes], str | None, int | None]:
        """(chunks, content type, length) of one blob."""
        raise NotImplementedError


class _StoreOnly(_Source):
    def __init__(self, name: str) -> None:
        self.name = name

    def blob(self, digest: str, *, manifest: bool, size_hint: int | None,
             what: str) -> tuple[Iterator[bytes], str | None, int | None]:
        raise OCIError(f"{what}: not in the local store and no source to fetch it from; "
                       "fetch the image first (with its registry reachable)")


class _LayoutSource(_Source):
    """An OCI image layout directory. Blob paths come from digests only and no
    symlink is followed below the layout root (every open is O_NOFOLLOW, relative
    to directory fds), so a layout cannot make us read files outside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"oci-layout:{root}"

    def _open(self, parts: tuple[str, ...], what: str) -> int:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OCIError(f"{self.name}: cannot open the layout directory ({exc.strerror}); "
                           "check the path in the reference") from None
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                nfd = os.open(part, flags | (0 if last else os.O_DIRECTORY), dir_fd=fd)
                os.close(fd)
                fd = nfd
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OCIError(f"{what}: {'/'.join(parts)} in {self.name} is not a regular file")
            return fd
        except OSError as exc:
            os.close(fd)
            reason = "a symlink (not followed)" if exc.errno == errno.ELOOP else exc.strerror
            raise OCIError(f"{what}: {'/'.join(parts)} in {self.name}: {reason}; "
                           "the layout is incomplete or not an OCI image layout") from None
        except BaseException:
            os.close(fd)
            raise

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
            raise OCIError(f"{what}: imageLayoutVersion {str(version)[:20]!r} is not supported "
                           "(expected 1.0.0)")
        doc = decode_manifest_or_index(self.read_small(("index.json",), what),
                                       what=f"{what}/index.json", media_type=OCI_INDEX)
        if not isinstance(doc, ImageIndex):
            raise OCIError(f"{what}/index.json: is not an image index")
        return doc

    def find_tag(self, tag: str) -> str:
        entries = self.index().manifests
        digests = {e.digest for e in entries if e.ref_name == tag}
        if len(digests) == 1:
            return digests.pop()
        if digests:
            raise OCIError(f"{self.name}: tag {tag!r} names {len(digests)} different images; "
                           "use @sha256:DIGEST to choose one")
        tags = sorted({e.ref_name for e in entries if e.ref_name}) or ["none"]
        raise OCIError(f"{self.name}: no image tagged {tag!r} (tags: {', '.join(tags)[:200]})")

    def blob(self, digest: str, *, manifest: bool, size_hint: int | None,
             what: str) -> tuple[Iterator[bytes], str | None, int | None]:
        fd = self._open(("blobs", "sha256", digest[len("sha256:"):]), what)
        size = os.fstat(fd).st_size
        if size_hint is not None and size != size_hint:
            os.close(fd)
            raise OCIError(f"{what}: {self.name} has {size} bytes, its descriptor says "
                           f"{size_hint}; the layout is inconsistent")

        def chunks() -> Iterator[bytes]:
            with os.fdopen(fd, "rb") as fh:
                while block := fh.read(1 << 20):
                    yield block
        return chunks(), None, size


class _RegistrySource(_Source):
    """One registry repository over the distribution HTTP API."""

    def __init__(self, client: OCIClient, ref: ImageRef) -> None:
        assert ref.registry is not None and ref.repository is not None
        self.client = client
        self.registry = ref.registry
        self.repository = ref.repository
        self.host = api_host(ref.registry)
        self.name = f"{ref.registry}/{ref.repository}"
        self.plain_http = client.plain_http_allowed(self.host)
        # oras-py's Registry supplies the session (cookies ignored) and URL scheme.
        # Imported here: only registry refs need it, and it costs ~0.1 s of startup.
        import oras.provider

        self._oras = oras.provider.Registry(hostname=self.host, insecure=self.plain_http)
        self.session: requests.Session = self._oras.session
        self.base = f"{self._oras.prefix}://{self.host}/v2/{self.repository}"
        self._auth: str | None = None

    # -- request plumbing ------------------------------------------------------
    def _unreachable(self, exc: Exception, what: str) -> OCIError:
        if isinstance(exc, requests.exceptions.SSLError):
            hint = ("if it serves plain HTTP, pass --insecure-registry " + self.host
                    if not self.plain_http else "check its certificate")
            return OCIError(f"{what}: TLS handshake with registry {self.host} failed; {hint}")
        kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
        return OCIError(f"{what}: cannot reach registry {self.host} ({kind}); check that it "
                        "is running and reachable, or use a digest-pinned ref whose blobs are "
                        "cached")

    def _send(self, method: str, url: str, headers: dict[str, str],
              what: str) -> requests.Response:
        """One request with bounded retries inside a deadline; follows safe redirects."""
        client = self.client
        deadline = time.monotonic() + client.timeout
        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._follow(method, url, headers, what)
            except requests.exceptions.SSLError as exc:
                raise self._unreachable(exc, what) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                if attempt >= client.max_attempts or time.monotonic() + delay > deadline:
                    raise self._unreachable(exc, what) from None
            except requests.exceptions.RequestException as exc:
                raise OCIError(f"{what}: request to registry {self.host} failed "
                               f"({type(exc).__name__})") from None
            else:
                retryable = resp.status_code in (429, 502, 503, 504)
                if (not retryable or attempt >= client.max_attempts
                        or time.monotonic() + delay > deadline):
                    return resp
                resp.close()
            time.sleep(delay)
            delay *= 2

    def _follow(self, method: str, url: str, headers: dict[str, str],
                what: str) -> requests.Response:
        origin = urllib.parse.urlsplit(url).netloc
        for _ in range(_MAX_REDIRECTS + 1):
            resp = self.session.request(method, url, headers=headers, stream=True,
                                        allow_redirects=False,
                                        timeout=(self.client.timeout, self.client.timeout))
            if resp.status_code not in (301, 302, 303, 307, 308):
                return resp
            location = resp.headers.get("Location", "")
            resp.close()
            try:
                url = urllib.parse.urljoin(url, location)
                parts = urllib.parse.urlsplit(url)
                parts.port  # noqa: B018  (raises ValueError on a malformed port)
            except ValueError:
                raise OCIError(f"{what}: registry {self.host} redirected to a malformed URL "
                               f"{location[:100]!r}") from None
            if parts.scheme != "https" and not (
                    parts.scheme == "http" and self.client.plain_http_allowed(parts.netloc)):
                raise OCIError(f"{what}: registry {self.host} redirected to {parts.scheme}://"
                               f"{parts.netloc[:100]}; only HTTPS redirects are followed")
            if parts.netloc != origin:  # never hand our credentials to another host
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
        raise OCIError(f"{what}: registry {self.host} redirected more than {_MAX_REDIRECTS} times")

    def request(self, method: str, path: str, *, what: str,
                accept: str | None = None) -> requests.Response:
        """A request against the repository, answering auth challenges once."""
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if accept:
            headers["Accept"] = accept
        if self._auth:
            headers["Authorization"] = self._auth
        url = f"{self.base}/{path}"
        resp = self._send(method, url, headers, what)
        if resp.status_code == 401:
            header = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            self._auth = self._authenticate(header, what)
            headers["Authorization"] = self._auth
            resp = self._send(method, url, headers, what)
            if resp.status_code == 401:
                resp.close()
                raise OCIError(f"{what}: registry {self.host} refused our credentials (HTTP 401); "
                               f"check `docker login {self.registry}` / ~/.docker/config.json")
        return resp

    def _authenticate(self, header: str, what: str) -> str:
        challenges = parse_challenges(header)
        creds = load_credentials(self.registry, self.client.auth_config)
        for ch in challenges:
            if ch.scheme == "bearer":
                return "Bearer " + self._token(ch.params, creds, what)
        for ch in challenges:
            if ch.scheme == "basic" and creds:
                return "Basic " + creds
        schemes = ", ".join(ch.scheme for ch in challenges)
        raise OCIError(f"{what}: registry {self.host} requires authentication ({schemes}); "
                       f"run `docker login {self.registry}` or add credentials to "
                       "~/.docker/config.json")

    def _token(self, params: dict[str, str], creds: str | None, what: str) -> str:
        realm = params.get("realm", "")
        if not realm_allowed(realm, lambda p: self.client.plain_http_allowed(p.netloc)):
            raise OCIError(f"{what}: registry {self.host} sent token realm {realm[:100]!r}; "
                           "only https realms (or plain http on loopback/insecure hosts) are used")
        parts = urllib.parse.urlsplit(realm)
        query = {"scope": params.get("scope") or f"repository:{self.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        headers = {"User-Agent": _USER_AGENT, "Accept": "application/json",
                   "Accept-Encoding": "identity"}
        if creds:
            headers["Authorization"] = "Basic " + creds
        where = f"{what}: token server {parts.netloc[:100]}"
        resp = self._send("GET", url, headers, where)
        if resp.status_code != 200:
            detail = summarize_errors(self.read_body(resp, MAX_ERROR_BODY, where, strict=False))
            hint = ("credentials rejected" if creds else
                    f"anonymous access refused; run `docker login {self.registry}`")
            raise OCIError(f"{where}: HTTP {resp.status_code} ({detail or hint})")
        return decode_token_response(self.read_body(resp, MAX_TOKEN_RESPONSE, where), what=where)

    def read_body(self, resp: requests.Response, limit: int, what: str, *,
                  strict: bool = True) -> bytes:
        parts: list[bytes] = []
        total = 0
        try:
            for block in self.stream(resp, limit, what, size=None):
                parts.append(block)
                total += len(block)
        except OCIError:
            if strict:
                raise
        return b"".join(parts)[:limit]

    def stream(self, resp: requests.Response, limit: int, what: str,
               size: int | None) -> Iterator[bytes]:
        """The exact bytes of a response body (no Content-Encoding decoding), bounded."""
        # Base deadline plus a floor throughput, so a server dripping bytes cannot
        # hold a build forever while never tripping the per-read timeout.
        budget = self.client.timeout * 3 + (size or 0) / _MIN_RATE
        deadline = time.monotonic() + budget
        total = 0
        try:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise OCIError(f"{what}: registry {self.host} announces {length} bytes, more "
                               f"than the {limit}-byte limit")
            for block in resp.raw.stream(_CHUNK, decode_content=False):
                total += len(block)
                if total > limit:
                    raise OCIError(f"{what}: more than {limit} bytes received; refusing")
                if time.monotonic() > deadline:
                    raise OCIError(f"{what}: registry {self.host} is sending too slowly; gave up")
                yield block
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                OSError) as exc:
            raise OCIError(f"{what}: connection to registry {self.host} broke while reading "
                           f"({type(exc).__name__}); retry") from None
        finally:
            resp.close()

    def check_status(self, resp: requests.Response, what: str) -> None:
        if resp.status_code == 200:
            return
        detail = summarize_errors(self.read_body(resp, MAX_ERROR_BODY, what, strict=False))
        detail = f" ({detail})" if detail else ""
        if resp.status_code == 404:
            raise OCIError(f"{what}: not found in registry {self.host} (HTTP 404{detail}); "
                           "check the repository, tag or digest")
        if resp.status_code == 403:
            raise OCIError(f"{what}: access denied by registry {self.host} (HTTP 403{detail}); "
                           f"check your credentials for {self.registry}")
        raise OCIError(f"{what}: registry {self.host} answered HTTP {resp.status_code}{detail}")

    # -- the two things fetch needs -----------------------------------------------
    def blob(self, digest: str, *, manifest: bool, size_hint: int | None,
             what: str) -> tuple[Iterator[bytes], str | None, int | None]:
        path = f"manifests/{digest}" if manifest else f"blobs/{digest}"
        resp = self.request("GET", path, what=what, accept=ACCEPT if manifest else None)
        self.check_status(resp, what)
        limit = MAX_DOC_SIZE if manifest else (size_hint if size_hint is not None else 0)
        return (self.stream(resp, limit, what, size_hint), resp.headers.get("Content-Type"),
                size_hint)

    def resolve_tag(self, tag: str, what: str) -> str:
        resp = self.request("HEAD", f"manifests/{tag}", what=what, accept=ACCEPT)
        resp.close()
        header = resp.headers.get("Docker-Content-Digest", "")
        if resp.status_code == 200 and header.startswith("sha256:"):
            return check_digest(header, what)
        # No usable HEAD answer (or an error, whose JSON body only a GET carries):
        # GET the document and hash it ourselves.
        resp = self.request("GET", f"manifests/{tag}", what=what, accept=ACCEPT)
        self.check_status(resp, what)
        body = b"".join(self.stream(resp, MAX_DOC_SIZE, what, None))
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        served = resp.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise OCIError(f"{what}: registry {self.host} says the tag is {served[:80]} but "
                           f"served {digest}")
        self.client.store.ingest_blob_bytes(digest, body, what=what)
        return digest


# -- the client ------------------------------------------------------------------


class OCIClient:
    def __init__(self, store: Store, *, insecure_registries: frozenset[str] = frozenset(),
                 timeout: float = 10.0, max_attempts: int = 3,
                 auth_config: Path | None = None) -> None:
        self.store = store
        self.insecure_registries = insecure_registries
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.auth_config = auth_config  # docker config.json; None: $DOCKER_CONFIG or ~/.docker
        self._sources: dict[str, _Source] = {}

    def plain_http_allowed(self, hostport: str) -> bool:
        """Plain HTTP only to loopback or to hosts the user named as insecure."""
        return (is_loopback(hostport) or hostport in self.insecure_registries
                or host_name(hostport) in self.insecure_registries)

    def _source(self, ref: ImageRef) -> _Source:
        key = f"{ref.kind}:{ref.registry}/{ref.repository}:{ref.layout_path}"
        if key not in self._sources:
            if ref.kind == "oci-layout":
                assert ref.layout_path is not None
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
        assert isinstance(source, _RegistrySource)
        return source.resolve_tag(ref.tag, str(ref))

    def fetch(self, ref: ImageRef, digest: str, platform: str,
              progress: Progress | None = None, *, layers: bool = True) -> ResolvedImage:
        """Fetch everything the image for ``platform`` needs into the store and decode it.

        ``layers=False`` stops after manifests and config (what resolution needs)."""
        return self._load(self._source(ref), ref, digest, platform, progress, layers)

    def load_cached(self, digest: str, platform: str,
                    ref: ImageRef | None = None) -> ResolvedImage:
        """Decode an image purely from the store; raises if any blob is missing."""
        return self._load(_StoreOnly("store"), ref, digest, platform, None, True)

    # -- internals -----------------------------------------------------------------
    def _load(self, source: _Source, ref: ImageRef | None, digest: str, platform: str,
              progress: Progress | None, layers: bool) -> ResolvedImage:
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
                raise OCIError(f"{what}: the index entry is itself an index; nested indexes "
                               "are not supported")
        manifest: ImageManifest = doc
        cfg_what = f"{name}: config {manifest.config.digest}"
        cfg_data, _ = self._document(source, manifest.config.digest, manifest.config.size,
                                     cfg_what, manifest=False)
        config = decode_config(cfg_data, what=cfg_what)
        check_config(config, manifest, plat, what=cfg_what)
        for layer in manifest.layers if layers else ():
            self._layer(source, name, layer, progress)
        return ResolvedImage(ref=ref, index_digest=index_digest, manifest_digest=manifest_digest,
                             platform=str(plat), config_digest=manifest.config.digest,
                             layers=manifest.layers, diff_ids=config.diff_ids, config=config)

    def _document(self, source: _Source, digest: str, size: int | None, what: str, *,
                  manifest: bool) -> tuple[bytes, str | None]:
        """A small JSON blob: from the store (re-verified) or fetched, verified, stored."""
        ctype: str | None = None
        if not self.store.has_blob(digest):
            chunks, ctype, _ = source.blob(digest, manifest=manifest, size_hint=size, what=what)
            limit = MAX_DOC_SIZE if size is None else min(size, MAX_DOC_SIZE)
            self._ingest(digest, chunks, limit, size, what)
        try:
            data = self.store.read_blob(digest, max_size=MAX_DOC_SIZE, what=what)
        except StoreError as exc:
            raise OCIError(str(exc)) from None
        if size is not None and len(data) != size:
            raise OCIError(f"{what}: is {len(data)} bytes but its descriptor says {size}; "
                           "the image is inconsistent")
        return data, ctype

    def _layer(self, source: _Source, name: str, layer: LayerDesc,
               progress: Progress | None) -> None:
        what = f"{name}: layer {layer.digest}"
        if self.store.has_blob(layer.digest):
            if progress:
                progress(layer.digest, layer.size, layer.size)
            return
        if layer.size > MAX_LAYER_SIZE:
            raise OCIError(f"{what}: {layer.size} bytes is above the {MAX_LAYER_SIZE} limit")
        chunks, _, length = source.blob(layer.digest, manifest=False, size_hint=layer.size,
                                        what=what)
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

    def _ingest(self, digest: str, chunks: Iterator[bytes], limit: int, size: int | None,
                what: str) -> None:
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
