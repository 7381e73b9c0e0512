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


CONFIG = (
    "cloudHub:\n"
    "  tlsCAFile: ca/missing.crt\n  tlsCAKeyFile: ca/missing.key\n"
    "  tlsCertFile: certs/missing.crt\n  tlsPrivateKeyFile: certs/missing.key\n"
    "  websocket: {{address: 127.0.0.1, port: {ws}}}\n"
    "  https: {{address: 127.0.0.1, port: 0}}\n"
    "hub:\n  dataDir: data\n  api: {{port: 0}}\n"
)


class TwistdLifecycleTests(SynchronousTestCase):
    """Exit statuses and clean-up as a service manager sees them (issue 15)."""

    def workdir(self, ws: int = 0) -> tuple[str, str]:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        config = os.path.join(path, "hub.yaml")
        with open(config, "w") as f:
            f.write(CONFIG.format(ws=ws))
        return path, config

    def popen(self, args: list[str], cwd: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            TWISTD + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=twistd_env(),
            cwd=cwd,
        )
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), False)
        return process

    def read_until(self, process: subprocess.Popen[bytes], needle: bytes) -> bytes:
        assert process.stdout is not None
        out = b""
        deadline = time.monotonic() + 30
        while needle not in out and time.monotonic() < deadline and process.poll() is None:
            out += process.stdout.read() or b""
            time.sleep(0.05)
        return out

    def run_failing(self, cwd: str, config: str) -> tuple[int, str]:
        out = subprocess.run(
            TWISTD + ["-n", "cloudhub", "--config", config],
            capture_output=True,
            text=True,
            env=twistd_env(),
            cwd=cwd,
            timeout=60,
        )
        output = out.stdout + out.stderr
        self.assertIn("cloudhub cannot start", output)
        self.assertNotIn("Unhandled error in Deferred", output)
        # The default pid file is removed even though the start failed.
        self.assertFalse(os.path.exists(os.path.join(cwd, "twistd.pid")), output)
        return out.returncode, output

    def test_version(self) -> None:
        from cloudhub import __version__

        cwd, _ = self.workdir()
        out = subprocess.run(
            TWISTD + ["cloudhub", "--version"],
            capture_output=True,
            text=True,
            env=twistd_env(),
            cwd=cwd,
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
        cwd, config = self.workdir(ws=taken.getsockname()[1])
        code, output = self.run_failing(cwd, config)
        self.assertEqual(code, tap.EXIT_START_FAILED, output)
        self.assertIn("Address already in use", output)

    def test_bad_ca_file_exits_non_zero(self) -> None:
        cwd, config = self.workdir()
        os.makedirs(os.path.join(cwd, "ca"))
        for name in ("missing.crt", "missing.key"):
            with open(os.path.join(cwd, "ca", name), "w") as f:
                f.write("garbage\n")
        code, output = self.run_failing(cwd, config)
        self.assertEqual(code, tap.EXIT_START_FAILED, output)

    def test_store_that_cannot_be_opened_exits_non_zero(self) -> None:
        cwd, config = self.workdir()
        os.makedirs(os.path.join(cwd, "data", "cloudhub.db"))  # a directory
        code, output = self.run_failing(cwd, config)
        self.assertEqual(code, tap.EXIT_START_FAILED, output)
        self.assertIn("cloudhub.db", output)

    def test_sigterm_while_starting_exits_zero(self) -> None:
        """A stop while the CA is still being opened is deliberate: exit 0."""
        import fcntl

        cwd, config = self.workdir()
        os.makedirs(os.path.join(cwd, "data"))
        fd = os.open(os.path.join(cwd, "data", ".certs.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # the CA thread waits for this lock
        try:
            process = self.popen(["-n", "--pidfile=", "cloudhub", "--config", config], cwd)
            out = self.read_until(process, b"cloudhub starting")
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        code = process.wait(timeout=30)
        assert process.stdout is not None
        out += process.stdout.read() or b""
        self.assertEqual(code, 0, out.decode(errors="replace")[-3000:])
