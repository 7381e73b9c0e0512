"""CertificateAuthority: created like cloudcore's, kept on disk, loaded again, signs like it."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cloudhub.certs.authority import (
    CertificateAuthority,
    _create_files_once,
    issued_by,
    pem_block,
    write_atomically,
)
from cloudhub.errors import CertificateError
from tests.helpers_tls import EDGECORE_CSR_DER, csr_for, make_config, sign_client_cert

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def fixed(now: datetime = NOW) -> Any:
    return lambda: now


def ext(cert: x509.Certificate, kind: type) -> Any:
    return cert.extensions.get_extension_for_class(kind)


def sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = ext(cert, x509.SubjectAlternativeName).value
    return (
        set(san.get_values_for_type(x509.DNSName)),
        {str(ip) for ip in san.get_values_for_type(x509.IPAddress)},
    )


def read(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


class GeneratedTests(SynchronousTestCase):
    """No files configured: a CA and server certificate are created under dataDir."""

    def setUp(self) -> None:
        self.base = self.mktemp()
        self.config = make_config(self.base)
        self.authority = CertificateAuthority.load_or_create(self.config)

    def test_ca_like_cloudcore(self) -> None:
        ca = self.authority.ca_certificate
        self.assertIsInstance(ca.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(ca.public_key().curve.name, "secp256r1")  # type: ignore[union-attr]
        self.assertEqual(ca.subject.rfc4514_string(), "CN=KubeEdge")
        self.assertEqual(ca.issuer, ca.subject)
        self.assertTrue(issued_by(ca, ca))
        self.assertTrue(ext(ca, x509.BasicConstraints).value.ca)
        usage = ext(ca, x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign and usage.digital_signature and usage.key_encipherment)
        life = ca.not_valid_after_utc - ca.not_valid_before_utc
        self.assertEqual(life, timedelta(days=36500))
        self.assertLess(ca.serial_number, 2**63)

    def test_server_certificate(self) -> None:
        cert = self.authority.server_certificate
        self.assertEqual(
            {a.oid: a.value for a in cert.subject},
            {NameOID.COMMON_NAME: "KubeEdge", NameOID.ORGANIZATION_NAME: "KubeEdge"},
        )
        self.assertEqual(cert.public_key().curve.name, "secp256r1")  # type: ignore[union-attr]
        self.assertEqual(
            list(ext(cert, x509.ExtendedKeyUsage).value), [ExtendedKeyUsageOID.SERVER_AUTH]
        )
        self.assertEqual(sans(cert), (set(), {"127.0.0.1", "::1"}))
        self.assertTrue(issued_by(cert, self.authority.ca_certificate))
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertEqual(life, timedelta(days=36500))
        self.assertLess(cert.serial_number, 2**63)

    def test_configured_names(self) -> None:
        config = make_config(
            self.mktemp(), advertiseAddress=["10.0.0.5"], dnsNames=["hub.example.com", ""]
        )
        authority = CertificateAuthority.load_or_create(config)
        self.assertEqual(sans(authority.server_certificate), ({"hub.example.com"}, {"10.0.0.5"}))

    def test_files(self) -> None:
        data = self.config.hub.data_dir
        for name, mode in [
            ("ca/rootCA.crt", 0o644),
            ("ca/rootCA.key", 0o600),
            ("certs/server.crt", 0o644),
            ("certs/server.key", 0o600),
        ]:
            path = os.path.join(data, name)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), mode, name)
        kind, der = pem_block(read(os.path.join(data, "ca/rootCA.key")), "key")
        self.assertEqual(kind, "EC PRIVATE KEY")
        self.assertEqual(der, self.authority.ca_key_der)
        self.assertEqual(read(os.path.join(data, "ca/rootCA.crt")), self.authority.ca_pem)
        leftovers = [n for n in os.listdir(data) if n.startswith(".") and n != ".certs.lock"]
        self.assertEqual(leftovers, [])

    def test_ca_key_der_is_sec1(self) -> None:
        key = serialization.load_der_private_key(self.authority.ca_key_der, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        sec1 = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        self.assertEqual(sec1, self.authority.ca_key_der)

    def test_restart_same_everything(self) -> None:
        again = CertificateAuthority.load_or_create(self.config)
        self.assertEqual(again.ca_der, self.authority.ca_der)
        self.assertEqual(again.ca_key_der, self.authority.ca_key_der)
        self.assertEqual(again.server_certificate, self.authority.server_certificate)
        self.assertEqual(again.server_key_pem, self.authority.server_key_pem)

    def test_ca_hash(self) -> None:
        import hashlib

        self.assertEqual(self.authority.ca_hash, hashlib.sha256(self.authority.ca_der).hexdigest())

    def test_new_names_regenerate_server_certificate(self) -> None:
        config = make_config(self.base, advertiseAddress=["10.0.0.7"])
        again = CertificateAuthority.load_or_create(config)
        self.assertEqual(again.ca_der, self.authority.ca_der)
        self.assertNotEqual(again.server_certificate, self.authority.server_certificate)
        self.assertEqual(sans(again.server_certificate)[1], {"10.0.0.7"})
        self.assertEqual(read(config.data_path("certs", "server.crt")), again.server_cert_pem)

    def test_foreign_server_certificate_regenerated(self) -> None:
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        write_atomically(self.config.data_path("certs", "server.crt"), other.server_cert_pem)
        write_atomically(self.config.data_path("certs", "server.key"), other.server_key_pem, 0o600)
        again = CertificateAuthority.load_or_create(self.config)
        self.assertTrue(issued_by(again.server_certificate, again.ca_certificate))
        self.assertNotEqual(again.server_certificate, other.server_certificate)

    def test_mismatched_server_key_regenerated(self) -> None:
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        write_atomically(self.config.data_path("certs", "server.key"), other.server_key_pem, 0o600)
        again = CertificateAuthority.load_or_create(self.config)
        self.assertNotEqual(again.server_certificate, self.authority.server_certificate)
        self.assertTrue(issued_by(again.server_certificate, again.ca_certificate))

    def test_half_pair_is_an_error(self) -> None:
        for name in ("ca/rootCA.key", "ca/rootCA.crt", "certs/server.key"):
            base = self.mktemp()
            config = make_config(base)
            CertificateAuthority.load_or_create(config)
            os.unlink(config.data_path(*name.split("/")))
            e = self.assertRaises(CertificateError, CertificateAuthority.load_or_create, config)
            self.assertIn(config.data_path(*name.split("/")), str(e))

    def test_unwritable_data_dir(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        with open(os.path.join(base, "data"), "w") as stream:
            stream.write("a file where the data directory should be")
        e = self.assertRaises(
            CertificateError, CertificateAuthority.load_or_create, make_config(base)
        )
        self.assertIn(os.path.join(base, "data"), str(e))

    def test_configured_half_pair_is_an_error(self) -> None:
        base = self.mktemp()
        config = make_config(base)
        os.makedirs(os.path.dirname(config.cloudhub.tls_ca_file))
        write_atomically(config.cloudhub.tls_ca_file, self.authority.ca_pem)
        e = self.assertRaises(CertificateError, CertificateAuthority.load_or_create, config)
        self.assertIn(config.cloudhub.tls_ca_key_file, str(e))


class ConfiguredFilesTests(SynchronousTestCase):
    """tlsCAFile and friends exist: they are used as they are (§4.2)."""

    def _rsa_ca(self, base: str) -> tuple[Any, rsa.RSAPrivateKey, bytes]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Operator CA")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(7)
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        pkcs8 = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        config = make_config(base)
        write_atomically(config.cloudhub.tls_ca_file, cert.public_bytes(serialization.Encoding.PEM))
        write_atomically(config.cloudhub.tls_ca_key_file, pkcs8, 0o600)
        return cert, key, pkcs8

    def test_rsa_pkcs8_ca(self) -> None:
        base = self.mktemp()
        cert, key, pkcs8 = self._rsa_ca(base)
        config = make_config(base)
        authority = CertificateAuthority.load_or_create(config)
        self.assertEqual(authority.ca_certificate, cert)
        # §5.4: the HMAC key is the DER inside the PEM block, whatever its format.
        self.assertEqual(authority.ca_key_der, pem_block(pkcs8, "k")[1])
        self.assertEqual(
            authority.ca_key_der,
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        self.assertTrue(issued_by(authority.server_certificate, cert))
        signed = x509.load_der_x509_certificate(authority.sign_csr(EDGECORE_CSR_DER))
        self.assertTrue(issued_by(signed, cert))
        # Nothing was generated in place of the operator's CA.
        self.assertFalse(os.path.exists(config.data_path("ca")))

    def test_configured_server_certificate_used(self) -> None:
        base = self.mktemp()
        first = CertificateAuthority.load_or_create(make_config(base))
        config = make_config(base)
        for source, target in [
            (config.data_path("ca", "rootCA.crt"), config.cloudhub.tls_ca_file),
            (config.data_path("ca", "rootCA.key"), config.cloudhub.tls_ca_key_file),
            (config.data_path("certs", "server.crt"), config.cloudhub.tls_cert_file),
            (config.data_path("certs", "server.key"), config.cloudhub.tls_private_key_file),
        ]:
            write_atomically(target, read(source), 0o600)
            os.unlink(source)
        again = CertificateAuthority.load_or_create(config)
        self.assertEqual(again.ca_der, first.ca_der)
        self.assertEqual(again.server_certificate, first.server_certificate)
        self.assertFalse(os.path.exists(config.data_path("certs", "server.crt")))

    def test_configured_server_certificate_without_names_is_replaced(self) -> None:
        base = self.mktemp()
        first = CertificateAuthority.load_or_create(make_config(base))
        config = make_config(base, advertiseAddress=["10.1.2.3"])
        write_atomically(config.cloudhub.tls_cert_file, first.server_cert_pem)
        write_atomically(config.cloudhub.tls_private_key_file, first.server_key_pem, 0o600)
        again = CertificateAuthority.load_or_create(config)
        self.assertEqual(sans(again.server_certificate)[1], {"10.1.2.3"})
        # The operator's file is left alone; ours is under dataDir.
        self.assertEqual(read(config.cloudhub.tls_cert_file), first.server_cert_pem)
        self.assertEqual(read(config.data_path("certs", "server.crt")), again.server_cert_pem)

    def test_bad_files(self) -> None:
        cases = {
            b"not pem at all": "no PEM block",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n": "base64",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n": "certificate",
        }
        for content, reason in cases.items():
            base = self.mktemp()
            self._rsa_ca(base)
            config = make_config(base)
            write_atomically(config.cloudhub.tls_ca_file, content)
            e = self.assertRaises(CertificateError, CertificateAuthority.load_or_create, config)
            self.assertIn(config.cloudhub.tls_ca_file, str(e))
            self.assertIn(reason, str(e))

    def test_encrypted_key(self) -> None:
        base = self.mktemp()
        self._rsa_ca(base)
        config = make_config(base)
        write_atomically(
            config.cloudhub.tls_ca_key_file,
            b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
            b"DEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        e = self.assertRaises(CertificateError, CertificateAuthority.load_or_create, config)
        self.assertIn("encrypted", str(e))
        self.assertIn(config.cloudhub.tls_ca_key_file, str(e))

    def test_key_of_another_ca(self) -> None:
        base = self.mktemp()
        self._rsa_ca(base)
        config = make_config(base)
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_atomically(
            config.cloudhub.tls_ca_key_file,
            other.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        )
        e = self.assertRaises(CertificateError, CertificateAuthority.load_or_create, config)
        self.assertIn("does not belong", str(e))


class ReadOnlyLoadTests(SynchronousTestCase):
    """load and load_ca: the tools read what the hub would use, and never create a file."""

    def setUp(self) -> None:
        self.base = self.mktemp()
        self.config = make_config(self.base)

    def created(self) -> CertificateAuthority:
        authority = CertificateAuthority.load_or_create(self.config)
        os.unlink(self.config.data_path(".certs.lock"))
        return authority

    def assertNothingCreated(self) -> None:
        self.assertFalse(os.path.exists(self.base))

    def test_same_as_load_or_create(self) -> None:
        hub = self.created()
        before = sorted(os.walk(self.config.hub.data_dir))
        loaded = CertificateAuthority.load(self.config, clock=fixed())
        self.assertEqual(loaded.ca_der, hub.ca_der)
        self.assertEqual(loaded.ca_key_der, hub.ca_key_der)
        self.assertEqual(loaded.server_certificate, hub.server_certificate)
        self.assertEqual(loaded.server_key_pem, hub.server_key_pem)
        self.assertEqual(loaded.signing_days, 365)
        self.assertEqual(loaded.clock(), NOW)
        root = CertificateAuthority.load_ca(self.config)
        self.assertEqual(
            (root.ca_der, root.ca_hash, root.ca_key_der),
            (hub.ca_der, hub.ca_hash, hub.ca_key_der),
        )
        self.assertEqual(root.path, self.config.data_path("ca", "rootCA.crt"))
        self.assertEqual(root.key_path, self.config.data_path("ca", "rootCA.key"))
        # No lock file, nothing else.
        self.assertEqual(sorted(os.walk(self.config.hub.data_dir)), before)

    def test_no_ca(self) -> None:
        for load in (CertificateAuthority.load, CertificateAuthority.load_ca):
            e = self.assertRaises(CertificateError, load, self.config)
            message = str(e)
            self.assertTrue(message.startswith("no CA yet (looked for "), message)
            for path in (
                self.config.cloudhub.tls_ca_file,
                self.config.cloudhub.tls_ca_key_file,
                self.config.data_path("ca", "rootCA.crt"),
                self.config.data_path("ca", "rootCA.key"),
            ):
                self.assertIn(path, message)
            self.assertIn(
                f"start the hub once (it creates one in {self.config.data_path('ca')})", message
            )
            self.assertNotIn("\n", message)
            self.assertNothingCreated()

    def test_how_to_init_names_the_config(self) -> None:
        for path, command in [
            ("<defaults>", "`cloudhub init`"),
            ("<config>", "`cloudhub init --config FILE`"),
            ("/etc/cloud hub.yaml", "`cloudhub init --config '/etc/cloud hub.yaml'`"),
        ]:
            config = replace(self.config, path=path)
            e = self.assertRaises(CertificateError, CertificateAuthority.load_ca, config)
            self.assertTrue(str(e).endswith(f"or run {command}"), str(e))

    def test_no_ca_in_existing_empty_data_dir(self) -> None:
        os.makedirs(self.config.hub.data_dir)
        self.assertRaises(CertificateError, CertificateAuthority.load_ca, self.config)
        self.assertEqual(os.listdir(self.config.hub.data_dir), [])

    def test_configured_ca(self) -> None:
        """The operator's tlsCAFile pair is found first, as the hub does; dataDir is not made."""
        cert, _, pkcs8 = ConfiguredFilesTests._rsa_ca(ConfiguredFilesTests(), self.base)
        root = CertificateAuthority.load_ca(self.config)
        self.assertEqual(root.certificate, cert)
        self.assertEqual(root.path, self.config.cloudhub.tls_ca_file)
        self.assertEqual(root.ca_key_der, pem_block(pkcs8, "k")[1])
        # The server pair does not exist yet: load says so and names both places.
        e = self.assertRaises(CertificateError, CertificateAuthority.load, self.config)
        self.assertIn(
            f"no usable server certificate (no {self.config.cloudhub.tls_cert_file} or "
            f"{self.config.data_path('certs', 'server.crt')})",
            str(e),
        )
        self.assertFalse(os.path.exists(self.config.hub.data_dir))

    def test_ca_without_server_pair(self) -> None:
        hub = self.created()
        for name in ("server.crt", "server.key"):
            os.unlink(self.config.data_path("certs", name))
        self.assertEqual(CertificateAuthority.load_ca(self.config).ca_der, hub.ca_der)
        e = self.assertRaises(CertificateError, CertificateAuthority.load, self.config)
        self.assertIn("no usable server certificate", str(e))
        self.assertIn("start the hub once (it creates one in", str(e))
        self.assertEqual(os.listdir(self.config.data_path("certs")), [])

    def test_stale_server_pair_left_alone(self) -> None:
        hub = self.created()
        config = make_config(self.base, advertiseAddress=["10.0.0.7"])
        e = self.assertRaises(CertificateError, CertificateAuthority.load, config)
        self.assertIn(
            f"{config.data_path('certs', 'server.crt')}: it lacks the configured names 10.0.0.7",
            str(e),
        )
        self.assertEqual(read(config.data_path("certs", "server.crt")), hub.server_cert_pem)
        self.assertEqual(CertificateAuthority.load_ca(config).ca_der, hub.ca_der)

    def test_same_errors_as_load_or_create(self) -> None:
        """Half a pair, a bad file, a key of another certificate: the hub's own message."""

        def half(config: Any) -> None:
            os.unlink(config.data_path("ca", "rootCA.key"))

        def garbage(config: Any) -> None:
            write_atomically(config.data_path("ca", "rootCA.crt"), b"not pem at all")

        def other_key(config: Any) -> None:
            other = make_config(self.mktemp())
            CertificateAuthority.load_or_create(other)
            write_atomically(
                config.data_path("ca", "rootCA.key"), read(other.data_path("ca", "rootCA.key"))
            )

        for damage in (half, garbage, other_key):
            config = make_config(self.mktemp())
            CertificateAuthority.load_or_create(config)
            damage(config)
            expected = str(
                self.assertRaises(CertificateError, CertificateAuthority.load_or_create, config)
            )
            for load in (CertificateAuthority.load, CertificateAuthority.load_ca):
                e = self.assertRaises(CertificateError, load, config)
                self.assertEqual(str(e), expected, damage.__name__)

    def test_configured_half_pair(self) -> None:
        os.makedirs(os.path.dirname(self.config.cloudhub.tls_ca_key_file))
        write_atomically(self.config.cloudhub.tls_ca_key_file, b"key")
        e = self.assertRaises(CertificateError, CertificateAuthority.load_ca, self.config)
        self.assertIn(f"{self.config.cloudhub.tls_ca_file}: missing", str(e))
        self.assertFalse(os.path.exists(self.config.hub.data_dir))

    def test_unsearchable_directory_is_not_no_ca(self) -> None:
        if os.geteuid() == 0:
            raise SkipTest("root may look into any directory")
        self.created()
        os.chmod(self.config.data_path("ca"), 0)
        self.addCleanup(os.chmod, self.config.data_path("ca"), 0o755)
        e = self.assertRaises(CertificateError, CertificateAuthority.load_ca, self.config)
        self.assertIn("cannot look for it", str(e))


class SignTests(SynchronousTestCase):
    """sign_csr: what cloudcore puts in an edge certificate (§5.2)."""

    def setUp(self) -> None:
        self.config = make_config(self.mktemp())
        self.authority = CertificateAuthority.load_or_create(self.config, clock=fixed())

    def sign(self, csr: bytes = EDGECORE_CSR_DER, usages: Any = None) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.authority.sign_csr(csr, usages, "edge-node-1"))

    def test_captured_edgecore_csr(self) -> None:
        cert = self.sign()
        csr = x509.load_der_x509_csr(EDGECORE_CSR_DER)
        self.assertTrue(issued_by(cert, self.authority.ca_certificate))
        self.assertEqual(cert.issuer, self.authority.ca_certificate.subject)
        # Only CN and O survive.
        self.assertEqual(cert.subject.rfc4514_string(), "CN=kubeedge.io,O=kubeEdge")
        self.assertEqual(cert.public_key(), csr.public_key())
        self.assertEqual(cert.not_valid_before_utc, NOW)
        self.assertEqual(cert.not_valid_after_utc, NOW + timedelta(days=365))
        self.assertEqual(
            list(ext(cert, x509.ExtendedKeyUsage).value), [ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        usage = ext(cert, x509.KeyUsage).value
        self.assertTrue(usage.digital_signature and usage.key_encipherment)
        self.assertFalse(usage.key_cert_sign)
        self.assertEqual(cert.signature_hash_algorithm.name, "sha256")  # type: ignore[union-attr]
        self.assertTrue(0 < cert.serial_number < 2**63)
        # Beyond cloudcore (issue 18, node identity): the node, as the one SAN, a URI.
        san = ext(cert, x509.SubjectAlternativeName)
        self.assertFalse(san.critical)
        self.assertEqual(
            list(san.value), [x509.UniformResourceIdentifier("urn:cloudhub:node:edge-node-1")]
        )

    def test_no_node_name_no_san(self) -> None:
        """Without a node name the certificate is cloudcore's: no SAN at all."""
        cert = x509.load_der_x509_certificate(self.authority.sign_csr(EDGECORE_CSR_DER))
        self.assertEqual(cert.subject.rfc4514_string(), "CN=kubeedge.io,O=kubeEdge")
        self.assertRaises(
            x509.ExtensionNotFound,
            cert.extensions.get_extension_for_class,
            x509.SubjectAlternativeName,
        )
        self.assertEqual(len(cert.extensions), 3)

    def test_node_name_validated(self) -> None:
        for bad in ("Edge-1", "a..b", "a/b", "-a", "n\u00f6de", "x" * 254, "a." + "b" * 64):
            e = self.assertRaises(
                CertificateError, self.authority.sign_csr, EDGECORE_CSR_DER, None, bad
            )
            self.assertIn("invalid node name", str(e))
        longest = ".".join(["a" * 63] * 3 + ["b" * 61])
        cert = x509.load_der_x509_certificate(
            self.authority.sign_csr(EDGECORE_CSR_DER, None, longest)
        )
        self.assertEqual(
            ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier
            ),
            ["urn:cloudhub:node:" + longest],
        )

    def test_serials_differ(self) -> None:
        self.assertNotEqual(self.sign().serial_number, self.sign().serial_number)

    def test_signing_duration(self) -> None:
        config = make_config(self.mktemp(), edgeCertSigningDuration=30)
        authority = CertificateAuthority.load_or_create(config, clock=fixed())
        cert = x509.load_der_x509_certificate(authority.sign_csr(EDGECORE_CSR_DER))
        self.assertEqual(cert.not_valid_after_utc - cert.not_valid_before_utc, timedelta(days=30))

    def test_ext_key_usages(self) -> None:
        for numbers, expected in [
            ([1], [ExtendedKeyUsageOID.SERVER_AUTH]),
            ([2, 1], [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
            ([], [ExtendedKeyUsageOID.CLIENT_AUTH]),
        ]:
            cert = self.sign(usages=numbers)
            self.assertEqual(list(ext(cert, x509.ExtendedKeyUsage).value), expected)
        for bad in ([3], [0], [2, 9], [True]):
            e = self.assertRaises(CertificateError, self.sign, usages=bad)
            self.assertIn("extended key usage", str(e))

    def test_subject_and_sans_not_copied(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ou"),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "a"),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "b"),
                        x509.NameAttribute(NameOID.COMMON_NAME, "node"),
                    ]
                )
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("1.2.3.4"))]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        cert = self.sign(csr)
        self.assertEqual(cert.subject.rfc4514_string(), "CN=node,O=b,O=a")
        # key usage, EKU, authority key id, and the hub's SAN naming the node: only that.
        self.assertEqual(len(cert.extensions), 4)
        self.assertEqual(
            list(ext(cert, x509.SubjectAlternativeName).value),
            [x509.UniformResourceIdentifier("urn:cloudhub:node:edge-node-1")],
        )

    def test_rsa_csr(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = self.sign(csr_for(key))  # type: ignore[arg-type]
        self.assertEqual(cert.public_key(), key.public_key())

    def test_strong_keys_signed(self) -> None:
        """What edgecore sends (ECDSA P-256, the captured CSR) and the other strong keys pass."""
        self.sign()
        for key in (
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP384R1()),
            rsa.generate_private_key(public_exponent=65537, key_size=3072),
        ):
            cert = self.sign(csr_for(key))  # type: ignore[arg-type]
            self.assertEqual(cert.public_key(), key.public_key())

    def test_weak_keys_refused(self) -> None:
        """Issue 18 finding 11: RSA under 2048 bits and curves other than P-256/P-384 refused,
        with a reason naming the key."""
        for key, named in [
            (rsa.generate_private_key(public_exponent=65537, key_size=1024), "RSA-1024"),
            (rsa.generate_private_key(public_exponent=65537, key_size=2040), "RSA-2040"),
            (ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
            (ec.generate_private_key(ec.SECP224R1()), "secp224r1"),
            (ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
            (ec.generate_private_key(ec.BrainpoolP256R1()), "brainpoolP256r1"),
        ]:
            e = self.assertRaises(CertificateError, self.sign, csr_for(key))  # type: ignore[arg-type]
            self.assertIn(named, str(e))
            self.assertIn("edge-node-1", str(e))
            self.assertIn("weak", str(e))

    def test_ed25519_refused(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = ed25519.Ed25519PrivateKey.generate()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")]))
            .sign(key, None)
            .public_bytes(serialization.Encoding.DER)
        )
        e = self.assertRaises(CertificateError, self.sign, csr)
        self.assertIn("Ed25519", str(e))

    def test_garbage(self) -> None:
        for garbage in (b"", b"hello", EDGECORE_CSR_DER[:-5], b"\x30\x03\x02\x01\x00"):
            e = self.assertRaises(CertificateError, self.sign, garbage)
            self.assertIn("edge-node-1", str(e))

    def test_bad_signature(self) -> None:
        tampered = bytearray(EDGECORE_CSR_DER)
        tampered[-3] ^= 0x01  # inside the signature's s value
        e = self.assertRaises(CertificateError, self.sign, bytes(tampered))
        self.assertIn("invalid signature", str(e))
        tampered = bytearray(EDGECORE_CSR_DER)
        tampered[0x60] ^= 0x01  # inside the subject ("kubeedge.io")
        e = self.assertRaises(CertificateError, self.sign, bytes(tampered))
        self.assertIn("invalid signature", str(e))


class VerifyClientTests(SynchronousTestCase):
    """verify_client_certificate: the renewal path's check (§5.2 step 1)."""

    def setUp(self) -> None:
        self.now = NOW
        self.authority = CertificateAuthority.load_or_create(
            make_config(self.mktemp()), clock=lambda: self.now
        )
        self.cert = x509.load_der_x509_certificate(self.authority.sign_csr(EDGECORE_CSR_DER))

    def test_good(self) -> None:
        self.authority.verify_client_certificate(self.cert)
        # As a TLS transport hands it over.
        self.authority.verify_client_certificate(X509.from_cryptography(self.cert))

    def test_foreign_ca(self) -> None:
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()), clock=fixed())
        foreign = x509.load_der_x509_certificate(other.sign_csr(EDGECORE_CSR_DER))
        e = self.assertRaises(CertificateError, self.authority.verify_client_certificate, foreign)
        self.assertIn("not signed by this hub's CA", str(e))

    def test_same_name_other_key(self) -> None:
        """A forged CA with our CA's name does not pass: the signature decides."""
        ca = self.authority.ca_certificate
        forger = ec.generate_private_key(ec.SECP256R1())
        fake = sign_client_cert(
            ca, forger, ec.generate_private_key(ec.SECP256R1()), NOW, timedelta(days=1)
        )
        self.assertRaises(CertificateError, self.authority.verify_client_certificate, fake)

    def test_expired_and_not_yet_valid(self) -> None:
        self.now = NOW + timedelta(days=366)
        e = self.assertRaises(CertificateError, self.authority.verify_client_certificate, self.cert)
        self.assertIn("expired", str(e))
        self.now = NOW - timedelta(seconds=1)
        e = self.assertRaises(CertificateError, self.authority.verify_client_certificate, self.cert)
        self.assertIn("not valid before", str(e))

    def test_server_auth_only(self) -> None:
        server_only = x509.load_der_x509_certificate(self.authority.sign_csr(EDGECORE_CSR_DER, [1]))
        e = self.assertRaises(
            CertificateError, self.authority.verify_client_certificate, server_only
        )
        self.assertIn("ClientAuth", str(e))


def _start_hub(base: str, barrier: Any, results: Any) -> None:
    """One 'hub process': wait for the other, then load-or-create on the shared dataDir."""
    try:
        barrier.wait(timeout=30)
        authority = CertificateAuthority.load_or_create(make_config(base))
        results.put(
            (
                os.getpid(),
                authority.ca_der,
                authority.server_certificate.fingerprint(hashes.SHA256()),
            )
        )
    except BaseException as e:  # report, so the parent fails with the reason
        results.put((os.getpid(), repr(e), b""))


class ConcurrentStartTests(SynchronousTestCase):
    """Two hubs started at the same moment on one empty dataDir end with one CA."""

    ROUNDS = 5

    def race(self) -> list[tuple[int, bytes, bytes]]:
        context = multiprocessing.get_context("fork")
        rounds = []
        for _ in range(self.ROUNDS):
            base = self.mktemp()
            barrier = context.Barrier(2)
            results = context.Queue()
            processes = [
                context.Process(target=_start_hub, args=(base, barrier, results)) for _ in range(2)
            ]
            for p in processes:
                p.start()
            reports = [results.get(timeout=30) for _ in processes]
            for p in processes:
                p.join(timeout=30)
                self.assertEqual(p.exitcode, 0)
            for _, ca, _ in reports:
                self.assertIsInstance(ca, bytes, ca)
            self.assertEqual(reports[0][1], reports[1][1])
            # What they report is what is on disk, and the key on disk belongs to it.
            on_disk = CertificateAuthority.load_or_create(make_config(base))
            self.assertEqual(on_disk.ca_der, reports[0][1])
            rounds.extend(reports)
        return rounds

    def test_one_ca_and_one_server_certificate(self) -> None:
        reports = self.race()
        for first, second in zip(reports[::2], reports[1::2], strict=True):
            self.assertEqual(first[2], second[2])


class FilesTests(SynchronousTestCase):
    def test_create_once_loser(self) -> None:
        directory = os.path.join(self.mktemp(), "ca")
        self.assertTrue(_create_files_once(directory, {"a": (b"1", 0o600), "b": (b"2", 0o644)}))
        self.assertFalse(_create_files_once(directory, {"a": (b"x", 0o600), "b": (b"y", 0o644)}))
        self.assertEqual(read(os.path.join(directory, "a")), b"1")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(directory, "a")).st_mode), 0o600)
        self.assertEqual(os.listdir(os.path.dirname(directory)), ["ca"])

    def test_create_once_into_existing_directory(self) -> None:
        directory = os.path.join(self.mktemp(), "ca")
        os.makedirs(directory)
        with open(os.path.join(directory, "README"), "w") as stream:
            stream.write("operator notes")
        self.assertTrue(_create_files_once(directory, {"a": (b"1", 0o600)}))
        self.assertEqual(sorted(os.listdir(directory)), ["README", "a"])

    def test_write_atomically(self) -> None:
        path = os.path.join(self.mktemp(), "x", "file")
        write_atomically(path, b"one", 0o600)
        write_atomically(path, b"two", 0o600)
        self.assertEqual(read(path), b"two")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["file"])
