"""What a restored guest learns before any user command: its generation.

Before a restored spore (a forked child or not) runs anything, the host sends
the guest agent a GENERATION message: fresh host entropy mixed into the kernel
pool (and the CRNG reseeded), wall clock, hostname, and
/run/spore/generation.json — so forked guests know they forked. Every restore
sends one, forked or not, with new entropy each time: restores of one spore
share memory, never their random stream. (Forking itself, the manifests, is the
format's: ``sporevm.spore.fork``.)
"""

from __future__ import annotations

import os
import time

from sporevm.runtime.agent_messages import Generation as GenerationMessage
from sporevm.spore import manifest

ENTROPY_BYTES = 64


def generation_message(m: manifest.Manifest, hostname: str) -> GenerationMessage:
    """What the agent applies in a restored guest before any user command."""
    now = time.time_ns()
    g = m.generation
    return GenerationMessage(
        generation_id=g.id,
        parent_id=g.parent or "",
        index=g.index,
        count=g.count,
        hostname=hostname,
        entropy=os.urandom(ENTROPY_BYTES),
        time=(now // 10**9, now % 10**9),
    )
