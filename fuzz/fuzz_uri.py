"""Fuzz bundle URI parsing: only SporeError may escape; canonical forms round-trip and
the push/pull policies agree with the parse."""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.dist import uri as bundle_uri
    from sporevm.errors import SporeError


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mutable = fdp.ConsumeBool()
    text = fdp.ConsumeUnicodeNoSurrogates(len(data))
    try:
        uri = bundle_uri.parse_uri(text)
    except SporeError:
        return
    again = bundle_uri.parse_uri(str(uri))
    assert again == uri, (text, str(uri), again)
    try:
        pulled = bundle_uri.parse_pull_uri(text, allow_mutable=mutable)
        assert pulled == uri and (uri.pin is not None or (mutable and uri.tag))
    except SporeError:
        assert uri.pin is None
    try:
        bundle_uri.parse_push_uri(text)
        assert uri.pin is None and uri.scheme in ("file", "oci", "s3")
    except SporeError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
