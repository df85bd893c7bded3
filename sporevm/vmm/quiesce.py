"""Wait for a running guest to go idle before it is paused for a snapshot.

When a step's command exits, the guest kernel still has work queued (tearing the
process down, RCU callbacks, deferred frees). A snapshot taken at that moment
carries the unfinished work into every restore, where it runs before the agent
answers. So the monitor lets the vCPUs settle first: it samples their threads'
CPU clocks and pauses once they have used under ``busy_ratio`` of a ``window``,
or after ``limit`` seconds whatever the guest does (a guest spinning in user
space never settles; the snapshot is still correct, only slower to resume).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW = 0.04
BUSY_RATIO = 0.05
LIMIT = 2.0


@dataclass(frozen=True)
class Settle:
    seconds: float  # time spent waiting
    settled: bool  # False when the limit was reached with the guest still busy


def _cpu_seconds(threads: list[int]) -> float:
    total = 0.0
    for ident in threads:
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (OSError, ProcessLookupError):
            pass  # the thread left run(); its share no longer matters
    return total


def wait_until_idle(
    vcpu_threads: Callable[[], list[int]],
    *,
    window: float = WINDOW,
    busy_ratio: float = BUSY_RATIO,
    limit: float = LIMIT,
) -> Settle:
    """Block until the vCPU threads are (nearly) idle for one window, or ``limit``."""
    start = time.monotonic()
    while True:
        threads = vcpu_threads()
        if not threads:
            return Settle(time.monotonic() - start, True)  # nothing running: already still
        before = _cpu_seconds(threads)
        t0 = time.monotonic()
        time.sleep(window)
        used = _cpu_seconds(threads) - before
        now = time.monotonic()
        if used <= busy_ratio * (now - t0):
            return Settle(now - start, True)
        if now - start >= limit:
            return Settle(now - start, False)
