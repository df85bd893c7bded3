"""Hooks and helpers every strict JSON reader of outside input shares.

Python's json module accepts duplicate keys (last wins), NaN/Infinity and
floats; our formats refuse all three, and JSON Schema's ``pattern`` keyword
means ECMA-262 regexes, whose ``$`` is end of input (Python's also matches
before a final newline). Callers turn the ValueError these raise into their
own one-line error.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a repeated key is an error, never "last one wins"."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:60]!r}")
        out[key] = value
    return out


def load_versioned_object(
    data: bytes, what: str, *, limit: int, encoding: str, fmt: str, error: type[Exception]
) -> dict[str, Any]:
    """Bounded strict parse of a JSON object whose ``format`` must be ``fmt``.

    Every defect is one ``error`` naming ``what``; the format is checked first and
    said plainly, since the commonest failure is a file from a newer spore.
    """
    if len(data) > limit:
        raise error(f"{what}: larger than {limit} bytes; refusing to parse it")
    try:
        doc = json.loads(
            data.decode(encoding),
            object_pairs_hook=no_duplicate_keys,
            parse_float=reject_float,
            parse_constant=reject_constant,
        )
    except UnicodeDecodeError:
        raise error(f"{what}: not {_TEXT[encoding]} text") from None
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply") from None
    except ValueError as exc:  # also over-long integers (int max str digits)
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise error(f"{what}: invalid JSON ({msg})") from None
    if not isinstance(doc, dict):
        raise error(f"{what}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != fmt:
        raise error(
            f"{what}: format {str(doc.get('format'))[:40]!r} is not supported "
            f"(this spore reads {fmt})"
        )
    return doc


_TEXT = {"ascii": "ASCII", "utf-8": "UTF-8"}


def load_object(data: bytes, what: str, error: type[Exception]) -> dict[str, Any]:
    """A strict JSON object: UTF-8, no duplicate keys, no NaN/Infinity; any defect is one
    ``error`` line naming ``what`` (callers bound the size first)."""
    try:
        obj = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=no_duplicate_keys,
            parse_constant=reject_constant,
        )
    except UnicodeDecodeError:
        raise error(f"{what}: not UTF-8 text; not a JSON document") from None
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply; rejecting it") from None
    except ValueError as exc:
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise error(f"{what}: invalid JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise error(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def reject_constant(name: str) -> Any:
    """``parse_constant``: NaN, Infinity and -Infinity are not JSON (nor integers)."""
    raise ValueError(f"{name} is not valid JSON (a non-integer constant)")


def reject_float(text: str) -> Any:
    """``parse_float``: formats that hold integers only."""
    raise ValueError(f"non-integer number {text[:40]}: not an integer (integers only)")


@functools.lru_cache(maxsize=128)
def ecma_regex(pattern: str) -> re.Pattern[str]:
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def ecma_pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    """A jsonschema ``pattern`` implementation with ECMA-262 end-of-input semantics."""
    import jsonschema.exceptions  # only schema users pay for it (the monitor is not one)

    if validator.is_type(instance, "string") and not ecma_regex(pattern).search(instance):
        yield jsonschema.exceptions.ValidationError(f"{instance[:80]!r} does not match {pattern}")
