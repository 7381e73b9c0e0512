"""Prometheus metrics: what a run of the real hub shows on /metrics, and the collector alone."""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import UTC, datetime

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.web import CertificateCounters
from cloudhub.errors import NodeRefused
from cloudhub.handler import MessageHandle
from cloudhub.metrics import (
    ACK_LATENCY_BUCKETS,
    CertificateExpiryCollector,
    HubCollector,
    HubMetrics,
    StoreCollector,
)
from cloudhub.store import MemorySyncStore, SQLiteSyncStore, StoreError

from .fakes import FakeConnection, pod_message
from .helpers_tls import make_config
from .test_api import ApiHarness, pod_body, wait_for
from .test_store import ManualPool, ThreadlessReactor, flaky, flaky_connect

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def scrape(metrics: HubMetrics) -> Samples:
    """What ``GET /metrics`` of these metrics would show (the text format)."""
    return samples(generate_latest(metrics.registry).decode())


def names(found: Samples) -> set[str]:
    return {name for name, _ in found}


class HubRunTests(ApiHarness, TestCase):
    timeout = 60

    async def scrape(self, **headers: bytes) -> Samples:
        reply = await self.call(
            b"GET", "/metrics", headers={k.encode(): v for k, v in headers.items()}
        )
        self.assertEqual(reply.code, 200)
        self.assertTrue(reply.header(b"content-type").startswith(b"text/plain"))  # type: ignore[union-attr]
        return samples(reply.body.decode())

    async def test_send_ack_disconnect(self) -> None:
        await self.start_hub()
        before = await self.scrape()
        self.assertEqual(value(before, "cloudhub_connected_nodes", transport="websocket"), 0)
        self.assertEqual(value(before, "cloudhub_connected_nodes", transport="quic"), 0)
        self.assertEqual(value(before, "cloudhub_messages_sent_total"), 0)

        node = await self.join("edge-1")
        await wait_for(lambda: self.hub.upstream.nodes()[0].last_keepalive is not None)
        reply = await self.post("edge-1", pod_body("uid-1", "5"), "?wait=ack&timeout=20")
        self.assertEqual(reply.code, 200)
        reply = await self.post("edge-1", pod_body("uid-1", "4", operation="update"))
        self.assertEqual(reply.code, 409)

        during = await self.scrape()
        self.assertEqual(value(during, "cloudhub_connected_nodes", transport="websocket"), 1)
        self.assertEqual(value(during, "connected_nodes"), 1)  # KubeEdge's name
        self.assertEqual(value(during, "cloudhub_messages_sent_total"), 1)
        self.assertEqual(value(during, "cloudhub_messages_acknowledged_total"), 1)
        self.assertEqual(value(during, "cloudhub_messages_retransmitted_total"), 0)
        self.assertEqual(value(during, "cloudhub_refused_total", reason="stale"), 1)
        self.assertEqual(value(during, "cloudhub_refused_total", reason="invalid"), 0)
        self.assertEqual(value(during, "cloudhub_refused_total", reason="node_limit"), 0)
        self.assertEqual(value(during, "cloudhub_ack_latency_seconds_count"), 1)
        latency = value(during, "cloudhub_ack_latency_seconds_sum")
        self.assertTrue(0 < latency < 20, latency)
        self.assertEqual(value(during, "cloudhub_ack_latency_seconds_bucket", le="60.0"), 1)
        self.assertEqual(value(during, "cloudhub_ack_latency_seconds_bucket", le="0.0001"), 0)
        # At least the first keepalive and the ACK.
        self.assertGreaterEqual(value(during, "cloudhub_messages_received_total"), 2)
        self.assertEqual(value(during, "cloudhub_queue_depth"), 0)
        self.assertEqual(value(during, "cloudhub_certificates_issued_total"), 1)  # bootstrap
        self.assertEqual(value(during, "cloudhub_certificates_renewed_total"), 0)
        self.assertEqual(value(during, "cloudhub_token_failures_total"), 0)

        await node.stop()
        await wait_for(lambda: not self.hub.upstream.is_connected("edge-1"))
        # Owed to the node while it is away.
        reply = await self.post("edge-1", pod_body("uid-2", "1", name="web"))
        self.assertEqual(reply.code, 202)
        after = await self.scrape()
        self.assertEqual(value(after, "cloudhub_connected_nodes", transport="websocket"), 0)
        self.assertEqual(value(after, "connected_nodes"), 0)
        self.assertEqual(value(after, "cloudhub_queue_depth"), 1)
        self.assertEqual(value(after, "cloudhub_messages_acknowledged_total"), 1)
        self.assertEqual(value(after, "cloudhub_keepalive_timeouts_total"), 0)

    async def test_openmetrics_on_request(self) -> None:
        await self.start_hub()
        reply = await self.call(
            b"GET",
            "/metrics",
            headers={b"accept": b"application/openmetrics-text; version=1.0.0"},
        )
        self.assertEqual(reply.code, 200)
        self.assertTrue(
            reply.header(b"content-type").startswith(b"application/openmetrics-text")  # type: ignore[union-attr]
        )
        self.assertTrue(reply.body.endswith(b"# EOF\n"))

    async def test_without_metrics_there_is_no_metrics_path(self) -> None:
        await self.start_hub(metrics=False)
        reply = await self.call(b"GET", "/metrics")
        self.assertEqual(reply.code, 404)


class CollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.handle = MessageHandle(
            self.clock, keepalive_interval=1.0, node_limit=2, store=MemorySyncStore()
        )
        self.counters = CertificateCounters()
        self.metrics = HubMetrics(self.handle, self.counters)

    def scrape(self) -> Samples:
        return scrape(self.metrics)

    def test_transports_node_limit_and_keepalive_timeouts(self) -> None:
        quic = FakeConnection("n2")
        quic.transport = "quic"  # type: ignore[misc]
        self.handle.connection_made(FakeConnection("n1"))
        self.handle.connection_made(quic)
        self.assertRaises(NodeRefused, self.handle.connection_made, FakeConnection("n3"))
        found = self.scrape()
        self.assertEqual(value(found, "cloudhub_connected_nodes", transport="websocket"), 1)
        self.assertEqual(value(found, "cloudhub_connected_nodes", transport="quic"), 1)
        self.assertEqual(value(found, "connected_nodes"), 2)
        self.assertEqual(value(found, "cloudhub_refused_total", reason="node_limit"), 1)
        self.clock.advance(1.5)  # no keepalive from either
        found = self.scrape()
        self.assertEqual(value(found, "cloudhub_keepalive_timeouts_total"), 2)
        self.assertEqual(value(found, "connected_nodes"), 0)

    def test_queue_depth_invalid_and_certificate_counters(self) -> None:
        self.handle.send("off-1", pod_message("u1", "1"))
        self.handle.send("off-2", pod_message("u2", "1"))
        self.handle.send("off-2", pod_message("u3", "1", name="other"))
        bad = pod_message("", "1")
        self.failureResultOf(self.handle.send("off-1", bad))
        self.counters.issued = 3
        self.counters.renewed = 1
        self.counters.token_failures = 4
        self.counters.cert_failures = 2
        self.counters.rate_limited = 5
        found = self.scrape()
        self.assertEqual(value(found, "cloudhub_queue_depth"), 3)
        self.assertEqual(value(found, "cloudhub_refused_total", reason="invalid"), 1)
        self.assertEqual(value(found, "cloudhub_certificates_issued_total"), 3)
        self.assertEqual(value(found, "cloudhub_certificates_renewed_total"), 1)
        self.assertEqual(value(found, "cloudhub_token_failures_total"), 4)
        self.assertEqual(value(found, "cloudhub_certificate_renewal_failures_total"), 2)
        self.assertEqual(value(found, "cloudhub_certificate_requests_rate_limited_total"), 5)

    def test_ack_latency_buckets_and_observer(self) -> None:
        self.assertEqual((ACK_LATENCY_BUCKETS[0], ACK_LATENCY_BUCKETS[-1]), (0.0001, 60.0))
        self.handle.stats.observe_ack_latency(0.003)
        self.handle.stats.observe_ack_latency(45.0)
        found = self.scrape()
        self.assertEqual(value(found, "cloudhub_ack_latency_seconds_count"), 2)
        self.assertEqual(value(found, "cloudhub_ack_latency_seconds_bucket", le="0.005"), 1)
        self.assertEqual(value(found, "cloudhub_ack_latency_seconds_bucket", le="60.0"), 2)
        # On a bound counts as "le" that bound; above the last bound only in +Inf.
        self.handle.stats.observe_ack_latency(0.005)
        self.handle.stats.observe_ack_latency(61.0)
        found = self.scrape()
        self.assertEqual(value(found, "cloudhub_ack_latency_seconds_bucket", le="0.005"), 2)
        self.assertEqual(value(found, "cloudhub_ack_latency_seconds_bucket", le="60.0"), 3)
        self.assertEqual(value(found, "cloudhub_ack_latency_seconds_bucket", le="+Inf"), 4)
        self.assertAlmostEqual(value(found, "cloudhub_ack_latency_seconds_sum"), 106.008)
        self.metrics.close()
        self.assertEqual(self.handle.stats.ack_latency_observers, [])
        self.handle.stats.observe_ack_latency(1.0)
        self.assertEqual(value(self.scrape(), "cloudhub_ack_latency_seconds_count"), 4)

    def test_one_registry_per_hub_and_none_global(self) -> None:
        other = HubMetrics(MessageHandle(self.clock))
        self.addCleanup(other.close)
        self.handle.stats.observe_ack_latency(0.01)
        self.assertEqual(value(self.scrape(), "cloudhub_ack_latency_seconds_count"), 1)
        theirs = scrape(other)
        self.assertEqual(value(theirs, "cloudhub_ack_latency_seconds_count"), 0)
        # Certificate metrics only where the certificate server's counters were given.
        self.assertNotIn(("cloudhub_certificates_issued_total", ()), theirs)
        global_names = {m.name for m in REGISTRY.collect()}
        self.assertFalse({n for n in global_names if "cloudhub" in n or n == "connected_nodes"})

    def test_every_family_is_described_without_reading_state(self) -> None:
        class NoState:
            stats = property(lambda self: (_ for _ in ()).throw(AssertionError("read")))

        collector = HubCollector(NoState(), CertificateCounters())  # type: ignore[arg-type]
        self.assertRaises(AssertionError, lambda: list(collector.collect()))
        described = {family.name for family in collector.describe()}
        self.assertIn("cloudhub_connected_nodes", described)
        self.assertIn("connected_nodes", described)
        self.assertIn("cloudhub_messages_sent", described)
        self.assertIn("cloudhub_token_failures", described)
        self.assertIn("cloudhub_node_limit", described)

    def test_new_collectors_are_described_without_reading_state(self) -> None:
        class NoAuthority:
            ca_certificate = property(lambda self: (_ for _ in ()).throw(AssertionError("read")))

        def no_store() -> None:
            raise AssertionError("read")

        expiry = CertificateExpiryCollector(NoAuthority())  # type: ignore[arg-type]
        self.assertRaises(AssertionError, lambda: list(expiry.collect()))
        self.assertEqual(
            [f.name for f in expiry.describe()], ["cloudhub_certificate_expiry_timestamp_seconds"]
        )
        store = StoreCollector(no_store)
        self.assertRaises(AssertionError, lambda: list(store.collect()))
        self.assertEqual(
            [f.name for f in store.describe()],
            [
                "cloudhub_store_commit_failures",
                "cloudhub_store_batches_committed",
                "cloudhub_store_changes_committed",
            ],
        )

    def test_node_limit(self) -> None:
        self.assertEqual(value(self.scrape(), "cloudhub_node_limit"), 2)

    def test_node_connections_and_disconnections(self) -> None:
        found = self.scrape()
        for family in ("cloudhub_node_connections_total", "cloudhub_node_disconnections_total"):
            for transport in ("websocket", "quic"):  # 0 rather than no series
                self.assertEqual(value(found, family, transport=transport), 0)
        first = FakeConnection("n1")
        quic = FakeConnection("n2")
        quic.transport = "quic"  # type: ignore[misc]
        self.handle.connection_made(first)
        self.handle.connection_made(quic)
        self.handle.connection_made(FakeConnection("n1"))  # replaces the first: one flap
        self.assertRaises(NodeRefused, self.handle.connection_made, FakeConnection("n3"))
        self.handle.connection_lost(first, "gone")  # already replaced: not counted again
        found = self.scrape()
        self.assertEqual(value(found, "cloudhub_node_connections_total", transport="websocket"), 2)
        self.assertEqual(value(found, "cloudhub_node_connections_total", transport="quic"), 1)
        self.assertEqual(
            value(found, "cloudhub_node_disconnections_total", transport="websocket"), 1
        )
        self.assertEqual(value(found, "cloudhub_node_disconnections_total", transport="quic"), 0)
        self.clock.advance(1.5)  # keepalive timeouts end both
        found = self.scrape()
        self.assertEqual(
            value(found, "cloudhub_node_disconnections_total", transport="websocket"), 2
        )
        self.assertEqual(value(found, "cloudhub_node_disconnections_total", transport="quic"), 1)
        self.assertEqual(value(found, "cloudhub_keepalive_timeouts_total"), 2)
        # Closed metrics no longer count (nor keep the handle's subscriber list growing).
        self.metrics.close()
        self.handle.connection_made(FakeConnection("n4"))
        self.assertEqual(
            value(self.scrape(), "cloudhub_node_connections_total", transport="websocket"), 2
        )

    def test_no_store_figures_for_the_memory_store_nor_certificates_without_authority(
        self,
    ) -> None:
        found = names(self.scrape())
        self.assertFalse({n for n in found if n.startswith("cloudhub_store_")})
        self.assertNotIn("cloudhub_certificate_expiry_timestamp_seconds", found)


class CertificateExpiryTests(SynchronousTestCase):
    """The expiry gauge, from real authorities made in a temporary data directory."""

    def test_ca_and_server_expiry_read_at_each_scrape(self) -> None:
        authority = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        metrics = HubMetrics(MessageHandle(Clock()), authority=authority)
        self.addCleanup(metrics.close)
        found = scrape(metrics)
        name = "cloudhub_certificate_expiry_timestamp_seconds"
        ca = authority.ca_certificate.not_valid_after_utc.timestamp()
        server = authority.server_certificate.not_valid_after_utc.timestamp()
        self.assertEqual(value(found, name, certificate="ca"), ca)
        self.assertEqual(value(found, name, certificate="server"), server)
        self.assertGreater(ca, time.time() + 99 * 365 * 86400)  # cloudcore's 100 years
        # Read when scraped: a certificate the hub swaps in shows at once.
        then = datetime(2000, 1, 1, tzinfo=UTC)
        older = CertificateAuthority.load_or_create(make_config(self.mktemp()), clock=lambda: then)
        authority.server_certificate = older.server_certificate
        found = scrape(metrics)
        self.assertEqual(
            value(found, name, certificate="server"),
            older.server_certificate.not_valid_after_utc.timestamp(),
        )
        self.assertLess(value(found, name, certificate="server"), server)
        self.assertEqual(value(found, name, certificate="ca"), ca)


class StoreMetricsTests(SynchronousTestCase):
    """The sync store's figures, from a real SQLite store whose commits fail on demand (its
    writer thread run by hand, as in test_store)."""

    def setUp(self) -> None:
        self.reactor = ThreadlessReactor()
        self.pool = ManualPool()
        self.store = SQLiteSyncStore(
            os.path.join(self.mktemp(), "cloudhub.db"),
            self.reactor,
            connect=flaky_connect,
            threadpool=self.pool,  # type: ignore[arg-type]
            retry_delay=1.0,
        )
        self.handle = MessageHandle(self.reactor, store=self.store)
        self.metrics = HubMetrics(self.handle)
        self.addCleanup(self.metrics.close)

    def tearDown(self) -> None:
        flaky(self.store).fail_commits = False
        self.pool.run_at_once = True
        self.pool.run_all()
        self.reactor.advance(10)
        closed = self.store.close()
        self.pool.run_all()
        self.successResultOf(closed)

    def figures(self, metrics: HubMetrics | None = None) -> tuple[float, float, float]:
        found = scrape(metrics or self.metrics)
        return (
            value(found, "cloudhub_store_commit_failures_total"),
            value(found, "cloudhub_store_batches_committed_total"),
            value(found, "cloudhub_store_changes_committed_total"),
        )

    def test_failed_commits_are_counted(self) -> None:
        self.assertEqual(self.figures(), (0, 0, 0))
        flaky(self.store).fail_commits = True  # as with a full disk
        sent = [
            self.handle.send("n1", pod_message("u1", "1")),
            self.handle.send("n1", pod_message("u2", "1", name="other")),
        ]
        self.reactor.advance(0)
        self.pool.run_next()
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.assertEqual(self.figures(), (1, 0, 0))
        for refused in sent:  # not accepted: rolled back, never retried
            self.failureResultOf(refused, StoreError)
        self.reactor.advance(1.0)  # retried, and failing still
        self.pool.run_next()
        self.flushLoggedErrors(sqlite3.OperationalError)
        self.assertEqual(self.figures(), (2, 0, 0))
        flaky(self.store).fail_commits = False
        self.reactor.advance(1.0)
        self.pool.run_next()
        # The retry commits what is not a promise to a caller (here a purge), not the messages.
        self.assertEqual(self.figures(), (2, 1, 0))

    def test_follows_the_handles_current_store(self) -> None:
        self.handle.send("n1", pod_message("u1", "1"))
        self.reactor.advance(0)
        self.pool.run_next()
        self.assertEqual(self.figures(), (0, 1, 1))
        # A hub that stopped has no store (and one that restarted a new one), as
        # MessageHandle.attach/detach set it: the figures go with it.
        self.handle.store = None
        found = names(scrape(self.metrics))
        self.assertFalse({n for n in found if n.startswith("cloudhub_store_")})
        self.handle.store = self.store
        self.assertEqual(self.figures(), (0, 1, 1))

    def test_explicit_store(self) -> None:
        self.handle.send("n1", pod_message("u1", "1"))
        self.reactor.advance(0)
        self.pool.run_next()
        other = HubMetrics(MessageHandle(Clock(), store=MemorySyncStore()), store=self.store)
        self.addCleanup(other.close)
        self.assertEqual(self.figures(other), (0, 1, 1))


class LimitsCollectorTests(SynchronousTestCase):
    """Refusals of the limits (issue 18), by listener and reason, read at each scrape."""

    def test_limits_and_transport_drops(self) -> None:
        from types import SimpleNamespace

        from prometheus_client import CollectorRegistry, generate_latest

        from cloudhub.certs.web import HttpCounters
        from cloudhub.limits import ConnectionCounters
        from cloudhub.metrics import LimitsCollector
        from cloudhub.transport.websocket import WebSocketStats

        limiter = SimpleNamespace(open=3, counters=ConnectionCounters(refused_address=2))
        site = SimpleNamespace(http_counters=HttpCounters(head_timeouts=5, uri_too_long=1))
        stats = WebSocketStats()
        sources = {
            "https": (limiter, site),
            "websocket": (None, SimpleNamespace(transport_stats=stats)),
        }
        registry = CollectorRegistry()
        registry.register(LimitsCollector(lambda: sources))
        stats.node_ids_refused = 4
        stats.output_overflows = 1
        text = generate_latest(registry).decode()
        for line in (
            'cloudhub_connections_open{listener="https"} 3.0',
            'cloudhub_connections_refused_total{listener="https",reason="address"} 2.0',
            'cloudhub_http_refused_total{listener="https",reason="head_timeout"} 5.0',
            'cloudhub_http_refused_total{listener="https",reason="uri_too_long"} 1.0',
            "cloudhub_edge_connections_dropped_total"
            '{reason="bad_node_id",transport="websocket"} 4.0',
            "cloudhub_edge_connections_dropped_total"
            '{reason="output_overflow",transport="websocket"} 1.0',
        ):
            self.assertIn(line, text)
