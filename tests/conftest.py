"""Shared fixtures: a real registry on loopback, real images in it, a fresh store.

The registry is Debian's docker-registry (distribution 2.8) with its own config
(filesystem storage in a temp dir, no auth, deletes enabled); images are built
offline by tools/ociimage.py and pushed with skopeo, exactly as users would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from sporevm.store import Store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import ociimage  # noqa: E402  (tools/ is not a package)
from registry import LocalRegistry  # noqa: E402

MINBASE_CACHE = Path.home() / ".cache" / "spore-tests"

# Every `spore run` a test starts runs in its own process, whether or not the person
# running the tests has a resident server up; tests/test_server_e2e.py starts its own.
os.environ["SPORE_SERVER"] = "off"


@dataclass(frozen=True)
class PushedImage:
    ref: str  # e.g. 127.0.0.1:PORT/library/busybox:latest
    layout: Path
    tag: str
    digest: str  # manifest (or index) digest, identical in layout and registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    reg = LocalRegistry(tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def busybox_image(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
    layout = tmp_path_factory.mktemp("busybox") / "layout"
    digest = ociimage.write_layout(layout, list(ociimage.busybox_layers()), tag="latest")
    ref = registry.push(layout, "library/busybox:latest")
    return PushedImage(ref, layout, "latest", digest)


@pytest.fixture(scope="session")
def multilayer_image(
    registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> PushedImage:
    """tests/layer_cases' three-layer image (every layer semantic), one compression each."""
    from tests.layer_cases import multi_layer_case

    layout = tmp_path_factory.mktemp("multilayer") / "layout"
    layers, _ = multi_layer_case()
    compressions: list[ociimage.Compression] = ["none", "gzip", "zstd"]
    digest = ociimage.write_layout(
        layout, list(layers), tag="latest", compression=compressions[: len(layers)]
    )
    ref = registry.push(layout, "library/multilayer:latest")
    return PushedImage(ref, layout, "latest", digest)


@pytest.fixture
def throwaway_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A private registry for one test, which may stop() it (e.g. to test offline builds)."""
    reg = LocalRegistry(tmp_path / "throwaway-registry")
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def minbase_image(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is missing; run scripts/setup")
    layout = tmp_path_factory.mktemp("minbase") / "layout"
    tag = "bookworm-minbase"
    digest = ociimage.write_layout(layout, list(ociimage.minbase_layers(MINBASE_CACHE)), tag=tag)
    ref = registry.push(layout, f"library/debian:{tag}", tag=tag)
    return PushedImage(ref, layout, tag, digest)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests using the image fixtures need the registry; mark them so `-m 'not registry'` works.
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {
            "registry",
            "busybox_image",
            "minbase_image",
            "multilayer_image",
            "throwaway_registry",
        }:
            item.add_marker(pytest.mark.registry)
        if "minbase_image" in names:
            item.add_marker(pytest.mark.minbase)


@contextmanager
def immutable(paths: list[Path]) -> Iterator[None]:
    """chattr +i on ``paths`` for the block: not even root can remove or rename them.

    A real stand-in for a store entry that cannot be evicted (a read-only store, an I/O
    error); skips where the filesystem or the user cannot set the flag.
    """
    done: list[Path] = []
    try:
        for path in paths:
            proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
            if proc.returncode:
                pytest.skip(f"chattr +i does not work here: {proc.stderr.strip()}")
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], check=True)
