"""The interpreter's garbage collector, set for a hub that holds many objects (issue 9).

With Python's default thresholds (700, 10, 10) a hub delivering thousands of messages a
second runs a young collection every few hundred allocations and, every so often, a full
collection over everything it holds: queued messages, sessions, TLS connections. Measured with
``cloudhub bench`` at 1,000 nodes: 11 % of the hub's time in collections and pauses up to
200 ms, which set the p99 of send → ACK. Collecting young objects less often (the first
threshold) and freezing what exists at start-up (restored queues, certificates, modules) cut
that to about 1 % and 20 ms.

The hub's messages are reclaimed by reference counting; the cycle collector only has to find
the few cycles (failures with tracebacks), so collecting it less often costs memory only for
those, until the next collection.
"""

from __future__ import annotations

import gc

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["GarbageCollectorTuning"]

log = Logger()

# Only thresholds 0 is ours; generations 1 and 2 keep Python's default ratios.
OLDER_THRESHOLDS = (10, 10)


class GarbageCollectorTuning(Service):
    """While running: young collections every ``threshold`` net allocations, and the objects
    that existed at start moved out of the collector's sight (``gc.freeze``).

    Stopping puts the thresholds back (embedders, tests running many hubs in one process);
    the frozen objects are released with ``gc.unfreeze`` into the oldest generation.
    """

    name = "gc"

    def __init__(self, threshold: int) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, not {threshold}")
        self.threshold = threshold
        self._previous: tuple[int, int, int] | None = None

    def startService(self) -> None:
        super().startService()
        self._previous = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(self.threshold, *OLDER_THRESHOLDS)
        log.debug(
            "garbage collector: {frozen} objects frozen, thresholds {thresholds}",
            frozen=gc.get_freeze_count(),
            thresholds=gc.get_threshold(),
        )

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            gc.set_threshold(*self._previous)
            gc.unfreeze()
            self._previous = None
