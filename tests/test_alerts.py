"""The Prometheus alerting rules in etc/prometheus: promtool accepts them and their unit tests
pass, and every metric they select is one a real hub exposes (so renaming a metric in
cloudhub/metrics.py breaks a test here, not an alert in production)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.web import CertificateCounters
from cloudhub.handler import MessageHandle
from cloudhub.metrics import HubMetrics
from cloudhub.store import SQLiteSyncStore

from .helpers_tls import make_config
from .test_store import ManualPool, ThreadlessReactor

PROMETHEUS = Path(__file__).resolve().parent.parent / "etc" / "prometheus"
RULES = PROMETHEUS / "cloudhub-alerts.yml"
RULE_TESTS = PROMETHEUS / "cloudhub-alerts.test.yml"
PROMTOOL_TIMEOUT = 60  # seconds; both commands take well under one

# Series Prometheus makes itself when it scrapes, and labels it puts on every target.
SCRAPE_SERIES = {"up"}
TARGET_LABELS = {"job", "instance"}
SEVERITIES = {"warning", "critical"}
# Each description tells the operator what to do, with one of these words.
WHAT_TO_DO = ("Check", "Plan", "Rotate", "Renew", "Raise")

# PromQL words that look like metric names but are not.
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')

Selector = tuple[str, dict[str, str]]


def selectors(expr: str) -> list[Selector]:
    """The metric selectors of a PromQL expression: (name, its ``=`` label matchers).

    Enough PromQL for rule files: range and subquery brackets and grouping clauses are
    dropped, and a name followed by ``(`` is a function or an aggregation.
    """
    expr = _RANGE.sub("", _GROUPING.sub("", expr))
    found = []
    for name, matchers, call in _SELECTOR.findall(expr):
        if call or name in _KEYWORDS:
            continue
        equal = {label: text for label, op, text in _MATCHER.findall(matchers) if op == "="}
        found.append((name, equal))
    return found


def grouping_labels(expr: str) -> set[str]:
    """The labels named in ``by``/``without``/``on``/``ignoring``/``group_*`` clauses."""
    return {
        label.strip()
        for _, labels in _GROUPING.findall(expr)
        for label in labels.split(",")
        if label.strip()
    }


def load_rules() -> list[dict[str, Any]]:
    with open(RULES) as stream:
        document = yaml.safe_load(stream)
    groups = document["groups"]
    return [rule for group in groups for rule in group["rules"]]


class PromtoolTests(SynchronousTestCase):
    """``promtool check rules`` and ``promtool test rules``, as an operator would run them."""

    def promtool(self, *arguments: str) -> None:
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool not found (Debian package prometheus)")
        result = subprocess.run(
            [promtool, *arguments],
            cwd=PROMETHEUS.parent.parent,
            capture_output=True,
            text=True,
            timeout=PROMTOOL_TIMEOUT,
            check=False,
        )
        self.assertEqual(
            result.returncode,
            0,
            f"promtool {' '.join(arguments)} failed:\n{result.stdout}\n{result.stderr}",
        )

    def test_check_rules(self) -> None:
        self.promtool("check", "rules", os.path.relpath(RULES, PROMETHEUS.parent.parent))

    def test_rule_unit_tests(self) -> None:
        self.promtool("test", "rules", os.path.relpath(RULE_TESTS, PROMETHEUS.parent.parent))


class RuleFileTests(SynchronousTestCase):
    """The rule file against what the code exposes; no promtool needed."""

    def exposed(self) -> dict[str, list[dict[str, str]]]:
        """Every sample name of a fully built hub's /metrics, with the label sets it has."""
        reactor = ThreadlessReactor()
        store = SQLiteSyncStore(
            os.path.join(self.mktemp(), "cloudhub.db"),
            reactor,
            threadpool=ManualPool(run_at_once=True),  # type: ignore[arg-type]
        )
        self.addCleanup(lambda: self.successResultOf(store.close()))
        authority = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        handle = MessageHandle(reactor, store=store)
        metrics = HubMetrics(handle, CertificateCounters(), authority=authority, store=store)
        self.addCleanup(metrics.close)
        found: dict[str, list[dict[str, str]]] = {}
        text = generate_latest(metrics.registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append(dict(sample.labels))
        return found

    def test_selectors_parser(self) -> None:
        expr = (
            'sum without (transport) (rate(cloudhub_a_total{reason="x", le!="1"}[5m])) '
            "> 0.8 * on (job) group_left max_over_time(cloudhub_b[1h:1m]) and up == 0 "
            "unless histogram_quantile(0.99, c_bucket offset 5m) > 1e3"
        )
        self.assertEqual(
            selectors(expr),
            [
                ("cloudhub_a_total", {"reason": "x"}),
                ("cloudhub_b", {}),
                ("up", {}),
                ("c_bucket", {}),
            ],
        )
        self.assertEqual(grouping_labels(expr), {"transport", "job"})

    def test_every_selected_metric_is_exposed(self) -> None:
        exposed = self.exposed()
        selected = set()
        for rule in load_rules():
            expr = rule["expr"]
            found = selectors(expr)
            self.assertTrue(found, f"{rule['alert']}: no metric in {expr!r}")
            for name, equal in found:
                selected.add(name)
                if name in SCRAPE_SERIES:
                    continue
                self.assertIn(name, exposed, f"{rule['alert']} selects {name}, not exposed")
                wanted = {k: v for k, v in equal.items() if k not in TARGET_LABELS}
                self.assertTrue(
                    any(wanted.items() <= labels.items() for labels in exposed[name]),
                    f"{rule['alert']} selects {name}{wanted}; exposed: {exposed[name]}",
                )
            # A label the rule groups by is one its own metrics have.
            labels_here = {
                label for name, _ in found for labels in exposed.get(name, []) for label in labels
            }
            for label in grouping_labels(expr) - TARGET_LABELS:
                self.assertIn(label, labels_here, f"{rule['alert']} groups by {label}")
        # What the alerts are about (issue 15): a parser that found nothing would pass above.
        self.assertLessEqual(
            {
                "up",
                "cloudhub_connected_nodes",
                "cloudhub_node_disconnections_total",
                "cloudhub_queue_depth",
                "cloudhub_ack_latency_seconds_bucket",
                "cloudhub_certificate_expiry_timestamp_seconds",
                "cloudhub_store_commit_failures_total",
            },
            selected,
        )

    def test_every_rule_says_how_bad_and_what_to_check(self) -> None:
        with open(RULES) as stream:
            groups = yaml.safe_load(stream)["groups"]
        self.assertEqual([group["name"] for group in groups], ["cloudhub"])
        for rule in load_rules():
            name = rule["alert"]
            self.assertRegex(name, r"^CloudHub[A-Z]\w+$")
            self.assertIn("for", rule, name)
            self.assertIn(rule["labels"]["severity"], SEVERITIES, name)
            annotations = rule["annotations"]
            self.assertTrue(annotations["summary"].strip(), name)
            description = annotations["description"]
            self.assertTrue(any(verb in description for verb in WHAT_TO_DO), name)

    def test_every_alert_fires_in_the_unit_tests(self) -> None:
        """Each (alert, severity) of the rule file is expected to fire somewhere in the promtool
        tests, so a new rule comes with its test."""
        with open(RULE_TESTS) as stream:
            document = yaml.safe_load(stream)
        self.assertEqual(document["rule_files"], [RULES.name])
        fired = {
            (case["alertname"], alert["exp_labels"]["severity"])
            for test in document["tests"]
            for case in test["alert_rule_test"]
            for alert in case["exp_alerts"]
        }
        rules = {(rule["alert"], rule["labels"]["severity"]) for rule in load_rules()}
        self.assertEqual(rules - fired, set())
        self.assertEqual(fired - rules, set())
