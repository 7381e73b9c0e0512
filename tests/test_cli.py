"""The ``cloudhub`` command line."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from contextlib import redirect_stdout

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub import cli
from cloudhub.certs.authority import CertificateAuthority
from cloudhub.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TokenCommandTests(SynchronousTestCase):
    def config_file(self) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "hub.yaml")
        with open(path, "w") as f:
            f.write(
                "cloudHub:\n"
                f"  tlsCAFile: {directory}/none.crt\n  tlsCAKeyFile: {directory}/none.key\n"
                f"  tlsCertFile: {directory}/s.crt\n  tlsPrivateKeyFile: {directory}/s.key\n"
                f"hub:\n  dataDir: {directory}/data\n"
            )
        return path

    def test_prints_only_the_token(self) -> None:
        path = self.config_file()
        out = subprocess.run(
            [sys.executable, "-m", "cloudhub.cli", "token", "--config", path],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        lines = out.stdout.splitlines()
        self.assertEqual(len(lines), 1)
        parts = lines[0].split(".")
        self.assertEqual(len(parts), 4)
        authority = CertificateAuthority.load_or_create(load_config(path))
        self.assertEqual(parts[0], hashlib.sha256(authority.ca_der).hexdigest())

    def test_bad_config_one_line_on_stderr(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("hub:\n  dataDir: 5\n")
        stdout = io.StringIO()
        with redirect_stdout(stdout):
            self.assertEqual(cli.main(["token", "--config", path]), 1)
        self.assertEqual(stdout.getvalue(), "")


class SyncCommandTests(TestCase):
    config_file = TokenCommandTests.config_file

    @inlineCallbacks
    def test_lists_pending_and_acked_objects(self):
        from twisted.internet import reactor

        from cloudhub.store import SQLiteSyncStore

        from .fakes import pod_message

        path = self.config_file()
        config = load_config(path)
        os.makedirs(config.hub.data_dir, exist_ok=True)
        store = SQLiteSyncStore(config.store_path, reactor)
        message = pod_message("uid-1", "7", "insert")
        store.put_pending("edge-1", "uid-1", message, "Pod", "default", "nginx")
        store.acknowledged("edge-1", "uid-2", 3, False)
        store.put_pending("edge-2", "uid-3", pod_message("uid-3", "9"), "Pod", "default", "x")
        store.note_attempt("edge-2", "uid-3", 5, "no ACK after 5 transmissions")
        yield store.close()
        stdout = io.StringIO()
        with redirect_stdout(stdout):
            self.assertEqual(cli.main(["sync", "--config", path, "--node", "edge-2"]), 0)
        lines = stdout.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("uid-3", lines[1])
        self.assertIn("9", lines[1])
        self.assertIn("no ACK after 5 transmissions", lines[1])
        stdout = io.StringIO()
        with redirect_stdout(stdout):
            cli.main(["sync", "--config", path])
        self.assertEqual(len(stdout.getvalue().splitlines()), 4)

    def test_no_store_is_a_clear_error(self) -> None:
        path = self.config_file()
        self.assertEqual(cli.main(["sync", "--config", path]), 1)
