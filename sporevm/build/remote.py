"""The seam between the build and a shared remote cache (``--cache-from``).

The build asks; what a cache is and how its bytes move (sporevm.dist transports) lives
above the build floor, in sporevm/pipeline/remote_cache.py, which implements this.
A remote cache is untrusted input: whatever it installs is verified on the way in, and
a miss, a damaged entry or an unreachable cache is a warning, never a failed build.
"""

from __future__ import annotations

from typing import Protocol


class RemoteCache(Protocol):
    def restore_guest(self) -> bool:
        """Install this host class's managed kernel and agent initramfs into the local
        store if a cache has them for exactly the local inputs; True if it did."""
        ...

    def restore_steps(self, keys: list[str], have: int) -> int:
        """Install the deepest step snapshot a cache has among ``keys[have+1:]`` (keys[0]
        is the boot key; keys[n] the step after n steps) and record it in the local store
        under its key; the number of steps it holds, else ``have``."""
        ...
