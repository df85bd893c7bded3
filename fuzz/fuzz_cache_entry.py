"""Fuzz remote build-cache metadata (sporevm/pipeline/cache_entry.py): a key's pointer
(`ref.json`, spore-cache-ref/v1) and the guest entry (`guest.json`, spore-cache-guest/v1),
both read from caches that may be hostile. Only CacheEntryError may escape decoding, and
whatever decodes re-encodes to exactly the same bytes (one byte form per entry)."""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.pipeline import cache_entry


def TestOneInput(data: bytes) -> None:
    for decode in (cache_entry.decode_ref, cache_entry.decode):
        try:
            value = decode(data)
        except cache_entry.CacheEntryError:
            continue
        assert value.encode() == data
        assert decode(value.encode()) == value


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
