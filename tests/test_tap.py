"""The daemon as operators meet it: ``twistd cloudhub`` (real subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from cloudhub import tap
from cloudhub.service import CloudHubService

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


class TapTests(SynchronousTestCase):
    def test_make_service(self) -> None:
        options = tap.Options()
        options.parseOptions(["--config", os.path.join(REPO, "etc", "cloudhub.yaml")])
        service = tap.makeService(options)
        self.assertIsInstance(service, CloudHubService)

    def test_bad_config_exits_with_one_line(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("cloudHub:\n  nodeLimit: -1\n")
        options = tap.Options()
        options.parseOptions(["--config", path])
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options)
        message = str(caught.exception.code)
        self.assertIn("cloudHub.nodeLimit", message)
        self.assertIn(path, message)


class TwistdTests(SynchronousTestCase):
    def test_help_lists_config(self) -> None:
        out = subprocess.run(
            TWISTD + ["cloudhub", "--help"],
            capture_output=True,
            text=True,
            env=twistd_env(),
            cwd=self.mktemp_dir(),
            timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("--config", out.stdout)

    def mktemp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def test_bad_config_stops_startup(self) -> None:
        workdir = self.mktemp_dir()
        config = os.path.join(workdir, "bad.yaml")
        with open(config, "w") as f:
            f.write("cloudHub:\n  websocket:\n    port: 99999\n")
        out = subprocess.run(
            TWISTD + ["-n", "cloudhub", "--config", config],
            capture_output=True,
            text=True,
            env=twistd_env(),
            cwd=workdir,
            timeout=60,
        )
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("cloudHub.websocket.port", out.stderr + out.stdout)

    def test_runs_until_sigint_and_exits_zero(self) -> None:
        workdir = self.mktemp_dir()
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
        process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "cloudhub", "--config", config],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=twistd_env(),
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
                chunk = process.stdout.read() or b""
                output += chunk
                time.sleep(0.05)
            self.assertIn(b"cloudhub ready", output, output.decode(errors="replace"))
            process.send_signal(signal.SIGINT)
            self.assertEqual(process.wait(timeout=30), 0)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


class TwistdLifecycleTests(SynchronousTestCase):
    def mktemp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def test_version(self) -> None:
        from cloudhub import __version__

        out = subprocess.run(
            TWISTD + ["cloudhub", "--version"],
            capture_output=True,
            text=True,
            env=twistd_env(),
            cwd=self.mktemp_dir(),
            timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), f"cloudhub {__version__}")

    def test_port_taken_exits_non_zero_with_one_critical_line(self) -> None:
        import socket

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        workdir = self.mktemp_dir()
        config = os.path.join(workdir, "hub.yaml")
        with open(config, "w") as f:
            f.write(
                "cloudHub:\n"
                "  tlsCAFile: ca/missing.crt\n  tlsCAKeyFile: ca/missing.key\n"
                "  tlsCertFile: certs/missing.crt\n  tlsPrivateKeyFile: certs/missing.key\n"
                f"  websocket: {{address: 127.0.0.1, port: {taken.getsockname()[1]}}}\n"
                "  https: {address: 127.0.0.1, port: 0}\n"
                "hub:\n  dataDir: data\n  api: {port: 0}\n"
            )
        out = subprocess.run(
            TWISTD + ["-n", "--pidfile=", "cloudhub", "--config", config],
            capture_output=True,
            text=True,
            env=twistd_env(),
            cwd=workdir,
            timeout=60,
        )
        output = out.stdout + out.stderr
        self.assertEqual(out.returncode, tap.EXIT_START_FAILED, output)
        self.assertIn("cloudhub cannot start", output)
        self.assertIn("Address already in use", output)
        self.assertNotIn("Unhandled error in Deferred", output)
