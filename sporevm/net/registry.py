"""The one OCI registry client: every request spore sends to a registry goes through here.

Image fetches (``build/oci.py``) and the ``oci://`` bundle transport
(``dist/transport_oci.py``) both use :class:`Repository`, so one policy holds
for both:

- **plain HTTP** only to loopback or to hosts the user named insecure (hosts.py);
  no cookies, no ``.netrc`` credentials;
- **redirects** for GETs only: at most 5, each to https (or plain http on an
  allowed host), never with userinfo; ``Authorization`` is dropped once the host
  changes; other methods get the 3xx as an answer;
- **401**: one token flow. The challenge is parsed with bounds (auth.py); a Bearer
  realm must be https (or an allowed plain-http host) before anything is sent to
  it; credentials are the inline ``auths`` of the docker config; the token
  response is read raw, at most 1 MiB (an announced larger length is refused
  before reading), within its own deadlines and the same redirect policy; the
  token must be printable ASCII. A Basic challenge gets the credentials directly.
  One re-authentication per request (a push escalates the token's scope);
- **retries**: GET and HEAD only (uploads never), at most 3 attempts on a failed
  connection or HTTP 429/502/503/504, inside the transfer's header deadline;
- **deadlines** (deadline.py): the response headers within ``HEADERS`` s of the
  request start (connect, TLS, retries, auth round trips included), the whole
  transfer within ``BASE`` s + expected size / ``MIN_RATE``, checked as bytes
  arrive and enforced by the watchdog. Uploads are bounded by the per-read
  timeout only: their body is ours, of any size;
- **sizes**: bodies are raw (no Content-Encoding decoding) and bounded by the
  caller's limit, announced (Content-Length) or counted; error bodies ≤ 64 KiB,
  reduced to one printable line.

oras-py's ``Registry`` supplies the session (its cookie policy refuses every
cookie) and the URL scheme. None of its request, retry or token code runs: its
``do_request`` retries for minutes on a dead registry, and its token flow reads
bodies unbounded, follows redirects without a scheme policy, runs docker
credential helpers and re-sends a cached token when a push needs a wider scope.
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from sporevm.errors import OCIError, SporeError
from sporevm.net.auth import (
    MAX_ERROR_BODY,
    MAX_TOKEN_RESPONSE,
    decode_token_response,
    load_credentials,
    parse_challenges,
    realm_allowed,
    summarize_errors,
)
from sporevm.net.deadline import Deadline, current, request_timeout
from sporevm.net.hosts import Policy
from sporevm.net.http import USER_AGENT, raw_stream, watched_session

MAX_REDIRECTS = 5
MAX_ATTEMPTS = 3
RETRY_STATUS = frozenset({429, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_RETRIED = ("GET", "HEAD")  # idempotent and bodiless
# Only GETs follow redirects (registries send blob downloads to storage); a HEAD that
# is redirected answers "not here", and its caller falls back to a GET or an upload.
_FOLLOWED = ("GET",)


class Repository:
    """One repository of one registry (``host`` serves its /v2/ API).

    ``registry`` is the name credentials are looked up by (``docker.io`` for
    Docker Hub, whose API host differs); ``error`` the kind of error raised
    (OCIError for image fetches, DistError for bundles); ``actions`` the scope
    asked for when a challenge names none; ``again`` what the user runs to retry,
    and ``unreachable_hint`` what else they can do, for error messages."""

    def __init__(
        self,
        host: str,
        repository: str,
        *,
        policy: Policy,
        error: type[SporeError],
        registry: str | None = None,
        actions: str = "pull",
        again: str = "try again",
        unreachable_hint: str = "",
        auth_config: Path | None = None,
    ) -> None:
        # Imported here: only registry users need it, and it costs ~0.1 s of startup.
        import oras.provider

        self.host, self.repository, self.policy, self.error = host, repository, policy, error
        self.registry = registry or host
        self.actions, self.again, self.unreachable_hint = actions, again, unreachable_hint
        self.auth_config = auth_config  # docker config.json; None: $DOCKER_CONFIG or ~/.docker
        self.server = f"registry {host}"
        self.plain_http = policy.plain_http_allowed(host)
        self._oras = oras.provider.Registry(hostname=host, insecure=self.plain_http)
        self.session: requests.Session = watched_session(self._oras.session)
        self.session.max_redirects = MAX_REDIRECTS  # we follow them ourselves; belt and braces
        self.origin = f"{self._oras.prefix}://{host}"
        self.base = f"{self.origin}/v2/{repository}/"
        self._auth: str | None = None
        self._creds: tuple[str | None] | None = None  # loaded once, on the first challenge

    # -- public: one exchange ------------------------------------------------------------
    def transfer(self, what: str, expected: int, *, resume: bool = False) -> Deadline:
        """The deadline of one exchange with this registry (close it when done)."""
        return Deadline(
            what, self.server, expected, resume=resume, error=self.error, again=self.again
        )

    def url(self, path: str, what: str) -> str:
        """``path`` below the repository (``manifests/…``, ``blobs/…``), or an absolute
        URL, which must be on this registry's origin."""
        if "://" not in path:
            return self.base + path
        return self.same_origin(path, what)

    def request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        deadline: Deadline | None,
        accept: str | None = None,
        headers: dict[str, str] | None = None,
        data: Any = None,
    ) -> requests.Response:
        """``method`` on ``path``, answering auth challenges; the body is not read.

        ``deadline``: the exchange's (the request runs under its header deadline);
        None when the caller already runs us inside one (``Deadline.open``), and for
        uploads, whose body of any size is ours to send."""
        url = self.url(path, what)
        hdrs = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
        if accept:
            hdrs["Accept"] = accept

        def run() -> requests.Response:
            return self._authorized(method, url, hdrs, data, what)

        return deadline.open(run) if deadline is not None else run()

    def body(
        self, resp: requests.Response, limit: int, what: str, deadline: Deadline | None
    ) -> Iterator[bytes]:
        """The raw body, at most ``limit`` bytes (an announced larger length is refused
        before any byte is read), checked against ``deadline`` as bytes arrive."""
        length = resp.headers.get("Content-Length")
        if length is not None and not length.isdigit():
            resp.close()
            raise self.error(
                f"{what}: {self.server} sent a malformed Content-Length {length[:40]!r}"
            )
        if length is not None and int(length) > limit:
            resp.close()
            raise self.error(
                f"{what}: {self.server} announces {length[:40]} bytes, more than "
                f"the {limit}-byte limit"
            )
        blocks = raw_stream(
            resp,
            lambda name: self.error(
                f"{what}: connection to {self.server} broke while reading ({name}); {self.again}"
            ),
        )
        total = 0
        for block in deadline.guard(blocks) if deadline is not None else blocks:
            total += len(block)
            if total > limit:
                resp.close()
                raise self.error(f"{what}: more than {limit} bytes from {self.server}; refusing")
            yield block

    def read(
        self, path: str, what: str, *, limit: int, accept: str | None = None
    ) -> tuple[bytes, requests.Response]:
        """A small document, whole: GET, status 200, body ≤ ``limit``, one deadline."""
        with contextlib.closing(self.transfer(what, limit)) as d:
            resp = self.request("GET", path, what, deadline=d, accept=accept)
            self.check(resp, what, d)
            return b"".join(self.body(resp, limit, what, d)), resp

    def check(
        self,
        resp: requests.Response,
        what: str,
        deadline: Deadline | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> None:
        if resp.status_code not in ok:
            raise self.status_error(resp, what, deadline)

    def status_error(
        self, resp: requests.Response, what: str, deadline: Deadline | None = None
    ) -> SporeError:
        """The registry's refusal as one line, with its JSON error summary when the body
        can be read under a deadline (``deadline``, or the one running)."""
        d = deadline or current()
        detail = ""
        if d is not None:
            parts: list[bytes] = []
            with contextlib.suppress(SporeError):
                for block in self.body(resp, MAX_ERROR_BODY, what, d):
                    parts.append(block)
            detail = summarize_errors(b"".join(parts))
        resp.close()
        status = resp.status_code
        detail = f" ({detail})" if detail else ""
        if status == 404:
            return self.error(
                f"{what}: not found in {self.server} (HTTP 404{detail}); check the "
                "repository, tag or digest"
            )
        if status in (401, 403):
            return self.error(
                f"{what}: access denied by {self.server} (HTTP {status}{detail}); "
                f"check your credentials for {self.registry}"
            )
        return self.error(f"{what}: {self.server} answered HTTP {status}{detail}")

    def same_origin(self, location: str, what: str) -> str:
        """``location`` (e.g. an upload URL the registry sent) resolved; it must stay on
        this registry's origin."""
        url = urllib.parse.urljoin(self.base, location)
        parts = urllib.parse.urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            raise self.error(
                f"{what}: {self.server} sent us to {parts.netloc[:100]!r}; "
                "uploads and requests only go to the registry named"
            )
        return url

    # -- auth --------------------------------------------------------------------------
    def _authorized(
        self, method: str, url: str, headers: dict[str, str], data: Any, what: str
    ) -> requests.Response:
        for attempt in (1, 2):
            if self._auth:
                headers = {**headers, "Authorization": self._auth}
            if hasattr(data, "seek"):
                data.seek(0)
            resp = self._attempts(method, url, headers, data, what)
            if resp.status_code != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            if attempt == 2:
                raise self.error(
                    f"{what}: {self.server} refused our credentials (HTTP 401); "
                    f"check `docker login {self.registry}` / "
                    "~/.docker/config.json"
                )
            self._auth = self._authenticate(challenge, what)
        raise AssertionError("unreachable")

    def _authenticate(self, header: str, what: str) -> str:
        try:
            challenges = parse_challenges(header)
        except OCIError as exc:
            raise self.error(f"{what}: {self.server}: {exc}") from None
        for ch in challenges:  # every realm offered, before anything goes to any of them
            if ch.scheme == "bearer":
                self._check_realm(ch.params.get("realm", ""), what)
        creds = self._credentials()
        for ch in challenges:
            if ch.scheme == "bearer":
                return "Bearer " + self._token(ch.params, creds, what)
        for ch in challenges:
            if ch.scheme == "basic" and creds:
                return "Basic " + creds
        schemes = ", ".join(ch.scheme for ch in challenges)
        raise self.error(
            f"{what}: {self.server} requires authentication; run `docker login "
            f"{self.registry}` or add credentials to ~/.docker/config.json "
            f"(challenge: {schemes[:80]})"
        )

    def _credentials(self) -> str | None:
        if self._creds is None:
            try:
                self._creds = (load_credentials(self.registry, self.auth_config),)
            except OCIError as exc:
                raise self.error(str(exc)) from None
        return self._creds[0]

    def _check_realm(self, realm: str, what: str) -> None:
        if not realm_allowed(realm, lambda p: self.policy.plain_http_allowed(p.netloc)):
            raise self.error(
                f"{what}: {self.server} names the token realm {realm[:100]!r}; "
                f"only https realms (or plain http on "
                f"{self.policy.plain_http_hosts()}) are used"
            )

    def _token(self, params: dict[str, str], creds: str | None, what: str) -> str:
        realm = params.get("realm", "")
        self._check_realm(realm, what)
        parts = urllib.parse.urlsplit(realm)
        query = {"scope": params.get("scope") or f"repository:{self.repository}:{self.actions}"}
        if params.get("service"):
            query["service"] = params["service"]
        url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            "Accept-Encoding": "identity",
        }
        if creds:
            headers["Authorization"] = "Basic " + creds
        where = f"{parts.scheme}://{parts.netloc}{parts.path}"[:160]  # no query: no secrets
        server = f"token server {parts.netloc[:100]}"
        too_many = (
            f"{what}: authentication with {self.server} failed (TooManyRedirects): "
            f"{server} redirected more than {MAX_REDIRECTS} times"
        )
        with contextlib.closing(
            Deadline(
                f"{what}: token response",
                where,
                MAX_TOKEN_RESPONSE,
                error=self.error,
                again=self.again,
            )
        ) as d:
            resp = d.open(
                lambda: self._attempts(
                    "GET", url, headers, None, f"{what}: {server}", too_many=too_many
                )
            )
            if resp.status_code != 200:
                detail = summarize_errors(self._drain(resp, MAX_ERROR_BODY, what, d))
                hint = (
                    "credentials rejected"
                    if creds
                    else f"anonymous access refused; run `docker login {self.registry}`"
                )
                raise self.error(f"{what}: {server}: HTTP {resp.status_code} ({detail or hint})")
            length = resp.headers.get("Content-Length")
            too_big = self.error(
                f"{what}: token response from {where} exceeds "
                f"{MAX_TOKEN_RESPONSE >> 20} MiB; is this a registry?"
            )
            if length is not None and (not length.isdigit() or int(length) > MAX_TOKEN_RESPONSE):
                resp.close()
                raise too_big
            data = self._drain(resp, MAX_TOKEN_RESPONSE + 1, what, d)
            if len(data) > MAX_TOKEN_RESPONSE:
                raise too_big
        try:
            return decode_token_response(data, what=f"{what}: token response from {where}")
        except OCIError as exc:
            raise self.error(str(exc)) from None

    def _drain(self, resp: requests.Response, limit: int, what: str, d: Deadline) -> bytes:
        """At most ``limit`` bytes of a body (the rest is dropped with the connection)."""
        parts: list[bytes] = []
        total = 0
        blocks = raw_stream(
            resp,
            lambda name: self.error(
                f"{what}: connection to {d.server} broke while reading ({name}); {self.again}"
            ),
        )
        for block in d.guard(blocks):
            parts.append(block)
            total += len(block)
            if total >= limit:
                resp.close()
                break
        return b"".join(parts)[:limit]

    # -- sending: retries and redirects ----------------------------------------------------
    def _attempts(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        data: Any,
        what: str,
        too_many: str | None = None,
    ) -> requests.Response:
        """One request, retried (GET/HEAD only) while the header deadline allows."""
        delay = 0.1
        for attempt in range(1, MAX_ATTEMPTS + 1):
            retry = method in _RETRIED and data is None and attempt < MAX_ATTEMPTS
            try:
                resp = self._follow(method, url, headers, data, what, too_many)
            except requests.exceptions.SSLError:
                raise self._unreachable(what, tls=True) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                if not (retry and _time_left(delay)):
                    raise self._unreachable(
                        what, timeout=isinstance(exc, requests.exceptions.Timeout)
                    ) from None
            except requests.exceptions.RequestException as exc:
                raise self.error(
                    f"{what}: request to {self.server} failed ({type(exc).__name__})"
                ) from None
            else:
                if resp.status_code not in RETRY_STATUS or not (retry and _time_left(delay)):
                    return resp
                resp.close()
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _follow(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        data: Any,
        what: str,
        too_many: str | None,
    ) -> requests.Response:
        for _ in range(MAX_REDIRECTS + 1):
            resp = self.session.request(
                method,
                url,
                headers=headers,
                data=data,
                stream=True,
                allow_redirects=False,
                timeout=request_timeout(),
            )
            if method not in _FOLLOWED or resp.status_code not in _REDIRECT_STATUS:
                return resp
            location = resp.headers.get("Location", "")
            resp.close()
            try:
                target = urllib.parse.urljoin(url, location)
                parts = urllib.parse.urlsplit(target)
                parts.port  # noqa: B018  (raises ValueError on a malformed port)
            except ValueError:
                parts = None
            if parts is None or not parts.hostname or "@" in parts.netloc:
                raise self.error(
                    f"{what}: {self.server} redirected to a malformed URL {location[:100]!r}"
                )
            if parts.scheme != "https" and not (
                parts.scheme == "http" and self.policy.plain_http_allowed(parts.netloc)
            ):
                raise self.error(
                    f"{what}: {self.server} redirected to {parts.scheme}://"
                    f"{parts.netloc[:100]}; only HTTPS redirects are followed"
                )
            if parts.netloc != urllib.parse.urlsplit(url).netloc:  # never to another host
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise self.error(
            too_many or f"{what}: {self.server} redirected more than {MAX_REDIRECTS} times"
        )

    def _unreachable(self, what: str, *, tls: bool = False, timeout: bool = False) -> SporeError:
        if tls:
            hint = (
                f"if it serves plain HTTP, pass --insecure-registry {self.host}"
                if self.policy.insecure_option and not self.plain_http
                else "check its certificate"
            )
            return self.error(f"{what}: TLS handshake with {self.server} failed; {hint}")
        kind = "timed out" if timeout else "connection failed"
        return self.error(
            f"{what}: cannot reach {self.server} ({kind}); check that it is "
            f"running and reachable{self.unreachable_hint}"
        )


def _time_left(delay: float) -> bool:
    """Whether a retry after ``delay`` s still fits the running header deadline."""
    d = current()
    return d is None or d.headers_left() > delay
