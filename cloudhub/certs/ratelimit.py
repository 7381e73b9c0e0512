"""Slow down guessing: a token bucket per client address that only failures spend.

A client may fail ``burst`` times in a row; after that it is refused until the bucket refills,
one failure's worth every ``refill_seconds``. Successes cost nothing, so a well-behaved edge
is never limited. Time comes from the injected reactor.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime


class FailureLimiter:
    """Per-key failure budget; memory is bounded by ``max_keys`` (least recent dropped)."""

    def __init__(
        self,
        clock: IReactorTime,
        burst: int = 10,
        refill_seconds: float = 6.0,
        max_keys: int = 10000,
    ) -> None:
        if burst < 1 or refill_seconds <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be >= 1 and refill_seconds > 0")
        self.clock = clock
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.max_keys = max_keys
        # key -> (tokens left, when counted); most recently failed last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.burst)
        tokens, then = entry
        return min(float(self.burst), tokens + (now - then) / self.refill_seconds)

    def retry_after(self, key: str) -> float:
        """0 if ``key`` may try now, else the seconds until it may try again."""
        now = self.clock.seconds()
        tokens = self._tokens(key, now)
        if tokens >= 1:
            return 0.0
        return (1 - tokens) * self.refill_seconds

    def failed(self, key: str) -> None:
        """Spend one failure from ``key``'s budget."""
        now = self.clock.seconds()
        tokens = max(0.0, self._tokens(key, now) - 1)
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
