"""Fuzz registry auth inputs: WWW-Authenticate challenges, token responses, error bodies.

Only SporeError may escape; summarize_errors must never raise and must return
one printable line. The same bytes are also a registry HTTP answer (status from
the first two bytes, a Content-Length that is absent, exact or short, the rest
as body) read by the one registry client's status check and bounded body reader
(net/registry.py), which must never return more than its limit.
"""

import contextlib
import io
import sys

import atheris

with atheris.instrument_imports():
    import requests
    import urllib3

    from sporevm.errors import OCIError, SporeError
    from sporevm.net import auth, registry
    from sporevm.net.hosts import Policy

# Never sends a request: only the answer-reading half of the client is driven.
_REPO = registry.Repository("127.0.0.1:1", "fuzz/repo", policy=Policy(), error=OCIError)


def _answer(data: bytes) -> None:
    status = 100 + int.from_bytes(data[:2], "little") % 500
    body = data[3:]
    resp = requests.Response()
    resp.status_code = status
    mode = data[2] % 3 if len(data) > 2 else 0
    if mode:
        resp.headers["Content-Length"] = str(len(body) - (mode == 2))
    resp.raw = urllib3.HTTPResponse(
        body=io.BytesIO(body), preload_content=False, decode_content=False
    )
    limit = (data[2] if len(data) > 2 else 0) * 16
    with contextlib.closing(_REPO.transfer("fuzz", limit)) as deadline:
        try:
            _REPO.check(resp, "fuzz", deadline)
            got = b"".join(_REPO.body(resp, limit, "fuzz", deadline))
            assert status == 200 and got == body[: len(got)] and len(got) <= limit
        except SporeError:
            announced = resp.headers.get("Content-Length", "0")
            assert status != 200 or len(body) > limit or not announced.isdigit()


def TestOneInput(data: bytes) -> None:
    line = auth.summarize_errors(data)
    assert len(line) <= 200 and line.isprintable(), line
    try:
        # requests hands header values over as latin-1 decoded text
        for challenge in auth.parse_challenges(data.decode("latin-1")):
            assert challenge.scheme and challenge.scheme == challenge.scheme.lower()
    except SporeError:
        pass
    try:
        token = auth.decode_token_response(data, what="fuzz: token")
        assert "\r" not in token and "\n" not in token and " " not in token
    except SporeError:
        pass
    _answer(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
