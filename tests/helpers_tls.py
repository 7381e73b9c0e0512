"""Shared pieces of the certificate tests: configs in a temp dir, the captured CSR, a real TLS
certificate server on 127.0.0.1 port 0 that is torn down cleanly, and small HTTPS clients."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.tls import client_tls_options, server_tls_options
from cloudhub.certs.web import CertificateSite, certificate_site
from cloudhub.config import HubConfig, parse_config
from cloudhub.edge.bootstrap import TrustCAPolicy
from cloudhub.listening import ListeningService

# The CSR a real edgecore v1.15.4 sent (shared/testdata/edgecore/http-bootstrap.txt).
EDGECORE_CSR_DER = bytes.fromhex(
    "308201163081be020100305c310b300906035504061302434e3111300f060355"
    "040813085a68656a69616e673111300f0603550407130848616e677a686f7531"
    "11300f060355040a13086b75626545646765311430120603550403130b6b7562"
    "65656467652e696f3059301306072a8648ce3d020106082a8648ce3d03010703"
    "420004233b08610e5aab0475093efd40b530f4c9275fa1abbe7a90984ccfc09e"
    "383bbcff0ec5ecd9b5d9e6e6d4f381ae26ba09efb3d97ef025fad9c0c07a07b4"
    "84e227a000300a06082a8648ce3d04030203470030440220183691d62552ec24"
    "e19102e827405671309ca940a38cc44bd3fbe662e169c6a4022024d25d27f950"
    "6ff70b21463d5b5a9e274e3ea7c2d757b57958a47e7afa68c4f6"
)
# The JWT header every cloudcore token carries: {"alg":"HS256","typ":"JWT"}.
CLOUDCORE_JWT_HEADER = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"


def make_config(base: str, **cloudhub: Any) -> HubConfig:
    """A config whose tls* files are absent (under ``base/etc``) and dataDir is ``base/data``."""
    etc = os.path.join(base, "etc")
    settings = {
        "tlsCAFile": os.path.join(etc, "ca", "rootCA.crt"),
        "tlsCAKeyFile": os.path.join(etc, "ca", "rootCA.key"),
        "tlsCertFile": os.path.join(etc, "certs", "server.crt"),
        "tlsPrivateKeyFile": os.path.join(etc, "certs", "server.key"),
        **cloudhub,
    }
    hub = {"dataDir": os.path.join(base, "data"), "api": {"address": "127.0.0.1", "port": 0}}
    return parse_config({"cloudHub": settings, "hub": hub})


def csr_for(key: ec.EllipticCurvePrivateKey, subject: x509.Name | None = None) -> bytes:
    from cloudhub.edge.bootstrap import EDGE_SUBJECT

    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or EDGE_SUBJECT)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def load_ca_key(config: HubConfig) -> ec.EllipticCurvePrivateKey:
    with open(config.data_path("ca", "rootCA.key"), "rb") as stream:
        key = serialization.load_pem_private_key(stream.read(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def sign_client_cert(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    lifetime: timedelta,
    usages: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> x509.Certificate:
    """A client certificate with chosen dates, for expired/foreign-certificate cases."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeedge.io")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


class TrackingFactory(WrappingFactory):
    """Knows the open connections so a test can wait until the server side has closed them."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def closed(self, timeout: float = 5.0) -> Deferred[None]:
        """Fires once every connection is closed; after ``timeout`` the rest are aborted."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)

        def abort() -> None:
            for p in list(self.protocols):
                p.transport.abortConnection()

        call = global_reactor.callLater(timeout, abort)  # type: ignore[attr-defined]

        def done(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(done)


@dataclass
class RunningServer:
    url: str
    port: int
    site: CertificateSite
    connections: TrackingFactory
    stop: Callable[[], Deferred[None]]


def start_server(
    test: TestCase,
    factory: Any,
    authority: CertificateAuthority,
    client_certs: str = "request",
) -> Deferred[tuple[int, TrackingFactory, Callable[[], Deferred[None]]]]:
    """Listen with TLS on 127.0.0.1:0; ``stop`` (also run at cleanup) stops listening and
    waits until every connection is closed (aborting stragglers after a few seconds)."""
    tracking = TrackingFactory(
        TLSMemoryBIOFactory(server_tls_options(authority, client_certs), False, factory)  # type: ignore[arg-type]
    )
    service = ListeningService(
        "test-https", TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1"), tracking
    )
    service.startService()

    async def stopping() -> None:
        if service.running:
            stopped = service.stopService()
            if stopped is not None:
                await stopped
        await tracking.closed()

    def stop() -> Deferred[None]:
        return Deferred.fromCoroutine(stopping())

    test.addCleanup(stop)
    return service.listening.addCallback(lambda _: (service.bound_port, tracking, stop))


async def start_certificate_server(
    test: TestCase, authority: CertificateAuthority, tokens: Any, clock: Any, **kwargs: Any
) -> RunningServer:
    """The certificate server on real TLS; ``clock`` drives its limiter."""
    site = certificate_site(authority, tokens, clock, **kwargs)
    port, tracking, stop = await start_server(test, site, authority)
    return RunningServer(f"https://127.0.0.1:{port}", port, site, tracking, stop)


@dataclass
class Response:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


@implementer(IBodyProducer)
class BytesProducer:
    """Writes the whole body at once (FileBodyProducer is exercised by cloudhub.edge)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@dataclass
class Client:
    """An HTTPS client trusting the hub's CA; keeps connections alive to test keep-alive."""

    test: TestCase
    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    pool: HTTPConnectionPool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = HTTPConnectionPool(global_reactor, persistent=True)
        self.test.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(
            global_reactor,
            contextFactory=TrustCAPolicy(self.ca_pem, self.cert_pem, self.key_pem),
            pool=self.pool,
        )

    async def request(
        self,
        url: str,
        method: bytes = b"GET",
        headers: dict[bytes, bytes] | None = None,
        body: bytes | None = None,
    ) -> Response:
        response = await self.agent.request(
            method,
            url.encode("ascii"),
            Headers({k: [v] for k, v in (headers or {}).items()}),
            BytesProducer(body) if body is not None else None,
        )
        data = await readBody(response)
        return Response(response.code, response.headers, data)


class RawClient(Protocol):
    """Sends bytes as they are and collects the answer; closes once ``enough`` is satisfied."""

    def __init__(self, to_send: list[bytes], enough: Callable[[bytes], bool]) -> None:
        self.to_send = to_send
        self.enough = enough
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        for chunk in self.to_send:
            self.transport.write(chunk)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.enough(self.received):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.received)


async def raw_exchange(
    port: int, ca_pem: bytes, to_send: list[bytes], enough: Callable[[bytes], bool]
) -> bytes:
    """Everything the server answered to ``to_send`` over a verified TLS connection."""
    endpoint = SSL4ClientEndpoint(
        global_reactor, "127.0.0.1", port, client_tls_options(ca_pem, hostname="127.0.0.1")
    )
    protocol = RawClient(to_send, enough)
    await connectProtocol(endpoint, protocol)
    return await protocol.done
