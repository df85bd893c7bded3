"""Real servers on 127.0.0.1 for the distribution tests and the pull benchmark.

- ``S3Server``: moto's S3 in server mode (a real S3 HTTP API, SigV4 and all).
- ``StaticServer``: a static file server over one directory (stdlib ``http.server``
  in a thread) that honours ``Range: bytes=N-`` and can misbehave on request:
  cut a body short, ignore Range, or redirect.
- ``SlowServer``: serves fixed paths (any transport's URL layout: plain files, S3
  path-style objects, registry manifests and blobs) and makes chosen paths slow:
  headers trickled a line at a time, or a body sent in part and then a byte at a
  time or not at all.
- the registry is ``tools/registry.py``'s ``LocalRegistry`` (conftest's ``registry``).

Test modules import the fixtures: ``from tests.dist_servers import s3_server, static_server``.
"""

from __future__ import annotations

import http.server
import os
import re
import select
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from registry import free_port

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """moto's ThreadedMotoServer on a free loopback port; ``client()`` talks to it."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint)

    def stop(self) -> None:
        self._server.stop()


class AuthRegistry:
    """docker-registry with htpasswd (Basic) auth for one user, private storage."""

    def __init__(self, workdir: Path, user: str, password: str) -> None:
        with warnings.catch_warnings():  # deprecated (gone in 3.13); libxcrypt does bcrypt
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt

        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        (workdir / "htpasswd").write_text(
            # bcrypt cost 4: the registry checks it on every request
            f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}\n"
        )
        (workdir / "config.yml").write_text(
            "version: 0.1\n"
            "log: {level: error, accesslog: {disabled: true}}\n"
            f"storage: {{filesystem: {{rootdirectory: {workdir / 'storage'}}}}}\n"
            f"auth: {{htpasswd: {{realm: spore-test, path: {workdir / 'htpasswd'}}}}}\n"
            f"http: {{addr: '{self.host}'}}\n"
        )
        self._log = open(workdir / "registry.log", "wb")
        self.proc = subprocess.Popen(
            ["/usr/bin/docker-registry", "serve", str(workdir / "config.yml")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if requests.get(f"http://{self.host}/v2/", timeout=1).status_code == 401:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError((workdir / "registry.log").read_text()[-2000:])
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()


_RANGE = re.compile(r"bytes=([0-9]+)-\Z")


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no access log on stderr: the base of the test servers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _Handler(QuietHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        if self.headers.get("Authorization"):
            srv.authorized.append(self.path)
        location = srv.redirects.get(self.path, srv.redirect_to)
        if location is not None:
            self.send_response(307)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        rel = self.path.lstrip("/")
        target = srv.root / rel
        if ".." in rel.split("/") or not target.is_file():
            self.send_error(404)
            return
        data = target.read_bytes()
        m = _RANGE.match(self.headers.get("Range", ""))
        start = int(m.group(1)) if m and not srv.ignore_range else 0
        if start > len(data) or (start == len(data) and start > 0):
            self.send_error(416)
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        if srv.cut_after is not None:
            # Announce the whole body, send part of it, hang up: a broken transfer.
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: srv.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.log: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None
        self.ignore_range = False
        self.redirect_to: str | None = None  # redirect every request here
        self.redirects: dict[str, str] = {}  # or just these paths
        self.authorized: list[str] = []  # paths requested with credentials

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on a cut or refused transfer are expected here


class StaticServer:
    """Serves ``root`` at ``self.url``; misbehaviour is switched on ``self.httpd``
    (``cut_after``, ``ignore_range``, ``redirect_to``, ``redirects``) and undone by
    ``reset()``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.httpd = _Server(root)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.httpd.cut_after = None
        self.httpd.ignore_range = False
        self.httpd.redirect_to = None
        self.httpd.redirects.clear()
        self.httpd.authorized.clear()
        self.httpd.log.clear()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


@dataclass(frozen=True)
class Slow:
    """How ``SlowServer`` answers one path: with ``header_gap``, the status line and then
    one more header line every ``header_gap`` s, never ending; else the headers and the
    first ``first`` bytes of the body at once, then one byte every ``byte_gap`` s (None:
    no more bytes at all)."""

    header_gap: float | None = None
    first: int = 0
    byte_gap: float | None = None


class _SlowHandler(QuietHandler):
    server: _SlowHTTPServer

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        path = self.path.partition("?")[0]  # botocore adds ?x-id=GetObject
        srv.log.append((path, self.headers.get("Range")))
        data = srv.files.get(path)
        if data is None:
            self.send_error(404)
            return
        m = _RANGE.match(self.headers.get("Range", ""))
        start = int(m.group(1)) if m else 0
        if start >= len(data) > 0:
            self.send_error(416)
            return
        slow = srv.slow.get(path)
        try:
            if slow is not None and slow.header_gap is not None:
                self.close_connection = True
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                n = 0
                while not self._gone(slow.header_gap):
                    self.wfile.write(b"X-Slow-%d: %s\r\n" % (n, b"x" * 8))
                    n += 1
                return
            body = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if slow is None:
                self.wfile.write(body)
                return
            self.close_connection = True
            self.wfile.write(body[: slow.first])
            srv.stalled.set()
            for pos in range(slow.first, len(body)):
                if self._gone(slow.byte_gap):
                    return
                self.wfile.write(body[pos : pos + 1])
        except OSError:
            self.close_connection = True  # the client gave up on us: what the tests want

    def _gone(self, seconds: float | None) -> bool:
        """Wait ``seconds`` (None: until the end); True once the client hung up or the
        server stops."""
        end = time.monotonic() + (seconds if seconds is not None else 1e9)
        while not self.server.stopping.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.connection], [], [], min(left, 0.1))
            if ready:  # nothing more may come before our answer: EOF or a reset
                return True
        return True


class _SlowHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SlowHandler)
        self.files: dict[str, bytes] = {}
        self.slow: dict[str, Slow] = {}
        self.log: list[tuple[str, str | None]] = []
        self.stalled = threading.Event()  # a slow body's first bytes are out
        self.stopping = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class SlowServer:
    """``files`` (URL path -> bytes) at ``self.url``, the paths in ``slow`` slow."""

    def __init__(self) -> None:
        self.httpd = _SlowHTTPServer()
        self.files, self.slow, self.log = self.httpd.files, self.httpd.slow, self.httpd.log
        self.stalled = self.httpd.stalled
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.stopping.set()  # ends every slow answer still going
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)  # the transport finds credentials the way users' do: env
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def static_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticServer]:
    server = StaticServer(tmp_path_factory.mktemp("www"))
    try:
        yield server
    finally:
        server.stop()
