"""Deadlines on pulls (docs/limits.md, sporevm/net/deadline.py), over http://, s3:// and
oci:// against slow servers on 127.0.0.1: trickled headers, a body sent a byte at a
time, a pack that stops after its first MiB. Each must fail `spore pull` soon, with one
line naming the file, the server and the bound, no output and the store lock free;
a stalled pack resumes on the next pull. The deadlines are shortened here (1 s base,
1 s for headers, 8 MiB/s floor) so each test takes a few seconds."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import urllib3.poolmanager

from sporevm.cli import main
from sporevm.dist import chunkpack
from sporevm.dist.pack import pack
from sporevm.dist.transport_oci import encode_artifact
from sporevm.dist.transports import open_source
from sporevm.dist.uri import parse_pull_uri
from sporevm.errors import DistError
from sporevm.net import deadline
from sporevm.spore.chunks import MAX_OBJECT
from sporevm.store import Store
from tests.dist_servers import S3_ENV, Slow, SlowServer
from tests.test_bundle import SEG, make_spores

SCHEMES = ["http", "s3", "oci"]
BUCKET, PREFIX, REPO = "bkt", "spores/app", "spores/app"


@dataclass(frozen=True)
class Bundle:
    files: dict[str, bytes]  # bundle-relative name -> bytes
    digest: str
    pack: str  # the parent's pack: several MiB


@dataclass(frozen=True)
class Served:
    uri: str
    args: list[str]
    paths: dict[str, str]  # bundle file (or "manifest" for oci) -> URL path on the server


@pytest.fixture(scope="module")
def bundle_files(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    tmp = tmp_path_factory.mktemp("deadline-bundle")
    s = make_spores(tmp)
    out = tmp / "b.bundle"
    res = pack(str(s.parent), s.children, out, s.store, pack_limit=MAX_OBJECT, segment_limit=SEG)
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    first = chunkpack.decode(files[chunkpack.NAME]).packs[0].name
    assert len(files[first]) > 2 << 20
    return Bundle(files, res.digest, first)


@pytest.fixture
def slow_server() -> Iterator[SlowServer]:
    server = SlowServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def short_deadlines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(deadline, "HEADERS", 1.0)
    monkeypatch.setattr(deadline, "BASE", 1.0)
    monkeypatch.setattr(deadline, "MIN_RATE", 8 << 20)
    monkeypatch.setenv("SPORE_HOME", str(tmp_path / "home"))
    # boto3 finds credentials in the environment, never on the network (no IMDS)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def serve(server: SlowServer, b: Bundle, scheme: str) -> Served:
    """Put the bundle on ``server`` the way ``scheme`` lays it out."""
    if scheme == "http":
        paths = {n: f"/b/{n}" for n in b.files}
        served = Served(f"{server.url}/b@{b.digest}", [], paths)
    elif scheme == "s3":
        paths = {n: f"/{BUCKET}/{PREFIX}/{n}" for n in b.files}
        served = Served(f"s3://{BUCKET}/{PREFIX}@{b.digest}", ["--s3-endpoint", server.url], paths)
    else:
        layers = [
            (n, "sha256:" + hashlib.sha256(d).hexdigest(), len(d)) for n, d in b.files.items()
        ]
        manifest = encode_artifact(layers, b.digest)
        pin = "sha256:" + hashlib.sha256(manifest).hexdigest()
        paths = {n: f"/v2/{REPO}/blobs/{d}" for n, d, _ in layers}
        paths["manifest"] = f"/v2/{REPO}/manifests/{pin}"
        server.files[paths["manifest"]] = manifest
        served = Served(f"oci://{server.host}/{REPO}@{pin}", [], paths)
    for name, data in b.files.items():
        server.files[served.paths[name]] = data
    return served


def failed_pull(
    served: Served, out: Path, capsys: pytest.CaptureFixture[str], within: float
) -> str:
    """`spore pull` fails within ``within`` s: exit 1, one error line (returned), no
    output, and the store lock is free again."""
    t0 = time.monotonic()
    code = main(["pull", served.uri, "--out", str(out), "--json", *served.args])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == DistError.exit_code, err
    assert took < within, f"took {took:.1f} s: {err}"
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("spore: error: "), err
    assert not out.exists() and not list(out.parent.glob(f".tmp-{out.name}-*"))
    with Store().lock(exclusive=True, timeout=0):  # StoreBusy if the pull still held it
        pass
    return lines[0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_trickled_headers_fail_the_pull(
    scheme: str,
    slow_server: SlowServer,
    bundle_files: Bundle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = serve(slow_server, bundle_files, scheme)
    slow_server.slow[served.paths["bundle.json"]] = Slow(header_gap=0.2)
    line = failed_pull(served, tmp_path / "out.spore", capsys, within=6)
    assert "bundle.json" in line and slow_server.host in line, line
    assert "no complete response headers within 1 s" in line, line
    assert "run the pull again" in line


def test_trickled_oci_manifest_headers_fail_the_pull(
    slow_server: SlowServer,
    bundle_files: Bundle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = serve(slow_server, bundle_files, "oci")
    slow_server.slow[served.paths["manifest"]] = Slow(header_gap=0.2)
    line = failed_pull(served, tmp_path / "out.spore", capsys, within=6)
    assert ": manifest: registry " + slow_server.host in line, line
    assert "within 1 s" in line


@pytest.mark.parametrize("scheme", SCHEMES)
def test_metadata_a_byte_at_a_time_fails_the_pull(
    scheme: str,
    slow_server: SlowServer,
    bundle_files: Bundle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = serve(slow_server, bundle_files, scheme)
    slow_server.slow[served.paths["bundle.json"]] = Slow(first=0, byte_gap=0.1)
    line = failed_pull(served, tmp_path / "out.spore", capsys, within=6)
    # read whole, up to its 1 MiB limit: 1 s + 1 MiB at 8 MiB/s
    assert "bundle.json" in line and slow_server.host in line, line
    assert re.search(
        r"sent \d+ of at most 1048576 bytes in the 1 s allowed "
        r"\(1 s \+ the size at 8192 KiB/s\)",
        line,
    ), line


@pytest.mark.parametrize(
    ("scheme", "gap"), [("http", None), ("http", 0.3), ("s3", 0.3), ("oci", 0.3)]
)
def test_pack_stalled_after_its_first_mib_fails_then_resumes(
    scheme: str,
    gap: float | None,
    slow_server: SlowServer,
    bundle_files: Bundle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = serve(slow_server, bundle_files, scheme)
    path = served.paths[bundle_files.pack]
    slow_server.slow[path] = Slow(first=1 << 20, byte_gap=gap)
    size = len(bundle_files.files[bundle_files.pack])
    allowed = 1 + size / (8 << 20)
    line = failed_pull(served, tmp_path / "out.spore", capsys, within=allowed + 4)
    assert bundle_files.pack in line and slow_server.host in line, line
    assert f"of {size} bytes in the {allowed:.0f} s allowed" in line, line
    assert "run the pull again to resume" in line
    # the verified prefix stays in the store's staging area: the next pull resumes it
    slow_server.slow.clear()
    slow_server.log.clear()
    out = tmp_path / "out.spore"
    assert main(["pull", served.uri, "--out", str(out), "--json", *served.args]) == 0, (
        capsys.readouterr().err
    )
    assert (out / "id").is_file()
    ranges = [r for p, r in slow_server.log if p == path]
    assert len(ranges) == 1 and ranges[0] is not None, ranges
    assert int(ranges[0].removeprefix("bytes=").rstrip("-")) >= 1 << 19, ranges


def test_watched_pools_leave_urllib3_alone(slow_server: SlowServer, bundle_files: Bundle) -> None:
    """The watched connection classes go to our sessions only, never urllib3's globals."""
    served = serve(slow_server, bundle_files, "http")
    before = dict(urllib3.poolmanager.pool_classes_by_scheme)
    src = open_source(parse_pull_uri(served.uri))
    assert src.read_small("bundle.json", 1 << 20) == bundle_files.files["bundle.json"]
    assert urllib3.poolmanager.pool_classes_by_scheme == before
    assert not any("Watched" in c.__name__ for c in before.values())
