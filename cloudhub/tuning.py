"""The interpreter, set for a hub that holds many objects and runs a writer thread (issue 9).

Two process-wide settings, both measured with ``cloudhub bench``:

* **Garbage collector.** With Python's default thresholds (700, 10, 10) a hub delivering
  thousands of messages a second ran a young collection every few hundred allocations and,
  now and then, a full one over everything it holds: 11 % of its time at 1,000 nodes and
  pauses up to 200 ms, which set the p99 of send → ACK. Collecting young objects less often
  (``hub.gcThreshold``) and freezing what exists at start (restored queues, certificates,
  modules) cut that to about 1 %. Messages are reclaimed by reference counting; the cycle
  collector only has the few cycles (failures with tracebacks) to find.
* **GIL switch interval** (``hub.switchIntervalMicroseconds``, 1 ms). The SQLite writer thread
  hands the GIL back at every call into SQLite and then waits for it again; behind a reactor
  thread busy in Python without a pause it waits the whole switch interval each time (5 ms by
  default) and can fall behind for good: a store fed 300 writes per reactor turn in a loop
  committed 2 batches in 1.5 s (its buffer grew to 70,000 writes) with 5 ms, and kept up with
  1 ms. The cost, alternating 1 ms and 5 ms three times at 1,000 nodes: ~4 % of throughput,
  less than this machine's run-to-run spread.

Both are the process's, not one hub's: the first running :class:`InterpreterTuning` applies its
settings and the last one to stop puts back what it found (two hubs in one process, tests).
"""

from __future__ import annotations

import gc
import sys

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["InterpreterTuning"]

log = Logger()

# Only threshold 0 is ours; generations 1 and 2 keep Python's default ratios.
OLDER_THRESHOLDS = (10, 10)

_running: list[InterpreterTuning] = []
# What the first one found: (gc thresholds, switch interval).
_found: tuple[tuple[int, int, int], float] | None = None


class InterpreterTuning(Service):
    """While running: young collections every ``gc_threshold`` net allocations (0: untouched),
    what existed at start frozen (``gc.freeze``), and a GIL switch interval of
    ``switch_interval`` seconds (0: untouched)."""

    name = "tuning"

    def __init__(self, gc_threshold: int, switch_interval: float) -> None:
        if gc_threshold < 0 or switch_interval < 0:
            raise ValueError("gc_threshold and switch_interval must not be negative")
        self.gc_threshold = gc_threshold
        self.switch_interval = switch_interval

    def startService(self) -> None:
        global _found
        super().startService()
        _running.append(self)
        if len(_running) > 1:
            return  # the first one's settings stand
        _found = (gc.get_threshold(), sys.getswitchinterval())
        if self.gc_threshold:
            gc.collect()
            gc.freeze()
            gc.set_threshold(self.gc_threshold, *OLDER_THRESHOLDS)
        if self.switch_interval:
            sys.setswitchinterval(self.switch_interval)
        log.debug(
            "interpreter: gc thresholds {thresholds} ({frozen} objects frozen), "
            "switch interval {interval} s",
            thresholds=gc.get_threshold(),
            frozen=gc.get_freeze_count(),
            interval=sys.getswitchinterval(),
        )

    def stopService(self) -> None:
        global _found
        super().stopService()
        if self not in _running:
            return
        _running.remove(self)
        if _running or _found is None:
            return
        thresholds, interval = _found
        _found = None
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        sys.setswitchinterval(interval)
