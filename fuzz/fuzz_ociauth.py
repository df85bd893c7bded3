"""Fuzz registry auth inputs: WWW-Authenticate challenges, token responses, error bodies.

Only SporeError may escape; summarize_errors must never raise and must return
one printable line. The same bytes are also a registry HTTP answer (status from
the first two bytes, a Content-Length that is absent, exact or short, the rest
as body) read by the registry client's status check and bounded body reader
(oci.py), which must never return more than its limit.
"""

import atexit
import io
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import requests
    import urllib3

    from sporevm.build import oci, ociauth, ociref
    from sporevm.errors import SporeError
    from sporevm.store import Store

# Never sends a request: only the answer-reading half of the client is driven.
_STORE = Path(tempfile.mkdtemp(prefix="fuzz-ociauth-"))
atexit.register(shutil.rmtree, _STORE, True)  # in-process replays; libFuzzer skips atexit
_SOURCE = oci._RegistrySource(
    oci.OCIClient(Store(_STORE)),
    ociref.parse_ref("127.0.0.1:1/fuzz/repo:latest", Path("/")),
)


def _answer(data: bytes) -> None:
    status = 100 + int.from_bytes(data[:2], "little") % 500
    body = data[3:]
    resp = requests.Response()
    resp.status_code = status
    mode = data[2] % 3 if len(data) > 2 else 0
    if mode:
        resp.headers["Content-Length"] = str(len(body) - (mode == 2))
    resp.raw = urllib3.HTTPResponse(body=io.BytesIO(body), preload_content=False,
                                    decode_content=False)
    try:
        _SOURCE.check_status(resp, "fuzz")
        limit = (data[2] if len(data) > 2 else 0) * 16
        got = _SOURCE.read_body(resp, limit, "fuzz")
        assert status == 200 and got == body[: len(got)] and len(got) <= limit
    except SporeError:
        assert status != 200 or len(body) > (data[2] * 16 if len(data) > 2 else 0)


def TestOneInput(data: bytes) -> None:
    line = ociauth.summarize_errors(data)
    assert len(line) <= 200 and line.isprintable(), line
    try:
        # requests hands header values over as latin-1 decoded text
        for challenge in ociauth.parse_challenges(data.decode("latin-1")):
            assert challenge.scheme and challenge.scheme == challenge.scheme.lower()
    except SporeError:
        pass
    try:
        token = ociauth.decode_token_response(data, what="fuzz: token")
        assert "\r" not in token and "\n" not in token and " " not in token
    except SporeError:
        pass
    _answer(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
