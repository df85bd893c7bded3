"""Fuzz image reference parsing: only SporeError may escape; canonical forms round-trip."""

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm.build import ociref
    from sporevm.errors import SporeError

_BASE = Path("/work/ctx")


def TestOneInput(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    try:
        ref = ociref.parse_ref(text, _BASE)
    except SporeError:
        return
    again = ociref.parse_ref(str(ref), _BASE)
    assert again == ref, (text, str(ref), again)
    if ref.registry is not None:
        ociref.is_loopback(ociref.api_host(ref.registry))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
