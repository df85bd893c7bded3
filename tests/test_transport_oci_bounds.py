"""oci:// through a registry whose token server we do not trust (docs/limits.md).

A real socket server on 127.0.0.1 answers every registry request with a 401
Bearer challenge pointing at its own ``/token``, and that endpoint's answer is
what each test varies: the token response is read through oras-py's session,
so the bound must hold there too. Limit accepted, limit + 1 refused with one
line, whether the length is announced or the body is chunked.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sporevm.dist.transport_oci import encode_artifact
from sporevm.dist.transports import Source, open_source
from sporevm.dist.uri import parse_pull_uri
from sporevm.errors import DistError
from sporevm.net.auth import MAX_TOKEN_LEN, MAX_TOKEN_RESPONSE
from tests.dist_servers import QuietHandler

REPO = "spores/bounds"
BUNDLE_DIGEST = "sha256:" + "cd" * 32
BLOB = b'{"format":"spore-bundle/v1"}'
MANIFEST = encode_artifact(
    [("bundle.json", "sha256:" + hashlib.sha256(BLOB).hexdigest(), len(BLOB))], BUNDLE_DIGEST
)
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
TOKEN = "tok-abc.DEF_123"


class _Handler(QuietHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/token"):
            self._token_answer()
            return
        if self.headers.get("Authorization") != f"Bearer {srv.token}":
            self.send_response(401)
            realm = srv.realm if srv.realm is not None else f"{srv.url}/token"
            self.send_header(
                "WWW-Authenticate",
                f'Bearer realm="{realm}",service=x,scope="repository:{REPO}:pull"',
            )
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == f"/v2/{REPO}/manifests/{MANIFEST_DIGEST}":
            body = MANIFEST
        elif self.path == f"/v2/{REPO}/blobs/sha256:{hashlib.sha256(BLOB).hexdigest()}":
            body = BLOB
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _token_answer(self) -> None:
        srv = self.server
        if srv.redirects_left > 0:
            srv.redirects_left -= 1
            self.send_response(302)
            self.send_header("Location", self.path)  # the same realm again
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = srv.token_body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.close_connection = True
        if srv.mode == "length":
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif srv.mode == "lie":  # announces a terabyte, sends nothing
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
        else:  # chunked, no Content-Length
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 64 << 10):
                piece = body[i : i + (64 << 10)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.seen: list[tuple[str, str | None]] = []
        self.token = TOKEN
        self.token_body = json.dumps({"token": TOKEN}).encode()
        self.mode = "length"
        self.redirects_left = 0
        self.realm: str | None = None  # None: this server's own /token

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client hanging up on a refused body is expected here


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    # No docker credentials from the machine running the tests: anonymous tokens only.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nowhere"))
    # The test server (the outside) must take a 64 KiB Authorization header line.
    monkeypatch.setattr(http.client, "_MAXLINE", 1 << 20)
    server = _Server()
    thread = threading.Thread(target=lambda: server.serve_forever(0.05), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def pull(server: _Server) -> Source:
    netloc = server.url.removeprefix("http://")
    return open_source(parse_pull_uri(f"oci://{netloc}/{REPO}@{MANIFEST_DIGEST}"))


def refused(server: _Server, pattern: str) -> str:
    with pytest.raises(DistError) as info:
        pull(server)
    msg = str(info.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    assert re.search(pattern, msg), msg
    return msg


def padded(size: int, token: str = TOKEN) -> bytes:
    """A token response of exactly ``size`` bytes: JSON plus trailing whitespace."""
    doc = json.dumps({"token": token}).encode()
    assert len(doc) <= size
    return doc + b" " * (size - len(doc))


def test_small_token_is_used(registry: _Server) -> None:
    src = pull(registry)
    assert src.pinned_bundle_digest == BUNDLE_DIGEST
    assert src.read_small("bundle.json", 1000) == BLOB
    manifest = f"/v2/{REPO}/manifests/{MANIFEST_DIGEST}"
    assert registry.seen[0] == (manifest, None)
    assert registry.seen[1][0].startswith("/token?")
    assert registry.seen[2] == (manifest, f"Bearer {TOKEN}")


@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_token_response_at_the_limit_is_accepted(registry: _Server, mode: str) -> None:
    registry.mode = mode
    registry.token_body = padded(MAX_TOKEN_RESPONSE)
    assert pull(registry).pinned_bundle_digest == BUNDLE_DIGEST
    assert (f"/v2/{REPO}/manifests/{MANIFEST_DIGEST}", f"Bearer {TOKEN}") in registry.seen


@pytest.mark.parametrize("mode", ["length", "chunked", "lie"])
def test_token_response_over_the_limit_is_refused(registry: _Server, mode: str) -> None:
    registry.mode = mode
    registry.token_body = padded(MAX_TOKEN_RESPONSE + 1)
    msg = refused(
        registry,
        r"token response from http://127\.0\.0\.1:\d+/token exceeds "
        r"1 MiB; is this a registry\?",
    )
    assert msg.startswith(f"oci://127.0.0.1:{registry.server_address[1]}/{REPO}@")
    assert "?service" not in msg  # the URL is named without its query
    assert not any(auth and auth.startswith("Bearer") for _, auth in registry.seen)


def test_token_length(registry: _Server) -> None:
    registry.token = "t" * MAX_TOKEN_LEN
    registry.token_body = json.dumps({"token": registry.token}).encode()
    assert pull(registry).pinned_bundle_digest == BUNDLE_DIGEST
    registry.token += "t"
    registry.token_body = json.dumps({"token": registry.token}).encode()
    refused(registry, rf"malformed token \(not 1 to {MAX_TOKEN_LEN} printable ASCII")


@pytest.mark.parametrize("token", ["tok en", "tok\u00e9n", "tok\x7f"])
def test_token_must_be_printable_ascii(registry: _Server, token: str) -> None:
    registry.token_body = json.dumps({"token": token}).encode()
    refused(registry, "malformed token")
    assert not any(auth and auth.startswith("Bearer") for _, auth in registry.seen)


def test_token_fetch_redirects(registry: _Server) -> None:
    registry.redirects_left = 5
    assert pull(registry).pinned_bundle_digest == BUNDLE_DIGEST
    assert sum(path.startswith("/token") for path, _ in registry.seen) == 6
    registry.seen.clear()
    registry.redirects_left = 6
    refused(
        registry,
        r"authentication with registry 127\.0\.0\.1:\d+ failed "
        r"\(TooManyRedirects\)",
    )
    assert sum(path.startswith("/token") for path, _ in registry.seen) == 6


@pytest.mark.parametrize(
    "realm",
    [
        "http://token.example.invalid/token",
        "ftp://127.0.0.1/t",
        "//127.0.0.1/token",
        "http://127.0.0.1:bad/token",
        "",
    ],
)
def test_token_realm_must_be_https_or_loopback(registry: _Server, realm: str) -> None:
    # oras-py would send docker-config credentials to whatever realm is named.
    registry.realm = realm
    refused(
        registry,
        r"names the token realm .*; only https realms \(or plain http on "
        r"loopback\) are used",
    )
    assert not any(path.startswith("/token") for path, _ in registry.seen)
    assert len(registry.seen) == 1  # the one unauthenticated request, nothing after it
