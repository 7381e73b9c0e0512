"""The certificate server over real TLS on 127.0.0.1: what edgecore asks, and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub.certs.authority import CertificateAuthority, issued_by
from cloudhub.certs.identity import certificate_node_names
from cloudhub.certs.ratelimit import FailureLimiter
from cloudhub.certs.tls import client_tls_options
from cloudhub.certs.token import TokenIssuer, issue_token, make_token, split_token
from cloudhub.certs.web import IN_MEMORY_BODY, BoundedRequest
from tests.helpers_tls import (
    EDGECORE_CSR_DER,
    Client,
    RunningServer,
    csr_for,
    key_pem,
    load_ca_key,
    make_config,
    pem,
    raw_exchange,
    sign_client_cert,
    start_certificate_server,
    start_server,
)

MIB = 1024 * 1024


class CertificateServerTestCase(TestCase):
    """A hub's certificate server with a fresh CA, a token, and a client trusting the CA."""

    limiter_burst = 1000

    async def asyncSetUp(self, **site: Any) -> None:
        self.config = make_config(self.mktemp())
        self.authority = CertificateAuthority.load_or_create(self.config)
        self.clock = Clock()
        self.clock.advance(reactor.seconds())  # type: ignore[attr-defined]
        self.tokens = TokenIssuer(self.authority, 12, self.clock)
        self.token = issue_token(self.config)
        self.jwt = split_token(self.token)[1]
        self.upgrades: list[dict[str, Any]] = []
        site.setdefault("limiter", FailureLimiter(self.clock, burst=self.limiter_burst))
        site.setdefault("on_node_upgrade", self.upgrades.append)
        self.server: RunningServer = await start_certificate_server(
            self, self.authority, self.tokens, self.clock, **site
        )
        self.client = Client(self, self.authority.ca_pem)

    def url(self, path: str) -> str:
        return self.server.url + path

    async def edge_crt(
        self,
        csr: bytes = EDGECORE_CSR_DER,
        authorization: bytes | None = None,
        client: Client | None = None,
        **headers: bytes,
    ) -> Any:
        sent = {b"NodeName": b"edge-node-1"}
        if authorization is not None:
            sent[b"Authorization"] = authorization
        sent.update({k.encode(): v for k, v in headers.items()})
        return await (client or self.client).request(self.url("/edge.crt"), headers=sent, body=csr)

    def bearer(self, token: str | None = None) -> bytes:
        return b"Bearer " + (token or self.jwt).encode()


class BootstrapTests(CertificateServerTestCase):
    """The two requests of a fresh edgecore (http-bootstrap.txt)."""

    async def setUp(self) -> None:  # type: ignore[override]
        await self.asyncSetUp()

    async def test_ca_crt(self) -> None:
        response = await self.client.request(self.url("/ca.crt"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, self.authority.ca_der)
        self.assertEqual(response.header(b"content-type"), b"application/octet-stream")
        # The token's first part is the SHA-256 of exactly these bytes.
        self.assertEqual(hashlib.sha256(response.body).hexdigest(), self.token.split(".")[0])

    async def test_captured_csr_with_token(self) -> None:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        ca = x509.load_der_x509_certificate((await self.client.request(self.url("/ca.crt"))).body)

        response = await self.edge_crt(authorization=self.bearer())

        self.assertEqual(response.code, 200, response.body)
        cert = x509.load_der_x509_certificate(response.body)
        self.assertTrue(issued_by(cert, ca))
        self.assertEqual(cert.subject.rfc4514_string(), "CN=kubeedge.io,O=kubeEdge")
        self.assertEqual(
            list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        self.assertEqual(cert.not_valid_after_utc - cert.not_valid_before_utc, timedelta(days=365))
        self.assertEqual(cert.public_key(), x509.load_der_x509_csr(EDGECORE_CSR_DER).public_key())
        # Beyond cloudcore: the certificate names the node of the NodeName header.
        self.assertEqual(certificate_node_names(cert), ("edge-node-1",))
        self.assertEqual(self.server.site.counters.issued, 1)
        issued = [e for e in events if "issued edge certificate" in e.get("log_format", "")]
        self.assertEqual(len(issued), 1)
        self.assertEqual(issued[0]["node"], "edge-node-1")
        self.assertEqual(issued[0]["serial"], f"{cert.serial_number:x}")
        self.assertEqual(issued[0]["expiry"], cert.not_valid_after_utc.isoformat())

    async def test_new_edge_csr_with_tokens_of_the_issuer(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        token = split_token(self.tokens.current)[1]
        response = await self.edge_crt(csr_for(key), self.bearer(token))
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual(
            x509.load_der_x509_certificate(response.body).public_key(), key.public_key()
        )

    async def test_ext_key_usages_header(self) -> None:
        response = await self.edge_crt(authorization=self.bearer(), ExtKeyUsages=b"[1, 2]")
        self.assertEqual(response.code, 200, response.body)
        usages = x509.load_der_x509_certificate(response.body).extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        )
        self.assertEqual(
            list(usages.value), [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )

    async def test_keep_alive(self) -> None:
        """edgecore keeps its connections open; several requests share one."""
        for _ in range(3):
            self.assertEqual((await self.client.request(self.url("/ca.crt"))).code, 200)
        self.assertEqual(len(self.server.connections.protocols), 1)


class RenewalTests(CertificateServerTestCase):
    """§5.5: present the current certificate, no token."""

    async def setUp(self) -> None:  # type: ignore[override]
        await self.asyncSetUp()
        self.key = ec.generate_private_key(ec.SECP256R1())
        response = await self.edge_crt(csr_for(self.key), self.bearer())
        self.cert = x509.load_der_x509_certificate(response.body)

    def client_with(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Client:
        return Client(self, self.authority.ca_pem, pem(cert), key_pem(key))

    async def test_renew(self) -> None:
        new_key = ec.generate_private_key(ec.SECP256R1())
        response = await self.edge_crt(
            csr_for(new_key), client=self.client_with(self.cert, self.key)
        )
        self.assertEqual(response.code, 200, response.body)
        renewed = x509.load_der_x509_certificate(response.body)
        self.assertTrue(issued_by(renewed, self.authority.ca_certificate))
        self.assertEqual(renewed.public_key(), new_key.public_key())
        self.assertNotEqual(renewed.serial_number, self.cert.serial_number)
        self.assertEqual(self.server.site.counters.renewed, 1)
        self.assertEqual(self.server.site.counters.issued, 2)

    async def test_foreign_ca(self) -> None:
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        foreign = x509.load_der_x509_certificate(other.sign_csr(csr_for(self.key)))
        response = await self.edge_crt(client=self.client_with(foreign, self.key))
        self.assertEqual(response.code, 401)
        self.assertIn(b"not signed by this hub's CA", response.body)
        self.assertEqual(self.server.site.counters.cert_failures, 1)

    async def test_foreign_ca_with_a_valid_token_too(self) -> None:
        """A presented certificate is judged first, as in cloudcore; a token does not rescue it."""
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        foreign = x509.load_der_x509_certificate(other.sign_csr(csr_for(self.key)))
        response = await self.edge_crt(
            authorization=self.bearer(), client=self.client_with(foreign, self.key)
        )
        self.assertEqual(response.code, 401)

    async def test_expired(self) -> None:
        expired = sign_client_cert(
            self.authority.ca_certificate,
            load_ca_key(self.config),
            self.key,
            datetime.now(UTC) - timedelta(days=400),
            timedelta(days=365),
        )
        response = await self.edge_crt(client=self.client_with(expired, self.key))
        self.assertEqual(response.code, 401)
        self.assertIn(b"expired", response.body)

    async def test_server_auth_certificate(self) -> None:
        server_only = sign_client_cert(
            self.authority.ca_certificate,
            load_ca_key(self.config),
            self.key,
            datetime.now(UTC) - timedelta(days=1),
            timedelta(days=365),
            (ExtendedKeyUsageOID.SERVER_AUTH,),
        )
        response = await self.edge_crt(client=self.client_with(server_only, self.key))
        self.assertEqual(response.code, 401)


class NodeNameTests(CertificateServerTestCase):
    """Issue 18, node identity: the certificate names the node of NodeName; a renewal keeps
    the node its certificate names."""

    async def setUp(self) -> None:  # type: ignore[override]
        await self.asyncSetUp()
        self.key = ec.generate_private_key(ec.SECP256R1())

    def client_with(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Client:
        return Client(self, self.authority.ca_pem, pem(cert), key_pem(key))

    async def named(self, node: bytes) -> x509.Certificate:
        response = await self.edge_crt(csr_for(self.key), self.bearer(), NodeName=node)
        self.assertEqual(response.code, 200, response.body)
        return x509.load_der_x509_certificate(response.body)

    async def test_bootstrap_names_the_node(self) -> None:
        for node in (b"edge-a", b"edge-b.example.com"):
            cert = await self.named(node)
            self.assertEqual(certificate_node_names(cert), (node.decode(),))
            # KubeEdge's subject is kept (the CSR's CN and O).
            self.assertEqual(cert.subject.rfc4514_string(), "CN=kubeedge.io,O=kubeEdge")

    async def test_invalid_node_name_400(self) -> None:
        for node in (b"Edge-A", b"a..b", b"a/b", b"x" * 300, b"n\xc3\xb6de", b"n\xf6de", b"-a"):
            response = await self.edge_crt(authorization=self.bearer(), NodeName=node)
            self.assertEqual(response.code, 400, node)
            self.assertIn(b"NodeName", response.body)
        self.assertEqual(self.server.site.counters.bad_requests, 7)
        self.assertEqual(self.server.site.counters.issued, 0)

    async def test_token_without_node_name_400(self) -> None:
        for node in (b"", b"   "):
            response = await self.edge_crt(authorization=self.bearer(), NodeName=node)
            self.assertEqual(response.code, 400)
            self.assertIn(b"missing NodeName header", response.body)
        response = await self.client.request(
            self.url("/edge.crt"),
            headers={b"Authorization": self.bearer()},
            body=EDGECORE_CSR_DER,
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(self.server.site.counters.issued, 0)

    async def test_first_node_name_counts(self) -> None:
        """As Go's Header.Get: the first of repeated NodeName headers."""
        head = (
            b"GET /edge.crt HTTP/1.1\r\nHost: x\r\nAuthorization: " + self.bearer() + b"\r\n"
            b"NodeName: edge-first\r\nNodename: edge-second\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(EDGECORE_CSR_DER),)
        )
        answer = await raw_exchange(
            self.server.port, self.authority.ca_pem, [head + EDGECORE_CSR_DER], lambda r: False
        )
        status, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(status.startswith(b"HTTP/1.1 200 "), status)
        cert = x509.load_der_x509_certificate(body)
        self.assertEqual(certificate_node_names(cert), ("edge-first",))

    async def test_renewal_keeps_the_node(self) -> None:
        cert = await self.named(b"edge-a")
        for header in (b"edge-a", b""):
            new_key = ec.generate_private_key(ec.SECP256R1())
            response = await self.edge_crt(
                csr_for(new_key), client=self.client_with(cert, self.key), NodeName=header
            )
            self.assertEqual(response.code, 200, response.body)
            renewed = x509.load_der_x509_certificate(response.body)
            self.assertEqual(certificate_node_names(renewed), ("edge-a",))
            cert, self.key = renewed, new_key
        self.assertEqual(self.server.site.counters.renewed, 2)

    async def test_renewal_for_another_node_403(self) -> None:
        cert = await self.named(b"edge-a")
        response = await self.edge_crt(
            csr_for(ec.generate_private_key(ec.SECP256R1())),
            client=self.client_with(cert, self.key),
            NodeName=b"edge-b",
        )
        self.assertEqual(response.code, 403)
        self.assertIn(b"'edge-a'", response.body)
        counters = self.server.site.counters
        self.assertEqual((counters.node_names_refused, counters.cert_failures), (1, 1))
        self.assertEqual((counters.issued, counters.renewed), (1, 0))
        # A token does not change that: the presented certificate decides (as cloudcore).
        response = await self.edge_crt(
            authorization=self.bearer(), client=self.client_with(cert, self.key), NodeName=b"x"
        )
        self.assertEqual(response.code, 403)

    async def test_renewal_of_an_unnamed_certificate_names_node_name(self) -> None:
        """A certificate naming no node (cloudcore's from the same CA, or the hub's before node
        identity) renews into one naming NodeName: the way existing edges get named."""
        old = x509.load_der_x509_certificate(self.authority.sign_csr(csr_for(self.key)))
        self.assertEqual(certificate_node_names(old), ())
        response = await self.edge_crt(client=self.client_with(old, self.key), NodeName=b"edge-c")
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual(
            certificate_node_names(x509.load_der_x509_certificate(response.body)), ("edge-c",)
        )
        response = await self.edge_crt(client=self.client_with(old, self.key), NodeName=b"")
        self.assertEqual(response.code, 400)


class BadInputTests(CertificateServerTestCase):
    """Each bad request gets its status, nothing crashes, and the server goes on serving."""

    async def setUp(self) -> None:  # type: ignore[override]
        await self.asyncSetUp()

    async def assertStillServing(self) -> None:
        response = await self.edge_crt(authorization=self.bearer())
        self.assertEqual(response.code, 200, response.body)
        fresh = Client(self, self.authority.ca_pem)
        response = await fresh.request(
            self.url("/edge.crt"),
            headers={b"Authorization": self.bearer(), b"NodeName": b"edge-2"},
            body=EDGECORE_CSR_DER,
        )
        self.assertEqual(response.code, 200, response.body)

    def forged_tokens(self) -> dict[str, str]:
        key = self.authority.ca_key_der
        now = self.clock.seconds()
        exp = int(now) + 3600
        header, payload, signature = self.jwt.split(".")
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        return {
            "alg none": "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + payload + ".",
            "HS512": jwt.encode({"exp": exp}, key, algorithm="HS512"),
            "wrong key": jwt.encode({"exp": exp}, other.ca_key_der, algorithm="HS256"),
            "tampered": header + "." + payload[:-2] + "x" + payload[-1] + "." + signature,
            "expired": split_token(make_token(self.authority, now - 7200, 3600))[1],
            "garbage": "abc",
            "whole token": self.token,
        }

    async def test_authorization(self) -> None:
        cases: list[bytes | None] = [
            None,
            b"",
            b"Bearer",
            b"Bearer ",
            b"Bearer  " + self.jwt.encode(),
            b"Bearer " + self.jwt.encode() + b" extra",
            b"Basic " + self.jwt.encode(),
            self.jwt.encode(),
            b"Bearer \xff\xfe",
        ]
        cases += [self.bearer(token) for token in self.forged_tokens().values()]
        for authorization in cases:
            response = await self.edge_crt(authorization=authorization)
            self.assertEqual((authorization, response.code), (authorization, 401))
            self.assertEqual(response.body, b"Invalid authorization token")
        self.assertEqual(self.server.site.counters.token_failures, len(cases))
        self.assertEqual(self.server.site.counters.issued, 0)
        await self.assertStillServing()

    async def test_bad_csr(self) -> None:
        tampered = bytearray(EDGECORE_CSR_DER)
        tampered[-3] ^= 1
        for body, reason in [
            (b"", b"not a DER PKCS#10"),
            (b"-----BEGIN CERTIFICATE REQUEST-----", b"not a DER PKCS#10"),
            (EDGECORE_CSR_DER[:100], b"not a DER PKCS#10"),
            (bytes(tampered), b"invalid signature"),
        ]:
            response = await self.edge_crt(body, self.bearer())
            self.assertEqual(response.code, 400)
            self.assertIn(reason, response.body)
            self.assertIn(b"edge-node-1", response.body)
        self.assertEqual(self.server.site.counters.bad_requests, 4)
        await self.assertStillServing()

    async def test_weak_keys_refused(self) -> None:
        """Issue 18 finding 11: RSA-1024 and secp256k1 CSRs get 400 naming the key."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        for key, named in [
            (rsa.generate_private_key(public_exponent=65537, key_size=1024), b"RSA-1024"),
            (ec.generate_private_key(ec.SECP256K1()), b"secp256k1"),
        ]:
            response = await self.edge_crt(csr_for(key), self.bearer())  # type: ignore[arg-type]
            self.assertEqual(response.code, 400, response.body)
            self.assertIn(b"weak key", response.body)
            self.assertIn(named, response.body)
        self.assertEqual(self.server.site.counters.bad_requests, 2)
        self.assertEqual(self.server.site.counters.issued, 0)
        await self.assertStillServing()  # the captured edgecore CSR (ECDSA P-256) still passes

    async def test_bad_ext_key_usages(self) -> None:
        for value in (b"[3]", b"x", b'{"a": 1}', b"[true]", b'["2"]'):
            response = await self.edge_crt(authorization=self.bearer(), ExtKeyUsages=value)
            self.assertEqual(response.code, 400, value)
        await self.assertStillServing()

    async def test_not_found_and_method(self) -> None:
        for path in ("/", "/nope", "/ca.crt/x", "/ca.crt/", "/edge.crt/../x"):
            response = await self.client.request(self.url(path))
            self.assertEqual(response.code, 404, path)
        for method, path in [
            (b"POST", "/ca.crt"),
            (b"PUT", "/edge.crt"),
            (b"GET", "/nodeupgrade"),
            (b"DELETE", "/readyz"),
        ]:
            response = await self.client.request(self.url(path), method=method)
            self.assertEqual(response.code, 405, (method, path))
            self.assertTrue(response.header(b"allow"))
        await self.assertStillServing()

    async def test_oversized_body_refused_at_once(self) -> None:
        """413 right after the headers: the client sent 64 KiB of a declared 2 MiB."""
        head = (
            b"GET /edge.crt HTTP/1.1\r\nHost: x\r\nAuthorization: " + self.bearer() + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % (2 * MIB,)
        )
        expected = b"request body too large (limit 1048576 bytes)"
        answer = await raw_exchange(
            self.server.port, self.authority.ca_pem, [head, b"x" * 65536], lambda r: expected in r
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"Connection: close", answer)
        self.assertTrue(answer.endswith(expected), answer)
        self.assertEqual(self.server.site.counters.too_large, 1)
        await self.assertStillServing()

    async def test_oversized_chunked_body(self) -> None:
        head = (
            b"GET /edge.crt HTTP/1.1\r\nHost: x\r\nAuthorization: " + self.bearer() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        expected = b"request body too large"
        # 17 chunks of 64 KiB cross 1 MiB; the terminating chunk is never sent.
        answer = await raw_exchange(
            self.server.port,
            self.authority.ca_pem,
            [head] + [chunk] * 17,
            lambda r: b"bytes)" in r,
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(expected, answer)
        await self.assertStillServing()

    async def test_oversized_then_drained(self) -> None:
        """A body a little over the limit is read to its end and dropped, then the server
        closes: the client gets its answer and an orderly close."""
        head = b"GET /edge.crt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        answer = await raw_exchange(
            self.server.port,
            self.authority.ca_pem,
            [head] + [chunk] * 17 + [b"0\r\n\r\n"],
            lambda r: False,  # the server closes
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertTrue(answer.endswith(b"bytes)"), answer)

    async def test_body_at_limit_is_read(self) -> None:
        """Exactly 1 MiB is allowed through (and then fails as a CSR, 400)."""
        response = await self.edge_crt(b"\x00" * MIB, self.bearer())
        self.assertEqual(response.code, 400)

    async def test_unexpected_exception(self) -> None:
        def broken(report: dict[str, Any]) -> None:
            raise RuntimeError("secret internals")

        self.server.site.resource.children[b"nodeupgrade"].on_report = broken
        response = await self.client.request(self.url("/nodeupgrade"), method=b"POST", body=b"{}")
        self.assertEqual(response.code, 500)
        self.assertEqual(response.body, b"internal server error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        await self.assertStillServing()


class RateLimitTests(CertificateServerTestCase):
    limiter_burst = 3

    async def setUp(self) -> None:  # type: ignore[override]
        await self.asyncSetUp()

    async def test_failures_then_429_until_refill(self) -> None:
        for _ in range(3):
            self.assertEqual((await self.edge_crt(authorization=b"Bearer x.y.z")).code, 401)
        response = await self.edge_crt(authorization=b"Bearer x.y.z")
        self.assertEqual(response.code, 429)
        self.assertEqual(response.header(b"retry-after"), b"7")
        # Limited even with a good token until a failure's worth has refilled (6 s).
        self.assertEqual((await self.edge_crt(authorization=self.bearer())).code, 429)
        self.assertEqual(self.server.site.counters.rate_limited, 2)
        self.assertEqual(self.server.site.counters.token_failures, 3)
        self.clock.advance(6)
        self.assertEqual((await self.edge_crt(authorization=self.bearer())).code, 200)
        # /ca.crt is never limited.
        self.assertEqual((await self.client.request(self.url("/ca.crt"))).code, 200)


class OtherEndpointsTests(CertificateServerTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.ready = True
        await self.asyncSetUp(ready=lambda: self.ready)

    async def test_readiness(self) -> None:
        for path in ("/readyz", "/healthz"):
            response = await self.client.request(self.url(path))
            self.assertEqual((response.code, response.body), (200, b"ok"))
        self.ready = False
        response = await self.client.request(self.url("/readyz"))
        self.assertEqual(response.code, 503)
        # Liveness stays: a hub that is not ready (a failing store) is not helped by a restart.
        response = await self.client.request(self.url("/healthz"))
        self.assertEqual((response.code, response.body), (200, b"ok"))

    async def test_node_upgrade(self) -> None:
        report = {
            "UpgradeID": "u1",
            "HistoryID": "h1",
            "NodeName": "edge-node-1",
            "FromVersion": "v1.15.3",
            "ToVersion": "v1.15.4",
            "Status": "Upgrade_Success",
            "Reason": "",
        }
        response = await self.client.request(
            self.url("/nodeupgrade"),
            method=b"POST",
            headers={b"Content-Type": b"application/json"},
            body=json.dumps(report).encode(),
        )
        self.assertEqual((response.code, response.body), (200, b"ok"))
        self.assertEqual(self.upgrades, [report])

    async def test_node_upgrade_limit_is_3_mib(self) -> None:
        body = json.dumps({"Reason": "x" * (2 * MIB)}).encode()
        response = await self.client.request(self.url("/nodeupgrade"), method=b"POST", body=body)
        self.assertEqual(response.code, 200)
        head = b"POST /nodeupgrade HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (
            3 * MIB + 1
        )
        answer = await raw_exchange(
            self.server.port, self.authority.ca_pem, [head], lambda r: b"bytes)" in r
        )
        self.assertIn(b"limit 3145728 bytes", answer)

    async def test_node_upgrade_bad_json(self) -> None:
        for body in (b"", b"{", b"[1]", b'"x"'):
            response = await self.client.request(
                self.url("/nodeupgrade"), method=b"POST", body=body
            )
            self.assertEqual(response.code, 400, body)
        self.assertEqual(self.upgrades, [])


class RestartTests(TestCase):
    """A hub restarted on the same dataDir: same CA, same server certificate, old tokens ok."""

    async def test_restart(self) -> None:
        config = make_config(self.mktemp())
        clock = Clock()
        clock.advance(reactor.seconds())  # type: ignore[attr-defined]
        first = CertificateAuthority.load_or_create(config)
        earlier = TokenIssuer(first, 12, clock).current
        server = await start_certificate_server(self, first, TokenIssuer(first, 12, clock), clock)
        client = Client(self, first.ca_pem)
        ca_before = (await client.request(server.url + "/ca.crt")).body
        await client.pool.closeCachedConnections()
        await server.stop()

        clock.advance(23 * 3600)  # the earlier token has one hour left
        second = CertificateAuthority.load_or_create(config)
        self.assertEqual(second.server_certificate, first.server_certificate)
        server = await start_certificate_server(self, second, TokenIssuer(second, 12, clock), clock)
        client = Client(self, second.ca_pem)
        self.assertEqual((await client.request(server.url + "/ca.crt")).body, ca_before)
        response = await client.request(
            server.url + "/edge.crt",
            headers={
                b"Authorization": b"Bearer " + split_token(earlier)[1].encode(),
                b"NodeName": b"edge-node-1",
            },
            body=EDGECORE_CSR_DER,
        )
        self.assertEqual(response.code, 200, response.body)


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class Collect(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class TLSOptionsTests(TestCase):
    """server_tls_options("require") for the WebSocket port; client_tls_options' checks."""

    def setUp(self) -> None:
        self.authority = CertificateAuthority.load_or_create(make_config(self.mktemp()))

    async def exchange(
        self, port: int, edge: tuple[bytes, bytes] | None = None, hostname: str = "127.0.0.1"
    ) -> bytes:
        cert_pem, key_pem = edge if edge is not None else (None, None)
        options = client_tls_options(self.authority.ca_pem, cert_pem, key_pem, hostname=hostname)
        protocol = Collect()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options), protocol)
        await protocol.lost
        return protocol.received

    def edge(self, authority: CertificateAuthority) -> tuple[bytes, bytes]:
        """A client certificate and key signed by ``authority``."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = x509.load_der_x509_certificate(authority.sign_csr(csr_for(key)))
        return pem(cert), key_pem(key)

    async def test_require(self) -> None:
        port, _, _ = await start_server(
            self, Factory.forProtocol(Echo), self.authority, client_certs="require"
        )
        self.assertEqual(await self.exchange(port, self.edge(self.authority)), b"ping")
        # No certificate, or one from another CA: the handshake fails, nothing is echoed.
        self.assertEqual(await self.exchange(port), b"")
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        self.assertEqual(await self.exchange(port, self.edge(other)), b"")

    async def test_request_accepts_any_certificate(self) -> None:
        port, _, _ = await start_server(
            self, Factory.forProtocol(Echo), self.authority, client_certs="request"
        )
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        self.assertEqual(await self.exchange(port, self.edge(other)), b"ping")
        self.assertEqual(await self.exchange(port), b"ping")

    async def test_client_checks_names(self) -> None:
        """The server certificate names 127.0.0.1 and ::1 only: 'localhost' fails (D3)."""
        port, _, _ = await start_server(
            self, Factory.forProtocol(Echo), self.authority, client_certs="request"
        )
        self.assertEqual(await self.exchange(port, hostname="localhost"), b"")
        self.assertEqual(await self.exchange(port, hostname="10.9.9.9"), b"")

    async def test_client_checks_ca(self) -> None:
        port, _, _ = await start_server(
            self, Factory.forProtocol(Echo), self.authority, client_certs="request"
        )
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        options = client_tls_options(other.ca_pem, hostname="127.0.0.1")
        protocol = Collect()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options), protocol)
        await protocol.lost
        self.assertEqual(protocol.received, b"")

    def test_bad_mode(self) -> None:
        from cloudhub.certs.tls import server_tls_options

        self.assertRaises(ValueError, server_tls_options, self.authority, "maybe")  # type: ignore[arg-type]
        self.assertRaises(ValueError, client_tls_options, b"", b"x", hostname="h")


class IdleTimeoutTests(SynchronousTestCase):
    def test_idle_connection_closed_after_a_minute(self) -> None:
        """edgecore keeps its HTTPS connections idle; the hub does not hold them for hours."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from cloudhub.certs.authority import CertificateAuthority
        from cloudhub.certs.token import TokenIssuer
        from cloudhub.certs.web import IDLE_TIMEOUT, certificate_site

        from .helpers_tls import make_config

        clock = Clock()
        authority = CertificateAuthority.load_or_create(make_config(os.path.abspath(self.mktemp())))
        site = certificate_site(authority, TokenIssuer(authority, 12, clock), clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransport()
        channel.makeConnection(transport)
        # Idle after a request (a connection that never asks is cut sooner: test_http_limits).
        channel.dataReceived(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertTrue(transport.disconnecting)


class BodyBufferTests(SynchronousTestCase):
    """Where a request body waits while it arrives: memory up to IN_MEMORY_BODY, then a file."""

    def request(self, length: int | None) -> BoundedRequest:
        from twisted.web.test.requesthelper import DummyChannel

        request = BoundedRequest(DummyChannel())
        request._body_limit = lambda: 64 * MIB  # type: ignore[method-assign]
        request.gotLength(length)
        return request

    def test_declared_lengths_up_to_the_limit_in_memory(self) -> None:
        for length in (0, 150_000, IN_MEMORY_BODY):
            self.assertIsInstance(self.request(length).content, io.BytesIO)

    def test_larger_or_unknown_lengths_spooled_to_a_file(self) -> None:
        for length in (IN_MEMORY_BODY + 1, None):
            content = self.request(length).content
            self.assertNotIsInstance(content, io.BytesIO)
            content.close()
