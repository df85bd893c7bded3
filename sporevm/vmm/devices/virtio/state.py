"""Validation helpers for device snapshot state (plain dicts of ints, bools, strings).

Snapshot state is read back from spores that may come from untrusted peers, so
``restore`` treats it as hostile input: every field is looked up by name, type-
checked and range-checked here, and anything wrong raises VirtioStateError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sporevm.errors import SporeError

State = dict[str, Any]


class VirtioStateError(SporeError):
    """A device or queue snapshot field is missing, mistyped or out of range."""


def expect_keys(state: object, where: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(state, Mapping):
        raise VirtioStateError(f"{where}: state must be an object, got {type(state).__name__}")
    got = set(state)
    if got != keys:
        missing, extra = sorted(keys - got), sorted(str(k) for k in got - keys)
        raise VirtioStateError(f"{where}: missing fields {missing}, unknown fields {extra}")
    return state


def get_int(state: Mapping[str, Any], where: str, name: str, lo: int, hi: int) -> int:
    value = state[name]
    # bool is an int subclass; a snapshot that says `true` for a counter is corrupt.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise VirtioStateError(f"{where}.{name}: expected an integer in [{lo}, {hi}]")
    return value


def get_bool(state: Mapping[str, Any], where: str, name: str) -> bool:
    value = state[name]
    if not isinstance(value, bool):
        raise VirtioStateError(f"{where}.{name}: expected a boolean")
    return value


def get_hex(state: Mapping[str, Any], where: str, name: str, max_bytes: int) -> bytes:
    value = state[name]
    if not isinstance(value, str) or len(value) > 2 * max_bytes:
        raise VirtioStateError(f"{where}.{name}: expected a hex string of <= {max_bytes} bytes")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = None
    # Canonical lowercase hex only (fromhex also accepts spaces and uppercase).
    if raw is None or raw.hex() != value:
        raise VirtioStateError(f"{where}.{name}: not a lowercase hex string")
    return raw


def get_str(state: Mapping[str, Any], where: str, name: str, max_len: int) -> str:
    value = state[name]
    if not isinstance(value, str) or len(value) > max_len:
        raise VirtioStateError(f"{where}.{name}: expected a string of <= {max_len} chars")
    return value
