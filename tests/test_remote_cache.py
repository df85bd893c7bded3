"""A build cache shared between machines (docs/cache.md), end to end as a CI fleet uses it.

Store A (the shared kernel store) builds a two-step Sporefile once with --cache-to to a
file://, an s3:// (moto) and an oci:// (docker-registry on loopback) cache at the same
time. Then, per transport, an empty store B (no kernel, no chunks) builds the same
Sporefile with --cache-from: no kernel compile, no VM boot, no step runs, the very same
spore id, and `run --from` prints what the steps wrote. Also: a changed last step on B
resumes from the cached snapshot of the step before it; a damaged cache object is a miss
with one warning (the work is done locally), never a result; two runners pushing the
same keys at once both succeed and leave a usable cache.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry import LocalRegistry

from sporevm.build.progress import Reporter
from sporevm.pipeline.remote_cache import RemoteCaches, parse_cache_uri
from sporevm.store import Store
from tests.conftest import PushedImage
from tests.dist_servers import S3_ENV, S3Server, s3_server  # noqa: F401
from tests.test_dist_e2e import clean_store, ok, spore
from tests.test_kernel import KERNEL_STORE, built_kernel  # noqa: F401  (shared fixture)

pytestmark = [pytest.mark.vm, pytest.mark.kernelbuild]

SPOREFILE = """\
sporefile: 1
name: cachedemo
base: {{image: "oci-layout:{layout}:latest"}}
machine: {{memory: 256MiB}}
env: {{WHO: "{who}"}}
steps:
  - name: write
    run: 'echo "hello $WHO" > /root/a.txt'
  - name: check
    run: {check}
verify:
  - run: [cat, /root/a.txt]
"""
CHECK = "[cat, /root/a.txt]"


@dataclass(frozen=True)
class Cached:
    layout: Path
    who: str
    uris: dict[str, str]
    extra: tuple[str, ...]  # --s3-endpoint for s3://
    spore_id: str
    keys: tuple[str, ...]  # the two step keys

    def context(self, root: Path, check: str = CHECK) -> Path:
        root.mkdir(parents=True)
        (root / "Sporefile").write_text(
            SPOREFILE.format(layout=self.layout, who=self.who, check=check)
        )
        return root / "Sporefile"


def greeting(home: Path, sf: Path) -> str:
    """What the steps wrote, read in a restore of the spore the build published."""
    spore_dir = str(sf.parent / "out" / "cachedemo.spore")
    return ok(spore(home, "run", "-q", "--from", spore_dir, "--", "cat", "/root/a.txt"))


@pytest.fixture(scope="module")
def cached(
    request: pytest.FixtureRequest,
    busybox_image: PushedImage,
    registry: LocalRegistry,
    s3_server: S3Server,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Cached:
    request.getfixturevalue("built_kernel")
    root = tmp_path_factory.mktemp("cache")
    unique = secrets.token_hex(4)
    s3_server.client().create_bucket(Bucket=f"cache-{unique}")
    uris = {
        "file": f"file://{root}/shared",
        "s3": f"s3://cache-{unique}/ci",
        "oci": f"oci://{registry.host}/cache/demo{unique}",
    }
    extra = ("--s3-endpoint", s3_server.endpoint)
    c = Cached(busybox_image.layout, "ci-" + uuid.uuid4().hex[:8], uris, extra, "", ())
    sf = c.context(root / "a")
    args = [a for uri in uris.values() for a in ("--cache-to", uri)]
    ok(spore(KERNEL_STORE, "build", str(sf), *args, *extra))
    doc = json.loads(
        ok(spore(KERNEL_STORE, "inspect", "--json", str(sf.parent / "out" / "cachedemo.spore")))
    )
    return Cached(
        c.layout, c.who, uris, extra, doc["id"], tuple(doc["manifest"]["provenance"]["steps"])
    )


@pytest.mark.parametrize("transport", ["file", "s3", "oci"])
def test_an_empty_store_restores_from_the_cache_instead_of_building(
    cached: Cached, transport: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"  # empty: no kernel, no initramfs, no chunks
    sf = cached.context(tmp_path / "b")
    proc = spore(home, "build", str(sf), "--cache-from", cached.uris[transport], *cached.extra)
    ok(proc)
    log = proc.stderr
    assert f"from cache {cached.uris[transport]}" in log, log
    assert "snapshot after 2 step(s)" in log, log
    assert "compiling" not in log and "kernel kvm" not in log, log  # no kernel build
    assert "step:" not in log and "resuming from" not in log, log  # no boot, no step
    doc = json.loads(
        ok(spore(home, "inspect", "--json", str(sf.parent / "out" / "cachedemo.spore")))
    )
    assert doc["id"] == cached.spore_id  # the very same spore
    assert greeting(home, sf) == f"hello {cached.who}\n"


def test_a_changed_last_step_resumes_from_the_cached_step_before_it(
    cached: Cached, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    sf = cached.context(tmp_path / "b", check="[cat, /root/a.txt, /proc/version]")
    proc = spore(home, "build", str(sf), "--cache-from", cached.uris["file"])
    ok(proc)
    assert "snapshot after 1 step(s)" in proc.stderr, proc.stderr
    assert "resuming from the snapshot after step write (1 of 2 steps cached)" in proc.stderr
    assert "step:check" in proc.stderr and "step:write" not in proc.stderr, proc.stderr


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_cache_object_is_a_miss_with_one_warning(cached: Cached, tmp_path: Path) -> None:
    shared = Path(cached.uris["file"].removeprefix("file://"))
    copy = tmp_path / "copy"
    shutil.copytree(shared, copy)
    packs = sorted(copy.glob("objects/*/packs/*.pack"))
    assert packs
    for pack in packs:
        _flip(pack)
    home = tmp_path / "home"
    sf = cached.context(tmp_path / "b")
    proc = spore(home, "build", str(sf), "--cache-from", f"file://{copy}")
    ok(proc)  # done locally: boot and both steps
    warnings = [ln for ln in proc.stderr.splitlines() if "step snapshot not used" in ln]
    assert warnings and all("sha256" in w for w in warnings), proc.stderr
    assert "step:write" in proc.stderr and "step:check" in proc.stderr
    assert greeting(home, sf) == f"hello {cached.who}\n"

    # The guest entry: a flipped initramfs byte is refused before anything is installed
    # (in process: building the kernel locally instead would take minutes).
    for f in copy.glob("objects/*/initrd"):
        _flip(f)
    store = Store(tmp_path / "fresh")
    reporter = Reporter.quiet()
    caches = RemoteCaches(
        store, reporter, [parse_cache_uri(f"file://{copy}", for_push=False)], [], "max"
    )
    assert caches.restore_guest() is False
    assert any("guest entry not used" in w and "sha256" in w for w in reporter.warnings)
    assert not (store.root / "keys" / "kernel").is_dir() or not any(
        (store.root / "keys" / "kernel").iterdir()
    )


PUBLISH = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from sporevm.build.progress import Reporter
    from sporevm.pipeline.remote_cache import RemoteCaches, parse_cache_uri
    from sporevm.store import Store
    uri, mode, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
    reporter = Reporter.quiet()
    caches = RemoteCaches(Store(), reporter, [], [parse_cache_uri(uri, for_push=True)], mode)
    wanted = [1, 2] if mode == "max" else [2]
    caches.publish_steps(["boot", *keys], wanted)
    print("warnings:", reporter.warnings)
    """
)


def test_two_runners_pushing_the_same_keys_at_once_both_succeed(
    cached: Cached, tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/race"
    env = {**os.environ, "SPORE_HOME": str(KERNEL_STORE)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISH, uri, mode, *cached.keys],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("min", "max")  # different objects, one pointer for the last step
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "warnings: []" in out, out
    home = clean_store(tmp_path / "home")  # the kernel only: these pushes carry no guest
    sf = cached.context(tmp_path / "b")
    proc = spore(home, "build", str(sf), "--cache-from", uri)
    ok(proc)
    assert "snapshot after 2 step(s)" in proc.stderr and "step:" not in proc.stderr


_ = S3_ENV  # the s3_server fixture exports these credentials to the CLI's environment


def test_a_cache_that_is_down_costs_one_warning_then_a_local_build(
    cached: Cached, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = clean_store(tmp_path / "home")
    sf = cached.context(tmp_path / "b")
    started = time.monotonic()
    proc = spore(home, "build", str(sf), "--cache-from", f"oci://127.0.0.1:{port}/cache/x")
    ok(proc)
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: cache")]
    assert len(warnings) == 1 and "not using this cache" in warnings[0], proc.stderr
    assert "step:write" in proc.stderr and "step:check" in proc.stderr  # built locally
    assert time.monotonic() - started < 300
