"""OCI side: refs, decoders, and fetching from a real registry and real OCI layouts.

Registry tests talk to Debian's docker-registry on loopback (conftest). The
Bearer-token tests put a small Python token server + auth gate in front of that
registry: it stands in for a third-party registry (docker.io/ghcr), because
configuring distribution's own token auth needs a signing CA; the bytes served
still come from the real registry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ociimage
import pytest
import requests
from registry import LocalRegistry, free_port

from sporevm.build.oci import OCIClient
from sporevm.build.ocimanifest import (
    ImageIndex,
    ImageManifest,
    decode_config,
    decode_manifest_or_index,
    parse_platform,
    select_platform,
)
from sporevm.build.ociref import is_loopback, parse_ref
from sporevm.errors import OCIError
from sporevm.net.auth import (
    decode_token_response,
    load_credentials,
    parse_challenges,
    summarize_errors,
)
from sporevm.store import Store
from tests.conftest import PushedImage

AMD64 = "linux/amd64"
D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# -- references ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/foo/bar", "docker.io/foo/bar:latest"),
        ("docker.io/library/busybox:latest", "docker.io/library/busybox:latest"),
        ("ghcr.io/o/r/sub:v1", "ghcr.io/o/r/sub:v1"),
        ("127.0.0.1:5000/x/y:tag", "127.0.0.1:5000/x/y:tag"),
        ("localhost/x", "localhost/x:latest"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("[::1]:5000/x", "[::1]:5000/x:latest"),
        (f"busybox@{D1}", f"docker.io/library/busybox@{D1}"),
        (f"127.0.0.1:5000/x:t@{D1}", f"127.0.0.1:5000/x:t@{D1}"),
        ("my-reg.example.com/a__b/c.d-e", "my-reg.example.com/a__b/c.d-e:latest"),
    ],
)
def test_parse_registry_refs(text: str, canonical: str) -> None:
    ref = parse_ref(text, Path("/"))
    assert ref.kind == "registry" and str(ref) == canonical
    assert str(parse_ref(str(ref), Path("/"))) == canonical  # canonical form round-trips


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("busybox:", "not a valid tag"),
        ("busybox:-x", "not a valid tag"),
        ("busybox@sha256:abc", "not a valid digest"),
        (f"busybox@sha512:{'a' * 128}", "unsupported algorithm"),
        ("docker://busybox", "URL schemes"),
        ("a b", "whitespace"),
        ("x//y", "not a valid repository path component"),
        ("bad_host.com:x/y", "registry host"),
        ("a" * 300, "longer than 255"),
    ],
)
def test_parse_ref_errors(text: str, needle: str) -> None:
    with pytest.raises(OCIError, match=needle) as info:
        parse_ref(text, Path("/"))
    assert "\n" not in str(info.value)


def test_parse_layout_refs(tmp_path: Path) -> None:
    ref = parse_ref("oci-layout:images/bb", tmp_path)
    assert (ref.kind, ref.layout_path, ref.tag, ref.digest) == (
        "oci-layout",
        tmp_path / "images/bb",
        "latest",
        None,
    )
    assert str(ref) == f"oci-layout:{tmp_path}/images/bb:latest"
    assert parse_ref("oci-layout:./bb:v2", tmp_path).tag == "v2"
    pinned = parse_ref(f"oci-layout:bb@{D1}", tmp_path)
    assert (pinned.tag, pinned.digest) == (None, D1)
    odd = parse_ref("oci-layout:/a:b/c", tmp_path)  # ':' inside the path, no tag
    assert (odd.layout_path, odd.tag) == (Path("/a:b/c"), "latest")
    assert parse_ref("oci-layout:/a@x/c", tmp_path).layout_path == Path("/a@x/c")
    with pytest.raises(OCIError, match="contains .:. or .@."):
        parse_ref("oci-layout:/a/b@c/", tmp_path)
    both = ref.pinned(D2)
    assert str(both).endswith(f"bb:latest@{D2}") and parse_ref(str(both), tmp_path) == both
    with pytest.raises(OCIError, match="missing layout directory"):
        parse_ref("oci-layout::tag", tmp_path)
    with pytest.raises(OCIError):
        ref.pinned("sha256:nothex")


def test_loopback_policy() -> None:
    assert all(is_loopback(h) for h in ("localhost:5000", "127.0.0.1", "127.3.4.5:1", "[::1]:5"))
    assert not any(is_loopback(h) for h in ("192.0.2.2:5000", "example.com", "[fd00::2]:5"))


# -- decoders -------------------------------------------------------------------------


def manifest_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": D1,
            "size": 10,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 20}
        ],
    }
    doc.update(over)
    return doc


def test_manifest_decoding_accepts_oci_and_docker() -> None:
    m = decode_manifest_or_index(js(manifest_doc()), what="m")
    assert isinstance(m, ImageManifest) and m.layers[0].digest == D2
    docker = manifest_doc(mediaType="application/vnd.docker.distribution.manifest.v2+json")
    docker["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json"
    docker["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert isinstance(decode_manifest_or_index(js(docker), what="m"), ImageManifest)
    no_type = manifest_doc()
    del no_type["mediaType"]  # optional in OCI: the shape decides
    assert isinstance(decode_manifest_or_index(js(no_type), what="m"), ImageManifest)


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"schemaVersion": 1, "name": "x", "fsLayers": []}, "schema 1"),
        (
            manifest_doc(mediaType="application/vnd.docker.distribution.manifest.v1+prettyjws"),
            "schema 1",
        ),
        (manifest_doc(schemaVersion=3), "schemaVersion"),
        (
            manifest_doc(mediaType="application/vnd.oci.artifact.manifest.v1+json"),
            "unsupported media type",
        ),
        (manifest_doc(manifests=[]), "ambiguous"),
        (
            manifest_doc(
                layers=[
                    {
                        "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                        "digest": D2,
                        "size": 1,
                        "urls": ["https://x"],
                    }
                ]
            ),
            "foreign",
        ),
        (
            manifest_doc(
                layers=[
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": D2,
                        "size": 1,
                        "urls": ["https://x"],
                    }
                ]
            ),
            "external URLs",
        ),
        (
            manifest_doc(layers=[{"mediaType": "application/x-squashfs", "digest": D2, "size": 1}]),
            "unsupported media type",
        ),
        (
            manifest_doc(
                layers=[
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": D2,
                        "size": -1,
                    }
                ]
            ),
            "non-negative",
        ),
        (
            manifest_doc(
                layers=[
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": D2,
                        "size": 1 << 40,
                    }
                ]
            ),
            "limit",
        ),
        (
            manifest_doc(
                config={
                    "mediaType": "application/vnd.cncf.helm.config.v1+json",
                    "digest": D1,
                    "size": 1,
                }
            ),
            "not a container image config",
        ),
        (manifest_doc(layers="x"), "must be a list"),
    ],
)
def test_manifest_decoding_rejects(doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(OCIError, match=needle) as info:
        decode_manifest_or_index(js(doc), what="ref: manifest")
    assert str(info.value).startswith("ref: manifest") and "\n" not in str(info.value)


def test_strict_json() -> None:
    for raw, needle in [
        (b'{"schemaVersion": 2, "schemaVersion": 2}', "duplicate key"),
        (b"[" * 100_000, "nested too deeply|invalid JSON"),
        (b'{"schemaVersion": NaN}', "invalid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "JSON object"),
    ]:
        with pytest.raises(OCIError, match=needle):
            decode_manifest_or_index(raw, what="m")
    with pytest.raises(OCIError, match="served as"):
        decode_manifest_or_index(
            js(manifest_doc()), what="m", media_type="application/vnd.oci.image.index.v1+json"
        )
    with pytest.raises(OCIError, match="schema 1"):
        decode_manifest_or_index(
            b"{}", what="m", media_type="application/vnd.docker.distribution.manifest.v1+json"
        )


def index_doc(*platforms: str) -> bytes:
    entries = []
    for i, p in enumerate(platforms):
        os_, arch, *variant = p.split("/")
        plat = {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {})}
        entries.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + f"{i:064x}",
                "size": 1,
                "platform": plat,
            }
        )
    return js({"schemaVersion": 2, "manifests": entries})


def test_platform_selection() -> None:
    index = decode_manifest_or_index(
        index_doc("linux/amd64", "linux/arm64/v8", "linux/arm/v6", "unknown/unknown"), what="i"
    )
    assert isinstance(index, ImageIndex)
    pick = select_platform(index, parse_platform("linux/arm64"), what="i")
    assert pick.digest.endswith("1")  # arm64 means arm64/v8
    assert select_platform(index, parse_platform("linux/amd64/v1"), what="i").digest.endswith("0")
    with pytest.raises(
        OCIError,
        match=r"linux/s390x \(available: linux/amd64, linux/arm/v6, "
        r"linux/arm64/v8\)",
    ):
        select_platform(index, parse_platform("linux/s390x"), what="i")
    with pytest.raises(OCIError, match=r"no image for platform linux/arm \("):
        select_platform(index, parse_platform("linux/arm"), what="i")
    for bad in ("linux", "Linux/amd64", "linux/amd64/v8/x", "linux//x"):
        with pytest.raises(OCIError, match="OS/ARCH"):
            parse_platform(bad)


def test_config_decoding() -> None:
    cfg: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "WorkingDir": "/w", "Cmd": None},
        "rootfs": {"type": "layers", "diff_ids": [D1]},
    }
    got = decode_config(js(cfg), what="c")
    assert (got.env, got.working_dir, got.cmd, got.diff_ids) == (("PATH=/bin",), "/w", (), (D1,))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rootfs": {"type": "x", "diff_ids": []}}, "rootfs.type"),
        ({"rootfs": {"type": "layers", "diff_ids": ["md5:x"]}}, "digest"),
        ({"config": {"Env": ["NOEQUALS"]}}, "KEY=VALUE"),
        ({"os": 3}, "must be a string"),
    ]
    for change, needle in cases:
        with pytest.raises(OCIError, match=needle):
            decode_config(js({**cfg, **change}), what="c")


def test_auth_parsers(tmp_path: Path) -> None:
    [bearer] = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",'
        'service="registry.docker.io",scope="repository:library/x:pull"'
    )
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/x:pull",
    }
    two = parse_challenges('Basic realm="r\\"q", Bearer realm="https://a/t" , service=svc')
    assert [(c.scheme, c.params) for c in two] == [
        ("basic", {"realm": 'r"q'}),
        ("bearer", {"realm": "https://a/t", "service": "svc"}),
    ]
    for bad in ('"quoted"', "", 'Bearer realm="x" ='):
        with pytest.raises(OCIError):
            parse_challenges(bad)
    assert decode_token_response(b'{"access_token": "abc.def"}', what="t") == "abc.def"
    for bad_token in (b'{"token": ""}', b'{"token": "a\\r\\nX-Evil: 1"}', b"{}"):
        with pytest.raises(OCIError):
            decode_token_response(bad_token, what="t")
    assert (
        summarize_errors(js({"errors": [{"code": "DENIED", "message": "no\x1b[31m"}]}))
        == "DENIED: no?[31m"
    )
    assert summarize_errors(b"<html>") == ""
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"u:p").decode()},
                    "reg.example:5000": {"username": "a", "password": "b"},
                }
            }
        )
    )
    assert load_credentials("docker.io", cfg) == base64.b64encode(b"u:p").decode()
    assert load_credentials("reg.example:5000", cfg) == base64.b64encode(b"a:b").decode()
    assert load_credentials("other.example", cfg) is None
    assert load_credentials("x", tmp_path / "missing.json") is None


# -- OCI layouts --------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    layout = tmp_path_factory.mktemp("small") / "layout"
    layer = ociimage.tar_layer(
        {"etc": None, "etc/hello": b"hi\n", "bin": None, "bin/sh": "/bin/busybox"}
    )
    return layout, ociimage.write_layout(layout, [layer], tag="v1", compression="zstd")


def test_layout_tag_and_digest(
    small_layout: tuple[Path, str], store: Store, tmp_path: Path
) -> None:
    layout, digest = small_layout
    client = OCIClient(store)
    ref = parse_ref(f"oci-layout:{layout.name}:v1", layout.parent)
    assert client.resolve(ref, AMD64) == digest
    img = client.fetch(ref, digest, AMD64)
    assert img.manifest_digest == digest and img.index_digest is None
    assert img.layers[0].media_type.endswith("+zstd")
    for blob in (digest, img.config_digest, img.layers[0].digest):
        assert store.has_blob(blob)
    # @digest refs need no tag lookup, and a second store fetches the same bytes.
    pinned = parse_ref(f"oci-layout:{layout}@{digest}", tmp_path)
    assert client.resolve(pinned, AMD64) == digest
    other = OCIClient(Store(tmp_path / "s2")).fetch(pinned, digest, AMD64)
    assert other.layers == img.layers and other.diff_ids == img.diff_ids
    with pytest.raises(OCIError, match=r"no image tagged 'nope' \(tags: v1\)"):
        client.resolve(parse_ref(f"oci-layout:{layout}:nope", tmp_path), AMD64)
    with pytest.raises(OCIError, match="not the requested linux/arm64"):
        OCIClient(Store(tmp_path / "s3")).fetch(pinned, digest, "linux/arm64")


def test_layout_symlinked_blob_is_not_followed(
    small_layout: tuple[Path, str], tmp_path: Path
) -> None:
    src, digest = small_layout
    layout = tmp_path / "evil"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    for name in ("oci-layout", "index.json"):
        (layout / name).write_bytes((src / name).read_bytes())
    outside = tmp_path / "outside"
    outside.write_bytes((src / "blobs/sha256" / digest[7:]).read_bytes())
    (layout / "blobs/sha256" / digest[7:]).symlink_to(outside)
    store = Store(tmp_path / "store")
    with pytest.raises(OCIError, match="symlink"):
        OCIClient(store).fetch(parse_ref(f"oci-layout:{layout}:v1", tmp_path), digest, AMD64)
    assert not store.has_blob(digest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(OCIError, match="imageLayoutVersion"):
        OCIClient(store).resolve(parse_ref(f"oci-layout:{layout}:v1", tmp_path), AMD64)


def test_layout_descriptor_size_mismatch(tmp_path: Path) -> None:
    layout = tmp_path / "l"
    ociimage.write_layout(layout, [ociimage.tar_layer({"a": b"x"})], tag="t", compression="none")
    index = json.loads((layout / "index.json").read_bytes())
    manifest = json.loads(
        (layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes()
    )
    manifest["layers"][0]["size"] += 1  # lie about the size; content digest still right
    data = js(manifest)
    (layout / "blobs/sha256" / sha(data)[7:]).write_bytes(data)
    ref = parse_ref(f"oci-layout:{layout}@{sha(data)}", tmp_path)
    store = Store(tmp_path / "store")
    with pytest.raises(OCIError, match="descriptor says"):
        OCIClient(store).fetch(ref, sha(data), AMD64)
    assert not store.has_blob(manifest["layers"][0]["digest"])


# -- registry -----------------------------------------------------------------------


def test_resolve_and_fetch(
    registry: LocalRegistry, busybox_image: PushedImage, store: Store
) -> None:
    client = OCIClient(store)
    ref = parse_ref(busybox_image.ref, Path("/"))
    digest = client.resolve(ref, AMD64)
    assert digest == busybox_image.digest  # skopeo --preserve-digests kept the bytes
    seen: list[tuple[str, int, int]] = []
    img = client.fetch(ref, digest, AMD64, progress=lambda *a: seen.append(a))
    assert img.manifest_digest == digest and img.platform == AMD64
    layer = img.layers[0]
    assert seen[-1] == (layer.digest, layer.size, layer.size)
    assert store.blob_path(layer.digest).stat().st_size == layer.size
    diff_id = json.loads(store.read_blob(img.config_digest, max_size=1 << 20, what="c"))
    assert list(img.diff_ids) == diff_id["rootfs"]["diff_ids"]
    assert img.config is not None and img.config.cmd == ("/bin/sh",)
    assert client.load_cached(digest, AMD64) == img.__class__(**{**img.__dict__, "ref": None})
    with pytest.raises(OCIError, match=r"not found in registry .*MANIFEST_UNKNOWN"):
        client.resolve(parse_ref(f"{registry.host}/library/busybox:nope", Path("/")), AMD64)


def test_cached_fetch_with_registry_down(
    busybox_image: PushedImage, store: Store, throwaway_registry: LocalRegistry
) -> None:
    reg = throwaway_registry
    try:
        ref = parse_ref(reg.push(busybox_image.layout, "x/bb:latest"), Path("/"))
        client = OCIClient(store)
        digest = client.resolve(ref, AMD64)
        first = client.fetch(ref, digest, AMD64)
    finally:
        reg.stop()
    pinned = ref.pinned(digest)
    again = OCIClient(store).fetch(pinned, OCIClient(store).resolve(pinned, AMD64), AMD64)
    assert again.layers == first.layers and again.manifest_digest == digest
    start = time.monotonic()
    with pytest.raises(OCIError) as info:
        OCIClient(store).resolve(ref, AMD64)
    elapsed = time.monotonic() - start
    assert elapsed < 5, elapsed
    msg = str(info.value)
    assert reg.host in msg and "cannot reach registry" in msg and "digest-pinned" in msg
    assert "\n" not in msg


def test_every_layer_compression(multilayer_image: PushedImage, store: Store) -> None:
    from tests.layer_cases import multi_layer_case

    client = OCIClient(store)
    ref = parse_ref(multilayer_image.ref, Path("/"))
    img = client.fetch(ref, client.resolve(ref, AMD64), AMD64)
    assert [layer.media_type.rsplit(".", 1)[1] for layer in img.layers] == [
        "tar",
        "tar+gzip",
        "tar+zstd",
    ]
    assert list(img.diff_ids) == [sha(tar) for tar in multi_layer_case()[0]]


def test_multi_platform_index(registry: LocalRegistry, store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "multi"
    index_digest = ociimage.write_index_layout(
        layout,
        {
            "linux/amd64": [ociimage.tar_layer({"arch": b"amd64\n"})],
            "linux/arm64": [
                ociimage.tar_layer({"arch": b"arm64\n"}),
                ociimage.tar_layer({"extra": b"x"}),
            ],
        },
        tag="multi",
    )
    ref = parse_ref(registry.push(layout, "test/multi:multi", tag="multi"), Path("/"))
    client = OCIClient(store)
    assert client.resolve(ref, "linux/arm64") == index_digest
    arm = client.fetch(ref, index_digest, "linux/arm64")
    amd = client.fetch(ref, index_digest, AMD64)
    assert arm.index_digest == amd.index_digest == index_digest
    assert arm.manifest_digest != amd.manifest_digest
    assert (len(arm.layers), len(amd.layers)) == (2, 1)
    with pytest.raises(
        OCIError,
        match=r"no image for platform linux/riscv64 \(available: "
        r"linux/amd64, linux/arm64\)",
    ):
        client.fetch(ref, index_digest, "linux/riscv64")


def test_corrupt_blob_is_rejected(registry: LocalRegistry, store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "corrupt"
    payload = hashlib.sha256(str(tmp_path).encode()).digest() * 512  # unique to this test
    digest = ociimage.write_layout(layout, [ociimage.tar_layer({"data": payload})], tag="c")
    ref = parse_ref(registry.push(layout, "test/corrupt:c", tag="c"), Path("/"))
    manifest = json.loads((layout / "blobs/sha256" / digest[7:]).read_bytes())
    layer = manifest["layers"][0]["digest"]
    blob = registry.blob_file(layer)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, different bytes
    blob.write_bytes(bytes(data))
    with pytest.raises(
        OCIError, match=f"layer {layer}: content digest is sha256:[0-9a-f]{{64}}, expected {layer}"
    ):
        OCIClient(store).fetch(ref, digest, AMD64)
    assert not store.has_blob(layer)
    assert list((store.root / "tmp").iterdir()) == []


def test_insecure_registry_policy(busybox_image: PushedImage, store: Store, tmp_path: Path) -> None:
    # Our own non-loopback address: plain HTTP must not be used unless the user says so.
    ip = non_loopback_ip()
    reg = LocalRegistry(tmp_path / "reg", bind="0.0.0.0", host=ip)
    try:
        ociimage.push_layout(
            busybox_image.layout, "latest", f"127.0.0.1:{reg.port}/library/busybox:latest"
        )
        ref = parse_ref(f"{reg.host}/library/busybox:latest", Path("/"))
        with pytest.raises(
            OCIError,
            match=f"TLS handshake with registry {reg.host} failed; "
            f"if it serves plain HTTP, pass --insecure-registry",
        ):
            OCIClient(store).resolve(ref, AMD64)
        client = OCIClient(store, insecure_registries=frozenset({reg.host}))
        assert client.resolve(ref, AMD64) == busybox_image.digest
        by_name = OCIClient(store, insecure_registries=frozenset({ip}))
        assert by_name.plain_http_allowed(reg.host)
        assert not OCIClient(store).plain_http_allowed(reg.host)
    finally:
        reg.stop()


def non_loopback_ip() -> str:
    """A non-loopback IPv4 address of this machine (skips, loudly, if there is none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # UDP connect sends no packet; it picks a source
            ip = str(s.getsockname()[0])
        except OSError:
            ip = "127.0.0.1"
    if is_loopback(ip):
        pytest.skip("this machine has no non-loopback IPv4 address to test the https policy")
    return ip


# -- Bearer token flow (stand-in for a third-party registry) ----------------------------


class AuthGate:
    """Token server + auth gate in front of the real registry (docker.io's flow, in small)."""

    def __init__(self, upstream: str, *, user: str | None = None) -> None:
        self.upstream = upstream
        self.user = user  # if set, tokens need Basic credentials "user:secret"
        self.token_requests: list[dict[str, str]] = []
        self.issued: set[str] = set()
        self.send_digest = True  # False: HEAD answers lack Docker-Content-Digest
        self.redirect_blobs: str | None = None  # URL prefix blob GETs are redirected to
        self.blob_auth: list[str] = []  # Authorization headers seen on redirected blob GETs
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                gate.handle(self, "GET")

            def do_HEAD(self) -> None:
                gate.handle(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(h.path)
        if url.path == "/token":
            query = dict(urllib.parse.parse_qsl(url.query))
            self.token_requests.append(query)
            want = "Basic " + base64.b64encode(f"{self.user}:secret".encode()).decode()
            if self.user and h.headers.get("Authorization") != want:
                return self.reply(h, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {})
            token = f"tok-{len(self.issued)}"
            self.issued.add(token)
            return self.reply(h, 200, js({"token": token}), {})
        auth = h.headers.get("Authorization", "")
        if url.path.startswith("/redirected/"):
            self.blob_auth.append(auth)
            h.path = h.path[len("/redirected") :]
        elif not auth.startswith("Bearer ") or auth[7:] not in self.issued:
            challenge = (
                f'Bearer realm="http://{self.host}/token",service="gate",'
                f'scope="repository:{url.path.split("/")[2]}/'
                f'{url.path.split("/")[3]}:pull"'
            )
            return self.reply(
                h, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge}
            )
        if self.redirect_blobs and "/blobs/" in url.path and not url.path.startswith("/redir"):
            return self.reply(h, 307, b"", {"Location": self.redirect_blobs + h.path})
        up = requests.request(
            method,
            self.upstream + h.path,
            timeout=5,
            headers={"Accept": h.headers.get("Accept", "*/*")},
        )
        keep = {
            k: v
            for k, v in up.headers.items()
            if k == "Content-Type" or (k == "Docker-Content-Digest" and self.send_digest)
        }
        self.reply(h, up.status_code, up.content, keep, head=method == "HEAD")

    def reply(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str],
        head: bool = False,
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gate(registry: LocalRegistry) -> Iterator[AuthGate]:
    g = AuthGate(registry.url)
    yield g
    g.close()


def test_bearer_token_flow_anonymous(
    gate: AuthGate, busybox_image: PushedImage, store: Store
) -> None:
    ref = parse_ref(f"{gate.host}/library/busybox:latest", Path("/"))
    client = OCIClient(store)
    digest = client.resolve(ref, AMD64)
    assert digest == busybox_image.digest
    img = client.fetch(ref, digest, AMD64)
    assert store.has_blob(img.layers[0].digest)
    # One token for the whole fetch: it is cached per repository.
    assert gate.token_requests == [{"service": "gate", "scope": "repository:library/busybox:pull"}]


def test_bearer_token_flow_with_credentials(
    registry: LocalRegistry, busybox_image: PushedImage, store: Store, tmp_path: Path
) -> None:
    gate = AuthGate(registry.url, user="alice")
    try:
        ref = parse_ref(f"{gate.host}/library/busybox:latest", Path("/"))
        with pytest.raises(OCIError, match=r"token server .*HTTP 401 \(UNAUTHORIZED\)"):
            OCIClient(store, auth_config=tmp_path / "none.json").resolve(ref, AMD64)
        config = tmp_path / "config.json"
        config.write_text(
            json.dumps({"auths": {gate.host: {"auth": base64.b64encode(b"alice:secret").decode()}}})
        )
        client = OCIClient(store, auth_config=config)
        assert client.resolve(ref, AMD64) == busybox_image.digest
    finally:
        gate.close()


def test_tag_resolution_without_digest_header(
    gate: AuthGate, busybox_image: PushedImage, store: Store
) -> None:
    # Some registries answer HEAD without Docker-Content-Digest: GET and hash the bytes.
    gate.send_digest = False
    ref = parse_ref(f"{gate.host}/library/busybox:latest", Path("/"))
    assert OCIClient(store).resolve(ref, AMD64) == busybox_image.digest
    assert store.has_blob(busybox_image.digest)


def test_blob_redirects(
    gate: AuthGate, busybox_image: PushedImage, store: Store, tmp_path: Path
) -> None:
    ref = parse_ref(f"{gate.host}/library/busybox:latest", Path("/")).pinned(busybox_image.digest)
    # Storage on another host (here: another loopback name) gets no credentials.
    gate.redirect_blobs = f"http://localhost:{gate.host.split(':')[1]}/redirected"
    img = OCIClient(store).fetch(ref, busybox_image.digest, AMD64)
    assert store.has_blob(img.layers[0].digest)
    assert gate.blob_auth and all(a == "" for a in gate.blob_auth)
    # A redirect to plain HTTP on a non-loopback host is refused.
    gate.redirect_blobs = "http://192.0.2.1:9/redirected"
    with pytest.raises(OCIError, match="only HTTPS redirects are followed"):
        OCIClient(Store(tmp_path / "s2")).fetch(ref, busybox_image.digest, AMD64)


def test_load_cached_names_what_is_missing(store: Store) -> None:
    with pytest.raises(OCIError, match=f"local store: manifest {D1}: not in the local store"):
        OCIClient(store).load_cached(D1, AMD64)


def test_token_realm_must_not_downgrade(store: Store) -> None:
    # A registry on a non-loopback name may not send us to a plain-http token realm.
    client = OCIClient(store)
    source = client._source(parse_ref("registry.example.com/x/y:1", Path("/")))
    with pytest.raises(OCIError, match="only https realms"):
        source.repo._authenticate('Bearer realm="http://evil.example/token"', "x")  # type: ignore[attr-defined]


@pytest.mark.minbase
def test_minbase_fetch(minbase_image: PushedImage, store: Store) -> None:
    client = OCIClient(store)
    ref = parse_ref(minbase_image.ref, Path("/"))
    start = time.monotonic()
    img = client.fetch(ref, client.resolve(ref, AMD64), AMD64)
    elapsed = time.monotonic() - start
    assert len(img.layers) == 1 and img.layers[0].size > 10 << 20
    assert elapsed < 30, elapsed
