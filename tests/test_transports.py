"""Every transport against its real server: put via the Sink, read via the Source.

file:// (a directory), http:// (a static server over a pushed directory), s3://
(moto's S3 server) and oci:// (Debian's docker-registry). For each: round trip,
a flipped byte on the server side fails with no dest file left, a truncated
transfer fails, and a partial dest resumes by fetching only the missing tail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from registry import LocalRegistry

from sporevm.dist.transport_oci import decode_artifact, encode_artifact
from sporevm.dist.transports import Sink, Source, open_sink, open_source
from sporevm.dist.uri import URIError, parse_pull_uri, parse_push_uri
from sporevm.errors import DistError
from tests.dist_servers import (  # noqa: F401
    AuthRegistry,
    S3Server,
    StaticServer,
    s3_server,
    static_server,
)

PACK = "packs/000001.pack"
METADATA = ["bundle.json", "chunkpack.index.json", "manifests/" + "ab" * 32 + ".json"]
BUNDLE_DIGEST = "sha256:" + "cd" * 32


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Where:
    """One transport's server: how to push there, pull back, and damage what it holds."""

    scheme: str
    push_uri: str
    pull_uri: Callable[[str], str]  # the reference push printed → a pull URI
    replace: Callable[[str, bytes], object]  # put other bytes under a file name, server side
    s3_endpoint: str | None = None


def make_files() -> dict[str, bytes]:
    # Fresh random bytes per test: registries share blobs across repositories by digest,
    # so one test damaging a blob must not damage another's.
    return {
        "bundle.json": b'{"format":"spore-bundle/v1"}',
        "chunkpack.index.json": b'{"packs":[]}',
        "manifests/" + "ab" * 32 + ".json": b'{"format":"spore/v1"}',
        PACK: os.urandom(3 << 20) + b"tail",
        "rootfs/000000.seg": os.urandom(4096),
    }


FILES: dict[str, bytes] = {}  # this test's files (set by the src_dir fixture)


@pytest.fixture
def src_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    FILES.clear()
    FILES.update(make_files())
    root = tmp_path_factory.mktemp("bundle-src")
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture(params=["file", "http", "s3", pytest.param("oci", marks=pytest.mark.registry)])
def where(request: pytest.FixtureRequest, tmp_path: Path, src_dir: Path) -> Iterator[Where]:
    unique = secrets.token_hex(4)
    if request.param == "file":
        base = tmp_path / "pushed" / "b"
        yield Where(
            "file",
            f"file://{base}",
            lambda ref: ref,
            lambda name, data: (base / name).write_bytes(data),
        )
    elif request.param == "http":
        www: StaticServer = request.getfixturevalue("static_server")
        www.reset()
        base = www.root / unique
        yield Where(
            "http",
            f"file://{base}",
            lambda ref: f"{www.url}/{unique}@{ref.rpartition('@')[2]}",
            lambda name, data: (base / name).write_bytes(data),
        )
        www.reset()
    elif request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        bucket = f"b-{unique}"
        s3.client().create_bucket(Bucket=bucket)
        yield Where(
            "s3",
            f"s3://{bucket}/spores/app",
            lambda ref: ref,
            lambda name, data: s3.client().put_object(
                Bucket=bucket, Key=f"spores/app/{name}", Body=data
            ),
            s3_endpoint=s3.endpoint,
        )
    else:
        reg: LocalRegistry = request.getfixturevalue("registry")

        def replace(name: str, data: bytes) -> None:
            reg.blob_file(sha(FILES[name])).write_bytes(data)

        yield Where("oci", f"oci://{reg.host}/spores/t{unique}:v1", lambda ref: ref, replace)


def push(where: Where, src_dir: Path) -> tuple[Sink, str]:
    sink = open_sink(parse_push_uri(where.push_uri), s3_endpoint=where.s3_endpoint)
    for name, data in FILES.items():
        sink.put(name, src_dir / name, len(data), sha(data))
    return sink, sink.finish(BUNDLE_DIGEST, METADATA)


def source(where: Where, ref: str) -> Source:
    return open_source(parse_pull_uri(where.pull_uri(ref)), s3_endpoint=where.s3_endpoint)


def test_round_trip(where: Where, src_dir: Path, tmp_path: Path) -> None:
    _, ref = push(where, src_dir)
    if where.scheme == "oci":  # pinned by the OCI manifest digest, without the tag
        assert ref.startswith(where.push_uri.removesuffix(":v1") + "@sha256:")
    else:
        assert ref == f"{where.push_uri}@{BUNDLE_DIGEST}"
    src = source(where, ref)
    assert src.pinned_bundle_digest == BUNDLE_DIGEST
    assert src.read_small("bundle.json", 1 << 20) == FILES["bundle.json"]
    before = src.bytes_received
    for name, data in FILES.items():
        dest = tmp_path / "out" / name.replace("/", "_")
        dest.parent.mkdir(exist_ok=True)
        src.fetch(name, dest, len(data), sha(data))
        assert dest.read_bytes() == data
    assert src.bytes_received - before == sum(len(d) for d in FILES.values())
    with pytest.raises(DistError, match="limit"):
        src.read_small(PACK, 1000)


def test_flipped_byte_fails_and_leaves_no_dest(where: Where, src_dir: Path, tmp_path: Path) -> None:
    _, ref = push(where, src_dir)
    data = bytearray(FILES[PACK])
    data[len(data) // 2] ^= 1
    where.replace(PACK, bytes(data))
    dest = tmp_path / "pack"
    with pytest.raises(DistError, match=r"packs/000001\.pack: sha256 mismatch"):
        source(where, ref).fetch(PACK, dest, len(data), sha(FILES[PACK]))
    assert not dest.exists()


def test_truncated_file_on_server_fails(where: Where, src_dir: Path, tmp_path: Path) -> None:
    _, ref = push(where, src_dir)
    where.replace(PACK, FILES[PACK][:100_000])
    dest = tmp_path / "pack"
    with pytest.raises(DistError, match=r"packs/000001\.pack: .*(bytes|broke|shorter)"):
        source(where, ref).fetch(PACK, dest, len(FILES[PACK]), sha(FILES[PACK]))
    # Nothing verified was written: either no dest, or at most the short prefix kept for a
    # resume (whose final hash is still checked).
    assert not dest.exists() or dest.stat().st_size <= 100_000


def test_resume_fetches_only_the_tail(where: Where, src_dir: Path, tmp_path: Path) -> None:
    _, ref = push(where, src_dir)
    data = FILES[PACK]
    dest = tmp_path / "pack"
    dest.write_bytes(data[:1_000_000])
    src = source(where, ref)
    before = src.bytes_received
    src.fetch(PACK, dest, len(data), sha(data))
    assert dest.read_bytes() == data
    assert src.bytes_received - before == len(data) - 1_000_000


def test_corrupt_partial_dest_is_not_trusted(where: Where, src_dir: Path, tmp_path: Path) -> None:
    _, ref = push(where, src_dir)
    data = FILES[PACK]
    dest = tmp_path / "pack"
    dest.write_bytes(b"X" * 1000)  # a previous attempt's bytes, but wrong
    with pytest.raises(DistError, match="sha256 mismatch"):
        source(where, ref).fetch(PACK, dest, len(data), sha(data))
    assert not dest.exists()
    source(where, ref).fetch(PACK, dest, len(data), sha(data))  # the retry starts clean
    assert dest.read_bytes() == data


def test_names_are_checked_everywhere(where: Where, src_dir: Path, tmp_path: Path) -> None:
    sink, ref = push(where, src_dir)
    src = source(where, ref)
    for bad in ("../x", "/etc/passwd", ".hidden", "a//b", "a/../b", "a\\b", "a b", ""):
        with pytest.raises(DistError, match="bundle-relative"):
            src.read_small(bad, 100)
        with pytest.raises(DistError, match="bundle-relative"):
            src.fetch(bad, tmp_path / "x", 1, sha(b"x"))
    sink2 = open_sink(
        parse_push_uri(
            where.push_uri + "x" if where.scheme != "oci" else where.push_uri.replace(":v1", ":v2")
        ),
        s3_endpoint=where.s3_endpoint,
    )
    with pytest.raises(DistError, match="bundle-relative"):
        sink2.put("../escape", src_dir / "bundle.json", 1, sha(b"x"))
    sink2.abort()


def test_missing_file_is_a_clear_error(where: Where, src_dir: Path, tmp_path: Path) -> None:
    _, ref = push(where, src_dir)
    with pytest.raises(DistError, match="not found|missing|not a layer"):
        source(where, ref).fetch("packs/999999.pack", tmp_path / "p", 5, sha(b"hello"))
    assert not (tmp_path / "p").exists()


# -- transport-specific behaviour -------------------------------------------------------


def test_file_push_is_atomic_and_idempotent(src_dir: Path, tmp_path: Path) -> None:
    uri = parse_push_uri(f"file://{tmp_path}/out/b")
    sink = open_sink(uri)
    sink.put(
        "bundle.json", src_dir / "bundle.json", len(FILES["bundle.json"]), sha(FILES["bundle.json"])
    )
    assert not (tmp_path / "out" / "b").exists()  # nothing visible before finish
    sink.abort()
    assert os.listdir(tmp_path / "out") == []
    where = Where("file", f"file://{tmp_path}/out/b", lambda r: r, lambda n, d: None)
    _, ref = push(where, src_dir)
    _, again = push(where, src_dir)  # same bundle again: fine
    assert again == ref == f"file://{tmp_path}/out/b@{BUNDLE_DIGEST}"
    (tmp_path / "out" / "b" / "bundle.json").write_bytes(b"{}")
    with pytest.raises(DistError, match="already exists and holds something else"):
        push(where, src_dir)
    assert sorted(os.listdir(tmp_path / "out")) == ["b"]  # no temp dirs left behind


def test_file_source_refuses_symlinks(src_dir: Path, tmp_path: Path) -> None:
    where = Where("file", f"file://{tmp_path}/b", lambda r: r, lambda n, d: None)
    _, ref = push(where, src_dir)
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    (tmp_path / "b" / "bundle.json").unlink()
    (tmp_path / "b" / "bundle.json").symlink_to(secret)
    with pytest.raises(DistError, match="symlink"):
        source(where, ref).read_small("bundle.json", 100)


def test_http_broken_transfer_then_resume(
    static_server: StaticServer,
    src_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    unique = secrets.token_hex(4)
    where = Where(
        "http",
        f"file://{static_server.root}/{unique}",
        lambda ref: f"{static_server.url}/{unique}@{ref.rpartition('@')[2]}",
        lambda n, d: None,
    )
    _, ref = push(where, src_dir)
    data = FILES[PACK]
    dest = tmp_path / "pack"
    static_server.httpd.cut_after = 500_000
    try:
        with pytest.raises(DistError, match="run the pull again to resume"):
            source(where, ref).fetch(PACK, dest, len(data), sha(data))
        kept = dest.stat().st_size
        assert 0 < kept <= 500_000
    finally:
        static_server.reset()
    src = source(where, ref)
    src.fetch(PACK, dest, len(data), sha(data))
    assert dest.read_bytes() == data
    assert src.bytes_received == len(data) - kept
    assert static_server.httpd.log[-1] == (f"/{unique}/{PACK}", f"bytes={kept}-")


def test_http_server_ignoring_range_still_verifies(
    static_server: StaticServer,  # noqa: F811
    src_dir: Path,
    tmp_path: Path,
) -> None:
    unique = secrets.token_hex(4)
    where = Where(
        "http",
        f"file://{static_server.root}/{unique}",
        lambda ref: f"{static_server.url}/{unique}@{ref.rpartition('@')[2]}",
        lambda n, d: None,
    )
    _, ref = push(where, src_dir)
    data = FILES[PACK]
    dest = tmp_path / "pack"
    dest.write_bytes(data[:1000])
    static_server.httpd.ignore_range = True
    try:
        src = source(where, ref)
        src.fetch(PACK, dest, len(data), sha(data))
    finally:
        static_server.reset()
    assert dest.read_bytes() == data and src.bytes_received == len(data)


def test_http_redirects_are_refused(
    static_server: StaticServer,
    src_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    static_server.httpd.redirect_to = "http://example.com/elsewhere"
    try:
        src = open_source(parse_pull_uri(f"{static_server.url}/x@{BUNDLE_DIGEST}"))
        with pytest.raises(DistError, match="redirect"):
            src.read_small("bundle.json", 100)
    finally:
        static_server.reset()


def test_oci_artifact_shape_and_mutable_tag(registry: LocalRegistry, src_dir: Path) -> None:
    unique = secrets.token_hex(4)
    where = Where(
        "oci", f"oci://{registry.host}/spores/m{unique}:v1", lambda r: r, lambda n, d: None
    )
    _, ref = push(where, src_dir)
    digest = ref.rpartition("@")[2]
    resp = requests.get(
        f"{registry.url}/v2/spores/m{unique}/manifests/{digest}",
        timeout=5,
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    doc = json.loads(resp.content)
    assert sha(resp.content) == digest
    assert doc["artifactType"] == "application/vnd.spore.bundle.v1"
    assert doc["annotations"] == {"org.spore.bundle.digest": BUNDLE_DIGEST}
    titles = [layer["annotations"]["org.opencontainers.image.title"] for layer in doc["layers"]]
    assert titles[:3] == METADATA and sorted(titles) == sorted(FILES)
    assert {layer["digest"] for layer in doc["layers"]} == {sha(d) for d in FILES.values()}
    # A tag resolves (only with allow_mutable) to the digest push printed.
    with pytest.raises(URIError, match="not pinned"):
        parse_pull_uri(where.push_uri)
    src = open_source(parse_pull_uri(where.push_uri, allow_mutable=True))
    assert src.reference == ref
    # A pin the registry does not hold is not found; a valid manifest never substitutes.
    with pytest.raises(DistError, match="not found"):
        open_source(parse_pull_uri(f"oci://{registry.host}/spores/m{unique}@{BUNDLE_DIGEST}"))


def test_oci_registry_serving_other_bytes_for_the_pin(
    registry: LocalRegistry, src_dir: Path
) -> None:
    unique = secrets.token_hex(4)
    where = Where("oci", f"oci://{registry.host}/spores/p{unique}", lambda r: r, lambda n, d: None)
    _, ref = push(where, src_dir)
    blob = registry.blob_file(ref.rpartition("@")[2])
    doc = json.loads(blob.read_bytes())
    doc["annotations"]["org.spore.bundle.digest"] = "sha256:" + "ee" * 32
    blob.write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(DistError, match="not the pinned one|says"):
        source(where, ref)


def test_oci_artifact_decoder_is_strict(src_dir: Path) -> None:
    files = [(n, sha(d), len(d)) for n, d in FILES.items()]
    good = encode_artifact(files, BUNDLE_DIGEST)
    assert decode_artifact(good, "t") == ({n: (d, s) for n, d, s in files}, BUNDLE_DIGEST)
    doc = json.loads(good)
    variants = [
        {**doc, "extra": 1},
        {**doc, "schemaVersion": 1},
        {**doc, "artifactType": "application/vnd.other"},
        {**doc, "layers": doc["layers"] + doc["layers"][:1]},
        {
            **doc,
            "layers": [
                {
                    **doc["layers"][0],
                    "annotations": {"org.opencontainers.image.title": "../etc/passwd"},
                }
            ],
        },
        {**doc, "layers": [{**doc["layers"][0], "size": -1}]},
        {**doc, "layers": [{**doc["layers"][0], "urls": ["http://x"]}]},
        {**doc, "annotations": {}},
    ]
    for variant in variants:
        with pytest.raises(DistError):
            decode_artifact(
                json.dumps(variant, sort_keys=True, separators=(",", ":")).encode(), "t"
            )
    with pytest.raises(DistError, match="canonical"):
        decode_artifact(json.dumps(doc, indent=1).encode(), "t")
    with pytest.raises(DistError, match="strict JSON"):
        decode_artifact(good[:-1] + b',"annotations":{}}', "t")


def test_oci_blob_redirects_followed_only_to_https_or_loopback(
    static_server: StaticServer, tmp_path: Path
) -> None:  # noqa: F811
    # A registry that sends blob downloads elsewhere (as registries backed by object
    # storage do), served as static files: manifest by digest, blob via a 307.
    data = b'{"format":"spore-bundle/v1"}'
    repo = f"r{secrets.token_hex(4)}"
    manifest = encode_artifact([("bundle.json", sha(data), len(data))], BUNDLE_DIGEST)
    mdir = static_server.root / "v2" / repo / "manifests"
    mdir.mkdir(parents=True)
    (mdir / sha(manifest)).write_bytes(manifest)
    (static_server.root / f"{repo}.blob").write_bytes(data)
    blob_path = f"/v2/{repo}/blobs/{sha(data)}"
    uri = parse_pull_uri(
        f"oci://{static_server.url.removeprefix('http://')}/{repo}@{sha(manifest)}"
    )
    try:
        static_server.httpd.redirects[blob_path] = f"{static_server.url}/{repo}.blob"
        src = open_source(uri)
        assert src.pinned_bundle_digest == BUNDLE_DIGEST
        assert src.read_small("bundle.json", 1000) == data
        static_server.httpd.redirects[blob_path] = f"http://example.com/{repo}.blob"
        with pytest.raises(DistError, match="only HTTPS redirects are followed"):
            src.fetch("bundle.json", tmp_path / "b", len(data), sha(data))
        assert not (tmp_path / "b").exists()
        static_server.httpd.redirects[blob_path] = blob_path  # a loop
        with pytest.raises(DistError, match="redirected more than"):
            src.read_small("bundle.json", 1000)
    finally:
        static_server.reset()


@pytest.mark.registry
def test_oci_basic_auth_registry(
    src_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = AuthRegistry(tmp_path / "auth-registry", "ci", "s3cret")
    try:
        where = Where("oci", f"oci://{reg.host}/spores/private", lambda r: r, lambda n, d: None)
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nowhere"))
        with pytest.raises(DistError, match="requires authentication; run `docker login"):
            push(where, src_dir)
        docker = tmp_path / "docker"
        docker.mkdir()
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        (docker / "config.json").write_text(
            json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"ci:wrong").decode()}}})
        )
        with pytest.raises(DistError, match="HTTP 401"):
            push(where, src_dir)
        (docker / "config.json").write_text(
            json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"ci:s3cret").decode()}}})
        )
        _, ref = push(where, src_dir)
        src = source(where, ref)
        dest = tmp_path / "pack"
        src.fetch(PACK, dest, len(FILES[PACK]), sha(FILES[PACK]))
        assert dest.read_bytes() == FILES[PACK]
    finally:
        reg.stop()


def test_sinks_refuse_bytes_that_do_not_match_their_digest(where: Where, src_dir: Path) -> None:
    # The file sink re-hashes while copying; S3 (ChecksumSHA256) and the registry (blob
    # digest) check it server-side.
    sink = open_sink(parse_push_uri(where.push_uri), s3_endpoint=where.s3_endpoint)
    data = FILES[PACK]
    with pytest.raises(DistError, match=r"packs/000001\.pack"):
        sink.put(PACK, src_dir / PACK, len(data), sha(data + b"other"))
    sink.abort()


def test_s3_pull_without_credentials_is_unsigned(
    s3_server: S3Server,
    src_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = f"pub-{secrets.token_hex(4)}"
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.client().put_bucket_policy(
        Bucket=bucket,
        Policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": "s3:GetObject",
                        "Resource": f"arn:aws:s3:::{bucket}/*",
                    }
                ],
            }
        ),
    )
    where = Where(
        "s3", f"s3://{bucket}", lambda r: r, lambda n, d: None, s3_endpoint=s3_server.endpoint
    )
    _, ref = push(where, src_dir)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("SPORE_S3_ENDPOINT", s3_server.endpoint)
    src = open_source(parse_pull_uri(ref))  # endpoint from the environment
    assert src.read_small("bundle.json", 1000) == FILES["bundle.json"]
    with pytest.raises(DistError, match="no AWS credentials"):
        push(Where("s3", f"s3://{bucket}/x", lambda r: r, lambda n, d: None), src_dir)


def test_http_never_sends_netrc_credentials(
    static_server: StaticServer,
    src_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unique = secrets.token_hex(4)
    where = Where(
        "http",
        f"file://{static_server.root}/{unique}",
        lambda ref: f"{static_server.url}/{unique}@{ref.rpartition('@')[2]}",
        lambda n, d: None,
    )
    _, ref = push(where, src_dir)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login me password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    static_server.reset()
    assert source(where, ref).read_small("bundle.json", 1000) == FILES["bundle.json"]
    assert static_server.httpd.log and static_server.httpd.authorized == []
    # The same request through a plain requests session would have sent them:
    requests.get(f"{static_server.url}/{unique}/bundle.json", timeout=5)
    assert static_server.httpd.authorized == [f"/{unique}/bundle.json"]
    static_server.reset()


@pytest.mark.registry
def test_oci_small_file_held_to_its_layer_digest(registry: LocalRegistry, src_dir: Path) -> None:
    """bundle.json read from the registry must hash to the pinned manifest's layer digest."""
    unique = os.urandom(4).hex()
    where = Where(
        "oci",
        f"oci://{registry.host}/spores/s{unique}:v1",
        lambda ref: ref,
        lambda name, data: registry.blob_file(sha(FILES[name])).write_bytes(data),
    )
    _, ref = push(where, src_dir)
    good = FILES["bundle.json"]
    try:
        where.replace("bundle.json", good[:-1] + bytes([good[-1] ^ 1]))
        with pytest.raises(
            DistError,
            match=r"bundle\.json: the registry sent .* the manifest "
            r"says",
        ):
            source(where, ref).read_small("bundle.json", 1 << 20)
    finally:
        where.replace("bundle.json", good)  # registries share blobs across repositories
