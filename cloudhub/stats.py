"""Counters of the delivery core, read by the metrics exporter at scrape time.

Plain integers bumped on the hot path (no locks, no labels, no allocation); the Prometheus
collector in :mod:`cloudhub.metrics` turns them into metrics only when scraped.
"""

from __future__ import annotations

from collections.abc import Callable


class HubStats:
    """What the hub did since it started."""

    __slots__ = (
        "sent",
        "acknowledged",
        "retransmitted",
        "refused_stale",
        "refused_invalid",
        "superseded",
        "dropped",
        "keepalive_timeouts",
        "node_limit_refusals",
        "received",
        "ack_latency_observers",
    )

    def __init__(self) -> None:
        self.sent = 0  # messages written to edges, retransmissions included
        self.acknowledged = 0  # ACK-mode messages the edges acknowledged
        self.retransmitted = 0  # transmissions after the first of the same message
        self.refused_stale = 0
        self.refused_invalid = 0
        self.superseded = 0  # pending messages replaced by a newer version or a delete
        self.dropped = 0  # no-ACK messages dropped (backlog of an offline node full)
        self.keepalive_timeouts = 0
        self.node_limit_refusals = 0
        self.received = 0  # messages from edges
        self.ack_latency_observers: list[Callable[[float], object]] = []

    def observe_ack_latency(self, seconds: float) -> None:
        for observe in self.ack_latency_observers:
            observe(seconds)
