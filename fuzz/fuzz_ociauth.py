"""Fuzz registry auth inputs: WWW-Authenticate challenges, token responses, error bodies.

Only SporeError may escape; summarize_errors must never raise and must return
one printable line.
"""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.build import ociauth
    from sporevm.errors import SporeError


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


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
