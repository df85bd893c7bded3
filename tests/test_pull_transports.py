"""Push and pull a (synthetic) bundle through every transport, against real servers on
127.0.0.1: files, a static HTTP server, moto's S3 server, the docker-registry (no VM)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry import LocalRegistry

from sporevm.dist import bundle, chunkpack
from sporevm.dist.pack import pack
from sporevm.dist.pull import pull
from sporevm.dist.push import push
from sporevm.dist.transports import Source, open_sink, open_source
from sporevm.dist.uri import parse_pull_uri, parse_push_uri
from sporevm.errors import SporeError
from sporevm.spore import manifest as mf
from sporevm.spore.chunks import CHUNK, MAX_OBJECT, ChunkStore
from sporevm.spore.sporedir import read_spore
from sporevm.store import Store
from tests.dist_servers import S3Server, StaticServer, s3_server, static_server  # noqa: F401
from tests.test_bundle import SEG, Spores, make_spores


@dataclass(frozen=True)
class Remote:
    scheme: str
    push_uri: str
    pull_uri: Callable[[str], str]  # pushed reference -> what to pull
    replace: Callable[[str, bytes, bytes], object]  # (name, old bytes, new bytes) on the server
    s3_endpoint: str | None = None


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Spores, Path]:
    tmp = tmp_path_factory.mktemp("bundle")
    s = make_spores(tmp)
    out = tmp / "b.bundle"
    pack(str(s.parent), s.children, out, s.store, pack_limit=MAX_OBJECT, segment_limit=SEG)
    return s, out


@pytest.fixture(params=["file", "http", "s3", "oci"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    unique = secrets.token_hex(4)
    if request.param == "file":
        yield Remote(
            "file",
            f"file://{tmp_path}/remote",
            lambda ref: ref,
            lambda name, old, new: (tmp_path / "remote" / name).write_bytes(new),
        )
    elif request.param == "http":
        www: StaticServer = request.getfixturevalue("static_server")
        www.reset()
        yield Remote(
            "http",
            f"file://{www.root}/{unique}",
            lambda ref: f"{www.url}/{unique}@{ref.rpartition('@')[2]}",
            lambda name, old, new: (www.root / unique / name).write_bytes(new),
        )
        www.reset()
    elif request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        s3.client().create_bucket(Bucket=f"b-{unique}")
        yield Remote(
            "s3",
            f"s3://b-{unique}/spores/app",
            lambda ref: ref,
            lambda name, old, new: s3.client().put_object(
                Bucket=f"b-{unique}", Key=f"spores/app/{name}", Body=new
            ),
            s3.endpoint,
        )
    else:
        reg: LocalRegistry = request.getfixturevalue("registry")
        yield Remote(
            "oci",
            f"oci://{reg.host}/spores/app{unique}:v1",
            lambda ref: ref,
            lambda name, old, new: reg.blob_file(
                "sha256:" + hashlib.sha256(old).hexdigest()
            ).write_bytes(new),
        )


def test_round_trip_and_child_fetches_only_what_differs(
    remote: Remote, local: tuple[Spores, Path], tmp_path: Path
) -> None:
    s, bundle_dir = local
    res = push(
        bundle_dir, open_sink(parse_push_uri(remote.push_uri), s3_endpoint=remote.s3_endpoint)
    )
    ref = remote.pull_uri(res.reference)
    store = Store(tmp_path / "clean")

    def src() -> Source:
        return open_source(parse_pull_uri(ref), s3_endpoint=remote.s3_endpoint)

    parent = pull(src(), store, tmp_path / "p.spore")
    assert (parent.digest, parent.manifest_id) == (res.digest, s.parent_id)
    _, m, _ = read_spore(str(tmp_path / "p.spore"))
    mf.verify_chunks(m, ChunkStore(store), rehash=True)
    files, _ = bundle.read_metadata(lambda n, lim: (bundle_dir / n).read_bytes())
    meta_size = sum(len(d) for _, d in files)
    idx = chunkpack.decode(dict(files)[chunkpack.NAME])
    # the metadata, the parent's pack and the rootfs; the children's packs stay remote
    # (oci reads its manifest and config too, so allow a few KiB on top)
    floor = meta_size + idx.packs[0].size + m.rootfs.size
    assert floor <= parent.bytes_received <= floor + 16384
    child = pull(src(), store, tmp_path / "c.spore", child=s.child_ids[1])
    assert meta_size + CHUNK <= child.bytes_received <= meta_size + CHUNK + 16384
    assert child.packs_fetched == 1
    assert read_spore(str(tmp_path / "c.spore"))[0] == s.child_ids[1]


@pytest.mark.parametrize(
    "name",
    ["bundle.json", "chunkpack.index.json", "manifests/", "packs/000000.pack", "rootfs/000001.seg"],
)
def test_one_flipped_byte_on_the_server_fails(
    remote: Remote, local: tuple[Spores, Path], tmp_path: Path, name: str
) -> None:
    s, bundle_dir = local
    res = push(
        bundle_dir, open_sink(parse_push_uri(remote.push_uri), s3_endpoint=remote.s3_endpoint)
    )
    if name == "manifests/":
        name = bundle.manifest_name(s.parent_id)
    old = (bundle_dir / name).read_bytes()
    new = bytearray(old)
    new[len(new) // 2] ^= 0x10
    remote.replace(name, old, bytes(new))
    out = tmp_path / "x.spore"
    src = open_source(
        parse_pull_uri(remote.pull_uri(res.reference)), s3_endpoint=remote.s3_endpoint
    )
    try:
        with pytest.raises(SporeError) as err:
            pull(src, Store(tmp_path / "clean"), out)
    finally:
        # the registry stores blobs once for all repositories: put the original back
        remote.replace(name, old, old)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_oci_tag_pull_needs_allow_mutable_and_prints_the_pin(
    registry: LocalRegistry,
    local: tuple[Spores, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from sporevm.cli import main

    s, bundle_dir = local
    tagged = f"oci://{registry.host}/spores/mutable{secrets.token_hex(4)}:latest"
    res = push(bundle_dir, open_sink(parse_push_uri(tagged)))
    monkeypatch.setenv("SPORE_HOME", str(tmp_path / "home"))
    assert main(["pull", tagged, "--out", str(tmp_path / "a.spore")]) == 2
    assert "pin" in capsys.readouterr().err and not (tmp_path / "a.spore").exists()
    code = main(["pull", tagged, "--allow-mutable", "--out", str(tmp_path / "a.spore"), "--json"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["digest"] == res.digest and doc["manifest_id"] == s.parent_id
    assert doc["reference"].endswith(res.reference.rpartition("@")[2])
