"""The one registry client (sporevm/net/registry.py), one policy, tried through both users.

Every test runs twice, against one hostile registry on 127.0.0.1: as an image fetch
(``OCIClient``, build side) and as an ``oci://`` bundle pull (``OciSource``, dist
side). Redirects, the token flow, retries, size bounds and the deadlines must hold
the same way for both, and fail with one line of each side's error type. The
trickle tests are the build side's old hole: it checked its time budget once per
block, so a registry dripping bytes (or header lines) held an image fetch forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ociimage
import pytest

from sporevm.build.oci import OCIClient
from sporevm.build.ociref import parse_ref
from sporevm.dist.transport_oci import OciSink, encode_artifact
from sporevm.dist.transports import open_source
from sporevm.dist.uri import parse_pull_uri, parse_push_uri
from sporevm.errors import DistError, OCIError, SporeError
from sporevm.net import deadline
from sporevm.net.auth import MAX_TOKEN_RESPONSE
from sporevm.net.hosts import Policy
from sporevm.net.registry import MAX_ATTEMPTS, MAX_REDIRECTS, Repository
from sporevm.store import Store
from tests.dist_servers import QuietHandler

REPO = "policy/test"
BUNDLE_DIGEST = "sha256:" + "cd" * 32
BLOB = b'{"format":"spore-bundle/v1"}'


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Handler(QuietHandler):
    server: _Registry

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(head=False)

    def do_POST(self) -> None:  # noqa: N802
        self.server.seen.append(("POST", self.path, self.headers.get("Authorization")))
        self._send(503, b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}')

    def _answer(self, head: bool) -> None:
        srv, path = self.server, self.path
        auth = self.headers.get("Authorization")
        srv.seen.append(("HEAD" if head else "GET", path, auth))
        if path.startswith("/token"):
            self._send(200, srv.token_body)
            return
        if path.startswith("/redirected/"):
            path = path[len("/redirected") :]
        elif srv.token is not None and auth != f"Bearer {srv.token}":
            realm = srv.realm if srv.realm is not None else f"http://{srv.host}/token"
            challenge = srv.challenge or f'Bearer realm="{realm}",service=x'
            self._send(401, b"", {"WWW-Authenticate": challenge})
            return
        elif srv.unavailable.get(path, 0) > 0:
            srv.unavailable[path] -= 1
            self._send(503, b"")
            return
        elif srv.redirect is not None and "/blobs/" in path:
            self._send(307, b"", {"Location": srv.redirect + path})
            return
        data = srv.files.get(path)
        if data is None:
            self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}')
            return
        if path in srv.trickle_headers:
            self._trickle(b"HTTP/1.1 200 OK\r\n", [b"X-Slow: x\r\n"] * 200, 0.2)
            return
        ctype = (
            "application/vnd.oci.image.manifest.v1+json"
            if "/manifests/" in path
            else "application/octet-stream"
        )
        if path in srv.trickle_body:
            head_bytes = (
                f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode()
            self._trickle(head_bytes, [data[i : i + 1] for i in range(len(data))], 0.1)
            return
        self._send(200, data, {"Content-Type": ctype}, head=head)

    def _send(
        self, status: int, body: bytes, headers: dict[str, str] | None = None, head: bool = False
    ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _trickle(self, first: bytes, pieces: list[bytes], gap: float) -> None:
        self.close_connection = True
        try:
            self.wfile.write(first)
            for piece in pieces:
                self.wfile.flush()
                time.sleep(gap)
                self.wfile.write(piece)
        except OSError:
            pass  # the client gave up on us: what the tests want


class _Registry(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.port = self.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.files: dict[str, bytes] = {}
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.token: str | None = None  # set: every /v2/ request needs this Bearer token
        self.token_body = b""
        self.realm: str | None = None  # None: this server's own /token
        self.challenge: str | None = None  # None: a Bearer challenge naming the realm
        self.redirect: str | None = None  # blob GETs are sent to this prefix + their path
        self.unavailable: dict[str, int] = {}  # path -> how many more 503s
        self.trickle_headers: set[str] = set()
        self.trickle_body: set[str] = set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass

    def paths(self, method: str, part: str) -> list[str]:
        return [p for m, p, _ in self.seen if m == method and part in p]


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Registry]:
    monkeypatch.setenv("HOME", str(tmp_path))  # no docker credentials of the test machine
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nowhere"))
    server = _Registry()
    thread = threading.Thread(target=lambda: server.serve_forever(0.05), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class User:
    """One user of the client: what it fetches, and how."""

    name: str
    error: type[SporeError]
    run: Callable[[], None]  # the whole fetch; raises ``error``
    manifest: str  # URL path of the first document fetched
    blob: str  # URL path of a blob it fetches


def _image_user(srv: _Registry, tmp: Path) -> User:
    layout = tmp / "layout"
    digest = ociimage.write_layout(
        layout, [ociimage.tar_layer({"hello": b"hi\n" * 1000})], tag="t", compression="none"
    )
    for blob in (layout / "blobs" / "sha256").iterdir():
        srv.files[f"/v2/{REPO}/blobs/sha256:{blob.name}"] = blob.read_bytes()
    manifest = srv.files.pop(f"/v2/{REPO}/blobs/{digest}")
    srv.files[f"/v2/{REPO}/manifests/{digest}"] = manifest
    layer = json.loads(manifest)["layers"][0]["digest"]
    runs = iter(range(1000))

    def run() -> None:
        store = Store(tmp / f"store{next(runs)}")
        ref = parse_ref(f"{srv.host}/{REPO}@{digest}", Path("/"))
        try:
            OCIClient(store).fetch(ref, digest, "linux/amd64")
        except SporeError:
            assert not store.has_blob(layer) and list((store.root / "tmp").iterdir()) == []
            raise

    return User(
        "image", OCIError, run, f"/v2/{REPO}/manifests/{digest}", f"/v2/{REPO}/blobs/{layer}"
    )


def _bundle_user(srv: _Registry) -> User:
    manifest = encode_artifact([("bundle.json", sha(BLOB), len(BLOB))], BUNDLE_DIGEST)
    srv.files[f"/v2/{REPO}/manifests/{sha(manifest)}"] = manifest
    srv.files[f"/v2/{REPO}/blobs/{sha(BLOB)}"] = BLOB

    def run() -> None:
        src = open_source(parse_pull_uri(f"oci://{srv.host}/{REPO}@{sha(manifest)}"))
        assert src.read_small("bundle.json", 1000) == BLOB

    return User(
        "bundle",
        DistError,
        run,
        f"/v2/{REPO}/manifests/{sha(manifest)}",
        f"/v2/{REPO}/blobs/{sha(BLOB)}",
    )


@pytest.fixture(params=["image", "bundle"])
def user(request: pytest.FixtureRequest, registry: _Registry, tmp_path: Path) -> User:
    return _image_user(registry, tmp_path) if request.param == "image" else _bundle_user(registry)


def refused(user: User, pattern: str, within: float = 10) -> str:
    """``user.run`` fails with one line of its own error type matching ``pattern``."""
    t0 = time.monotonic()
    with pytest.raises(SporeError) as info:
        user.run()
    took = time.monotonic() - t0
    msg = str(info.value)
    assert type(info.value) is user.error, (type(info.value), msg)
    assert "\n" not in msg and re.search(pattern, msg), msg
    assert took < within, f"took {took:.1f} s: {msg}"
    return msg


# -- redirects ---------------------------------------------------------------------------


def test_blob_redirect_to_another_host_gets_no_credentials(registry: _Registry, user: User) -> None:
    registry.token = "tok-1"
    registry.token_body = json.dumps({"token": "tok-1"}).encode()
    registry.redirect = f"http://localhost:{registry.port}/redirected"  # another loopback name
    user.run()
    redirected = [(p, a) for _, p, a in registry.seen if p.startswith("/redirected/")]
    assert redirected and all(auth is None for _, auth in redirected), redirected
    assert ("GET", user.blob, "Bearer tok-1") in registry.seen


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (
            "http://192.0.2.1:9/redirected",
            r"redirected to http://192\.0\.2\.1:9; only HTTPS "
            r"redirects are followed",
        ),
        ("ftp://127.0.0.1/redirected", "only HTTPS redirects are followed"),
        ("http://user:pw@127.0.0.1:{port}/redirected", "redirected to a malformed URL"),
        ("http://127.0.0.1:{port}", rf"redirected more than {MAX_REDIRECTS} times"),  # a loop
    ],
)
def test_blob_redirect_refusals(registry: _Registry, user: User, target: str, pattern: str) -> None:
    registry.redirect = target.format(port=registry.port)
    refused(user, rf"blob|bundle\.json|layer.*{pattern}|{pattern}")
    if "more than" in pattern:
        assert len(registry.paths("GET", "/blobs/")) == MAX_REDIRECTS + 1  # the first blob


# -- the token flow ----------------------------------------------------------------------


def test_token_flow_default_scope(registry: _Registry, user: User) -> None:
    registry.token = "tok-2"
    registry.token_body = json.dumps({"access_token": "tok-2"}).encode()
    user.run()
    tokens = registry.paths("GET", "/token")
    assert len(tokens) == 1  # one token for the whole fetch
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(tokens[0]).query))
    assert query == {"service": "x", "scope": f"repository:{REPO}:pull"}


@pytest.mark.parametrize(
    "realm", ["http://192.0.2.1/token", "https://u:p@127.0.0.1/token", "//127.0.0.1/token"]
)
def test_token_realm_refused_before_anything_is_sent(
    registry: _Registry, user: User, realm: str
) -> None:
    registry.token = "tok-3"
    registry.realm = realm
    refused(
        user,
        r"names the token realm .*; only https realms \(or plain http on "
        r"loopback\) are used",
    )
    assert len(registry.seen) == 1  # the unauthenticated request, nothing after it


def test_every_offered_realm_is_checked(registry: _Registry, user: User) -> None:
    registry.token = "tok-5"
    registry.challenge = (
        f'Bearer realm="http://{registry.host}/token",service=x, '
        'Bearer realm="http://192.0.2.1/token",service=y'
    )
    refused(user, r"names the token realm 'http://192\.0\.2\.1/token'")
    assert len(registry.seen) == 1


def test_netrc_credentials_are_never_sent(registry: _Registry, user: User, tmp_path: Path) -> None:
    netrc = tmp_path / ".netrc"  # HOME is tmp_path
    netrc.write_text(
        "machine 127.0.0.1 login alice password secret\n"
        "machine localhost login alice password secret\n"
    )
    netrc.chmod(0o600)
    user.run()
    assert registry.seen and all(auth is None for _, _, auth in registry.seen)


def test_token_response_bound(registry: _Registry, user: User) -> None:
    registry.token = "tok-4"
    doc = json.dumps({"token": "tok-4"}).encode()
    registry.token_body = doc + b" " * (MAX_TOKEN_RESPONSE - len(doc))
    user.run()
    registry.token_body += b" "
    refused(user, r"token response from http://127\.0\.0\.1:\d+/token exceeds 1 MiB")
    assert not any(auth for m, p, auth in registry.seen[-2:] if p.startswith("/v2/"))


# -- retries -----------------------------------------------------------------------------


def test_reads_are_retried_within_the_bound(registry: _Registry, user: User) -> None:
    registry.unavailable[user.manifest] = MAX_ATTEMPTS - 1
    user.run()
    assert len(registry.paths("GET", user.manifest)) == MAX_ATTEMPTS
    registry.seen.clear()
    registry.unavailable[user.manifest] = MAX_ATTEMPTS
    refused(user, r"answered HTTP 503")
    assert len(registry.paths("GET", user.manifest)) == MAX_ATTEMPTS


def test_only_gets_follow_redirects(registry: _Registry) -> None:
    registry.redirect = f"http://{registry.host}/redirected"
    repo = Repository(registry.host, REPO, policy=Policy(), error=DistError)
    with contextlib.closing(repo.transfer("t", 0)) as d:
        resp = repo.request("HEAD", "blobs/" + sha(BLOB), "t", deadline=d)
    resp.close()
    assert resp.status_code == 307 and len(registry.seen) == 1


def test_uploads_are_not_retried(registry: _Registry, tmp_path: Path) -> None:
    src = tmp_path / "bundle.json"
    src.write_bytes(BLOB)
    sink = OciSink(parse_push_uri(f"oci://{registry.host}/{REPO}"))
    with pytest.raises(
        DistError,
        match=r"starting the upload: registry .* answered HTTP 503 "
        r"\(UNAVAILABLE: busy\)",
    ):
        sink.put("bundle.json", src, len(BLOB), sha(BLOB))
    assert len(registry.paths("POST", "/uploads/")) == 1


# -- deadlines ---------------------------------------------------------------------------


@pytest.fixture
def short_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadline, "HEADERS", 1.0)
    monkeypatch.setattr(deadline, "BASE", 1.0)
    monkeypatch.setattr(deadline, "MIN_RATE", 8 << 20)


@pytest.mark.usefixtures("short_deadlines")
@pytest.mark.parametrize("which", ["manifest", "blob"])
def test_trickled_headers_fail_by_the_deadline(registry: _Registry, user: User, which: str) -> None:
    registry.trickle_headers.add(getattr(user, which))
    msg = refused(
        user,
        r"registry 127\.0\.0\.1:\d+ sent no complete response headers "
        r"within 1 s; it is stalled or too slow",
        within=6,
    )
    assert (
        msg.endswith("then try again") if user.name == "image" else "run the pull again" in msg
    ), msg


@pytest.mark.usefixtures("short_deadlines")
def test_trickled_body_fails_by_the_deadline(registry: _Registry, user: User) -> None:
    registry.trickle_body.add(user.blob)
    refused(
        user,
        r"registry 127\.0\.0\.1:\d+ sent \d+ of (at most )?\d+ bytes in the 1 s "
        r"allowed \(1 s \+ the size at 8192 KiB/s\)",
        within=6,
    )
