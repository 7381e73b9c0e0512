"""The ``cloudhub`` command line."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from contextlib import redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

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
