"""Log output: JSON lines off a terminal, text on one, and the switch that forces either."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

from twisted.logger import Logger, LogLevel, globalLogBeginner, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.trial.unittest import SynchronousTestCase

from cloudhub import logs
from cloudhub.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FormatSelectionTests(SynchronousTestCase):
    def test_json_off_a_terminal_text_on_one(self) -> None:
        self.assertEqual(logs.select_format(io.StringIO(), {}), "json")
        self.assertEqual(logs.select_format(Terminal(), {}), "text")

    def test_environment_forces_either(self) -> None:
        self.assertEqual(logs.select_format(Terminal(), {logs.ENV_VAR: "json"}), "json")
        self.assertEqual(logs.select_format(io.StringIO(), {logs.ENV_VAR: "TEXT"}), "text")
        self.assertEqual(logs.select_format(Terminal(), {logs.ENV_VAR: "auto"}), "text")
        self.assertEqual(logs.select_format(io.StringIO(), {logs.ENV_VAR: ""}), "json")

    def test_bad_value_names_the_variable(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            logs.select_format(io.StringIO(), {logs.ENV_VAR: "yaml"})
        self.assertIn(logs.ENV_VAR, str(caught.exception))
        self.assertIn("json, text", str(caught.exception))

    def test_twistd_factory_exits_with_one_line_on_a_bad_value(self) -> None:
        self.patch(os, "environ", {logs.ENV_VAR: "xml"})
        with self.assertRaises(SystemExit) as caught:
            logs.observer()
        self.assertIn(logs.ENV_VAR, str(caught.exception.code))

    def test_twistd_factory_writes_to_stdout(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(os, "environ", {logs.ENV_VAR: "json"})
        observer = logs.observer()
        Logger(namespace="t", observer=observer).info("hello {who}", who="you")
        self.assertEqual(json.loads(out.getvalue())["who"], "you")

    def test_make_observer(self) -> None:
        out = io.StringIO()
        Logger(namespace="cloudhub.handler", observer=logs.make_observer(out, "text")).info(
            "node {node} connected", node="edge-1"
        )
        self.assertIn("[cloudhub.handler#info] node edge-1 connected", out.getvalue())
        self.assertRaises(ValueError, logs.make_observer, out, "xml")


class JsonLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.log = Logger(namespace="cloudhub.session", observer=logs.json_lines_observer(self.out))

    def lines(self) -> list[dict]:
        text = self.out.getvalue()
        self.assertTrue(text.endswith("\n"))
        return [json.loads(line) for line in text.splitlines()]

    def test_structured_fields(self) -> None:
        self.log.warn(
            "node {node}: no ACK for {msg_id} after {count} tries",
            node="edge-1",
            msg_id="m-1",
            count=5,
        )
        [line] = self.lines()
        self.assertEqual(line["level"], "warn")
        self.assertEqual(line["namespace"], "cloudhub.session")
        self.assertEqual(line["text"], "node edge-1: no ACK for m-1 after 5 tries")
        self.assertEqual((line["node"], line["msg_id"], line["count"]), ("edge-1", "m-1", 5))
        self.assertRegex(line["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(list(line)[:4], ["time", "level", "namespace", "text"])
        self.assertFalse([key for key in line if key.startswith("log_")])

    def test_failure_reserved_names_and_values_json_cannot_carry(self) -> None:
        try:
            raise ValueError("bad frame")
        except ValueError:
            self.log.failure("decode failed for {peer}", peer=("10.0.0.1", 5), text="clash")
        self.log.info("odd {value}", value=object(), nan=float("nan"), raw=b"\x00")
        failed, odd = self.lines()
        self.assertEqual(failed["level"], "critical")
        self.assertIn("ValueError: bad frame", failed["failure"])
        self.assertEqual(failed["_text"], "clash")
        self.assertEqual(failed["peer"], ["10.0.0.1", 5])
        self.assertTrue(odd["value"].startswith("<object object"))
        self.assertEqual((odd["nan"], odd["raw"]), ("nan", "b'\\x00'"))

    def test_legacy_events_are_not_duplicated(self) -> None:
        observer = logs.json_lines_observer(self.out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        legacy_log.msg("Starting factory", system="web")
        line = self.lines()[-1]
        self.assertEqual(line["text"], "Starting factory")
        self.assertEqual(line["system"], "web")
        self.assertNotIn("message", line)
        self.assertNotIn("isError", line)
        self.assertNotIn("_time", line)

    def test_a_broken_event_still_gives_a_line(self) -> None:
        class Unprintable:
            def __str__(self) -> str:
                raise RuntimeError("no")

            __repr__ = __str__

        line = logs.event_as_json_line(
            {"log_format": "{x}", "log_level": LogLevel.info, "log_time": 0.0, "x": Unprintable()}
        )
        self.assertTrue(line.endswith("\n"))
        self.assertIn("level", json.loads(line))


class BeginLoggingTests(SynchronousTestCase):
    def test_begin_logging_installs_the_observer(self) -> None:
        installed = []
        self.patch(
            globalLogBeginner,
            "beginLoggingTo",
            lambda observers, **kw: installed.append((observers, kw)),
        )
        out = io.StringIO()
        observer = logs.begin_logging(out, "json")
        self.assertEqual(installed, [([observer], {"redirectStandardIO": False})])


class TwistdTests(SynchronousTestCase):
    """``twistd -n --logger cloudhub.logs.observer cloudhub``: JSON lines into a pipe."""

    def run_hub(self, env: dict[str, str]) -> bytes:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        config = os.path.join(workdir, "hub.yaml")
        with open(config, "w") as f:
            f.write(
                "cloudHub:\n"
                "  tlsCAFile: ca/missing.crt\n  tlsCAKeyFile: ca/missing.key\n"
                "  tlsCertFile: certs/missing.crt\n  tlsPrivateKeyFile: certs/missing.key\n"
                "  websocket: {address: 127.0.0.1, port: 0}\n"
                "  https: {address: 127.0.0.1, port: 0}\n"
                "hub:\n  dataDir: data\n  api: {port: 0}\n"
            )
        environ = dict(os.environ)
        environ.pop(logs.ENV_VAR, None)
        environ.update(env)
        environ["PYTHONPATH"] = REPO + os.pathsep + environ.get("PYTHONPATH", "")
        process = subprocess.Popen(
            TWISTD
            + ["-n", "--pidfile=", "--logger", "cloudhub.logs.observer"]
            + ["cloudhub", "--config", config],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
            cwd=workdir,
        )
        try:
            output = b""
            deadline = time.monotonic() + 60
            assert process.stdout is not None
            os.set_blocking(process.stdout.fileno(), False)
            while b"cloudhub ready" not in output and time.monotonic() < deadline:
                if process.poll() is not None:
                    break
                output += process.stdout.read() or b""
                time.sleep(0.05)
            self.assertIn(b"cloudhub ready", output, output.decode(errors="replace"))
            process.send_signal(signal.SIGINT)
            self.assertEqual(process.wait(timeout=30), 0)
            output += process.stdout.read() or b""
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        return output

    def test_json_lines_into_a_pipe(self) -> None:
        output = self.run_hub({})
        lines = [json.loads(line) for line in output.decode().splitlines()]
        [ready] = [line for line in lines if line["text"].startswith("cloudhub ready")]
        self.assertEqual(ready["namespace"], "cloudhub.service")
        self.assertIn("https", json.loads(ready["ports"]))
        listening = [line for line in lines if line.get("service") == "https"]
        self.assertTrue(listening and isinstance(listening[0]["port"], int), listening)

    def test_text_when_forced(self) -> None:
        output = self.run_hub({logs.ENV_VAR: "text"})
        self.assertIn(b"[cloudhub.service#info] cloudhub ready", output)
        self.assertFalse(output.lstrip().startswith(b"{"))
