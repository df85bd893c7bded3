"""Addresses learned from DNS answers for allowed names, each until a deadline.

A grant is (address, entry, port): the answer to an allowed name taught the gateway
that ``address`` is that name's, so flows to it are allowed (any port for a ``host``
entry, one port for ``host:port``). Floor addresses are never learned (the caller
filters them, and ``policy.decide`` checks the floor first anyway). Bounded: when
full, expired grants go first, then the one that expires soonest.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_LEARNED = 4096  # (address, entry, port) grants
MIN_HOLD_S = 60.0  # a grant outlives the TTL the guest was given by at least this
MAX_HOLD_S = 3600.0  # and never lives longer than this after its answer


class Learned:
    def __init__(self, capacity: int = MAX_LEARNED) -> None:
        self.capacity = capacity
        self._grants: dict[tuple[int, str, int | None], float] = {}
        self._by_addr: dict[int, set[tuple[str, int | None]]] = {}

    def __len__(self) -> int:
        return len(self._grants)

    def learn(self, addr: int, rule: str, port: int | None, ttl: float, now: float) -> None:
        hold = min(max(ttl + MIN_HOLD_S, MIN_HOLD_S), MAX_HOLD_S)
        key = (addr, rule, port)
        if key not in self._grants and len(self._grants) >= self.capacity:
            self._evict(now)
        self._grants[key] = max(self._grants.get(key, 0.0), now + hold)
        self._by_addr.setdefault(addr, set()).add((rule, port))

    def lookup(self, addr: int, now: float) -> Sequence[tuple[str, int | None]]:
        grants = self._by_addr.get(addr)
        if not grants:
            return ()
        return sorted(
            (g for g in grants if self._grants[(addr, *g)] > now),
            key=lambda g: (g[1] is not None, g[0], g[1] or 0),
        )

    def addresses(self) -> list[int]:
        """Every address with a grant, live or not yet swept."""
        return list(self._by_addr)

    def _evict(self, now: float) -> None:
        expired = [k for k, t in self._grants.items() if t <= now]
        for k in expired or [min(self._grants, key=self._grants.__getitem__)]:
            self._drop(k)

    def _drop(self, key: tuple[int, str, int | None]) -> None:
        del self._grants[key]
        addr, rule, port = key
        rest = self._by_addr[addr]
        rest.discard((rule, port))
        if not rest:
            del self._by_addr[addr]
