"""cloudhub.edge.bootstrap against the real certificate server: edgecore's first start."""

from __future__ import annotations

import os
import stat
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub.certs.authority import CertificateAuthority, issued_by
from cloudhub.certs.identity import certificate_node_names
from cloudhub.certs.token import TokenIssuer, issue_token
from cloudhub.edge.bootstrap import (
    EDGE_SUBJECT,
    EdgeCredentials,
    bootstrap,
    make_csr,
    new_key,
    renew,
)
from cloudhub.errors import CertificateError, TokenError
from tests.helpers_tls import Client, RunningServer, make_config, start_certificate_server


class BootstrapTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.config = make_config(self.mktemp())
        self.authority = CertificateAuthority.load_or_create(self.config)
        clock = Clock()
        clock.advance(reactor.seconds())  # type: ignore[attr-defined]
        self.tokens = TokenIssuer(self.authority, 12, clock)
        self.server: RunningServer = await start_certificate_server(
            self, self.authority, self.tokens, clock
        )
        self.token = issue_token(self.config)

    async def test_bootstrap(self) -> None:
        credentials = await bootstrap(reactor, self.server.url, self.token, "edge-node-1")
        ca_body = (
            await Client(self, self.authority.ca_pem).request(self.server.url + "/ca.crt")
        ).body
        ca = x509.load_der_x509_certificate(ca_body)
        self.assertEqual(x509.load_pem_x509_certificate(credentials.ca_pem), ca)
        cert = credentials.certificate
        self.assertTrue(issued_by(cert, ca))
        self.assertEqual(cert.subject.rfc4514_string(), "CN=kubeedge.io,O=kubeEdge")
        self.assertEqual(
            list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        self.assertEqual(cert.not_valid_after_utc - cert.not_valid_before_utc, timedelta(days=365))
        key = serialization.load_pem_private_key(credentials.key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertEqual(cert.public_key(), key.public_key())
        self.assertEqual(self.server.site.counters.issued, 1)
        # Issue 18, node identity: the NodeName it sends is named in the certificate.
        self.assertEqual(certificate_node_names(cert), ("edge-node-1",))

    async def test_given_key(self) -> None:
        key = new_key()
        credentials = await bootstrap(reactor, self.server.url, self.token, "n", key=key)
        self.assertEqual(credentials.certificate.public_key(), key.public_key())

    async def test_renew(self) -> None:
        first = await bootstrap(reactor, self.server.url, self.token, "edge-node-1")
        second = await renew(reactor, self.server.url, first, "edge-node-1")
        self.assertEqual(second.ca_pem, first.ca_pem)
        self.assertNotEqual(second.key_pem, first.key_pem)
        self.assertNotEqual(second.certificate.serial_number, first.certificate.serial_number)
        self.assertTrue(issued_by(second.certificate, self.authority.ca_certificate))
        # The renewed certificate renews in turn, and keeps naming the node.
        third = await renew(reactor, self.server.url, second, "edge-node-1")
        self.assertEqual(self.server.site.counters.renewed, 2)
        for credentials in (first, second, third):
            self.assertEqual(certificate_node_names(credentials.certificate), ("edge-node-1",))

    async def test_renew_as_another_node_refused(self) -> None:
        first = await bootstrap(reactor, self.server.url, self.token, "edge-node-1")
        e = await self.assertFailure(
            renew(reactor, self.server.url, first, "edge-node-2"), CertificateError
        )
        self.assertIn("HTTP 403", str(e))
        self.assertIn("'edge-node-1'", str(e))

    async def test_renew_with_foreign_certificate(self) -> None:
        first = await bootstrap(reactor, self.server.url, self.token, "edge-node-1")
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        key = new_key()
        foreign = x509.load_der_x509_certificate(other.sign_csr(make_csr(key)))
        forged = EdgeCredentials(
            first.ca_pem,
            foreign.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        )
        e = await self.assertFailure(
            renew(reactor, self.server.url, forged, "edge-node-1"), CertificateError
        )
        self.assertIn("HTTP 401", str(e))

    async def test_ca_hash_mismatch(self) -> None:
        bad = "0" * 64 + "." + self.token.split(".", 1)[1]
        e = await self.assertFailure(
            bootstrap(reactor, self.server.url, bad, "edge-node-1"), CertificateError
        )
        self.assertIn("failed to validate CA certificate", str(e))
        self.assertIn(self.authority.ca_hash, str(e))
        self.assertEqual(self.server.site.counters.issued, 0)

    async def test_token_refused(self) -> None:
        other_config = make_config(self.mktemp())
        CertificateAuthority.load_or_create(other_config)  # another hub's CA
        other = issue_token(other_config)
        # Right CA hash, JWT signed by another CA's key.
        forged = self.authority.ca_hash + "." + other.split(".", 1)[1]
        e = await self.assertFailure(
            bootstrap(reactor, self.server.url, forged, "edge-node-1"), TokenError
        )
        self.assertIn("Invalid authorization token", str(e))

    async def test_hostname_checked(self) -> None:
        """The server certificate names 127.0.0.1 and ::1, not 'localhost' (D3)."""
        url = f"https://localhost:{self.server.port}"
        e = await self.assertFailure(
            bootstrap(reactor, url, self.token, "edge-node-1"), CertificateError
        )
        self.assertIn("failed to get edge certificate", str(e))
        self.assertIn("VerificationError", str(e))
        self.assertEqual(self.server.site.counters.issued, 0)


class NoServerTests(TestCase):
    async def test_wrong_format_token_needs_no_network(self) -> None:
        for token in ("abc.def", "a.b.c", ""):
            e = await self.assertFailure(
                bootstrap(reactor, "https://127.0.0.1:1", token, "n"), TokenError
            )
            self.assertIn("wrong format", str(e))

    async def test_nothing_listening(self) -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        number = port.getHost().port
        await port.stopListening()
        token = "a" * 64 + ".x.y.z"
        e = await self.assertFailure(
            bootstrap(reactor, f"https://127.0.0.1:{number}", token, "n"), CertificateError
        )
        self.assertIn("failed to get CA certificate", str(e))

    async def test_bad_url(self) -> None:
        e = await self.assertFailure(
            bootstrap(reactor, "http://127.0.0.1:1", "a.b.c.d", "n"), CertificateError
        )
        self.assertIn("https://", str(e))


class FilesTests(SynchronousTestCase):
    def test_save_and_load(self) -> None:
        authority = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        key = new_key()
        cert = x509.load_der_x509_certificate(authority.sign_csr(make_csr(key)))
        credentials = EdgeCredentials(
            authority.ca_pem,
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        )
        directory = os.path.join(self.mktemp(), "certs")
        credentials.save(directory)
        self.assertEqual(sorted(os.listdir(directory)), ["rootCA.crt", "server.crt", "server.key"])
        mode = stat.S_IMODE(os.stat(os.path.join(directory, "server.key")).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(EdgeCredentials.load(directory), credentials)

    def test_load_missing(self) -> None:
        directory = self.mktemp()
        e = self.assertRaises(CertificateError, EdgeCredentials.load, directory)
        self.assertIn("rootCA.crt", str(e))

    def test_csr_like_edgecore(self) -> None:
        key = new_key()
        csr = x509.load_der_x509_csr(make_csr(key))
        self.assertEqual(csr.subject, EDGE_SUBJECT)
        self.assertEqual(
            csr.subject.rfc4514_string(), "CN=kubeedge.io,O=kubeEdge,L=Hangzhou,ST=Zhejiang,C=CN"
        )
        self.assertTrue(csr.is_signature_valid)
        self.assertEqual(csr.public_key(), key.public_key())
