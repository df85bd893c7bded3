"""Distribution end to end on a real Linux guest, as a user runs it (issue 5 acceptance):

build -> pack -> push -> pull into a clean store -> `spore run --from` prints what the
original spore prints, through file://, http://, s3:// (moto) and oci:// (docker-registry).

The spore is built once per session (cached by step keys in the shared kernel store;
the first run cold-boots the guest). The "clean" store holds only the managed kernel
and guest agent (a pull must bring every chunk, state object and the rootfs).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry import LocalRegistry

from tests.conftest import PushedImage
from tests.dist_servers import S3_ENV, S3Server, StaticServer, s3_server, static_server  # noqa: F401
from tests.test_kernel import KERNEL_STORE, built_kernel  # noqa: F401  (shared fixture)

pytestmark = [pytest.mark.vm, pytest.mark.kernelbuild]

SPOREFILE = """\
sporefile: 1
name: distdemo
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB}}
steps:
  - name: write
    run: 'read -r b < /proc/sys/kernel/random/boot_id; echo "warm $b" > /root/state.txt'
push: ["file://{pushed}"]
"""
CHECK = ["sh", "-c", 'read -r s < /root/state.txt; echo "$s"']


def spore(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPORE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "sporevm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@dataclass(frozen=True)
class Built:
    spore: Path
    bundle: Path
    children: tuple[str, ...]
    expected: str  # what CHECK prints in the original spore
    sporefile: Path
    build_ref: str  # what `spore build` printed for its push: entry


@pytest.fixture(scope="module")
def built(
    request: pytest.FixtureRequest,
    busybox_image: PushedImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Built:
    request.getfixturevalue("built_kernel")
    ctx = tmp_path_factory.mktemp("distdemo")
    (ctx / "Sporefile").write_text(
        SPOREFILE.format(layout=busybox_image.layout, pushed=ctx / "pushed")
    )
    build_ref = ok(spore(KERNEL_STORE, "build", str(ctx / "Sporefile"))).strip()
    spore_dir = ctx / "out" / "distdemo.spore"
    expected = ok(spore(KERNEL_STORE, "run", "-q", "--from", str(spore_dir), "--", *CHECK))
    assert expected.startswith("warm ")
    ok(spore(KERNEL_STORE, "fork", str(spore_dir), "--count", "2", "--out", str(ctx / "kids")))
    doc = json.loads(
        ok(
            spore(
                KERNEL_STORE,
                "pack",
                str(spore_dir),
                "--children",
                str(ctx / "kids"),
                "--out",
                str(ctx / "b.bundle"),
                "--json",
            )
        )
    )
    return Built(
        spore_dir, ctx / "b.bundle", tuple(doc["children"]), expected, ctx / "Sporefile", build_ref
    )


def clean_store(path: Path) -> Path:
    """A store with the managed kernel and guest agent only: no chunks, no rootfs."""
    for sub in ("kernels", "guest"):
        shutil.copytree(KERNEL_STORE / sub, path / sub, symlinks=True)
    for kind in (
        "kernel",
        "guest-agent",
        "initrd",
        "source-sha256",
        "source-version",
        "tool-version",
    ):
        if (KERNEL_STORE / "keys" / kind).is_dir():
            shutil.copytree(KERNEL_STORE / "keys" / kind, path / "keys" / kind)
    return path


@dataclass(frozen=True)
class Remote:
    name: str
    push_uri: str
    pull_text: str  # format with {ref}: the pinned reference push printed
    extra: tuple[str, ...] = ()


@pytest.fixture(params=["file", "http", "s3", "oci"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    unique = secrets.token_hex(4)
    if request.param == "file":
        yield Remote("file", f"file://{tmp_path}/remote", "{ref}")
    elif request.param == "http":
        www: StaticServer = request.getfixturevalue("static_server")
        yield Remote("http", f"file://{www.root}/{unique}", f"{www.url}/{unique}@{{pin}}")
    elif request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        s3.client().create_bucket(Bucket=f"e2e-{unique}")
        yield Remote("s3", f"s3://e2e-{unique}/spores", "{ref}", ("--s3-endpoint", s3.endpoint))
    else:
        reg: LocalRegistry = request.getfixturevalue("registry")
        yield Remote("oci", f"oci://{reg.host}/spores/distdemo{unique}:v1", "{ref}")


def test_round_trip(built: Built, remote: Remote, tmp_path: Path) -> None:
    env_home = clean_store(tmp_path / "clean")
    ref = ok(spore(KERNEL_STORE, "push", str(built.bundle), remote.push_uri, *remote.extra)).strip()
    assert "@sha256:" in ref
    pull_ref = remote.pull_text.format(ref=ref, pin=ref.rpartition("@")[2])
    out = tmp_path / "pulled.spore"
    doc = json.loads(
        ok(spore(env_home, "pull", pull_ref, "--out", str(out), "--json", *remote.extra))
    )
    assert doc["cached"] == 0 and doc["bytes_received"] > 0
    got = ok(spore(env_home, "run", "-q", "--from", str(out), "--", *CHECK))
    assert got == built.expected
    # a forked child on a node that holds the parent: fork children share every chunk,
    # so only the metadata crosses the wire
    child = built.children[0]
    doc2 = json.loads(
        ok(
            spore(
                env_home,
                "pull",
                pull_ref,
                "--child",
                child,
                "--out",
                str(tmp_path / "child.spore"),
                "--json",
                *remote.extra,
            )
        )
    )
    assert doc2["packs_fetched"] == 0 and doc2["cached"] == doc2["objects"]
    assert doc2["bytes_received"] < 64 * 1024, doc2
    print(
        f"\n{remote.name}: parent pull {doc['bytes_received']} B, "
        f"child pull {doc2['bytes_received']} B"
    )


def test_build_packs_and_pushes(built: Built, tmp_path: Path) -> None:
    """`spore build` packed output.bundle and pushed it to push:, printing the pin."""
    pushed = built.sporefile.parent / "pushed"
    bundle_dir = built.sporefile.parent / "out" / "distdemo.bundle"
    assert built.build_ref.startswith(f"file://{pushed}@sha256:"), built.build_ref
    digest = built.build_ref.rpartition("@")[2]
    again = json.loads(ok(spore(KERNEL_STORE, "build", str(built.sporefile), "--json")))
    assert again["bundle"] == str(bundle_dir) and again["bundle_digest"] == digest
    assert again["tasks"]["bundle"] == "up-to-date" and again["tasks"]["verify"] == "up-to-date"
    assert again["pushed"] == [built.build_ref]  # pushing the same bundle again: same pin
    env_home = clean_store(tmp_path / "clean")
    ok(spore(env_home, "pull", built.build_ref, "--out", str(tmp_path / "p.spore")))
    got = ok(spore(env_home, "run", "-q", "--from", str(tmp_path / "p.spore"), "--", *CHECK))
    assert got == built.expected


def test_child_runs_after_pull(built: Built, tmp_path: Path) -> None:
    env_home = clean_store(tmp_path / "clean")
    child = built.children[1]
    out = tmp_path / "c.spore"
    ok(spore(env_home, "unpack", str(built.bundle), "--child", child, "--out", str(out)))
    assert (out / "id").read_text().strip() == child
    got = ok(spore(env_home, "run", "-q", "--from", str(out), "--", *CHECK))
    assert got == built.expected


def test_tampered_pack_on_the_server_fails_with_no_output(built: Built, tmp_path: Path) -> None:
    env_home = clean_store(tmp_path / "clean")
    remote = tmp_path / "remote"
    ref = ok(spore(KERNEL_STORE, "push", str(built.bundle), f"file://{remote}")).strip()
    pk = remote / "packs" / "000000.pack"
    data = bytearray(pk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pk.write_bytes(bytes(data))
    proc = spore(env_home, "pull", ref, "--out", str(tmp_path / "x.spore"))
    assert proc.returncode != 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("spore: error:")]
    assert len(errors) == 1 and "sha256" in errors[0], proc.stderr  # one line says why
    assert proc.stderr.rstrip().endswith(errors[0])
    assert not (tmp_path / "x.spore").exists()


_ = S3_ENV  # the s3_server fixture exports these credentials to the CLI's environment
