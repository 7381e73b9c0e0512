"""The ``cloudhub`` command line."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace

import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

import cloudhub
from cloudhub import cli, tap
from cloudhub.certs.authority import CertificateAuthority, write_atomically
from cloudhub.certs.token import split_token, verify_jwt
from cloudhub.config import HubConfig, load_config, parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOUR = 3600


def run(argv: list[str]) -> tuple[int, str, str]:
    """``cloudhub ARGV`` in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: --version, --help, usage errors
            code = e.code if isinstance(e.code, int) else 1
    return code, stdout.getvalue(), stderr.getvalue()


def tree(directory: str) -> dict[str, tuple[int, int, bytes]]:
    """Every file and directory under ``directory``: mode, mtime and content, to compare."""
    found: dict[str, tuple[int, int, bytes]] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            status = os.stat(path)
            content = b""
            if name in files:
                with open(path, "rb") as stream:
                    content = stream.read()
            found[os.path.relpath(path, directory)] = (status.st_mode, status.st_mtime_ns, content)
    return found


def write_config(directory: str, extra: str = "", hub: str = "", data_dir: str = "") -> str:
    """``directory/hub.yaml``: tls* files absent, dataDir ``directory/data`` (not made).

    ``extra`` and ``hub`` are more YAML lines for ``cloudHub:`` and ``hub:``.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory)
    path = os.path.join(directory, "hub.yaml")
    with open(path, "w") as f:
        f.write(
            "cloudHub:\n"
            f"  tlsCAFile: {directory}/none.crt\n  tlsCAKeyFile: {directory}/none.key\n"
            f"  tlsCertFile: {directory}/s.crt\n  tlsPrivateKeyFile: {directory}/s.key\n"
            f"{extra}"
            f"hub:\n  dataDir: {data_dir or directory + '/data'}\n{hub}"
        )
    return path


class CommandTestCase(SynchronousTestCase):
    def config_file(self, extra: str = "", hub: str = "", data_dir: str = "") -> str:
        return write_config(self.mktemp(), extra, hub, data_dir)

    def init(self, path: str) -> HubConfig:
        code, _, err = run(["init", "--config", path])
        self.assertEqual(code, 0, err)
        return load_config(path)


class TokenCommandTests(CommandTestCase):
    def test_prints_only_the_token(self) -> None:
        path = self.config_file()
        config = self.init(path)
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
        authority = CertificateAuthority.load(config)
        self.assertEqual(parts[0], hashlib.sha256(authority.ca_der).hexdigest())

    def test_token_verifies_against_the_ca(self) -> None:
        config = self.init(self.config_file())
        code, out, err = run(["token", "-c", config.path])
        self.assertEqual((code, err), (0, ""))
        ca_hash, signed = split_token(out.strip())
        authority = CertificateAuthority.load(config)
        self.assertEqual(ca_hash, authority.ca_hash)
        claims = verify_jwt(authority, signed, time.time())
        self.assertLess(abs(claims["exp"] - (time.time() + 24 * HOUR)), 5)

    def test_no_ca_creates_nothing(self) -> None:
        """Without a CA, `token` says how to make one and exits 1; not even dataDir appears."""
        path = self.config_file()
        config = load_config(path)
        code, out, err = run(["token", "--config", path])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("cloudhub: no CA yet"), err)
        for looked in (
            config.cloudhub.tls_ca_file,
            config.cloudhub.tls_ca_key_file,
            config.data_path("ca", "rootCA.crt"),
            config.data_path("ca", "rootCA.key"),
        ):
            self.assertIn(looked, err)
        self.assertIn("start the hub once", err)
        self.assertIn(f"cloudhub init --config {path}", err)
        self.assertFalse(os.path.exists(config.hub.data_dir))
        self.assertEqual(sorted(os.listdir(os.path.dirname(path))), ["hub.yaml"])

    def test_no_ca_empty_data_dir_stays_empty(self) -> None:
        path = self.config_file()
        config = load_config(path)
        os.makedirs(config.hub.data_dir)
        code, out, err = run(["token", "--config", path])
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no CA yet", err)
        self.assertEqual(os.listdir(config.hub.data_dir), [])

    def test_needs_only_the_ca(self) -> None:
        """A missing server pair does not stop a token, and `token` does not make a new one."""
        config = self.init(self.config_file())
        for name in ("server.crt", "server.key"):
            os.unlink(config.data_path("certs", name))
        code, out, err = run(["token", "--config", config.path])
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(split_token(out)[0], CertificateAuthority.load_ca(config).ca_hash)
        self.assertEqual(os.listdir(config.data_path("certs")), [])

    def test_half_ca_pair(self) -> None:
        config = self.init(self.config_file())
        os.unlink(config.data_path("ca", "rootCA.key"))
        code, out, err = run(["token", "--config", config.path])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err,
            f"cloudhub: {config.data_path('ca', 'rootCA.key')}: missing, "
            f"but its pair {config.data_path('ca', 'rootCA.crt')} exists\n",
        )

    def test_bad_config_one_line_on_stderr(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("hub:\n  dataDir: 5\n")
        code, out, err = run(["token", "--config", path])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("hub.dataDir", err)


class InitCommandTests(CommandTestCase):
    def test_creates_what_the_hub_would(self) -> None:
        path = self.config_file()
        config = load_config(path)
        code, out, err = run(["init", "--config", path])
        self.assertEqual((code, err), (0, ""))
        authority = CertificateAuthority.load(config)
        ca = config.data_path("ca", "rootCA.crt")
        server = config.data_path("certs", "server.crt")
        self.assertEqual(
            out.splitlines(),
            [
                f"created the data directory {config.hub.data_dir}",
                f"created the CA: {ca} (key {config.data_path('ca', 'rootCA.key')})",
                f"  sha256: {authority.ca_hash} (the first part of every join token)",
                f"created the server certificate: {server} "
                f"(key {config.data_path('certs', 'server.key')})",
                "  names: 127.0.0.1, ::1",
                f"created the sync store: {config.store_path}",
            ],
        )
        # What the hub loads at start is exactly what init made.
        hub = CertificateAuthority.load_or_create(config)
        self.assertEqual(hub.ca_der, authority.ca_der)
        self.assertEqual(hub.server_certificate, authority.server_certificate)

    def test_second_run_changes_nothing(self) -> None:
        config = self.init(self.config_file())
        before = tree(config.hub.data_dir)
        code, out, err = run(["init", "--config", config.path])
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("found the existing CA: "), lines)
        self.assertTrue(lines[2].startswith("found the existing server certificate: "), lines)
        self.assertEqual(lines[-1], "nothing changed")
        self.assertEqual(tree(config.hub.data_dir), before)

    def test_configured_names(self) -> None:
        path = self.config_file("  advertiseAddress: [10.0.0.5]\n  dnsNames: [hub.example.com]\n")
        code, out, _ = run(["init", "--config", path])
        self.assertEqual(code, 0)
        self.assertIn("  names: hub.example.com, 10.0.0.5\n", out)

    def test_new_names_new_server_certificate(self) -> None:
        """Like a restart with new advertiseAddress: same CA, a new server certificate."""
        config = self.init(self.config_file())
        first = CertificateAuthority.load(config)
        path = self.config_file("  advertiseAddress: [10.0.0.9]\n", data_dir=config.hub.data_dir)
        code, out, err = run(["init", "--config", path])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("found the existing CA", out)
        self.assertIn("it lacks the configured names 10.0.0.9", out)
        self.assertIn("created the server certificate", out)
        self.assertNotIn("nothing changed", out)
        again = CertificateAuthority.load(load_config(path))
        self.assertEqual(again.ca_der, first.ca_der)
        self.assertNotEqual(again.server_certificate, first.server_certificate)

    def test_bad_ca_file(self) -> None:
        config = self.init(self.config_file())
        write_atomically(config.data_path("ca", "rootCA.crt"), b"not a certificate")
        code, out, err = run(["init", "--config", config.path])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err, f"cloudhub: {config.data_path('ca', 'rootCA.crt')}: no PEM block found\n"
        )


class VersionTests(SynchronousTestCase):
    def test_version(self) -> None:
        self.assertEqual(run(["--version"]), (0, f"cloudhub {cloudhub.__version__}\n", ""))


class CheckConfigTests(CommandTestCase):
    def check(self, path: str | None) -> tuple[list[str], HubConfig]:
        """Run check-config: the comment lines, and the printed YAML read back as a config."""
        code, out, err = run(["check-config", "--config", path] if path else ["check-config"])
        self.assertEqual((code, err), (0, ""))
        comments = [line for line in out.splitlines() if line.startswith("#")]
        self.assertEqual(out.splitlines()[: len(comments)], comments)
        return comments, parse_config(yaml.safe_load(out), "<printed>")

    def test_good_config_creates_nothing(self) -> None:
        path = self.config_file()
        config = load_config(path)
        comments, printed = self.check(path)
        self.assertEqual(
            comments,
            [
                f"# {path}: valid; effective settings, defaults filled in, secrets redacted",
                f"# no CA yet: the hub creates one in {config.data_path('ca')} at first start",
            ],
        )
        self.assertEqual(printed, replace(config, path="<printed>"))
        self.assertFalse(os.path.exists(config.hub.data_dir))
        self.assertEqual(sorted(os.listdir(os.path.dirname(path))), ["hub.yaml"])

    def test_defaults(self) -> None:
        existed = os.path.exists(HubConfig().hub.data_dir)
        comments, printed = self.check(None)
        self.assertIn("built-in defaults", comments[0])
        self.assertEqual(printed, HubConfig(path="<printed>"))
        if not existed:
            self.assertFalse(os.path.exists(HubConfig().hub.data_dir))

    def test_round_trip_with_secret_redacted(self) -> None:
        """Non-default values everywhere, a cloudcore.yaml: the output is the same config."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "cloudcore.yaml")
        with open(path, "w") as f:
            f.write(
                "apiVersion: cloudcore.config.kubeedge.io/v1alpha2\n"
                "kind: CloudCore\n"
                "kubeAPIConfig: {kubeConfig: /root/.kube/config}\n"
                "modules:\n"
                "  edgeController: {enable: true}\n"
                "  cloudHub:\n"
                "    nodeLimit: 42\n"
                f"    tlsCAFile: {directory}/ca.crt\n"
                f"    tlsCAKeyFile: {directory}/ca.key\n"
                "    advertiseAddress: [10.0.0.1, '::1']\n"
                "    dnsNames: ['123', hub.example.com]\n"
                "    websocket: {port: 20000, address: 127.0.0.1}\n"
                "    quic: {enable: true, maxIncomingStreams: 7}\n"
                "    authorization: {enable: false, debug: true}\n"
                "hub:\n"
                f"  dataDir: {directory}/data dir\n"
                "  store: {type: memory}\n"
                "  api: {token: 's3cret: yes', port: 0}\n"
                "  maxMessageSize: 2048\n"
            )
        config = load_config(path)
        code, out, err = run(["check-config", "-c", path])
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("s3cret", out)
        self.assertIn("token: <redacted>", out)
        printed = parse_config(yaml.safe_load(out), path)
        redacted = replace(config.hub.api, token="<redacted>")
        self.assertEqual(printed, replace(config, hub=replace(config.hub, api=redacted)))
        self.assertEqual(printed.cloudhub.dns_names, ["123", "hub.example.com"])

    def test_empty_secret_not_redacted(self) -> None:
        _, printed = self.check(self.config_file())
        self.assertEqual(printed.hub.api.token, "")

    def test_bad_config_as_at_start_up(self) -> None:
        path = self.config_file(hub="  api: {port: 99999}\n")
        code, out, err = run(["check-config", "--config", path])
        self.assertEqual((code, out), (1, ""))
        with self.assertRaises(SystemExit) as caught:
            tap.makeService({"config": path})
        self.assertEqual(err, f"{caught.exception.code}\n")
        self.assertIn("hub.api.port: must be a port number", err)

    def test_missing_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        code, out, err = run(["check-config", "--config", path])
        self.assertEqual((code, out, err), (1, "", f"cloudhub: {path}: file not found\n"))
        self.assertFalse(os.path.exists(path))

    def test_existing_certificates_reported_not_touched(self) -> None:
        config = self.init(self.config_file())
        os.unlink(config.data_path(".certs.lock"))  # check-config must not make one
        before = tree(config.hub.data_dir)
        comments, _ = self.check(config.path)
        ca = CertificateAuthority.load(config)
        self.assertEqual(
            comments[1:],
            [
                f"# CA: {config.data_path('ca', 'rootCA.crt')} "
                f"(key {config.data_path('ca', 'rootCA.key')}), sha256 {ca.ca_hash}",
                f"# server certificate: {config.data_path('certs', 'server.crt')} (127.0.0.1, ::1)",
            ],
        )
        self.assertEqual(tree(config.hub.data_dir), before)

    def test_stale_server_certificate_reported(self) -> None:
        config = self.init(self.config_file())
        path = self.config_file("  advertiseAddress: [10.0.0.9]\n", data_dir=config.hub.data_dir)
        comments, _ = self.check(path)
        self.assertEqual(
            comments[2:],
            [
                f"# not using the server certificate {config.data_path('certs', 'server.crt')}: "
                "it lacks the configured names 10.0.0.9",
                f"# no usable server certificate: the hub creates one in "
                f"{config.data_path('certs')}",
            ],
        )

    def test_bad_certificate_file(self) -> None:
        config = self.init(self.config_file())
        os.unlink(config.data_path("certs", "server.key"))
        code, out, err = run(["check-config", "--config", config.path])
        self.assertEqual((code, out), (1, ""))
        self.assertIn(config.data_path("certs", "server.key"), err)
        self.assertIn("missing", err)


class SyncCommandTests(TestCase):
    def config_file(self) -> str:
        return write_config(self.mktemp())

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
        store.acknowledged("edge-1", "uid-4", 12, True)  # an acknowledged delete: a tombstone
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
        lines = stdout.getvalue().splitlines()
        self.assertEqual(len(lines), 5)
        [tombstone] = [line for line in lines if "uid-4" in line]
        self.assertIn("deleted@12", tombstone)

    def test_no_store_is_a_clear_error(self) -> None:
        path = self.config_file()
        self.assertEqual(cli.main(["sync", "--config", path]), 1)
