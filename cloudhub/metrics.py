"""Prometheus metrics of one hub, read from its counters when scraped.

The delivery core only bumps plain integers (:class:`cloudhub.stats.HubStats`) and the
certificate server its :class:`~cloudhub.certs.web.CertificateCounters`; :class:`HubCollector`
turns them, and the live sessions and queues, into metric families at scrape time, as
:class:`CertificateExpiryCollector` does the expiry of the CA and server certificates and
:class:`StoreCollector` the sync store's commit figures. What is observed as it happens: the
ACK latency, a histogram fed through ``stats.ack_latency_observers``, and node connections and
disconnections (:class:`NodeEventCounters`, fed by ``handle.subscribe_events``).

The alerting rules in ``etc/prometheus/cloudhub-alerts.yml`` use these names; its tests
(``tests/test_alerts.py``) fail when one is renamed here.

Each hub has its own ``CollectorRegistry`` (two hubs in one process do not mix, and nothing
is registered globally). The registry is rendered on the reactor thread by
:class:`MetricsResource`, because the collector reads the hub's live dicts:
``prometheus_client.twisted.MetricsResource`` would render it in a thread pool (and imports
the global reactor).

Names are prefixed ``cloudhub_``; KubeEdge's own ``connected_nodes`` gauge (cloudcore's
monitor package) is kept too, so existing dashboards work.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request

from cloudhub.handler import EVENT_CONNECTED, EVENT_DISCONNECTED

if TYPE_CHECKING:
    from cloudhub.certs.authority import CertificateAuthority
    from cloudhub.certs.web import CertificateCounters
    from cloudhub.handler import MessageHandle, NodeEvent
    from cloudhub.store.interfaces import ISyncStore

__all__ = [
    "ACK_LATENCY_BUCKETS",
    "CertificateExpiryCollector",
    "HubCollector",
    "HubMetrics",
    "LatencyHistogram",
    "MetricsResource",
    "NodeEventCounters",
    "StoreCollector",
]

# 100 µs (an edge on loopback) to 60 s (retransmissions every 5 s, §6.4).
ACK_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Always reported, so a dashboard sees 0 rather than no series.
TRANSPORTS = ("websocket", "quic")


# (name after cloudhub_, help, HubStats attribute): counters read as they are.
_STATS_COUNTERS = (
    ("messages_sent", "Messages written to edges, retransmissions included", "sent"),
    ("messages_acknowledged", "ACK-mode messages the edges acknowledged", "acknowledged"),
    (
        "messages_retransmitted",
        "Transmissions after the first of the same message",
        "retransmitted",
    ),
    (
        "messages_superseded",
        "Pending messages replaced by a newer version or a delete before their ACK",
        "superseded",
    ),
    (
        "messages_dropped",
        "No-ACK messages dropped from the full backlog of an offline node",
        "dropped",
    ),
    (
        "messages_received",
        "Messages received from edges (keepalives and ACKs included)",
        "received",
    ),
    ("keepalive_timeouts", "Nodes disconnected for missing keepalives", "keepalive_timeouts"),
)
# (name after cloudhub_, help, CertificateCounters attribute).
_CERTIFICATE_COUNTERS = (
    ("certificates_issued", "Edge certificates signed (join token or renewal)", "issued"),
    (
        "certificates_renewed",
        "Edge certificates signed for a client certificate (renewal)",
        "renewed",
    ),
    (
        "token_failures",
        "Certificate requests with a missing, malformed, forged or expired join token",
        "token_failures",
    ),
    (
        "certificate_renewal_failures",
        "Renewals refused: client certificate not ours or expired",
        "cert_failures",
    ),
    (
        "certificate_requests_rate_limited",
        "Certificate requests answered 429 after repeated failures",
        "rate_limited",
    ),
    (
        "certificate_node_names_refused",
        "Renewals refused with 403: they asked for another node than their certificate names",
        "node_names_refused",
    ),
)
# (name after cloudhub_, help, store attribute): read when the store has the attribute
# (SQLiteSyncStore does; the in-memory store commits nothing, so it has none of them).
_STORE_COUNTERS = (
    (
        "store_commit_failures",
        "Sync store batches whose commit failed (full disk, I/O error, locked file); their "
        "changes stay buffered and are retried, and flush() callers (the API's durable "
        "accept) get an error meanwhile",
        "commit_failures",
    ),
    (
        "store_batches_committed",
        "Sync store batches committed (one transaction each)",
        "batches_committed",
    ),
    (
        "store_changes_committed",
        "Record changes the sync store committed (writes to one node's object coalesce into "
        "one change per batch)",
        "changes_committed",
    ),
)


class HubCollector(Collector):
    """The hub's counters and live state as metric families, computed on each scrape."""

    def __init__(
        self, handle: MessageHandle, certificates: CertificateCounters | None = None
    ) -> None:
        self.handle = handle
        self.certificates = certificates

    def describe(self) -> Iterator[Metric]:
        # Names only (for the registry's duplicate check); no hub state is read.
        return self._families(read=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(read=True)

    def _families(self, read: bool) -> Iterator[Metric]:
        handle = self.handle
        connected = GaugeMetricFamily(
            "cloudhub_connected_nodes",
            "Nodes connected now, by transport",
            labels=["transport"],
        )
        compatible = GaugeMetricFamily(
            "connected_nodes", "Number of nodes that connected to the cloudHub instance"
        )
        depth = GaugeMetricFamily(
            "cloudhub_queue_depth",
            "Messages owed to nodes (connected or not): ACK-mode pending plus no-ACK queued",
        )
        refused = CounterMetricFamily(
            "cloudhub_refused",
            "Messages refused (stale version, invalid) and node connections refused (node limit)",
            labels=["reason"],
        )
        limit = GaugeMetricFamily(
            "cloudhub_node_limit",
            "Most nodes connected at once (cloudHub.nodeLimit); more are refused, counted in "
            'cloudhub_refused_total{reason="node_limit"}',
        )
        if read:
            stats = handle.stats
            by_transport = Counter(s.connection.transport for s in handle.sessions.values())
            for transport in sorted(set(TRANSPORTS) | set(by_transport)):
                connected.add_metric([transport], by_transport.get(transport, 0))
            compatible.add_metric([], len(handle.sessions))
            depth.add_metric([], sum(queue.depth for queue in handle.queues.values()))
            refused.add_metric(["stale"], stats.refused_stale)
            refused.add_metric(["invalid"], stats.refused_invalid)
            refused.add_metric(["node_limit"], stats.node_limit_refusals)
            limit.add_metric([], handle.node_limit)
        yield connected
        yield compatible
        yield depth
        yield refused
        yield limit
        sources: list[tuple[object, tuple[tuple[str, str, str], ...]]] = [
            (handle.stats if read else None, _STATS_COUNTERS)
        ]
        if self.certificates is not None:
            sources.append((self.certificates, _CERTIFICATE_COUNTERS))
        for source, table in sources:
            for name, documentation, attribute in table:
                family = CounterMetricFamily(f"cloudhub_{name}", documentation)
                if read:
                    family.add_metric([], getattr(source, attribute))
                yield family


class CertificateExpiryCollector(Collector):
    """When the CA and the server certificate expire, read from the authority at each scrape
    (so a certificate replaced while the hub runs shows at once).

    An expired CA or server certificate stops every edge connection and join; the alerting
    rules warn weeks ahead from this gauge.
    """

    def __init__(self, authority: CertificateAuthority) -> None:
        self.authority = authority

    def describe(self) -> Iterator[Metric]:
        return self._families(read=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(read=True)

    def _families(self, read: bool) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "cloudhub_certificate_expiry_timestamp_seconds",
            "When the hub's certificate stops being valid (its notAfter, Unix time): "
            '"ca" signs the edges\' certificates and join tokens, "server" is presented to '
            "the edges (WebSocket, QUIC, certificate server)",
            labels=["certificate"],
        )
        if read:
            authority = self.authority
            for label, certificate in (
                ("ca", authority.ca_certificate),
                ("server", authority.server_certificate),
            ):
                expiry.add_metric([label], certificate.not_valid_after_utc.timestamp())
        yield expiry


class StoreCollector(Collector):
    """The sync store's commit figures: failures (the store cannot make messages durable)
    and commits, read at each scrape from the store ``source()`` returns.

    The source is called every time because the hub opens its store at each start (the
    handle's ``store`` changes); the figures of a newly opened store start at 0, which
    Prometheus takes as a counter reset. Only the figures the store keeps are reported
    (``SQLiteSyncStore`` keeps all three, the in-memory store none), and none while there is
    no store, so no series claims a count nobody makes.
    """

    def __init__(self, source: Callable[[], ISyncStore | None]) -> None:
        self.source = source

    def describe(self) -> Iterator[Metric]:
        for name, documentation, _ in _STORE_COUNTERS:
            yield CounterMetricFamily(f"cloudhub_{name}", documentation)

    def collect(self) -> Iterator[Metric]:
        store = self.source()
        for name, documentation, attribute in _STORE_COUNTERS:
            count = getattr(store, attribute, None)
            if isinstance(count, int):
                family = CounterMetricFamily(f"cloudhub_{name}", documentation)
                family.add_metric([], count)
                yield family


class NodeEventCounters(Collector):
    """Node connections and disconnections by transport, counted from the hub's node events.

    A falling ``cloudhub_connected_nodes`` shows nodes that left; this shows nodes that flap
    (disconnect and come back between two scrapes), which the gauge cannot. Counted per event,
    not per message, so off the hot path.
    """

    def __init__(self) -> None:
        self.connections: Counter[str] = Counter()
        self.disconnections: Counter[str] = Counter()

    def observe(self, event: NodeEvent) -> None:
        if event.event == EVENT_CONNECTED:
            self.connections[event.transport] += 1
        elif event.event == EVENT_DISCONNECTED:
            self.disconnections[event.transport] += 1

    def collect(self) -> Iterator[Metric]:
        connections = CounterMetricFamily(
            "cloudhub_node_connections",
            "Node connections accepted, by transport (a reconnect counts again)",
            labels=["transport"],
        )
        disconnections = CounterMetricFamily(
            "cloudhub_node_disconnections",
            "Node connections ended, by transport: closed by the edge or the network, keepalive "
            "timeout (also in cloudhub_keepalive_timeouts_total), replaced by a newer connection "
            "of the same node, hub shutdown",
            labels=["transport"],
        )
        for family, counts in (
            (connections, self.connections),
            (disconnections, self.disconnections),
        ):
            for transport in sorted(set(TRANSPORTS) | set(counts)):
                family.add_metric([transport], counts.get(transport, 0))
        yield connections
        yield disconnections


class MetricsResource(Resource):
    """``GET /metrics``: the registry in the Prometheus text format (OpenMetrics on request),
    rendered on the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        request.setResponseCode(http.OK)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body


class LatencyHistogram(Collector):
    """The ACK latency histogram, counted the cheap way and exported at scrape time.

    ``observe`` runs once per acknowledged message on the reactor thread: a bisect and two
    additions, where ``prometheus_client.Histogram.observe`` takes a lock per call (~4 µs).
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def collect(self) -> Iterator[Metric]:
        cumulative = 0
        buckets = []
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self.sum
        )


_HTTP_REFUSALS = (
    ("head_timeout", "head_timeouts"),
    ("request_timeout", "request_timeouts"),
    ("uri_too_long", "uri_too_long"),
    ("headers_too_large", "headers_too_large"),
    ("bad_framing", "bad_framing"),
    ("bad_request", "bad_requests"),
)
_CONNECTION_REFUSALS = (
    ("listener", "refused_listener"),
    ("address", "refused_address"),
    ("descriptors", "refused_descriptors"),
)

# The edge transports' refusals and drops: (stats attribute, reason label).
_TRANSPORT_REFUSALS = (
    ("requests_too_large", "request_too_large"),
    ("handshake_timeouts", "handshake_timeout"),
    ("node_ids_refused", "bad_node_id"),
    ("headers_refused", "bad_header"),
    ("protocol_errors", "protocol_error"),
    ("write_timeouts", "write_timeout"),
    ("output_overflows", "output_overflow"),
    ("identity_refused", "node_identity"),
)
# Let in under hub.nodeIdentity: warn; at zero, enforce would refuse no one.
_IDENTITY_WARNINGS = (("identity_mismatches", "mismatch"), ("identity_unnamed", "unnamed"))

# {listener name: (its ConnectionLimiter or None, its Site or None)}, read at each scrape.
LimitSources = Callable[[], Mapping[str, tuple[Any, Any]]]


class LimitsCollector(Collector):
    """What the connection caps and HTTP limits refused (issue 18), by listener."""

    def __init__(self, sources: LimitSources) -> None:
        self.sources = sources

    def describe(self) -> Iterator[Metric]:
        return self._families(read=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(read=True)

    def _families(self, read: bool) -> Iterator[Metric]:
        open_now = GaugeMetricFamily(
            "cloudhub_connections_open",
            "Connections open on a limited listener (hub.limits)",
            labels=["listener"],
        )
        refused = CounterMetricFamily(
            "cloudhub_connections_refused",
            "Connections closed at accept: the listener's cap (listener), the per-address cap "
            "(address), or the file descriptor reserve (descriptors)",
            labels=["listener", "reason"],
        )
        transport_refused = CounterMetricFamily(
            "cloudhub_edge_connections_dropped",
            "Edge connections refused or dropped by a transport's limits: upgrade request too "
            "large, handshake not done in time, node id not a node name, bad header, protocol "
            "error, peer not reading (write timeout, output buffer over the cap)",
            labels=["transport", "reason"],
        )
        admission = CounterMetricFamily(
            "cloudhub_handshake_admissions",
            "New edge connections by the handshake admission (hub.limits.websocket): admitted "
            "(of them, queued first), refused at accept (queue full), expired (waited too long)",
            labels=["transport", "outcome"],
        )
        waiting = GaugeMetricFamily(
            "cloudhub_handshakes_waiting",
            "New edge connections waiting for a handshake slot now (reads paused)",
            labels=["transport"],
        )
        identity_warnings = CounterMetricFamily(
            "cloudhub_node_identity_warnings",
            "Edges let in under hub.nodeIdentity: warn although their certificate names another "
            "node (mismatch) or none (unnamed); enforce would refuse them",
            labels=["transport", "reason"],
        )
        http_refused = CounterMetricFamily(
            "cloudhub_http_refused",
            "HTTP requests refused by the limits: head or request not complete in time (408), "
            "request line too long (414), headers too large (431), bad framing or head (400)",
            labels=["listener", "reason"],
        )
        if read:
            for name, (limiter, site) in sorted(self.sources().items()):
                if limiter is not None:
                    open_now.add_metric([name], limiter.open)
                    for reason, attribute in _CONNECTION_REFUSALS:
                        refused.add_metric([name, reason], getattr(limiter.counters, attribute))
                counters = getattr(site, "http_counters", None)
                if counters is not None:
                    for reason, attribute in _HTTP_REFUSALS:
                        http_refused.add_metric([name, reason], getattr(counters, attribute))
                stats = getattr(site, "transport_stats", None)  # an edge transport's
                for attribute, reason in _TRANSPORT_REFUSALS if stats is not None else ():
                    if hasattr(stats, attribute):
                        transport_refused.add_metric([name, reason], getattr(stats, attribute))
                for attribute, reason in _IDENTITY_WARNINGS if stats is not None else ():
                    if hasattr(stats, attribute):
                        identity_warnings.add_metric([name, reason], getattr(stats, attribute))
                gate = getattr(site, "admission", None)
                if gate is not None and hasattr(gate, "counters"):
                    for outcome in ("admitted", "queued", "refused", "expired"):
                        admission.add_metric([name, outcome], getattr(gate.counters, outcome))
                    waiting.add_metric([name], gate.waiting)
        yield admission
        yield waiting
        yield transport_refused
        yield identity_warnings
        yield open_now
        yield refused
        yield http_refused


class BudgetCollector(Collector):
    """What is owed against the limits of hub.limits (cloudhub/budget.py), read at scrape time."""

    def __init__(self, handle: MessageHandle) -> None:
        self.handle = handle

    def describe(self) -> Iterator[Metric]:
        return self._families(read=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(read=True)

    def _families(self, read: bool) -> Iterator[Metric]:
        messages = GaugeMetricFamily(
            "cloudhub_owed_messages",
            "Messages owed to nodes, as counted against hub.limits.totalMessages",
        )
        owed_bytes = GaugeMetricFamily(
            "cloudhub_owed_bytes",
            "Encoded bytes of the messages owed, as counted against hub.limits.totalBytes",
        )
        unknown = GaugeMetricFamily(
            "cloudhub_unknown_nodes",
            "Node ids owed something without having connected since the start "
            "(hub.limits.unknownNodes)",
        )
        refused = CounterMetricFamily(
            "cloudhub_over_limit",
            "Messages refused because a limit was reached (429 per node, 507 for the hub), by "
            "the limit's config key",
            labels=["limit"],
        )
        budget = getattr(self.handle, "budget", None)
        if read and budget is not None:
            messages.add_metric([], budget.messages)
            owed_bytes.add_metric([], budget.bytes)
            unknown.add_metric([], len(getattr(self.handle, "unknown_nodes", ())))
            for limit, count in sorted(budget.refusals.items()):
                refused.add_metric([limit], count)
        yield messages
        yield owed_bytes
        yield unknown
        yield refused


class HubMetrics:
    """The metrics of one hub: a registry, the collectors, the ACK latency histogram.

    Built from the hub's :class:`~cloudhub.handler.MessageHandle`, and, when given, the
    certificate server's counters and the certificate authority (certificate expiry): what
    is not given is not reported. The sync store's figures are those of ``store`` when given,
    else of the handle's current store (``handle.store``, looked up at each scrape, so the
    store a restarted hub reopens is followed). :meth:`close` detaches the latency observer and
    the node event subscription.
    """

    def __init__(
        self,
        handle: MessageHandle,
        certificates: CertificateCounters | None = None,
        *,
        authority: CertificateAuthority | None = None,
        store: ISyncStore | None = None,
        limits: LimitSources | None = None,
    ) -> None:
        self.handle = handle
        self.registry = CollectorRegistry(auto_describe=True)
        if limits is not None:
            self.registry.register(LimitsCollector(limits))
        self.registry.register(BudgetCollector(handle))
        self.registry.register(HubCollector(handle, certificates))
        if authority is not None:
            self.registry.register(CertificateExpiryCollector(authority))
        self.registry.register(
            StoreCollector((lambda: handle.store) if store is None else (lambda: store))
        )
        self.node_events = NodeEventCounters()
        self.registry.register(self.node_events)
        self._unsubscribe: Callable[[], None] | None = handle.subscribe_events(
            self.node_events.observe
        )
        self.ack_latency = LatencyHistogram(
            "cloudhub_ack_latency_seconds",
            "Time from the first transmission of an ACK-mode message (in its current round of "
            "retries) to the edge's ACK",
            ACK_LATENCY_BUCKETS,
        )
        self.registry.register(self.ack_latency)
        self._observe = self.ack_latency.observe
        handle.stats.ack_latency_observers.append(self._observe)

    def resource(self) -> MetricsResource:
        """A twisted.web resource rendering this hub's metrics (mount it at ``/metrics``)."""
        return MetricsResource(self.registry)

    def close(self) -> None:
        observers = self.handle.stats.ack_latency_observers
        if self._observe in observers:
            observers.remove(self._observe)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
