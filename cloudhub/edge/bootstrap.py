"""An edge's first certificate, and its renewal, as edgecore gets them (§5.1, §5.2, §5.5).

:func:`bootstrap` does what a fresh edgecore does with a join token: fetch ``/ca.crt``
without verification, check its SHA-256 against the token's first part, make a P-256 key and
a CSR, and ask ``/edge.crt`` for a certificate with the token's JWT, this time verifying the
server against the fetched CA. :func:`renew` asks for a new certificate by presenting the
current one instead of a token. :class:`EdgeCredentials` saves and loads the result with
edgecore's file names.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from cloudhub.certs.authority import issued_by, pem_block, write_atomically
from cloudhub.certs.tls import client_tls_options
from cloudhub.certs.token import split_token
from cloudhub.errors import CertificateError, TokenError

log = Logger()

# edgecore's file names under its certificate directories (§8.2).
CA_FILE = "rootCA.crt"
CERT_FILE = "server.crt"
KEY_FILE = "server.key"

# §5.2: the subject edgecore puts in every CSR (the cloud keeps only CN and O).
EDGE_SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Zhejiang"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Hangzhou"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kubeEdge"),
        x509.NameAttribute(NameOID.COMMON_NAME, "kubeedge.io"),
    ]
)

# The injected reactor: IReactorTCP (for Agent) and IReactorTime.
Reactor = Any

# edgecore's HTTP client timeout for these calls (§5.2).
TIMEOUT = 30.0


@dataclass(frozen=True)
class EdgeCredentials:
    """What an edge needs for mutual TLS with the hub, all PEM."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def save(self, directory: str) -> None:
        """Write ``rootCA.crt``, ``server.crt`` and ``server.key`` (mode 0600), atomically each."""
        write_atomically(os.path.join(directory, KEY_FILE), self.key_pem, 0o600)
        write_atomically(os.path.join(directory, CERT_FILE), self.cert_pem, 0o644)
        write_atomically(os.path.join(directory, CA_FILE), self.ca_pem, 0o644)

    @classmethod
    def load(cls, directory: str) -> EdgeCredentials:
        """Read what :meth:`save` wrote; :class:`CertificateError` naming a bad file."""
        values = []
        for name in (CA_FILE, CERT_FILE, KEY_FILE):
            path = os.path.join(directory, name)
            try:
                with open(path, "rb") as stream:
                    data = stream.read()
            except OSError as e:
                raise CertificateError(f"{path}: cannot read: {e.strerror or e}") from None
            pem_block(data, path)
            values.append(data)
        return cls(*values)


@implementer(IPolicyForHTTPS)
class TrustCAPolicy:
    """Agent TLS policy: trust only one CA, check the host name, maybe present a cert."""

    def __init__(
        self, ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None
    ) -> None:
        self.ca_pem = ca_pem
        self.cert_pem = cert_pem
        self.key_pem = key_pem

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii").strip("[]")
        return client_tls_options(self.ca_pem, self.cert_pem, self.key_pem, hostname=host)


@implementer(IPolicyForHTTPS)
class _NoVerification:
    """For ``GET /ca.crt`` only: the CA is not known yet; the token's hash checks it after."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return CertificateOptions()  # type: ignore[return-value]


def new_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key, as edgecore makes for each certificate."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A DER CSR like edgecore's (§5.2)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(EDGE_SUBJECT)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _url(server_url: str, path: str) -> bytes:
    parts = urlsplit(server_url)
    if parts.scheme != "https" or not parts.hostname:
        raise CertificateError(f"server URL {server_url!r} must be https://host:port")
    return f"{server_url.rstrip('/')}{path}".encode("ascii")


def _describe(error: Exception) -> str:
    """One line for an Agent error; its wrapper exceptions hide the cause in ``reasons``."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(f"{type(r.value).__name__}: {r.getErrorMessage()}" for r in reasons)
    return str(error) or type(error).__name__


async def _request(
    reactor: Reactor,
    policy: IPolicyForHTTPS,
    url: bytes,
    headers: dict[bytes, bytes] | None = None,
    body: bytes | None = None,
    timeout: float = TIMEOUT,
) -> tuple[int, bytes]:
    """GET ``url`` (with ``body``, as edgecore sends its CSR); the status and body."""
    agent = Agent(reactor, contextFactory=policy, connectTimeout=timeout)
    cooperator = None
    producer = None
    if body is not None:
        # A cooperator on the injected reactor, not the global one FileBodyProducer defaults to.
        cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        producer = FileBodyProducer(io.BytesIO(body), cooperator=cooperator)
    try:
        d = agent.request(
            b"GET", url, Headers({k: [v] for k, v in (headers or {}).items()}), producer
        )
        d.addTimeout(timeout, reactor)
        response = await d
        data_d = readBody(response)
        data_d.addTimeout(timeout, reactor)
        data = await data_d
    finally:
        if cooperator is not None:
            cooperator.stop()
    return response.code, data


async def _sign(
    reactor: Reactor,
    server_url: str,
    policy: TrustCAPolicy,
    headers: dict[bytes, bytes],
    key: ec.EllipticCurvePrivateKey,
    rejected: type[Exception],
) -> bytes:
    """Ask ``/edge.crt`` for a certificate for ``key``; its PEM, checked against the CA."""
    url = _url(server_url, "/edge.crt")
    try:
        code, body = await _request(reactor, policy, url, headers, make_csr(key))
    except Exception as e:
        raise CertificateError(
            f"failed to get edge certificate from {url.decode()}: {_describe(e)}"
        ) from e
    if code != 200:
        text = body[:500].decode("utf-8", "replace")
        error = rejected if code == 401 else CertificateError
        raise error(f"failed to get edge certificate from the cloud: HTTP {code}: {text}")
    try:
        cert = x509.load_der_x509_certificate(body)
    except ValueError:
        raise CertificateError("/edge.crt answered something not a DER certificate") from None
    ca = x509.load_pem_x509_certificate(policy.ca_pem)
    if not issued_by(cert, ca):
        raise CertificateError("the certificate from /edge.crt is not signed by the hub's CA")
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateError("the certificate from /edge.crt is for another key")
    return cert.public_bytes(serialization.Encoding.PEM)


async def _bootstrap(
    reactor: Reactor,
    server_url: str,
    token: str,
    node_name: str,
    key: ec.EllipticCurvePrivateKey | None,
) -> EdgeCredentials:
    ca_hash, jwt = split_token(token)
    url = _url(server_url, "/ca.crt")
    try:
        code, ca_der = await _request(reactor, _NoVerification(), url)
    except Exception as e:
        raise CertificateError(
            f"failed to get CA certificate from {url.decode()}: {_describe(e)}"
        ) from e
    if code != 200:
        raise CertificateError(f"failed to get CA certificate from {url.decode()}: HTTP {code}")
    actual = hashlib.sha256(ca_der).hexdigest()
    if actual != ca_hash.lower():
        raise CertificateError(
            f"failed to validate CA certificate. tokenCAhash: {ca_hash}, CAhash: {actual}"
        )
    try:
        ca = x509.load_der_x509_certificate(ca_der)
    except ValueError:
        raise CertificateError(f"{url.decode()} did not answer a DER certificate") from None
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    key = key if key is not None else new_key()
    headers = {b"Authorization": b"Bearer " + jwt.encode("ascii"), b"NodeName": node_name.encode()}
    cert_pem = await _sign(reactor, server_url, TrustCAPolicy(ca_pem), headers, key, TokenError)
    log.info("node {node} got its certificate from {url}", node=node_name, url=server_url)
    return EdgeCredentials(ca_pem, cert_pem, _key_pem(key))


def bootstrap(
    reactor: Reactor,
    server_url: str,
    token: str,
    node_name: str,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Deferred[EdgeCredentials]:
    """Get an edge's first certificate with a join token, like edgecore (§5.1, §5.2).

    ``server_url`` is edgecore's ``httpServer`` (``https://host:port``). Fails with
    :class:`TokenError` for a token not of 4 dot-separated parts or refused by the hub, and
    :class:`CertificateError` when the CA does not match the token or the hub cannot be
    reached or answers badly. ``key`` (P-256) is generated when not given.
    """
    return Deferred.fromCoroutine(_bootstrap(reactor, server_url, token, node_name, key))


async def _renew(
    reactor: Reactor,
    server_url: str,
    credentials: EdgeCredentials,
    node_name: str,
    key: ec.EllipticCurvePrivateKey | None,
) -> EdgeCredentials:
    key = key if key is not None else new_key()
    policy = TrustCAPolicy(credentials.ca_pem, credentials.cert_pem, credentials.key_pem)
    headers = {b"NodeName": node_name.encode()}
    cert_pem = await _sign(reactor, server_url, policy, headers, key, CertificateError)
    log.info("node {node} renewed its certificate at {url}", node=node_name, url=server_url)
    return EdgeCredentials(credentials.ca_pem, cert_pem, _key_pem(key))


def renew(
    reactor: Reactor,
    server_url: str,
    credentials: EdgeCredentials,
    node_name: str,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Deferred[EdgeCredentials]:
    """A new certificate (and key) for an edge, presenting its current one, no token (§5.5).

    Fails with :class:`CertificateError` when the hub refuses the current certificate.
    """
    return Deferred.fromCoroutine(_renew(reactor, server_url, credentials, node_name, key))
