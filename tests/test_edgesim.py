"""``cloudhub edgesim`` against a real hub on loopback (port 0, real TLS)."""

from __future__ import annotations

import io
import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub.edge.bootstrap import CA_FILE, CERT_FILE, KEY_FILE
from cloudhub.edgesim import (
    LatencyHistogram,
    SimOptions,
    Simulation,
    Simulator,
    TransportUnavailable,
    merge_snapshots,
    obtain_credentials,
)
from cloudhub.errors import CloudHubError
from cloudhub.service import CloudHubService

from .fakes import pod_message
from .test_integration_ws import hub_config, wait_for


class LatencyHistogramTests(SynchronousTestCase):
    def test_percentiles_merge_and_difference(self) -> None:
        histogram = LatencyHistogram()
        self.assertIsNone(histogram.percentile(50))
        for ms in range(1, 101):
            histogram.add(ms)
        self.assertEqual(histogram.total, 100)
        self.assertEqual(histogram.percentile(50), 50)
        self.assertEqual(histogram.percentile(99), 99)
        earlier = histogram.copy()
        histogram.add(12345)  # two significant digits above 100 ms
        self.assertEqual(histogram.minus(earlier).counts, {12000: 1})
        other = LatencyHistogram.from_json(histogram.to_json())
        other.merge(histogram)
        self.assertEqual(other.total, 202)
        histogram.add(-3)  # a clock that went backwards counts as 0
        self.assertIn(0, histogram.counts)

    def test_snapshots_of_processes_add_up(self) -> None:
        one = {"nodes": 2, "connected": 2, "acks": 3, "latency": {"4": 1}, "connecting": False}
        two = {"nodes": 3, "connected": 1, "acks": 1, "latency": {"4": 2}, "connecting": True}
        total = merge_snapshots([one, two])
        self.assertEqual((total["nodes"], total["connected"], total["acks"]), (5, 3, 4))
        self.assertEqual(total["latency"], {"4": 3})
        self.assertTrue(total["connecting"])

    def test_options_are_checked(self) -> None:
        for bad in (
            SimOptions(nodes=0),
            SimOptions(procs=0),
            SimOptions(duration=0),
            SimOptions(transport="tcp"),
            SimOptions(heartbeat=0),
        ):
            self.assertRaises(CloudHubError, bad.check)


class QuicUnavailableTests(TestCase):
    def setUp(self) -> None:
        # A None entry makes the import fail, whether or not cloudhub.edge.quic exists.
        saved = sys.modules.get("cloudhub.edge.quic", False)
        sys.modules["cloudhub.edge.quic"] = None  # type: ignore[assignment]

        def restore() -> None:
            if saved is False:
                del sys.modules["cloudhub.edge.quic"]
            else:
                sys.modules["cloudhub.edge.quic"] = saved  # type: ignore[assignment]

        self.addCleanup(restore)

    @inlineCallbacks
    def test_reported_not_raised(self):
        out, err = io.StringIO(), io.StringIO()
        options = SimOptions(nodes=2, transport="quic", token="x.y.z.w", duration=1)
        summary = yield Deferred.fromCoroutine(Simulation(reactor, options, out, err).run())
        self.assertIn("quic not available", summary["error"])
        self.assertIn("quic not available", out.getvalue())

    def test_simulator_refuses(self) -> None:
        with self.assertRaises(TransportUnavailable):
            Simulator(reactor, "quic", "127.0.0.1", 1, None)  # type: ignore[arg-type]


class EdgeSimTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.hub = CloudHubService(hub_config(base), reactor=reactor)
        self.hub.startService()
        self.addCleanup(self.hub.stopService)
        yield self.hub.ready
        self.https_url = f"https://127.0.0.1:{self.hub.port('https')}"

    def options(self, **changes: object) -> SimOptions:
        settings = {
            "nodes": 3,
            "hub": "127.0.0.1",
            "https_port": self.hub.port("https"),
            "ws_port": self.hub.port("websocket"),
            "token": self.hub.tokens.current,
            "duration": 3.0,
            "interval": 0.5,
            "prefix": "sim-",
            **changes,
        }
        return SimOptions(**settings)  # type: ignore[arg-type]

    def connected(self) -> int:
        return len(self.hub.upstream.nodes())

    @inlineCallbacks
    def test_simulator_connects_receives_and_acks(self):
        credentials, source = yield Deferred.fromCoroutine(
            obtain_credentials(reactor, self.https_url, self.hub.tokens.current, None)
        )
        self.assertEqual(source, "bootstrapped with the token")
        simulator = Simulator(
            reactor, "ws", "127.0.0.1", self.hub.port("websocket"), credentials, prefix="n-"
        )
        self.addCleanup(simulator.stop)
        yield simulator.grow(3)
        yield wait_for(lambda: self.connected() == 3)
        self.assertEqual(
            sorted(n.node_id for n in self.hub.upstream.nodes()), ["n-0", "n-1", "n-2"]
        )
        message = pod_message("uid-sim-1", "5", "insert")
        acked = yield self.hub.upstream.send("n-1", message)
        self.assertEqual(acked.msg_id, message.msg_id)
        snap = simulator.snapshot()
        self.assertEqual((snap["connected"], snap["ever_connected"]), (3, 3))
        self.assertEqual(snap["acks"], 1)
        self.assertGreaterEqual(snap["messages"], 1)
        self.assertEqual(LatencyHistogram.from_json(snap["latency"]).total, 1)
        yield simulator.stop()
        yield wait_for(lambda: self.connected() == 0)

    @inlineCallbacks
    def test_stop_unconnected_keeps_the_connected(self):
        credentials, _ = yield Deferred.fromCoroutine(
            obtain_credentials(reactor, self.https_url, self.hub.tokens.current, None)
        )
        simulator = Simulator(
            reactor, "ws", "127.0.0.1", self.hub.port("websocket"), credentials, prefix="k-"
        )
        self.addCleanup(simulator.stop)
        yield simulator.grow(2)
        yield wait_for(lambda: self.connected() == 2)
        self.assertEqual(simulator.stop_unconnected(), 0)
        self.assertEqual(simulator.snapshot()["connected"], 2)
        # Nothing listens on port 1: every attempt fails.
        dead = Simulator(reactor, "ws", "127.0.0.1", 1, credentials, prefix="d-")
        self.addCleanup(dead.stop)
        yield dead.grow(2)
        self.assertEqual(dead.stop_unconnected(), 2)
        self.assertEqual(dead.snapshot()["connect_failures"], 2)

    @inlineCallbacks
    def test_run_stops_after_duration_and_reuses_saved_certs(self):
        certs = os.path.abspath(self.mktemp())
        out, err = io.StringIO(), io.StringIO()
        simulation = Simulation(reactor, self.options(certs=certs), out, err)
        running = Deferred.fromCoroutine(simulation.run())
        yield wait_for(lambda: self.connected() == 3)
        yield self.hub.upstream.send("sim-2", pod_message("uid-run-1", "1", "insert"))
        summary = yield running
        self.assertFalse(summary["interrupted"])
        self.assertEqual(summary["ever_connected"], 3)
        self.assertEqual(summary["acks"], 1)
        self.assertEqual(summary["messages"] - summary["acks"], 0)  # no control messages
        self.assertEqual(summary["reconnects"], 0)
        self.assertEqual(summary["latency_samples"], 1)
        yield wait_for(lambda: self.connected() == 0)
        report = out.getvalue()
        self.assertIn("edgesim summary", report)
        self.assertIn("acks         1 sent", report)
        status = err.getvalue()  # not a terminal: plain lines, no carriage returns
        self.assertNotIn("\r", status)
        self.assertIn("connected 3/3", status)
        for name in (CA_FILE, CERT_FILE, KEY_FILE):
            self.assertTrue(os.path.exists(os.path.join(certs, name)))

        # Again without a token: the saved certificate is reused.
        out = io.StringIO()
        options = self.options(certs=certs, token=None, duration=1.0, nodes=2)
        summary = yield Deferred.fromCoroutine(Simulation(reactor, options, out, err).run())
        self.assertEqual(summary["ever_connected"], 2)
        self.assertIn(f"certificate reused {certs}", err.getvalue())

    @inlineCallbacks
    def test_interrupt_stops_at_once(self):
        out, err = io.StringIO(), io.StringIO()
        simulation = Simulation(reactor, self.options(duration=300.0), out, err)
        started = reactor.seconds()
        running = Deferred.fromCoroutine(simulation.run())
        yield wait_for(lambda: self.connected() == 3)
        simulation.interrupt()
        summary = yield running
        self.assertTrue(summary["interrupted"])
        self.assertLess(reactor.seconds() - started, 30)
        self.assertIn("interrupted", out.getvalue())
        yield wait_for(lambda: self.connected() == 0)

    @inlineCallbacks
    def test_nodes_spread_over_processes(self):
        out, err = io.StringIO(), io.StringIO()
        options = self.options(nodes=5, procs=2, duration=6.0, prefix="p-")
        running = Deferred.fromCoroutine(Simulation(reactor, options, out, err).run())
        yield wait_for(lambda: self.connected() == 5, timeout=30)
        self.assertEqual(
            sorted(n.node_id for n in self.hub.upstream.nodes()), [f"p-{i}" for i in range(5)]
        )
        yield self.hub.upstream.send("p-4", pod_message("uid-proc-1", "1", "insert"))
        summary = yield running
        self.assertEqual(summary["ever_connected"], 5)
        self.assertEqual(summary["acks"], 1)
        yield wait_for(lambda: self.connected() == 0)

    @inlineCallbacks
    def test_no_token_and_no_certs_is_a_clear_error(self):
        simulation = Simulation(reactor, self.options(token=None), io.StringIO(), io.StringIO())
        with self.assertRaises(CloudHubError) as caught:
            yield Deferred.fromCoroutine(simulation.run())
        self.assertIn("--token", str(caught.exception))
