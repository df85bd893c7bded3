"""``s3://bucket/prefix``: bundles as objects ``prefix/<name>`` through boto3.

The endpoint is ``--s3-endpoint``, else ``$SPORE_S3_ENDPOINT``, else boto3's
own resolution (AWS config/env) for real S3. Credentials and region come from
the usual AWS chain; a pull with no credentials at all is sent unsigned
(public buckets). Uploads carry ``ChecksumSHA256`` so the store itself refuses
bytes that do not match; downloads are re-verified by us anyway, and resumed
with ranged GETs. Downloads run under the shared deadlines (deadline.py): the
client's connections register their sockets with them like requests' do.
"""

from __future__ import annotations

import base64
import hashlib
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sporevm.dist.transports import (
    BLOCK,
    StreamSource,
    check_name,
    check_sha256,
    check_size,
)
from sporevm.dist.uri import BundleURI
from sporevm.errors import DistError
from sporevm.net import deadline

ENDPOINT_ENV = "SPORE_S3_ENDPOINT"
_PIECE = 64 << 10
MAX_PUT = 5 << 30  # one PutObject; bundle files are far smaller (packs ≤ 256 MiB)


def resolve_endpoint(endpoint: str | None) -> str | None:
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
    if endpoint is None:
        return None
    try:
        parts = urllib.parse.urlsplit(endpoint)
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        raise DistError(f"S3 endpoint {endpoint[:100]!r}: malformed port") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username
        or parts.query
        or parts.fragment
        or parts.path not in ("", "/")
    ):
        raise DistError(
            f"S3 endpoint {endpoint[:100]!r}: expected http(s)://host[:port] "
            f"(from --s3-endpoint or ${ENDPOINT_ENV})"
        )
    return endpoint


def _client(endpoint: str | None, *, anonymous_ok: bool) -> Any:
    import boto3
    import botocore
    import botocore.config

    session = boto3.session.Session()
    config = botocore.config.Config(
        connect_timeout=deadline.TIMEOUT,
        read_timeout=deadline.TIMEOUT,
        retries={"max_attempts": 3, "mode": "standard"},
        # Custom endpoints (moto, MinIO, Ceph) rarely serve virtual-host buckets.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    if anonymous_ok and session.get_credentials() is None:
        config = config.merge(botocore.config.Config(signature_version=botocore.UNSIGNED))
    return session.client(
        "s3", endpoint_url=endpoint, region_name=session.region_name or "us-east-1", config=config
    )


def _watch(client: Any) -> None:
    """Make the client's connections register with the active deadline (deadline.py).

    botocore has no public hook for its connection classes; its URLLib3Session keeps
    them in one dict per client, shared with every pool manager it makes (proxies
    included), so they are swapped in place for the watched subclasses. Refused if that
    dict is not there: a download whose deadline cannot end a stalled read is not
    bounded in time."""
    classes = getattr(
        getattr(getattr(client, "_endpoint", None), "http_session", None),
        "_pool_classes_by_scheme",
        None,
    )
    if not isinstance(classes, dict) or set(classes) != {"http", "https"}:
        raise DistError(
            "this botocore keeps its connection pools where spore cannot watch "
            "them (no deadline for S3 downloads); install a botocore version "
            "spore supports (see pyproject.toml)"
        )
    classes.update(deadline.watched_pools(classes))


def _errors() -> tuple[type[BaseException], ...]:
    import botocore.exceptions

    return (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


def _explain(exc: BaseException, where: str) -> str:
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "?"))
        if code in ("NoSuchKey", "404", "NotFound"):
            return "not found (check the bucket, prefix and pin)"
        if code == "NoSuchBucket":
            return f"bucket does not exist at {where}; create it first"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access denied ({code}); check AWS credentials"
        if code in ("InvalidRange", "416"):
            return "the object is shorter than expected; it does not match the bundle"
        if code in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
            return f"the store refused the bytes ({code}): they do not match their sha256"
        return f"{code}: {str(err.get('Message', ''))[:120]}"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    if isinstance(
        exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError
    ):
        return f"cannot reach {where}; check --s3-endpoint / ${ENDPOINT_ENV}"
    return f"{type(exc).__name__}: {str(exc)[:160]}"


class _S3Base:
    def __init__(self, uri: BundleURI, endpoint: str | None, *, anonymous_ok: bool) -> None:
        self.uri = uri
        self.endpoint = resolve_endpoint(endpoint)
        self.where = self.endpoint or "S3"
        self.client = _client(self.endpoint, anonymous_ok=anonymous_ok)
        self.errors = _errors()

    def key(self, name: str) -> str:
        return f"{self.uri.prefix}/{name}" if self.uri.prefix else name


class S3Source(_S3Base, StreamSource):
    def __init__(
        self, uri: BundleURI, *, endpoint: str | None = None, mutable: bool = False
    ) -> None:
        # mutable: a remote cache's pointers (pipeline/remote_cache.py), which are decoded
        # strictly and only ever name objects that are then pulled pinned.
        if uri.pin is None and not mutable:
            raise DistError(f"{uri}: s3 pulls must be pinned with @sha256:<bundle digest>")
        super().__init__(uri, endpoint, anonymous_ok=True)
        _watch(self.client)
        self.server = self.where
        self.reference = str(uri)
        self.pinned_bundle_digest = uri.pin
        self.bytes_received = 0

    def _open(
        self, name: str, start: int, size: int | None, what: str
    ) -> tuple[int, Iterator[bytes]]:
        args: dict[str, Any] = {"Bucket": self.uri.bucket, "Key": self.key(name)}
        if start > 0:
            args["Range"] = f"bytes={start}-"
        try:
            resp = self.client.get_object(**args)
        except self.errors as exc:
            raise DistError(f"{what}: {_explain(exc, self.where)}") from None
        body = resp["Body"]
        served = start
        if start > 0 and not resp.get("ContentRange"):
            served = 0  # the store ignored the range: the caller starts over
        length = resp.get("ContentLength")
        if size is not None and isinstance(length, int) and length != size - served:
            body.close()
            raise DistError(
                f"{what}: the object has {length + served} bytes, the bundle "
                f"metadata says {size}; it does not match"
            )

        broken: tuple[type[BaseException], ...] = (*self.errors, OSError)

        def blocks() -> Iterator[bytes]:
            try:
                # Pieces small enough that the deadline sees the bytes as they come.
                yield from body.iter_chunks(_PIECE)
            except broken as exc:
                raise DistError(
                    f"{what}: transfer from {self.where} broke "
                    f"({type(exc).__name__}); run the pull again to resume"
                ) from None
            finally:
                body.close()

        return served, blocks()


class S3Sink(_S3Base):
    def __init__(self, uri: BundleURI, *, endpoint: str | None = None) -> None:
        super().__init__(uri, endpoint, anonymous_ok=False)
        self.files: dict[str, tuple[int, str]] = {}
        self.bytes_sent = 0

    def put(self, name: str, src: Path, size: int, sha256: str) -> None:
        what = f"{self.uri}: {check_name(name, str(self.uri))}"
        want = check_sha256(sha256, what)
        if check_size(size, what) > MAX_PUT:
            raise DistError(f"{what}: {size} bytes is over the {MAX_PUT}-byte single-PUT limit")
        checksum = base64.b64encode(bytes.fromhex(want)).decode()
        key = self.key(name)
        try:
            head = self.client.head_object(Bucket=self.uri.bucket, Key=key, ChecksumMode="ENABLED")
            if head.get("ContentLength") == size and head.get("ChecksumSHA256") == checksum:
                self.files[name] = (size, want)  # already there, verified by the store
                return
        except self.errors:
            pass  # absent (or unreadable): upload
        try:
            with open(src, "rb") as fh:
                # Checked here as well: S3-compatible stores do not all verify ChecksumSHA256
                # (moto does not), and nothing unverified should be published.
                hasher = hashlib.sha256()
                while block := fh.read(BLOCK):
                    hasher.update(block)
                if fh.tell() != size or hasher.hexdigest() != want:
                    raise DistError(
                        f"{what}: {src} does not have the size and sha256 the "
                        "bundle says; it changed since packing — pack again"
                    )
                fh.seek(0)
                self.client.put_object(
                    Bucket=self.uri.bucket,
                    Key=key,
                    Body=fh,
                    ContentLength=size,
                    ChecksumSHA256=checksum,
                )
        except self.errors as exc:
            raise DistError(f"{what}: upload failed: {_explain(exc, self.where)}") from None
        self.bytes_sent += size
        self.files[name] = (size, want)

    def finish(self, bundle_digest: str, metadata_names: list[str]) -> str:
        pin = "sha256:" + check_sha256(bundle_digest, str(self.uri))
        missing = [n for n in metadata_names if n not in self.files]
        if missing:
            raise DistError(f"{self.uri}: metadata {missing[0]} was never pushed")
        return str(self.uri.with_pin(pin))

    def abort(self) -> None:
        """Objects already uploaded stay: they are content-verified, and a pull is pinned."""
