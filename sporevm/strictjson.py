"""Hooks and helpers every strict JSON reader of outside input shares.

Python's json module accepts duplicate keys (last wins), NaN/Infinity and
floats; our formats refuse all three, and JSON Schema's ``pattern`` keyword
means ECMA-262 regexes, whose ``$`` is end of input (Python's also matches
before a final newline). Callers turn the ValueError these raise into their
own one-line error.
"""

from __future__ import annotations

import functools
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


def ecma_pattern_keyword(validator: Any, pattern: str, instance: Any,
                         schema: Any) -> Iterator[Any]:
    """A jsonschema ``pattern`` implementation with ECMA-262 end-of-input semantics."""
    import jsonschema.exceptions  # only schema users pay for it (the monitor is not one)

    if validator.is_type(instance, "string") and not ecma_regex(pattern).search(instance):
        yield jsonschema.exceptions.ValidationError(f"{instance[:80]!r} does not match {pattern}")
