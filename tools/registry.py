"""Debian's docker-registry (distribution 2.8) on loopback, with private storage.

Used by the test fixtures and the benchmarks: a real registry, started with
its own config file (the packaged default enables htpasswd and does not start).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import ociimage
import requests

REGISTRY_BIN = Path("/usr/bin/docker-registry")


class RegistryError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalRegistry:
    """A docker-registry process with private storage; ``stop()`` kills it."""

    def __init__(self, workdir: Path, *, bind: str = "127.0.0.1", host: str | None = None) -> None:
        if not REGISTRY_BIN.exists():
            raise RegistryError(
                f"{REGISTRY_BIN} is missing; run scripts/setup (installs docker-registry)"
            )
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
            [str(REGISTRY_BIN), "serve", str(config)], stdout=self._log, stderr=subprocess.STDOUT
        )
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
                raise RegistryError(f"docker-registry did not come up on port {self.port}:\n{log}")
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
