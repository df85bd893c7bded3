"""Sizes (``512MiB``) and durations (``1m30s``) as Sporefiles and the CLI spell them.

Its own module, free of the YAML and schema stack, so that ``spore run`` parses
``--memory`` and ``--timeout`` without loading either.
"""

from __future__ import annotations

import json
import re

from sporevm.errors import SporefileError

MIB = 1 << 20
GIB = 1 << 30


def show(value: object, limit: int = 60) -> str:
    """A user value as one short, escaped line."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SIZE = re.compile(r"([1-9][0-9]{0,19})(B|KiB|MiB|GiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": MIB, "GiB": GIB}
_SIZE_EXPECTED = "expected an integer with unit B, KiB, MiB or GiB, e.g. 512MiB"
_DURATION = re.compile(r"(?:([0-9]{1,9})h)?(?:([0-9]{1,9})m)?(?:([0-9]{1,9})s)?(?:([0-9]{1,9})ms)?")
_DURATION_EXPECTED = "expected e.g. 30s, 2m, 1m30s"


def parse_size(s: str | int) -> int:
    """Bytes from ``512MiB``-style text or a positive integer; binary IEC units only."""
    if isinstance(s, int) and not isinstance(s, bool):
        if s <= 0:
            raise SporefileError(f"{s} is not a size; sizes are positive; {_SIZE_EXPECTED}")
        return s
    m = _SIZE.fullmatch(s) if isinstance(s, str) else None
    if m is None:
        raise SporefileError(f"{show(s)} is not a size; {_SIZE_EXPECTED}")
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if n >= 1 << 63:
        raise SporefileError(f"{show(s)} is too large a size; {_SIZE_EXPECTED}")
    return n


def format_size(n: int) -> str:
    """The shortest exact spelling of ``n`` bytes that parse_size accepts."""
    for unit in ("GiB", "MiB", "KiB"):
        if n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return f"{n}B"


def parse_duration(s: str) -> float:
    """Seconds from ``1h2m3s4ms``-style text: integers only, units in this order, each at most
    once, > 0. Sporefile fields are further bounded to 24h (MAX_DURATION_MS) by the loader."""
    m = _DURATION.fullmatch(s) if isinstance(s, str) and s else None
    if m is None:
        raise SporefileError(f"{show(s)} is not a duration; {_DURATION_EXPECTED}")
    h, mi, sec, ms = (int(g) if g else 0 for g in m.groups())
    total = ((h * 60 + mi) * 60 + sec) * 1000 + ms
    if total == 0:
        raise SporefileError(f"{show(s)} is zero; durations must be positive, e.g. 30s")
    return total / 1000


def format_duration(seconds: float) -> str:
    """The canonical spelling (e.g. ``1m30s``) of a duration with millisecond resolution."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    text = "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s"), (ms, "ms")) if v)
    return text or "0s"
