"""The Sporefile JSON Schema (2020-12): loading, validation, and errors worded for humans.

jsonschema's raw messages ("Additional properties are not allowed ...") name no line and
suggest no fix. Each error is mapped back to the key or value it concerns, and worded from the
``x-noun``/``x-expected`` annotations that sporefile.schema.json carries next to each rule.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any, Protocol

import blake3

from sporevm.errors import SporefileError
from sporevm.sporefile_yaml import Doc, DocPath, kind, show
from sporevm.strictjson import ecma_pattern_keyword


def _is_int(_checker: Any, instance: object) -> bool:
    # jsonschema counts 1.0 as an integer; YAML 1.0 is a float, and so is it here.
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.cache
def schema_bytes() -> bytes:
    return importlib.resources.files("sporevm").joinpath("sporefile.schema.json").read_bytes()


@functools.cache
def schema() -> dict[str, Any]:
    """The Sporefile JSON Schema (2020-12) shipped with the package."""
    loaded: dict[str, Any] = json.loads(schema_bytes().decode("utf-8"))
    return loaded


@functools.cache
def validator() -> Any:
    import jsonschema  # here, not at import: a no-op build need not load it (Verdicts)
    import jsonschema.validators

    base = jsonschema.Draft202012Validator
    cls = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        base,
        validators={"pattern": ecma_pattern_keyword},
        type_checker=base.TYPE_CHECKER.redefine("integer", _is_int),
    )
    return cls(schema())


_TYPE_NOUNS = {
    "string": "a string",
    "integer": "an integer",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
}


def _subschema(sub: dict[str, Any]) -> dict[str, Any]:
    ref = sub.get("$ref", "")
    if ref.startswith("#/$defs/"):
        resolved: dict[str, Any] = schema()["$defs"][ref[len("#/$defs/") :]]
        return resolved
    return sub


def _site(err: Any) -> tuple[DocPath, bool]:
    """Where an error points: the offending key for unknown or misnamed keys, else the value."""
    path: DocPath = tuple(err.absolute_path)
    if "propertyNames" in err.absolute_schema_path:
        return (*path, err.instance), True
    if err.validator == "additionalProperties":
        extras = [k for k in err.instance if k not in err.schema.get("properties", {})]
        return (*path, extras[0]), True
    return path, False


def _describe(doc: Doc, err: Any) -> SporefileError:
    path, at_key = _site(err)
    sch: dict[str, Any] = err.schema
    kw, value = err.validator, err.instance
    expected = sch.get("x-expected")
    noun = sch.get("x-noun")
    tail = f"; expected {expected}" if expected else ""
    if "propertyNames" in err.absolute_schema_path:
        return doc.error(path, f"{show(value)} is not {noun}{tail}", at_key=True)
    if kw == "additionalProperties":
        allowed = ", ".join(sorted(sch.get("properties", {})))
        return doc.error(
            path, f"unknown key {show(path[-1])}; allowed keys are: {allowed}", at_key=True
        )
    if kw == "required":
        missing = next(k for k in sch["required"] if k not in value)
        hint = _subschema(sch["properties"][missing]).get("x-expected")
        return doc.error(
            (*path, missing),
            f"missing required key {show(missing)}" + (f"; expected {hint}" if hint else ""),
        )
    raw = doc.raw(path)
    if kw == "type":
        want = err.validator_value
        types: list[str] = want if isinstance(want, list) else [want]
        noun = noun or " or ".join(_TYPE_NOUNS.get(t, t) for t in types)
        if value is None:
            return doc.error(path, f"is empty{tail or f'; expected {noun}'}")
        if "string" in types and isinstance(value, bool | int | float) and "$ref" not in sch:
            if validator().evolve(schema=sch).is_valid(raw):
                return doc.error(path, f'{raw} is {kind(value)}, not a string; quote it: "{raw}"')
        return doc.error(path, f"{raw} is {kind(value)}, not {noun}{tail}")
    if kw == "oneOf" and isinstance(value, dict):
        options = [b["required"][0] for b in err.validator_value]
        present = [k for k in options if k in value]
        what = (
            " and ".join(present) + " are all set"
            if present
            else "none of " + ", ".join(options) + " is set"
        )
        return doc.error(path, what + tail)
    if kw == "minLength":
        return doc.error(path, f"is empty{tail}")
    if kw == "maxLength":
        return doc.error(
            path, f"is {len(value)} characters, over the limit of {err.validator_value}{tail}"
        )
    if kw in ("minItems", "maxItems", "maxProperties"):
        return doc.error(
            path,
            f"has {len(value)} entries, outside the allowed "
            f"{'minimum' if kw == 'minItems' else 'maximum'} of "
            f"{err.validator_value}{tail}",
        )
    if kw in ("minimum", "maximum"):
        return doc.error(path, f"{raw} is out of range{tail}")
    if kw == "pattern" and noun:
        return doc.error(path, f"{show(value)} is not {noun}{tail}")
    return doc.error(path, str(err.message).splitlines()[0][:200])


class Verdicts(Protocol):
    """Where documents already found valid are remembered (the store, for spore build)."""

    def known_valid(self, key: str) -> bool: ...

    def record_valid(self, key: str) -> None: ...


def verdict_key(doc: Doc) -> str | None:
    """Names exactly this document under exactly this schema (None: not JSON-able)."""
    try:
        value = json.dumps(doc.value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None
    h = blake3.blake3(b"spore/sporefile-valid/v1\0")
    h.update(blake3.blake3(schema_bytes()).digest())
    h.update(value.encode())
    return h.hexdigest()


def first_error(doc: Doc, verdicts: Verdicts | None = None) -> SporefileError | None:
    """The error a reader should see first, or None. A document the schema passed before
    (same bytes of schema, same value) is not validated again: loading jsonschema is
    most of an unchanged build's start-up."""
    key = verdict_key(doc) if verdicts is not None else None
    if verdicts is not None and key is not None and verdicts.known_valid(key):
        return None
    errors = list(validator().iter_errors(doc.value))
    if not errors and verdicts is not None and key is not None:
        verdicts.record_valid(key)
    if not errors:
        return None

    def order(err: Any) -> tuple[int, int, int, str, str]:
        path, at_key = _site(err)
        line, col = doc.mark(path, at_key=at_key)
        return line, col, -len(path), str(err.validator), str(err.message)

    return _describe(doc, min(errors, key=order))
