"""``oci://host[:port]/repo[:tag]``: a bundle as an OCI artifact in a registry.

Every bundle file is one layer (media type ``application/vnd.spore.bundle.file.v1``,
its name in ``org.opencontainers.image.title``, its sha256 as the layer digest, so
the registry verifies it natively); the config is the OCI empty descriptor; the
manifest's ``artifactType`` is ``application/vnd.spore.bundle.v1`` and its
``org.spore.bundle.digest`` annotation carries the bundle digest. Push returns
``oci://host/repo@sha256:<manifest digest>``; pull fetches that manifest by
digest, checks its sha256 against the pin, and only then trusts the annotation
and the name → blob map.

oras-py's ``Registry`` provides the session (cookies ignored), the URL scheme
and the token auth dance on a 401; the requests themselves are ours, with
deadlines (deadline.py), bounded bodies, no retry loops and streamed uploads (oras-py's
``do_request`` retries for minutes and its ``put_upload`` reads a whole blob
into memory). Plain HTTP only to loopback registries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from sporevm.bearer import (
    MAX_TOKEN_LEN,
    MAX_TOKEN_RESPONSE,
    parse_challenges,
    realm_allowed,
    valid_bearer,
)
from sporevm.dist.deadline import Deadline, request_timeout
from sporevm.dist.transport_http import (
    USER_AGENT,
    WatchedAdapter,
    ranged_body,
    status_text,
    stream,
)
from sporevm.dist.transports import (
    StreamSource,
    check_name,
    check_sha256,
    check_size,
)
from sporevm.dist.uri import BundleURI
from sporevm.errors import DistError, OCIError
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
_MAX_REDIRECTS = 5
_EMPTY_CONFIG = {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_BLOB)}


def encode_artifact(files: list[tuple[str, str, int]], bundle_digest: str) -> bytes:
    """The canonical manifest bytes for (name, 'sha256:<hex>', size) layers, in order."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": _EMPTY_CONFIG,
        "layers": [{"mediaType": FILE_MEDIA_TYPE, "digest": digest, "size": size,
                    "annotations": {TITLE: name}} for name, digest, size in files],
        "annotations": {BUNDLE_DIGEST: bundle_digest},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def decode_artifact(data: bytes, what: str) -> tuple[dict[str, tuple[str, int]], str]:
    """Manifest bytes → ({name: ('sha256:<hex>', size)}, bundle digest). Strict and canonical."""
    if len(data) > MAX_MANIFEST:
        raise DistError(f"{what}: OCI manifest larger than {MAX_MANIFEST} bytes")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicate_keys,
                         parse_constant=reject_constant, parse_float=reject_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DistError(f"{what}: OCI manifest is not strict JSON ({str(exc)[:100]})") from None

    def fail(why: str) -> DistError:
        return DistError(f"{what}: not a spore bundle artifact: {why}")

    if not isinstance(doc, dict) or set(doc) != {"schemaVersion", "mediaType", "artifactType",
                                                 "config", "layers", "annotations"}:
        raise fail("expected exactly schemaVersion, mediaType, artifactType, config, layers, "
                   "annotations")
    if doc["schemaVersion"] != 2 or isinstance(doc["schemaVersion"], bool):
        raise fail("schemaVersion must be 2")
    if doc["mediaType"] != OCI_MANIFEST or doc["artifactType"] != ARTIFACT_TYPE:
        raise fail(f"mediaType/artifactType must be {OCI_MANIFEST} / {ARTIFACT_TYPE}")
    if doc["config"] != _EMPTY_CONFIG:
        raise fail("config must be the OCI empty descriptor")
    notes = doc["annotations"]
    if not isinstance(notes, dict) or set(notes) != {BUNDLE_DIGEST} \
            or not isinstance(notes[BUNDLE_DIGEST], str):
        raise fail(f"annotations must hold exactly {BUNDLE_DIGEST}")
    bundle_digest = "sha256:" + check_sha256(notes[BUNDLE_DIGEST], what)
    if bundle_digest != notes[BUNDLE_DIGEST]:
        raise fail(f"{BUNDLE_DIGEST} must be sha256:<hex>")
    layers = doc["layers"]
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise fail(f"layers must be a list of at most {MAX_LAYERS}")
    files: dict[str, tuple[str, int]] = {}
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or set(layer) != {"mediaType", "digest", "size",
                                                         "annotations"} \
                or layer["mediaType"] != FILE_MEDIA_TYPE:
            raise fail(f"layers[{i}] must be a {FILE_MEDIA_TYPE} descriptor with exactly "
                       "mediaType, digest, size, annotations")
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


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _BoundedAdapter(WatchedAdapter):
    """Deadlines, and a bounded body, for requests we do not issue ourselves.

    Ours all ask for ``stream=True`` and bound what they read; those pass through
    unchanged. The rest are oras-py's token fetches, which would read a whole body
    into memory: here they get at most MAX_TOKEN_RESPONSE bytes, raw (no
    Content-Encoding decoding) and within their own deadline, or a DistError.
    """

    def __init__(self, reference: str) -> None:
        super().__init__()
        self.reference = reference

    def send(self, request: requests.PreparedRequest, *args: Any,
             **kwargs: Any) -> requests.Response:
        # requests' Session.send passes everything but the request by keyword.
        if not args and kwargs.get("timeout") is None:
            kwargs["timeout"] = request_timeout()
        if args or kwargs.get("stream"):
            return super().send(request, *args, **kwargs)
        request.headers["Accept-Encoding"] = "identity"
        parts = urllib.parse.urlsplit(request.url or "")
        where = f"{parts.scheme}://{parts.netloc}{parts.path}"[:160]
        send = super().send
        with contextlib.closing(Deadline(f"{self.reference}: token response", where,
                                         MAX_TOKEN_RESPONSE)) as deadline:
            resp = deadline.open(lambda: send(request, **{
                **kwargs, "stream": True, "timeout": request_timeout()}))
            try:
                data = self._read(resp, where, deadline)
            finally:
                resp.close()
        resp._content = data  # what requests' own non-streamed read would have stored
        return resp

    def _read(self, resp: requests.Response, where: str, deadline: Deadline) -> bytes:
        limit = MAX_TOKEN_RESPONSE
        too_big = DistError(f"{self.reference}: token response from {where} exceeds "
                            f"{limit >> 20} MiB; is this a registry?")
        length = resp.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_big
        chunks: list[bytes] = []
        total = 0
        for block in deadline.guard(stream(resp, self.reference, where)):
            total += len(block)
            if total > limit:
                raise too_big
            chunks.append(block)
        return b"".join(chunks)


class _Registry:
    """One repository of one registry; every request has timeouts and no retry loop."""

    def __init__(self, uri: BundleURI) -> None:
        import oras.provider  # ~0.1 s of import; only oci:// needs it

        self.uri = uri
        self.server = f"registry {uri.netloc}"
        self._oras = oras.provider.Registry(hostname=uri.netloc, insecure=_loopback(uri.host))
        self.session: requests.Session = self._oras.session
        self.session.max_redirects = _MAX_REDIRECTS  # oras-py's token fetch follows them
        for prefix in ("https://", "http://"):
            self.session.mount(prefix, _BoundedAdapter(str(uri)))
        self.origin = f"{self._oras.prefix}://{uri.netloc}"
        self.base = f"{self.origin}/v2/{uri.repo}/"
        self._auth: dict[str, str] = {}
        self._configs_loaded = False

    def request(self, method: str, url: str, what: str, *, headers: dict[str, str] | None = None,
                data: Any = None) -> requests.Response:
        hdrs = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
        for attempt in (1, 2):
            if hasattr(data, "seek"):
                data.seek(0)
            resp = self._send(method, url, {**hdrs, **self._auth}, data, what)
            if resp.status_code != 401 or attempt == 2:
                return resp
            resp.close()
            self._authenticate(resp, what)
        raise AssertionError("unreachable")

    def _send(self, method: str, url: str, headers: dict[str, str], data: Any,
              what: str) -> requests.Response:
        """One request; GETs follow redirects (registries send blob downloads to storage
        or a CDN) only to HTTPS or loopback, dropping credentials on a host change. The
        bytes are verified by digest either way."""
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                resp = self.session.request(method, url, headers=headers, data=data,
                                            stream=True, allow_redirects=False,
                                            timeout=request_timeout())
            except requests.exceptions.RequestException as exc:
                kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else \
                    "connection failed"
                raise DistError(f"{what}: cannot reach {self.server} ({kind}); check that it "
                                "is running") from None
            if method != "GET" or resp.status_code not in (301, 302, 303, 307, 308):
                return resp
            resp.close()
            location = resp.headers.get("Location", "")
            try:
                parts = urllib.parse.urlsplit(urllib.parse.urljoin(url, location))
                host = parts.hostname or ""
                parts.port  # noqa: B018  (raises ValueError on a malformed port)
            except ValueError:
                raise DistError(f"{what}: {self.server} redirected to a malformed URL "
                                f"{location[:100]!r}") from None
            if parts.scheme != "https" and not (parts.scheme == "http" and _loopback(host)):
                raise DistError(f"{what}: {self.server} redirected to {parts.scheme}://"
                                f"{parts.netloc[:100]}; only HTTPS redirects are followed")
            if parts.netloc != urllib.parse.urlsplit(url).netloc:
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
            url = parts.geturl()
        raise DistError(f"{what}: {self.server} redirected more than {_MAX_REDIRECTS} times")

    def _authenticate(self, resp: requests.Response, what: str) -> None:
        # Credentials come from docker's config through oras-py (~/.docker/config.json,
        # plus $DOCKER_CONFIG/config.json as docker itself honours it).
        auth = self._oras.auth
        if not self._configs_loaded:
            extra = Path(os.environ.get("DOCKER_CONFIG", "/nonexistent")) / "config.json"
            container = self._oras.get_container(f"{self.uri.netloc}/{self.uri.repo}")
            auth.load_configs(container, configs=[str(extra)] if extra.is_file() else None)
            self._configs_loaded = True
        login = (f"{what}: {self.server} requires authentication; run "
                 f"`docker login {self.uri.netloc}`")
        creds = getattr(auth, "_basic_auth", None)
        if resp.headers.get("WWW-Authenticate", "").lower().startswith("basic"):
            # oras-py's token backend only speaks Bearer; Basic is one header.
            if not creds:
                raise DistError(login)
            self._auth = {"Authorization": f"Basic {creds}"}
            return
        self._check_realm(resp, what)  # before oras-py sends credentials anywhere
        try:
            headers, changed = auth.authenticate_request(resp, {})
        except (requests.exceptions.RequestException, ValueError, AttributeError,
                TypeError, KeyError) as exc:
            raise DistError(f"{what}: authentication with {self.server} failed "
                            f"({type(exc).__name__})") from None
        if not changed or "Authorization" not in headers:
            raise DistError(login)
        value = str(headers["Authorization"])
        if not value.startswith("Bearer ") or not valid_bearer(value[7:]):
            auth.token = None  # oras-py would hand the cached token out again
            raise DistError(f"{what}: the token server of {self.server} sent a malformed "
                            f"token (not 1 to {MAX_TOKEN_LEN} printable ASCII characters)")
        self._auth = {"Authorization": value}

    def _check_realm(self, resp: requests.Response, what: str) -> None:
        """oras-py fetches the token from whatever realm the challenge names, with the
        docker-config credentials: only an https realm, or plain http on loopback."""
        header = resp.headers.get("WWW-Authenticate", "")
        try:
            challenges = parse_challenges(header)
        except OCIError as exc:
            raise DistError(f"{what}: {self.server}: {exc}") from None
        for ch in challenges:
            if ch.scheme != "bearer":
                continue
            realm = ch.params.get("realm", "")
            if not realm_allowed(realm, lambda p: _loopback(p.hostname or "")):
                raise DistError(f"{what}: {self.server} names the token realm {realm[:100]!r}; "
                                "only https realms (or plain http on loopback) are used")

    def read_body(self, resp: requests.Response, limit: int, what: str,
                  deadline: Deadline) -> bytes:
        parts: list[bytes] = []
        total = 0
        for block in deadline.guard(stream(resp, what, self.server)):
            total += len(block)
            if total > limit:
                resp.close()
                raise DistError(f"{what}: more than {limit} bytes from {self.server}; refusing")
            parts.append(block)
        return b"".join(parts)

    def fail(self, resp: requests.Response, what: str) -> DistError:
        resp.close()
        return DistError(f"{what}: {status_text(resp.status_code, self.server)}")

    def same_origin(self, location: str, what: str) -> str:
        url = urllib.parse.urljoin(self.base, location)
        parts = urllib.parse.urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            raise DistError(f"{what}: {self.server} sent the upload to {parts.netloc[:100]!r}; "
                            "uploads only go to the registry named in the URI")
        return url


class OciSource(StreamSource):
    def __init__(self, uri: BundleURI) -> None:
        self.reg = _Registry(uri)
        self.bytes_received = 0
        ref = uri.pin or uri.tag
        if ref is None:
            raise DistError(f"{uri}: oci pulls need @sha256:<manifest digest> "
                            "(or a tag with --allow-mutable)")
        what = f"{uri}: manifest"
        self.server = self.reg.server
        with contextlib.closing(Deadline(what, self.server, MAX_MANIFEST)) as deadline:
            resp = deadline.open(lambda: self.reg.request(
                "GET", f"{self.reg.base}manifests/{ref}", what,
                headers={"Accept": OCI_MANIFEST}))
            if resp.status_code != 200:
                raise self.reg.fail(resp, what)
            data = self.reg.read_body(resp, MAX_MANIFEST, what, deadline)
        self.bytes_received += len(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if uri.pin is not None and digest != uri.pin:
            raise DistError(f"{what}: the registry served a manifest with digest {digest}, "
                            "not the pinned one; refusing it")
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
            raise DistError(f"{what}: not a layer of the OCI artifact; the bundle and its "
                            "artifact manifest disagree")
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
            raise DistError(f"{what}: the registry sent {len(data)} bytes hashing to "
                            f"{got[:23]}…; the manifest says {digest[:23]}… ({size} bytes)")
        return data

    def fetch(self, name: str, dest: Path, size: int, sha256: str) -> None:
        what = self._what(check_name(name, self.reference))
        digest, layer_size = self.layer(name, what)
        if (layer_size, check_sha256(digest, what)) != (size, check_sha256(sha256, what)):
            raise DistError(f"{what}: the bundle metadata (sha256 {check_sha256(sha256, what)[:16]}"
                            f"…, {size} bytes) and the OCI manifest ({digest[7:23]}…, "
                            f"{layer_size} bytes) disagree")
        super().fetch(name, dest, size, sha256)

    def _open(self, name: str, start: int, size: int | None,
              what: str) -> tuple[int, Iterator[bytes]]:
        digest, layer_size = self.layer(name, what)
        headers = {"Range": f"bytes={start}-"} if start > 0 else {}
        resp = self.reg.request("GET", f"{self.reg.base}blobs/{digest}", what, headers=headers)
        return ranged_body(resp, start, layer_size, what, self.reg.server)


class OciSink:
    def __init__(self, uri: BundleURI) -> None:
        self.uri = uri
        self.reg = _Registry(uri)
        self.files: dict[str, tuple[str, int]] = {}
        self.bytes_sent = 0

    def _exists(self, digest: str, size: int, what: str) -> bool:
        resp = self.reg.request("HEAD", f"{self.reg.base}blobs/{digest}", what)
        resp.close()
        return resp.status_code == 200 and resp.headers.get("Content-Length") == str(size)

    def _upload(self, data: Any, digest: str, size: int, what: str) -> None:
        if self._exists(digest, size, what):
            return
        resp = self.reg.request("POST", f"{self.reg.base}blobs/uploads/", what)
        resp.close()
        if resp.status_code != 202 or not resp.headers.get("Location"):
            raise self.reg.fail(resp, f"{what}: starting the upload")
        url = self.reg.same_origin(resp.headers["Location"], what)
        url += ("&" if urllib.parse.urlsplit(url).query else "?") + \
            urllib.parse.urlencode({"digest": digest})
        resp = self.reg.request("PUT", url, what, data=data, headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(size)})
        resp.close()
        if resp.status_code != 201:
            raise self.reg.fail(resp, f"{what}: upload")
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
            raise DistError(f"{what}: {len(self.files)} files make a manifest over "
                            f"{MAX_MANIFEST} bytes; pack with larger segments")
        self._upload(EMPTY_BLOB, EMPTY_DIGEST, len(EMPTY_BLOB), f"{self.uri}: config")
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        ref = self.uri.tag or digest
        resp = self.reg.request("PUT", f"{self.reg.base}manifests/{ref}", what,
                                data=manifest, headers={"Content-Type": OCI_MANIFEST})
        resp.close()
        if resp.status_code != 201:
            raise self.reg.fail(resp, what)
        served = resp.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise DistError(f"{what}: {self.reg.server} stored it as {served[:80]}, "
                            f"not {digest}")
        return str(BundleURI("oci", host=self.uri.host, port=self.uri.port,
                             repo=self.uri.repo, pin=digest))

    def abort(self) -> None:
        """Blobs already pushed stay: without a manifest nothing references them."""

