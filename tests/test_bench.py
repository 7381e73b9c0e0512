"""``cloudhub bench``: the report's structure and the table, from a tiny real run.

No figure is checked for speed (design.md, Testing): only that each is there, or says why not.
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

from cloudhub.bench import (
    PLANS,
    cpu_seconds,
    default_json_path,
    percentile,
    render_table,
    rss_kb,
    run_bench,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

THROUGHPUT_KEYS = {
    "nodes",
    "messages",
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
LATENCY_KEYS = {"nodes", "rate_target", "rate_sent", "sent", "acked", "p50_ms", "p99_ms"}


def unavailable_quic(report: dict) -> dict:
    quic = {"transport": "quic", "available": False, "reason": "quic not available: test"}
    return {**report, "transports": {**report["transports"], "quic": quic}}


class HelperTests(SynchronousTestCase):
    def test_proc_readers(self) -> None:
        self.assertGreater(rss_kb(os.getpid()), 1000)
        before = cpu_seconds(os.getpid())
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
        self.assertGreaterEqual(cpu_seconds(os.getpid()), before)

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
        ws = report["transports"]["ws"]
        self.assertTrue(ws["available"], err.getvalue())
        connections = ws["connections"]
        self.assertEqual(connections["target"], max(PLANS["tiny"].connection_steps))
        self.assertEqual(connections["held"], connections["target"])
        self.assertIsNone(connections["stopped"])
        for step in connections["steps"]:
            self.assertLessEqual(STEP_KEYS, set(step))
        self.assertEqual(
            [run["nodes"] for run in ws["throughput"]], list(PLANS["tiny"].throughput_nodes)
        )
        for run in ws["throughput"]:
            self.assertLessEqual(THROUGHPUT_KEYS, set(run))
            self.assertEqual(run["acked"], run["messages"])
            self.assertGreater(run["msgs_per_s"], 0)
        self.assertLessEqual(LATENCY_KEYS, set(ws["latency"]))
        self.assertEqual(ws["latency"]["acked"], ws["latency"]["sent"])
        quic = report["transports"]["quic"]
        if not quic["available"]:
            self.assertIn("quic not available", quic["reason"])

        table = render_table(report)
        for text in (
            "cloudhub bench --tiny",
            "nodes held (of 4)",
            "connect rate, nodes/s",
            "hub RSS per node at 4",
            "throughput, ACK mode",
            "  1 node",
            "  3 nodes",
            "p50 / p99, ms",
            "hub CPU seconds per 1,000 messages",
        ):
            self.assertIn(text, table)
        self.assertIn("not available", render_table(unavailable_quic(report)))

    def test_command_prints_the_table_and_writes_json(self) -> None:
        path = os.path.abspath(self.mktemp()) + ".json"
        done = subprocess.run(
            [sys.executable, "-m", "cloudhub.cli", "bench", "--tiny", "--transport", "ws"]
            + ["--json", path, "--no-plot"],
            capture_output=True,
            text=True,
            timeout=100,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertIn("throughput, ACK mode", done.stdout)
        self.assertIn(f"figures written to {path}", done.stdout)
        with open(path, encoding="utf-8") as stream:
            report = json.load(stream)
        self.assertEqual(list(report["transports"]), ["ws"])
        self.assertEqual(report["mode"], "tiny")
