"""TLS settings for the hub's listeners and for edge clients (§4.2, §5).

Server side: the hub's certificate, TLS 1.2 or newer, and one of two client-certificate
policies:

* ``"require"``: the WebSocket port. A client certificate signed by our CA is required and
  verified during the handshake (cloudcore's ``RequireAndVerifyClientCert``).
* ``"request"``: the certificate server. A certificate is asked for but neither required
  nor judged by TLS (cloudcore's ``RequestClientCert``): a fresh edge has none, and one with
  an expired or foreign certificate must get an HTTP 401 it can log, not a failed handshake.
  The HTTP handler verifies whatever was presented
  (:meth:`CertificateAuthority.verify_client_certificate`).

Client side: the server certificate must chain to the given CA and name the host (DNS or IP
SAN, checked by ``service_identity``), as edgecore checks it.
"""

from __future__ import annotations

from typing import Literal

from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from cloudhub.certs.authority import CertificateAuthority

ClientCertificates = Literal["require", "request"]


def server_tls_options(
    authority: CertificateAuthority, client_certs: ClientCertificates = "require"
) -> IOpenSSLServerConnectionCreator:
    """Server TLS options with the hub's certificate; see the module docstring for modes."""
    server = PrivateCertificate.loadPEM(authority.server_cert_pem + authority.server_key_pem)
    common = dict(
        privateKey=server.privateKey.original,
        certificate=server.original,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    if client_certs == "require":
        options = CertificateOptions(trustRoot=Certificate.loadPEM(authority.ca_pem), **common)
        return options  # type: ignore[return-value]
    if client_certs == "request":
        return _RequestClientCertificate(CertificateOptions(**common))
    raise ValueError(f"client_certs must be 'require' or 'request', not {client_certs!r}")


def _accept_any(connection: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
    # The certificate is judged by the HTTP handler, which can answer 401 with a reason.
    return True


@implementer(IOpenSSLServerConnectionCreator)
class _RequestClientCertificate:
    """Ask each client for a certificate without letting TLS reject any.

    The context a ``CertificateOptions`` builds may not be changed once in use, so the
    verify mode is set on each connection instead.
    """

    def __init__(self, options: CertificateOptions) -> None:
        self._options = options

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.serverConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _accept_any)
        return connection


def client_tls_options(
    ca_pem: bytes,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    *,
    hostname: str,
) -> IOpenSSLClientConnectionCreator:
    """Client TLS options that trust only ``ca_pem`` and check ``hostname`` (DNS or IP).

    With ``cert_pem`` and ``key_pem`` the client presents that certificate (mutual TLS).
    """
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("give both cert_pem and key_pem, or neither")
    client = PrivateCertificate.loadPEM(cert_pem + key_pem) if cert_pem and key_pem else None
    return optionsForClientTLS(
        hostname, trustRoot=Certificate.loadPEM(ca_pem), clientCertificate=client
    )
