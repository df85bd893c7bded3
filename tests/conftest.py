"""Shared fixtures: a real registry on loopback, real images in it, a fresh store.

The registry is Debian's docker-registry (distribution 2.8) with its own config
(filesystem storage in a temp dir, no auth, deletes enabled); images are built
offline by tools/ociimage.py and pushed with skopeo, exactly as users would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from sporevm.store import Store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import ociimage  # noqa: E402  (tools/ is not a package)

REGISTRY_BIN = Path("/usr/bin/docker-registry")
MINBASE_CACHE = Path.home() / ".cache" / "spore-tests"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalRegistry:
    """A docker-registry process with private storage; ``stop()`` kills it."""

    def __init__(self, workdir: Path, *, bind: str = "127.0.0.1", host: str | None = None) -> None:
        if not REGISTRY_BIN.exists():
            pytest.fail(f"{REGISTRY_BIN} is missing; run scripts/setup (installs docker-registry)")
        self.port = free_port(bind)
        self.host = f"{host or bind}:{self.port}"
        self.url = f"http://{self.host}"
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: error, accesslog: {disabled: true}}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.storage}}},"
            " delete: {enabled: true}}\n"
            f"http: {{addr: '{bind}:{self.port}'}}\n"
        )
        self._log = open(workdir / "registry.log", "wb")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [str(REGISTRY_BIN), "serve", str(config)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                if requests.get(f"http://{bind}:{self.port}/v2/", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (workdir / "registry.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"docker-registry did not come up on port {self.port}:\n{log}")
            time.sleep(0.05)

    def push(self, layout: Path, dest: str, *, tag: str = "latest") -> str:
        """Push the layout's ``tag`` as ``dest`` (REPO:TAG here); returns the full ref."""
        ref = f"{self.host}/{dest}"
        ociimage.push_layout(layout, tag, ref)
        return ref

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob (tests corrupt it to check verification)."""
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self._log.close()


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
def busybox_image(registry: LocalRegistry,
                  tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
    layout = tmp_path_factory.mktemp("busybox") / "layout"
    digest = ociimage.write_layout(layout, list(ociimage.busybox_layers()), tag="latest")
    ref = registry.push(layout, "library/busybox:latest")
    return PushedImage(ref, layout, "latest", digest)


@pytest.fixture(scope="session")
def multilayer_image(registry: LocalRegistry,
                     tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
    """tests/layer_cases' three-layer image (every layer semantic), one compression each."""
    from tests.layer_cases import multi_layer_case

    layout = tmp_path_factory.mktemp("multilayer") / "layout"
    layers, _ = multi_layer_case()
    compressions: list[ociimage.Compression] = ["none", "gzip", "zstd"]
    digest = ociimage.write_layout(layout, list(layers), tag="latest",
                                   compression=compressions[:len(layers)])
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
def minbase_image(registry: LocalRegistry,
                  tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
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
        if names & {"registry", "busybox_image", "minbase_image", "multilayer_image",
                    "throwaway_registry"}:
            item.add_marker(pytest.mark.registry)
        if "minbase_image" in names:
            item.add_marker(pytest.mark.minbase)

