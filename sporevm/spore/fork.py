"""Fork: N children of a spore that share its chunks and differ only in generation identity.

A child's manifest is the parent's with a fresh generation (new id, the
parent's manifest id, its index and the count). What a restored child's guest
learns of it before any user command (fresh entropy, clock, hostname) is the
runtime's (``sporevm.runtime.generation``).
"""

from __future__ import annotations

import dataclasses
import uuid

from sporevm.errors import UsageError
from sporevm.spore import manifest

MAX_CHILDREN = 10_000


def fork_manifests(
    parent: manifest.Manifest, parent_id: str, count: int
) -> list[manifest.Manifest]:
    if not 1 <= count <= MAX_CHILDREN:
        raise UsageError(f"--count {count}: must be 1..{MAX_CHILDREN}")
    return [
        dataclasses.replace(
            parent, generation=manifest.Generation(str(uuid.uuid4()), parent_id, i, count)
        )
        for i in range(count)
    ]
