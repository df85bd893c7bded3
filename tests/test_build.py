"""`spore build` end to end, as a user runs it: real registry, real images, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.ext4mount import mounted_ro
from tests.layer_cases import describe_tree as layer_tree
from tests.layer_cases import multi_layer_case
from tests.treecmp import describe_tree, diff_trees

pytestmark = pytest.mark.registry

SPOREFILE = """\
sporefile: 1
name: t
base:
  image: {image}
  platform: linux/amd64
steps:
  - name: hello
    run: echo hi
"""


def spore(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPORE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "sporevm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def build_json(home: Path, sporefile: Path, *extra: str) -> dict[str, Any]:
    proc = spore(home, "build", "--json", "--until", "rootfs", *extra, str(sporefile))
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def write_sporefile(directory: Path, image: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "Sporefile"
    path.write_text(SPOREFILE.format(image=image))
    return path


def test_build_then_rebuild_does_no_work(tmp_path: Path, busybox_image: Any) -> None:
    sf = write_sporefile(tmp_path / "proj", busybox_image.ref)
    first = build_json(tmp_path / "home", sf)
    assert first["tasks"] == {
        "resolve:base": "executed",
        "fetch:base": "executed",
        "rootfs": "executed",
    }
    assert Path(first["rootfs"]["path"]).stat().st_size == first["rootfs"]["size"]
    lock = json.loads((sf.parent / "Sporefile.lock").read_text())
    assert lock["images"][0]["digest"] == first["image"]
    started = time.monotonic()
    second = build_json(tmp_path / "home", sf)
    took = time.monotonic() - started
    assert set(second["tasks"].values()) == {"up-to-date"}
    assert second["rootfs"]["digest"] == first["rootfs"]["digest"]
    print(f"no-op rebuild wall time: {took:.3f} s")


def test_two_store_roots_give_identical_ext4(tmp_path: Path, busybox_image: Any) -> None:
    sf = write_sporefile(tmp_path / "proj", busybox_image.ref)
    a = build_json(tmp_path / "home-a", sf)
    b = build_json(tmp_path / "home-b", sf)
    assert a["rootfs"]["digest"] == b["rootfs"]["digest"]
    assert Path(a["rootfs"]["path"]).read_bytes() == Path(b["rootfs"]["path"]).read_bytes()


def test_rootfs_command_exports_the_same_image(tmp_path: Path, busybox_image: Any) -> None:
    out = tmp_path / "busybox.ext4"
    proc = spore(tmp_path / "home", "rootfs", busybox_image.ref, "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    import blake3

    assert "blake3:" + blake3.blake3(out.read_bytes()).hexdigest() == doc["digest"]
    with mounted_ro(out) as mnt:
        assert (mnt / "bin" / "busybox").is_file()


def test_locked_semantics(tmp_path: Path, busybox_image: Any) -> None:
    sf = write_sporefile(tmp_path / "proj", busybox_image.ref)
    home = tmp_path / "home"
    proc = spore(home, "build", "--until", "rootfs", "--locked", str(sf))
    assert proc.returncode == 2
    assert "Sporefile.lock" in proc.stderr and "--locked" in proc.stderr
    assert not (sf.parent / "Sporefile.lock").exists()
    build_json(home, sf)
    again = build_json(home, sf, "--locked")
    assert set(again["tasks"].values()) == {"up-to-date"}
    # A lock entry for another digest: --locked must refuse, a plain build keeps the lock.
    lock_path = sf.parent / "Sporefile.lock"
    lock = json.loads(lock_path.read_text())
    lock["images"][0]["digest"] = "sha256:" + "0" * 64
    lock_path.write_text(json.dumps(lock))
    proc = spore(home, "build", "--until", "rootfs", "--locked", "--update-lock", str(sf))
    assert proc.returncode == 2, proc.stderr
    assert "resolves to" in proc.stderr and lock_path.read_text() == json.dumps(lock)
    fixed = build_json(home, sf, "--update-lock")
    assert fixed["image"] != "sha256:" + "0" * 64
    assert json.loads(lock_path.read_text())["images"][0]["digest"] == fixed["image"]


def test_digest_pinned_builds_offline_and_dead_registry_fails_fast(
    tmp_path: Path, busybox_image: Any, throwaway_registry: Any
) -> None:
    ref = throwaway_registry.push(busybox_image.layout, "library/busybox:offline")
    home = tmp_path / "home"
    sf = write_sporefile(tmp_path / "proj", ref)
    first = build_json(home, sf)
    pinned = ref.rsplit(":", 1)[0] + "@" + first["image"]
    sf_pinned = write_sporefile(tmp_path / "pinned", pinned)
    throwaway_registry.stop()
    offline = build_json(home, sf_pinned)
    assert offline["rootfs"]["digest"] == first["rootfs"]["digest"]
    sf_tag = write_sporefile(tmp_path / "tag", ref.rsplit(":", 1)[0] + ":other")
    started = time.monotonic()
    proc = spore(home, "build", "--until", "rootfs", str(sf_tag))
    took = time.monotonic() - started
    assert proc.returncode == 1
    assert throwaway_registry.host in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert took < 10, f"a dead registry took {took:.1f} s to fail"


def test_malformed_sporefile_one_line_with_line_and_path(tmp_path: Path) -> None:
    sf = tmp_path / "Sporefile"
    sf.write_text("sporefile: 1\nname: t\nbase:\n  image: x\n  platfrom: linux/amd64\n")
    proc = spore(tmp_path / "home", "build", str(sf))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{sf}:5" in lines[0] and "platfrom" in lines[0]


def test_graph_shows_the_pipeline(tmp_path: Path, busybox_image: Any) -> None:
    sf = write_sporefile(tmp_path / "proj", busybox_image.ref)
    proc = spore(tmp_path / "home", "graph", "--json", str(sf))
    assert proc.returncode == 0, proc.stderr
    names = [t["name"] for t in json.loads(proc.stdout)["tasks"]]
    assert names == [
        "resolve:base",
        "fetch:base",
        "rootfs",
        "guest",
        "boot",
        "steps",
        "snapshot",
        "verify",
        "bundle",
    ]


@pytest.mark.mount
def test_multi_layer_image_through_registry(tmp_path: Path, multilayer_image: Any) -> None:
    sf = write_sporefile(tmp_path / "proj", multilayer_image.ref)
    doc = build_json(tmp_path / "home", sf)
    _, want = multi_layer_case()
    with mounted_ro(Path(doc["rootfs"]["path"])) as mnt:
        got = layer_tree(mnt)
    got.pop("lost+found", None)
    assert got == want


@pytest.mark.minbase
@pytest.mark.mount
def test_minbase_tree_equals_umoci_unpack(tmp_path: Path, minbase_image: Any) -> None:
    """Our ext4 holds exactly what `umoci unpack` produces from the same image."""
    sf = write_sporefile(tmp_path / "proj", minbase_image.ref)
    doc = build_json(tmp_path / "home", sf)
    bundle = tmp_path / "umoci-bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{minbase_image.layout}:{minbase_image.tag}", str(bundle)],
        check=True,
        capture_output=True,
    )
    want = describe_tree(bundle / "rootfs")
    with mounted_ro(Path(doc["rootfs"]["path"])) as mnt:
        got = describe_tree(mnt)
    got.pop("/lost+found", None)
    assert len(want) > 3000
    assert diff_trees(want, got) == []
