"""What the command modules share: argument types, output helpers, error lines."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from sporevm.errors import UsageError


def parse_duration(text: str) -> float:
    # Imported on use: the Sporefile module pulls in jsonschema (~100 ms), which
    # `spore run --from` and the other non-build commands never need.
    from sporevm.units import parse_duration as parse

    return parse(text)


def sporefile_path(arg: str | None) -> Path:
    path = Path(arg or "Sporefile")
    if path.is_dir():
        path = path / "Sporefile"
    if not path.is_file():
        raise UsageError(
            f"{path}: no Sporefile here; pass its path (spore build path/to/Sporefile)"
        )
    return path


def emit_json(doc: Any) -> int:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return 0


def env_pairs(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise UsageError(
                f"-e {item!r}: expected NAME=VALUE with NAME like [A-Za-z_][A-Za-z0-9_]*"
            )
        env[name] = value
    return env


def pull_doc(res: Any) -> dict[str, Any]:
    return {
        "spore": str(res.out),
        "digest": res.digest,
        "manifest_id": res.manifest_id,
        "objects": res.objects,
        "cached": res.cached,
        "packs_fetched": res.packs_fetched,
        "bytes_received": res.bytes_received,
    }


def print_pull(res: Any) -> None:
    print(
        f"{res.out}  {res.manifest_id}  (bundle {res.digest}; {res.objects} objects, "
        f"{res.cached} cached, {res.packs_fetched} pack(s) fetched, "
        f"{res.bytes_received} B received)"
    )


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


ZERO_DURATION = re.compile(r"0+|(?=.)(?:0+h)?(?:0+m)?(?:0+s)?(?:0+ms)?")


PRUNE_WAIT_DEFAULT = "5m"


def duration_or_zero(text: str) -> float:
    """parse_duration, but ``0``, ``0s`` (any zero spelling) is 0 rather than an error."""
    return 0.0 if ZERO_DURATION.fullmatch(text) else parse_duration(text)


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: the file, what the system said, and what to do."""
    what = exc.strerror or type(exc).__name__
    where = " -> ".join(os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None)
    head = f"{where}: {what}" if where else one_line(str(exc)) or what
    return f"{head}; check the disk, its free space and permissions, then run again"


def one_line(text: str) -> str:
    return " ".join(text.split())[:500]
