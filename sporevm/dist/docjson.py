"""Canonical JSON for the bundle's metadata files, and the strict reader they share.

Every metadata file of a bundle (``bundle.json``, ``chunkpack.index.json``,
``rootfs.index.json``) has exactly one byte form: keys sorted, no whitespace,
ASCII only, no trailing newline. The bundle's identity hashes these bytes, so
a reader accepts only that form (decode, validate, re-encode, compare); any
other spelling of the same document is an error, never a second identity.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from sporevm.errors import SporeError
from sporevm.strictjson import (
    ecma_pattern_keyword,
    load_versioned_object,
)

B3 = "^blake3:[0-9a-f]{64}$"
SHA = "^sha256:[0-9a-f]{64}$"
PIECE_MAX = 256 * 1024 * 1024  # one pack or rootfs segment: sized for blob stores


class BundleError(SporeError):
    """A bundle (or one of its files) is malformed, inconsistent or does not verify."""


def obj(props: dict[str, Any]) -> dict[str, Any]:
    """A closed JSON Schema object: every property required, nothing else allowed."""
    return {
        "type": "object",
        "properties": props,
        "required": sorted(props),
        "additionalProperties": False,
    }


def string(pattern: str) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern}


def integer(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def canonical(doc: Any) -> bytes:
    """Sorted keys, ``,``/``:`` separators, ASCII, integers only, no trailing newline."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


@functools.lru_cache(maxsize=8)
def _validator(schema_json: str) -> Any:
    import jsonschema.validators  # on use: a no-op build reads no bundle metadata

    cls = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        jsonschema.Draft202012Validator, validators={"pattern": ecma_pattern_keyword}
    )
    return cls(json.loads(schema_json))


def validate(doc: Any, schema: dict[str, Any], what: str) -> None:
    import jsonschema.exceptions

    err = jsonschema.exceptions.best_match(
        _validator(json.dumps(schema, sort_keys=True)).iter_errors(doc)
    )
    if err is not None:
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise BundleError(f"{what}: at {where}: {err.message[:200]}")


def load(data: bytes, what: str, limit: int, fmt: str) -> dict[str, Any]:
    """Parse one metadata file: bounded, strict, a JSON object whose ``format`` is ``fmt``."""
    return load_versioned_object(
        data, what, limit=limit, encoding="ascii", fmt=fmt, error=BundleError
    )


def require_canonical(doc: Any, data: bytes, what: str) -> None:
    if canonical(doc) != data:
        raise BundleError(
            f"{what}: not in canonical form (sorted keys, no whitespace, ASCII, "
            "no trailing newline); the file was edited or made by another tool"
        )
