"""``cloudhub bench``: the report's structure and the table, from a tiny real run.

No figure is checked for speed (design.md, Testing): only that each is there, or says why not,
and that every scenario of issue 9 ran (reconnect storm, batched submission, the paced runs,
the batch API) and is printed next to its target.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub.api import batch_message, parse_batch
from cloudhub.bench import (
    PLANS,
    TARGETS,
    api_bodies,
    cpu_seconds,
    default_json_path,
    evaluate_targets,
    listen_counters,
    median_of,
    percentile,
    pinning,
    render_table,
    rss_kb,
    run_bench,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

THROUGHPUT_KEYS = {
    "nodes",
    "messages",
    "batch",
    "acked",
    "failed",
    "timed_out",
    "seconds",
    "msgs_per_s",
    "hub_cpu_s_per_1000",
    "hub_cpu_util",
    "edge_cpu_util",
}
STEP_KEYS = {
    "nodes",
    "held",
    "seconds",
    "connect_rate",
    "hub_rss_kb",
    "hub_rss_base_kb",
    "hub_rss_per_node_kb",
    "hub_cpu_ms_per_connect",
}
LATENCY_KEYS = {
    "nodes",
    "rate_target",
    "rate_sent",
    "ack_rate",
    "sent",
    "acked",
    "not_acked",
    "p50_ms",
    "p99_ms",
    "p99_all_ms",
    "hub_cpu_util",
    "edge_cpu_util",
}
STORM_KEYS = {
    "nodes",
    "dropped",
    "reconnected",
    "held_after",
    "complete",
    "seconds",
    "handshakes_per_s",
    "hub_cpu_ms_per_handshake",
    "hub_cpu_util",
    "edge_cpu_util",
    "concurrency",
    "peak_in_flight",
    "listen_backlog",
}
API_KEYS = {
    "messages",
    "requests",
    "batch",
    "in_flight",
    "accepted",
    "refused",
    "failed_requests",
    "seconds",
    "msgs_per_s",
    "hub_cpu_util",
    "hub_cpu_s_per_1000",
    "client_cpu_util",
}


def unavailable_quic(report: dict) -> dict:
    quic = {"transport": "quic", "available": False, "reason": "quic not available: test"}
    return {**report, "transports": {**report["transports"], "quic": quic}}


def synthetic_run(rss: float, storm: dict | None, p99_all: float | None) -> dict:
    """One run's figures, as much of them as the targets read."""
    return {
        "connections": {
            "steps": [{"nodes": 10000, "hub_rss_per_node_kb": rss}],
            "idle": {"hub_cpu_util": 0.05},
        },
        "storm": storm,
        "throughput": [{"nodes": 1, "msgs_per_s": 2000.0}, {"nodes": 1000, "msgs_per_s": 9000.0}],
        "fixed_latency": {"p99_all_ms": p99_all, "sent": 100},
        "api": {"msgs_per_s": 21000.0},
    }


class HelperTests(SynchronousTestCase):
    def test_proc_readers(self) -> None:
        self.assertGreater(rss_kb(os.getpid()), 1000)
        before = cpu_seconds(os.getpid())
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
        self.assertGreaterEqual(cpu_seconds(os.getpid()), before)
        for value in listen_counters().values():
            self.assertGreaterEqual(value, 0)

    def test_percentile_nearest_rank(self) -> None:
        values = [float(v) for v in range(1, 101)]
        self.assertEqual(percentile(values, 50), 50.0)
        self.assertEqual(percentile(values, 99), 99.0)
        self.assertEqual(percentile([3.0], 99), 3.0)
        self.assertIsNone(percentile([], 50))

    def test_default_json_path(self) -> None:
        import datetime

        path = default_json_path("quick", datetime.date(2026, 11, 28))
        self.assertEqual(path, os.path.join("benchmarks", "results", "2026-11-28-quick.json"))

    def test_median_of_runs(self) -> None:
        self.assertEqual(median_of([3, 1, 2]), 2)
        self.assertEqual(median_of([1.0, None, 3.0]), 2.0)
        # Missing in most runs: no figure.
        self.assertIsNone(median_of([None, None, 5.0]))
        self.assertEqual(median_of(["a", "b", "a"]), "a")
        self.assertIsNone(median_of([None, None, "stopped"]))
        runs = [
            {"throughput": [{"nodes": 1, "x": 1}, {"nodes": 100, "x": 10}], "ok": True},
            {"throughput": [{"nodes": 100, "x": 30}, {"nodes": 1, "x": 3}], "ok": True},
            {"throughput": [{"nodes": 1, "x": 2}], "ok": False},
        ]
        merged = median_of(runs)
        self.assertEqual(merged["throughput"], [{"nodes": 1, "x": 2}, {"nodes": 100, "x": 20}])
        self.assertIs(merged["ok"], True)

    def test_targets_met_and_not(self) -> None:
        storm = {"complete": True, "seconds": 12.0, "handshakes_per_s": 830.0}
        runs = [
            synthetic_run(31.0, storm, 4.0),
            synthetic_run(29.0, storm, 6.0),
            synthetic_run(28.0, {"complete": False, "seconds": 60.0}, None),
        ]
        report = {"transports": {"ws": {"transport": "websocket", "available": True, "runs": runs}}}
        results = {t["key"]: t for t in evaluate_targets(report)}
        self.assertEqual(set(results), {t.key for t in TARGETS})
        self.assertEqual(results["rss_per_node"]["runs"], [31.0, 29.0, 28.0])
        self.assertEqual(results["rss_per_node"]["median"], 29.0)
        self.assertIs(results["rss_per_node"]["met"], True)
        self.assertIs(results["idle_cpu"]["met"], True)
        # Two of three storms complete: the median of those is the figure.
        self.assertEqual(results["storm_seconds"]["median"], 12.0)
        self.assertIs(results["handshakes"]["met"], True)
        self.assertIs(results["acked_throughput"]["met"], False)
        self.assertEqual(results["fixed_p99"]["median"], 5.0)
        self.assertIs(results["fixed_p99"]["met"], True)
        self.assertIs(results["api_rate"]["met"], True)
        # Most storms incomplete: no figure, and not met (the storm ran).
        failed = {"complete": False, "seconds": 60.0}
        report["transports"]["ws"]["runs"] = [synthetic_run(20.0, failed, None)] * 3
        results = {t["key"]: t for t in evaluate_targets(report)}
        self.assertIsNone(results["storm_seconds"]["median"])
        self.assertIs(results["storm_seconds"]["met"], False)
        self.assertIs(results["fixed_p99"]["met"], False)
        # Nothing measured: no verdict.
        empty = {"transports": {"ws": {"transport": "websocket", "available": False}}}
        self.assertTrue(all(t["met"] is None for t in evaluate_targets(empty)))

    def test_pinning(self) -> None:
        self.assertEqual(pinning(False), {"enabled": False, "reason": "--no-pin"})
        pins = pinning(True)
        if pins["enabled"]:
            self.assertEqual(len(pins["hub_cpus"]), 1)
            self.assertNotIn(pins["hub_cpus"][0], pins["bench_cpus"])

    def test_api_bodies_are_batches_the_hub_reads(self) -> None:
        bodies, end = api_bodies(10, 25, 10, 4, "t")
        self.assertEqual(end, 35)
        self.assertEqual(len(bodies), 3)
        entries = [e for body in bodies for e in parse_batch(body, ndjson=False)]
        self.assertEqual(len(entries), 25)
        parsed = [batch_message(entry, i) for i, entry in enumerate(entries)]
        self.assertEqual({node for node, _ in parsed}, {f"api-{i}" for i in range(4)})
        self.assertEqual(len({m.msg_id for _, m in parsed}), 25)
        self.assertEqual(len({m.content["metadata"]["uid"] for _, m in parsed}), 25)
        self.assertTrue(all(m.operation == "insert" for _, m in parsed))


class TinyBenchTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_report_and_table(self):
        err = io.StringIO()
        report = yield Deferred.fromCoroutine(
            run_bench(reactor, PLANS["tiny"], ["ws", "quic"], err)
        )
        json.loads(json.dumps(report))  # all of it is JSON
        self.assertEqual(report["mode"], "tiny")
        self.assertEqual(report["command"], "cloudhub bench --tiny")
        self.assertEqual(report["machine"]["cpus"], os.cpu_count())
        self.assertIn("pinning", report["machine"])
        ws = report["transports"]["ws"]
        self.assertTrue(ws["available"], err.getvalue())
        self.assertEqual(ws["runs_done"], 1)
        self.assertEqual(len(ws["runs"]), 1)
        connections = ws["connections"]
        self.assertEqual(connections["target"], max(PLANS["tiny"].connection_steps))
        self.assertEqual(connections["held"], connections["target"])
        self.assertIsNone(connections["stopped"])
        for step in connections["steps"]:
            self.assertLessEqual(STEP_KEYS, set(step))

        storm = ws["storm"]
        self.assertLessEqual(STORM_KEYS, set(storm))
        self.assertTrue(storm["complete"], err.getvalue())
        self.assertEqual(storm["dropped"], connections["held"])
        self.assertEqual(storm["reconnected"], storm["dropped"])
        self.assertEqual(storm["held_after"], storm["dropped"])
        self.assertGreater(storm["handshakes_per_s"], 0)
        self.assertEqual(storm["peak_in_flight"], PLANS["tiny"].storm_concurrency)

        self.assertEqual(
            [run["nodes"] for run in ws["throughput"]], list(PLANS["tiny"].throughput_nodes)
        )
        for run in ws["throughput"]:
            self.assertLessEqual(THROUGHPUT_KEYS, set(run))
            self.assertEqual(run["batch"], PLANS["tiny"].go_batch)
            self.assertEqual(run["acked"], run["messages"])
            self.assertGreater(run["msgs_per_s"], 0)
        for key in ("latency", "fixed_latency"):
            paced = ws[key]
            self.assertLessEqual(LATENCY_KEYS, set(paced))
            self.assertEqual(paced["acked"], paced["sent"])
            self.assertEqual(paced["not_acked"], 0)
            self.assertLessEqual(paced["p50_ms"], paced["p99_ms"])
            self.assertEqual(paced["p99_all_ms"], paced["p99_ms"])
        fixed = ws["fixed_latency"]
        self.assertEqual(fixed["rate_target"], PLANS["tiny"].fixed_rate)
        self.assertEqual(fixed["nodes"], PLANS["tiny"].fixed_rate_nodes)

        api = ws["api"]
        self.assertLessEqual(API_KEYS, set(api))
        self.assertEqual(api["accepted"], api["messages"])
        self.assertEqual((api["refused"], api["failed_requests"]), (0, 0))
        self.assertGreater(api["msgs_per_s"], 0)

        # Issue 18: the storm under handshake admission, once per setting, and slowloris.
        admission = ws["admission_storm"]
        self.assertEqual(
            [one["setting"] for one in admission["settings"]],
            [setting[0] for setting in PLANS["tiny"].admission_settings],
        )
        for one in admission["settings"]:
            self.assertTrue(one["complete"], err.getvalue())
            self.assertEqual(one["reconnected"], one["dropped"])
            self.assertEqual(one["keepalive_timeouts"], 0)
            self.assertEqual(one["steady_connected_after"], PLANS["tiny"].steady_nodes)
            self.assertEqual(one["steady_acked"], one["steady_sent"])
            self.assertIsNotNone(one["reactor_lag_p99_ms"])
        off, wait = admission["settings"]
        self.assertEqual(off["admission"]["queued"], 0)
        self.assertGreater(wait["admission"]["queued"], 0)  # max_handshakes 1: some waited
        self.assertEqual(wait["admission"]["admitted"], wait["dropped"])
        slow = ws["slowloris"]
        self.assertEqual(slow["attack"]["peak_held"], PLANS["tiny"].slow_connections)
        self.assertEqual(slow["https"]["accepted"], PLANS["tiny"].slow_connections)
        for window in (slow["baseline"], slow["during"]):
            self.assertEqual(window["edge_acked"], window["edge_sent"])
            self.assertGreater(window["api_requests"], 0)
            self.assertEqual(window["api_failed"], 0)

        targets = {t["key"]: t for t in report["targets"]}
        self.assertEqual(set(targets), {t.key for t in TARGETS})
        for target in targets.values():
            self.assertEqual(target["transport"], "websocket")
            self.assertEqual(len(target["runs"]), 1)
            self.assertIsNotNone(target["median"], target)
            self.assertIn(target["met"], (True, False))

        quic = report["transports"]["quic"]
        if quic["available"]:
            self.assertIsNone(quic["storm"])  # the storm is WebSocket's
            self.assertNotIn("api", quic)  # the batch API is measured once
        else:
            self.assertIn("quic not available", quic["reason"])

        table = render_table(report)
        for text in (
            "cloudhub bench --tiny",
            "median of 1 run",
            "nodes held (of 4)",
            "connect rate, nodes/s",
            "hub RSS per node at 4",
            "reconnect storm",
            "reconnect storm under handshake admission",
            "slowloris on the certificate port",
            "seconds until all connected again",
            "mTLS handshakes/s",
            "throughput, ACK mode",
            "  1 node",
            "  3 nodes",
            "p50 / p99, ms",
            "300 msg/s offered, 3 nodes",
            "batch API",
            "msg/s durably accepted",
            "hub CPU seconds per 1,000 messages",
            "issue 9 targets",
            "≤ 30 KB",
            "≥ 800/s",
            "≥ 25,000",
            "≤ 5 ms",
            "≥ 20,000",
        ):
            self.assertIn(text, table)
        header = next(line for line in table.splitlines() if line.split()[:1] == ["figure"])
        self.assertEqual(header.split()[-2:], ["target", "met"])
        self.assertTrue("met" in table.split("issue 9 targets")[0])
        self.assertIn("not available", render_table(unavailable_quic(report)))

    def test_command_prints_the_table_and_writes_json(self) -> None:
        path = os.path.abspath(self.mktemp()) + ".json"
        done = subprocess.run(
            [sys.executable, "-m", "cloudhub.cli", "bench", "--tiny", "--transport", "ws"]
            + ["--runs", "2", "--no-pin", "--json", path, "--no-plot"],
            capture_output=True,
            text=True,
            timeout=100,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertIn("throughput, ACK mode", done.stdout)
        self.assertIn("median of 2 runs", done.stdout)
        self.assertIn(f"figures written to {path}", done.stdout)
        with open(path, encoding="utf-8") as stream:
            report = json.load(stream)
        self.assertEqual(list(report["transports"]), ["ws"])
        self.assertEqual(report["mode"], "tiny")
        self.assertEqual(report["machine"]["pinning"], {"enabled": False, "reason": "--no-pin"})
        ws = report["transports"]["ws"]
        self.assertEqual(ws["runs_done"], 2)
        for target in report["targets"]:
            self.assertEqual(len(target["runs"]), 2)
        # A note every run gave is said once, naming the runs.
        held = [n for n in report["notes"] if "nodes of the largest step held" in n]
        self.assertEqual(len(held), 1)
        self.assertTrue(held[0].startswith("every run: websocket connections"), held)
