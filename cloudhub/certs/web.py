"""The certificate server (§5): what a new edge talks to before it can connect.

``GET /ca.crt``        the CA in DER, no authentication (§5.1);
``GET /edge.crt``      sign the DER CSR in the body, for a join token (``Authorization: Bearer
                       <jwt>``) or for a client certificate signed by our CA (renewal, §5.2, §5.5);
``POST /nodeupgrade``  an upgrade report from ``keadm upgrade``: logged, handed to a hook, ``ok``;
``/readyz``, ``/healthz``  ``ok`` while the hub serves, 503 otherwise.

Beyond cloudcore, bad input gets a precise answer and never a 500 or a traceback: a CSR that
does not parse → 400 with the reason; a body over the limit → 413 as soon as the headers say
so (or a chunked body crosses it), without buffering it; a missing, malformed, forged or
expired token, or a foreign or expired client certificate → 401; repeated failures from one
address → 429 until its budget refills. Issuances and failures are logged and counted.

Serve it with TLS from :func:`cloudhub.certs.tls.server_tls_options` in ``"request"`` mode, so
that renewing edges can present their certificate and it is judged here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from OpenSSL.crypto import X509
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.ratelimit import FailureLimiter
from cloudhub.certs.token import TokenIssuer
from cloudhub.errors import CertificateError, TokenError
from cloudhub.logs import AccessLog

log = Logger()

MIB = 1024 * 1024
# §5.2: cloudcore reads at most 1 MiB of CSR; §5.3: 3 MiB of upgrade report.
BODY_LIMIT = 1 * MIB
BODY_LIMITS = {b"/nodeupgrade": 3 * MIB}
# After answering 413, read and drop up to this much more before closing, so the client
# can read the answer instead of getting a reset (Go's net/http drains 256 KiB likewise).
DRAIN_LIMIT = 256 * 1024
# Bodies of a declared length up to this are kept in memory; twisted.web spools anything from
# 100 KB on to a temporary file, i.e. every batch of the HTTP API (~400 KB per 1,000 entries).
IN_MEMORY_BODY = 8 * MIB

TOO_MANY_REQUESTS = 429  # not among twisted.web.http's names
INVALID_TOKEN = b"Invalid authorization token"
TEXT = b"text/plain; charset=utf-8"


IDLE_TIMEOUT = 60.0  # seconds an idle certificate-server connection stays open


@dataclass
class CertificateCounters:
    """What the certificate server did, for the metrics endpoint to come."""

    issued: int = 0  # every certificate signed (bootstrap + renewal)
    renewed: int = 0  # those signed for a client certificate
    token_failures: int = 0  # missing, malformed, forged or expired tokens
    cert_failures: int = 0  # client certificates rejected on renewal
    rate_limited: int = 0  # requests answered 429
    bad_requests: int = 0  # CSRs or headers answered 400
    too_large: int = 0  # bodies answered 413
    node_upgrades: int = 0  # /nodeupgrade reports accepted


class BoundedRequest(Request):
    """A request that refuses an oversized body before buffering it.

    twisted.web buffers the whole body before a resource sees the request; the last
    moment to refuse is when the channel reports the declared length (:meth:`gotLength`)
    or hands over a chunk (:meth:`handleContentChunk`).
    """

    _limit = BODY_LIMIT
    _received = 0
    _drained = 0
    _rejected = False
    _hung_up = False

    def _body_limit(self) -> int:
        # The path is known to the channel before the body but has no public accessor;
        # without it, the smallest limit applies.
        path = getattr(self.channel, "_path", b"") or b""
        return BODY_LIMITS.get(path.split(b"?", 1)[0], BODY_LIMIT)

    def gotLength(self, length: int | None) -> None:
        self._limit = self._body_limit()
        if length is not None and length > self._limit:
            self.content = io.BytesIO()
            self._reject(f"declared {length} bytes")
            return
        if length is not None and length <= IN_MEMORY_BODY:
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            self._drained += len(data)
            if self._drained > DRAIN_LIMIT:
                self._hang_up()
            return
        self._received += len(data)
        if self._received > self._limit:
            if self.content is not None:
                self.content.close()  # may be a temporary file holding the first MiB
            self.content = io.BytesIO()
            self._reject(f"more than {self._limit} bytes received")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            # The rest of the refused body has arrived and been dropped; now hang up.
            self._hang_up()
            return
        super().requestReceived(command, path, version)

    def _too_large_answer(self) -> tuple[bytes, bytes]:
        """Content type and body of the 413 answer (the API answers JSON)."""
        return TEXT, b"request body too large (limit %d bytes)" % (self._limit,)

    def _reject(self, why: str) -> None:
        """Answer 413 on the raw transport: the request is not complete, so no Request API."""
        self._rejected = True
        # No "100 Continue" after a final answer.
        self.requestHeaders.removeHeader(b"expect")
        site = getattr(self.channel, "site", None)
        counters = getattr(site, "counters", None)
        if counters is not None:
            counters.too_large += 1
        peer = self.getClientAddress()
        log.warn(
            "refused a request body from {peer}: {why}, limit {limit} bytes",
            peer=getattr(peer, "host", str(peer)),
            why=why,
            limit=self._limit,
        )
        content_type, body = self._too_large_answer()
        head = [
            b"HTTP/1.1 413 Request Entity Too Large",
            b"Content-Type: " + content_type,
            b"Content-Length: %d" % (len(body),),
            b"Connection: close",
        ]
        transport = self.channel.transport
        assert transport is not None
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)

    def _hang_up(self) -> None:
        if not self._hung_up and self.channel is not None:
            self._hung_up = True
            self.channel.loseConnection()

    def processingFailed(self, reason: Any) -> Any:
        """Any failure that escaped a resource: log it, answer a bare 500, no traceback."""
        log.failure("unexpected error serving {uri}", reason, uri=self.uri)
        body = b"internal server error"
        self.setResponseCode(http.INTERNAL_SERVER_ERROR)
        self.setHeader(b"Content-Type", TEXT)
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        self.write(body)
        self.finish()
        return reason


def _respond(request: Request, code: int, body: bytes, content_type: bytes = TEXT) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    return body


def _body(request: Request) -> bytes:
    content = request.content
    return content.read() if content is not None else b""


def _peer(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", address))


def _header(request: Request, name: bytes, limit: int = 256) -> str:
    value = request.getHeader(name)
    return value.decode("utf-8", "replace")[:limit] if value else ""


class _Endpoint(Resource):
    """A leaf that answers text errors itself (404 below it, 405, 500) and logs crashes."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _NotFound()

    def render(self, request: Request) -> bytes:
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"render_{method}", None)
        if handler is None:
            allowed = sorted(
                name[len("render_") :] for name in dir(self) if name.startswith("render_")
            )
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
            return _respond(request, http.NOT_ALLOWED, b"405 method not allowed")
        try:
            return handler(request)  # type: ignore[no-any-return]
        except Exception:
            log.failure(
                "unexpected error serving {method} {uri} for {peer}",
                method=method,
                uri=request.uri,
                peer=_peer(request),
            )
            return _respond(request, http.INTERNAL_SERVER_ERROR, b"internal server error")


class _NotFound(_Endpoint):
    def render(self, request: Request) -> bytes:
        return _respond(request, http.NOT_FOUND, b"404 page not found")


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        return _NotFound()

    def render(self, request: Request) -> bytes:
        return _respond(request, http.NOT_FOUND, b"404 page not found")


class CACertificate(_Endpoint):
    """``GET /ca.crt``: the CA DER whose SHA-256 the token's first part names (§5.1)."""

    def __init__(self, authority: CertificateAuthority) -> None:
        super().__init__()
        self.authority = authority

    def render_GET(self, request: Request) -> bytes:
        return _respond(request, http.OK, self.authority.ca_der, b"application/octet-stream")


class EdgeCertificate(_Endpoint):
    """``GET /edge.crt``: sign an edge's CSR for a valid token or client certificate (§5.2)."""

    def __init__(
        self,
        authority: CertificateAuthority,
        tokens: TokenIssuer,
        limiter: FailureLimiter,
        counters: CertificateCounters,
    ) -> None:
        super().__init__()
        self.authority = authority
        self.tokens = tokens
        self.limiter = limiter
        self.counters = counters

    def render_GET(self, request: Request) -> bytes:
        peer = _peer(request)
        node = _header(request, b"nodename")
        wait = self.limiter.retry_after(peer)
        if wait > 0:
            self.counters.rate_limited += 1
            seconds = int(wait) + 1
            request.setHeader(b"Retry-After", b"%d" % (seconds,))
            log.warn(
                "refused /edge.crt from {peer} (node {node!r}): too many failures",
                peer=peer,
                node=node,
            )
            return _respond(
                request,
                TOO_MANY_REQUESTS,
                b"too many failed attempts, retry in %d s" % (seconds,),
            )

        presented = self._client_certificate(request)
        if presented is not None:
            try:
                self.authority.verify_client_certificate(presented)
            except CertificateError as e:
                self.counters.cert_failures += 1
                self.limiter.failed(peer)
                log.warn(
                    "refused renewal from {peer} (node {node!r}): {reason}",
                    peer=peer,
                    node=node,
                    reason=str(e),
                )
                return _respond(request, http.UNAUTHORIZED, str(e).encode("utf-8"))
            via = "renewal"
        else:
            problem = self._token_problem(request)
            if problem is not None:
                self.counters.token_failures += 1
                self.limiter.failed(peer)
                log.warn(
                    "refused /edge.crt from {peer} (node {node!r}): {reason}",
                    peer=peer,
                    node=node,
                    reason=problem,
                )
                return _respond(request, http.UNAUTHORIZED, INVALID_TOKEN)
            via = "token"

        try:
            usages = self._ext_key_usages(request)
            der = self.authority.sign_csr(_body(request), usages, node)
        except CertificateError as e:
            self.counters.bad_requests += 1
            log.warn(
                "bad certificate request from {peer} (node {node!r}): {reason}",
                peer=peer,
                node=node,
                reason=str(e),
            )
            return _respond(request, http.BAD_REQUEST, str(e).encode("utf-8"))
        cert = x509.load_der_x509_certificate(der)
        self.counters.issued += 1
        if via == "renewal":
            self.counters.renewed += 1
        log.info(
            "issued edge certificate for node {node!r} ({via}) to {peer}: "
            "serial {serial}, expires {expiry}",
            node=node,
            via=via,
            peer=peer,
            serial=f"{cert.serial_number:x}",
            expiry=cert.not_valid_after_utc.isoformat(),
        )
        return _respond(request, http.OK, der, b"application/octet-stream")

    @staticmethod
    def _client_certificate(request: Request) -> x509.Certificate | None:
        transport = request.transport
        if transport is None or not ISSLTransport.providedBy(transport):
            return None
        cert = transport.getPeerCertificate()
        return cert.to_cryptography() if isinstance(cert, X509) else None

    def _token_problem(self, request: Request) -> str | None:
        """Why the Authorization header does not carry a valid token, or None if it does."""
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(values) != 1:
            return "no Authorization header" if not values else "several Authorization headers"
        # §5.2: exactly two space-separated parts, as cloudcore splits it.
        parts = values[0].split(b" ")
        if len(parts) != 2 or parts[0].lower() != b"bearer" or not parts[1]:
            return "malformed Authorization header"
        try:
            self.tokens.verify(parts[1].decode("ascii"))
        except UnicodeDecodeError:
            return "token is not ASCII"
        except TokenError as e:
            return str(e)
        return None

    @staticmethod
    def _ext_key_usages(request: Request) -> list[int] | None:
        raw = request.getHeader(b"extkeyusages")
        if not raw:
            return None
        try:
            usages = json.loads(raw)
        except ValueError:
            usages = None
        if not isinstance(usages, list) or not all(
            isinstance(u, int) and not isinstance(u, bool) for u in usages
        ):
            raise CertificateError("ExtKeyUsages must be a JSON array of integers")
        return usages


def _short(value: Any, limit: int = 200) -> str:
    """A report field for the log: a 3 MiB body must not become a 3 MiB log line."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class NodeUpgrade(_Endpoint):
    """``POST /nodeupgrade``: keadm's upgrade report, passed on to ``on_report`` (§5.3)."""

    def __init__(
        self,
        counters: CertificateCounters,
        on_report: Callable[[dict[str, Any]], object] | None,
    ) -> None:
        super().__init__()
        self.counters = counters
        self.on_report = on_report

    def render_POST(self, request: Request) -> bytes:
        try:
            report = json.loads(_body(request))
        except ValueError:
            report = None
        if not isinstance(report, dict):
            self.counters.bad_requests += 1
            return _respond(request, http.BAD_REQUEST, b"body must be a JSON object")
        self.counters.node_upgrades += 1
        log.info(
            "node upgrade report from {peer}: node {node} upgrade {upgrade} "
            "{from_version} -> {to_version}: {status} {reason}",
            peer=_peer(request),
            node=_short(report.get("NodeName")),
            upgrade=_short(report.get("UpgradeID")),
            from_version=_short(report.get("FromVersion")),
            to_version=_short(report.get("ToVersion")),
            status=_short(report.get("Status")),
            reason=_short(report.get("Reason")),
        )
        if self.on_report is not None:
            self.on_report(report)
        return _respond(request, http.OK, b"ok")


class Readiness(_Endpoint):
    """``/readyz`` and ``/healthz``: 200 ``ok`` while ``ready()`` says so, else 503."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        super().__init__()
        self.ready = ready

    def render_GET(self, request: Request) -> bytes:
        if self.ready():
            return _respond(request, http.OK, b"ok")
        return _respond(request, http.SERVICE_UNAVAILABLE, b"not ready")


class CertificateSite(AccessLog, Site):
    """The certificate server's ``Site``; :attr:`counters` and :attr:`limiter` are public."""

    counters: CertificateCounters
    limiter: FailureLimiter


def certificate_site(
    authority: CertificateAuthority,
    tokens: TokenIssuer,
    reactor: IReactorTime,
    *,
    ready: Callable[[], bool] = lambda: True,
    counters: CertificateCounters | None = None,
    limiter: FailureLimiter | None = None,
    on_node_upgrade: Callable[[dict[str, Any]], object] | None = None,
) -> CertificateSite:
    """The certificate server as a ``Site`` to listen with (TLS ``"request"`` mode).

    ``reactor`` provides time for the failure limiter and the site's timeouts; ``ready``
    answers ``/readyz``; ``on_node_upgrade`` receives each ``/nodeupgrade`` report (a
    dict). Counters and limiter are created when not given.
    """
    counters = counters if counters is not None else CertificateCounters()
    limiter = limiter if limiter is not None else FailureLimiter(reactor)
    root = _Root()
    root.putChild(b"ca.crt", CACertificate(authority))
    root.putChild(b"edge.crt", EdgeCertificate(authority, tokens, limiter, counters))
    root.putChild(b"nodeupgrade", NodeUpgrade(counters, on_node_upgrade))
    readiness = Readiness(ready)
    root.putChild(b"readyz", readiness)
    root.putChild(b"healthz", readiness)
    # Idle connections close after a minute (twisted.web's default is 12 hours): edgecore
    # dials again when it needs the server, and a pile of idle sockets is a cheap attack.
    site = CertificateSite(
        root, requestFactory=BoundedRequest, reactor=reactor, timeout=IDLE_TIMEOUT
    )
    site.displayTracebacks = False
    site.counters = counters
    site.limiter = limiter
    return site
