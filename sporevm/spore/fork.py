"""Fork: N children of a spore that share its chunks and differ only in generation identity.

A child's manifest is the parent's with a fresh generation (new id, the
parent's manifest id, its index and the count). Before a restored child runs
any user command, the host sends the guest agent a GENERATION message: fresh
host entropy mixed into the kernel pool (and the CRNG reseeded), wall clock,
hostname, and /run/spore/generation.json — so forked guests know they forked.
Every restore sends one, forked or not, with new entropy each time: restores of
one spore share memory, never their random stream.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid

from sporevm.errors import UsageError
from sporevm.spore import manifest
from sporevm.vmm.agent_messages import Generation as GenerationMessage

MAX_CHILDREN = 10_000
ENTROPY_BYTES = 64


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


def generation_message(m: manifest.Manifest, hostname: str) -> GenerationMessage:
    """What the agent applies in a restored guest before any user command."""
    now = time.time_ns()
    g = m.generation
    return GenerationMessage(
        generation_id=g.id, parent_id=g.parent or "", index=g.index, count=g.count,
        hostname=hostname, entropy=os.urandom(ENTROPY_BYTES),
        time=(now // 10**9, now % 10**9),
    )
