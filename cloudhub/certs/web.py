"""The certificate server (§5): what a new edge talks to before it can connect.

``GET /ca.crt``        the CA in DER, no authentication (§5.1);
``GET /edge.crt``      sign the DER CSR in the body, for a join token (``Authorization: Bearer
                       <jwt>``) or for a client certificate signed by our CA (renewal, §5.2, §5.5);
                       the certificate names the node of the ``NodeName`` header (a renewal:
                       the node its certificate names) (:mod:`cloudhub.certs.identity`);
``POST /nodeupgrade``  an upgrade report from ``keadm upgrade``: logged, handed to a hook, ``ok``;
``/readyz``, ``/healthz``  ``ok`` while the hub serves, 503 otherwise.

Beyond cloudcore, bad input gets a precise answer and never a 500 or a traceback: a CSR that
does not parse → 400 with the reason; a body over the limit → 413 as soon as the headers say
so (or a chunked body crosses it), without buffering it; a missing, malformed, forged or
expired token, or a foreign or expired client certificate → 401; repeated failures from one
address → 429 until its budget refills; a CSR with a weak key (RSA under 2048 bits, a curve
other than P-256/P-384) → 400 naming the key; a ``NodeName`` that is not a node id, or none
with a token → 400; a renewal for another node than its certificate's → 403. Issuances and
failures are logged and counted.

The HTTP channel (:class:`BoundedChannel`, also the API's through :func:`bound_http`) bounds
the request head: complete within 10 s of connecting (or of the next request's first byte),
however slowly it trickles → 408 (a connection that sent nothing is just closed); a request
line over 8 KiB → 414; headers over 16 KiB or 100 lines → 431; bare-LF line ends → 400; every
one with ``Connection: close``, and the connection closes. Connection counts and the
descriptor reserve are :mod:`cloudhub.limits`' (wrapped around the TLS factory).

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
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.identity import certificate_node_names
from cloudhub.certs.ratelimit import FailureLimiter
from cloudhub.certs.token import TokenIssuer
from cloudhub.errors import CertificateError, TokenError
from cloudhub.limits import ThrottledLog
from cloudhub.logs import AccessLog
from cloudhub.nodeid import validate_node_id

log = Logger()
# Refusals and timeouts of the HTTP channel, logged at most once per 10 s (an attack must not
# turn into a log flood); the counters count every one.
_refusals = ThrottledLog(log)

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

# Issue 18: the request head (request line + headers) must be complete HEAD_TIMEOUT seconds
# after the connection opened (or, on a kept-alive connection, after the next request's first
# byte), however slowly bytes trickle in; twisted.web only has an idle timeout, which every
# byte restarts. The certificate server also bounds the whole request, body included.
HEAD_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
# Sizes (bytes, line ends excluded): a longer request line is answered 414, more header bytes
# or header lines 431 (twisted.web answered neither and cut at 16 KiB per line).
REQUEST_LINE_LIMIT = 8 * 1024
HEADER_BYTES_LIMIT = 16 * 1024
MAX_HEADERS = 100
# After a refusal or a timeout, a peer that does not read the answer is aborted this late.
ABORT_GRACE = 15.0


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
    node_names_refused: int = 0  # renewals asking for another node than their cert's: 403


@dataclass(frozen=True)
class HttpLimits:
    """The limits of :class:`BoundedChannel` (seconds, bytes; a timeout of None: none)."""

    head_timeout: float | None = HEAD_TIMEOUT
    request_timeout: float | None = REQUEST_TIMEOUT
    request_line: int = REQUEST_LINE_LIMIT
    header_bytes: int = HEADER_BYTES_LIMIT
    max_headers: int = MAX_HEADERS


@dataclass
class HttpCounters:
    """Requests refused by :class:`BoundedChannel`, for the metrics (a site's ``http_counters``)."""

    head_timeouts: int = 0  # 408 (or a silent close): head not complete in time
    request_timeouts: int = 0  # 408: head + body not complete within request_timeout
    uri_too_long: int = 0  # 414: request line over the limit
    headers_too_large: int = 0  # 431: header bytes or header count over the limit
    bad_framing: int = 0  # 400: bare LF line ends
    bad_requests: int = 0  # 400: other malformed heads (twisted.web's own checks)


# Status phrases twisted.web's table lacks (RFC 6585).
_PHRASES = {431: b"Request Header Fields Too Large"}


class BoundedChannel(http.HTTPChannel):
    """twisted.web's HTTP/1.1 channel with a deadline for the request head and exact refusals.

    The limits come from the site's ``http_limits`` (:class:`HttpLimits`), the counters go to
    its ``http_counters`` (:class:`HttpCounters`); :func:`bound_http` sets both. Refusals are
    written on the transport (the request is not complete, so no ``Request`` answers them)
    with ``Connection: close``; the connection then closes, and is aborted :data:`ABORT_GRACE`
    seconds later if the peer does not read. At most one timer per connection besides
    twisted.web's idle timeout.
    """

    site: Any = None
    _limits = HttpLimits()
    _json_errors = False
    _deadline: Any = None  # the IDelayedCall of the current deadline
    _deadline_kind = ""  # "head" or "request"
    _started = 0.0  # when the current request's first byte (or the connection) came
    _head_lines = 0  # lines of the current head received (0: the request line is next)
    _header_bytes = 0
    _header_count = 0
    _in_request = False  # a request has begun (connection made or first byte) and is unread
    _got_bytes = False  # any byte of the current request received
    _refused = False

    def connectionMade(self) -> None:
        limits = getattr(self.site, "http_limits", None)
        if isinstance(limits, HttpLimits):
            self._limits = limits
        self._json_errors = bool(getattr(self.site, "http_json_errors", False))
        # twisted.web's own size checks answer a bare 400; ours come first (see lineReceived).
        self.totalHeadersSize = self._limits.request_line + self._limits.header_bytes + 1
        self.maxHeaders = self._limits.max_headers + 1
        self.MAX_LENGTH = self._limits.request_line
        super().connectionMade()
        self._begin()

    # -- the deadline ----------------------------------------------------------------------

    def _begin(self) -> None:
        """A request begins: the head must be complete within head_timeout from now."""
        self._in_request = True
        self._started = self._now()
        self._head_lines = self._header_bytes = self._header_count = 0
        self.MAX_LENGTH = self._limits.request_line
        self._arm("head", self._limits.head_timeout)

    def _now(self) -> float:
        clock = getattr(self.site, "reactor", None)
        return float(clock.seconds()) if clock is not None else 0.0

    def _arm(self, kind: str, seconds: float | None) -> None:
        self._cancel_deadline()
        if seconds is None:
            return
        self._deadline_kind = kind
        self._deadline = self.callLater(max(0.0, seconds), self._expired)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        counters = self._counters()
        if self._deadline_kind == "head":
            if counters is not None:
                counters.head_timeouts += 1
            limit, what = self._limits.head_timeout, "request head"
        else:
            if counters is not None:
                counters.request_timeouts += 1
            limit, what = self._limits.request_timeout, "request"
        _refusals.emit(
            "closed a connection from {peer}: {what} not received within {limit} s",
            peer=self._peer(),
            what=what,
            limit=limit,
        )
        answered = bool(self.requests) and getattr(self.requests[-1], "_rejected", False)
        if self._got_bytes and not answered:
            self._refuse(408, f"{what} not received within {limit:g} s")
        else:
            # Nothing asked (or a TLS handshake that never finished): nothing to answer.
            self._close()

    # -- parsing ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self.line_mode and not self._handlingRequest:
            if not self._in_request:
                self._begin()  # the first byte of a request on a kept-alive connection
            self._got_bytes = True
        super().dataReceived(data)
        # A line not yet ended: CRLF ends lines, so an LF in what waits is a bare LF.
        if self.line_mode and not self._refused and b"\n" in self._buffer:
            self._bare_lf()

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if b"\n" in line:
            self._bare_lf()
            return
        limits = self._limits
        if self._head_lines == 0:
            if not line:
                # twisted.web eats one empty line before a request (after a POST body).
                super().lineReceived(line)
                return
            if not self._in_request:
                self._begin()  # pipelined after a request answered at once
            self._got_bytes = True
            self._head_lines = 1
            self._header_bytes = self._header_count = 0
            self.MAX_LENGTH = limits.header_bytes
        elif not line:
            # End of the head: the body (if any) has the rest of request_timeout.
            self._head_lines = 0
            if limits.request_timeout is not None:
                remaining = self._started + limits.request_timeout - self._now()
                self._arm("request", remaining)
            else:
                self._cancel_deadline()
        else:
            self._head_lines += 1
            self._header_bytes += len(line)
            if line[:1] not in (b" ", b"\t"):
                self._header_count += 1
            if self._header_bytes > limits.header_bytes:
                self._too_large_headers()
                return
            if self._header_count > limits.max_headers:
                self._refuse(431, f"more than {limits.max_headers} header lines", "headers")
                return
            self.MAX_LENGTH = limits.header_bytes - self._header_bytes
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._refused:
            return
        end = line.find(b"\n")
        if 0 <= end <= self.MAX_LENGTH + 1:
            self._bare_lf()
        elif self._head_lines == 0:
            self._refuse(
                414,
                f"request line longer than {self._limits.request_line} bytes",
                "uri",
            )
        else:
            self._too_large_headers()

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        self._in_request = self._got_bytes = False
        super().allContentReceived()

    def _too_large_headers(self) -> None:
        self._refuse(431, f"headers larger than {self._limits.header_bytes} bytes", "headers")

    def _bare_lf(self) -> None:
        self._refuse(400, "bare LF line ending: HTTP/1.1 lines end in CRLF", "framing")

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's own refusals (bad request line, header syntax, framing headers)."""
        self._refuse(400, "bad request: malformed request line or header")

    # -- refusing --------------------------------------------------------------------------

    def _counters(self) -> HttpCounters | None:
        counters = getattr(self.site, "http_counters", None)
        return counters if isinstance(counters, HttpCounters) else None

    def _peer(self) -> str:
        transport = self.transport
        peer = transport.getPeer() if transport is not None else None
        return str(getattr(peer, "host", peer))

    def _refuse(self, code: int, reason: str, kind: str = "") -> None:
        """Answer ``code`` with ``reason`` on the transport, then close."""
        if self._refused:
            return
        counters = self._counters()
        if counters is not None:
            if kind == "uri":
                counters.uri_too_long += 1
            elif kind == "headers":
                counters.headers_too_large += 1
            elif kind == "framing":
                counters.bad_framing += 1
            elif code == http.BAD_REQUEST:
                counters.bad_requests += 1
        if code != http.REQUEST_TIMEOUT:
            _refusals.emit(
                "refused a request from {peer}: {code} {reason}",
                peer=self._peer(),
                code=code,
                reason=reason,
            )
        if self._json_errors:
            content_type = b"application/json"
            body = json.dumps({"error": reason}).encode("utf-8")
        else:
            content_type, body = TEXT, reason.encode("utf-8")
        head = [
            b"HTTP/1.1 %d %s" % (code, http.RESPONSES.get(code) or _PHRASES.get(code, b"Error")),
            b"Content-Type: " + content_type,
            b"Content-Length: %d" % (len(body),),
            b"Connection: close",
        ]
        transport = self.transport
        if transport is not None:
            transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._close()

    def _close(self) -> None:
        """Close now; abort if the peer has not taken the answer after ABORT_GRACE."""
        self._refused = True
        self.persistent = False
        self.setTimeout(None)
        self._cancel_deadline()
        self.clearLineBuffer()
        self.setRawMode()
        self._handlingRequest = True  # what still arrives is buffered and dropped
        self._dataBuffer = []
        if self.transport is None:
            return
        self.loseConnection()
        if self._abortingCall is None:
            self._abortingCall = self.callLater(ABORT_GRACE, self.forceAbortClient)

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().rawDataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)


def bound_http(site: Site, limits: HttpLimits | None = None, *, json_errors: bool = False) -> Site:
    """Serve ``site`` with :class:`BoundedChannel` and ``limits``; errors as JSON
    (``{"error": ...}``) when ``json_errors``. Adds ``site.http_counters``; returns ``site``."""
    site.protocol = BoundedChannel  # type: ignore[assignment]
    site.http_limits = limits if limits is not None else HttpLimits()  # type: ignore[attr-defined]
    site.http_json_errors = json_errors  # type: ignore[attr-defined]
    if not isinstance(getattr(site, "http_counters", None), HttpCounters):
        site.http_counters = HttpCounters()  # type: ignore[attr-defined]
    return site


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

        # Beyond cloudcore (issue 18, node identity): the certificate names its node.
        named, code, problem = self._node_to_certify(request, presented)
        if problem:
            if code == http.FORBIDDEN:
                self.counters.cert_failures += 1
                self.counters.node_names_refused += 1
                self.limiter.failed(peer)
            else:
                self.counters.bad_requests += 1
            log.warn(
                "refused /edge.crt ({via}) from {peer} (node {node!r}): {reason}",
                via=via,
                peer=peer,
                node=node,
                reason=problem,
            )
            return _respond(request, code, problem.encode("utf-8"))
        node = named

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
    def _node_to_certify(
        request: Request, presented: x509.Certificate | None
    ) -> tuple[str, int, str]:
        """The node the new certificate names, or the status and reason to refuse with.

        ``NodeName`` is read as Go reads it (first value, bytes as sent, UTF-8) and must be a
        node id (400). A renewal keeps the node its certificate names: asking for another is
        refused (403); a certificate naming no node (cloudcore's, or ours from before node
        identity) is renewed for ``NodeName``, as a join token would be. A request with a
        token must say ``NodeName`` (400), as edgecore always does.
        """
        values = request.requestHeaders.getRawHeaders(b"nodename") or [b""]
        try:
            asked = values[0].strip(b" \t").decode("utf-8")
        except UnicodeDecodeError:
            return "", http.BAD_REQUEST, "NodeName header is not valid UTF-8"
        if asked:
            problem = validate_node_id(asked)
            if problem is not None:
                return "", http.BAD_REQUEST, f"invalid NodeName header: {problem}"
        certified = certificate_node_names(presented)
        if len(certified) > 1:
            return "", http.FORBIDDEN, "the client certificate names several nodes"
        if certified:
            if asked and asked != certified[0]:
                return (
                    "",
                    http.FORBIDDEN,
                    f"the client certificate is for node {certified[0]!r}; "
                    "a renewal keeps its node name",
                )
            return certified[0], 0, ""
        if not asked:
            return "", http.BAD_REQUEST, "missing NodeName header (the certificate names its node)"
        return asked, 0, ""

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
    """The certificate server's ``Site``; :attr:`counters`, :attr:`http_counters` and
    :attr:`limiter` are public."""

    counters: CertificateCounters
    http_counters: HttpCounters
    http_limits: HttpLimits
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
    http_limits: HttpLimits | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> CertificateSite:
    """The certificate server as a ``Site`` to listen with (TLS ``"request"`` mode).

    ``reactor`` provides time for the failure limiter and the site's timeouts; ``ready``
    answers ``/readyz``; ``on_node_upgrade`` receives each ``/nodeupgrade`` report (a
    dict); ``http_limits`` bound the request head's time and size (default
    :class:`HttpLimits`: 10 s for the head, 30 s for the whole request, 8 KiB request line,
    16 KiB of headers); ``idle_timeout`` closes idle connections. Counters and limiter are
    created when not given.
    """
    counters = counters if counters is not None else CertificateCounters()
    limiter = limiter if limiter is not None else FailureLimiter(reactor)
    root = _Root()
    root.putChild(b"ca.crt", CACertificate(authority))
    root.putChild(b"edge.crt", EdgeCertificate(authority, tokens, limiter, counters))
    root.putChild(b"nodeupgrade", NodeUpgrade(counters, on_node_upgrade))
    root.putChild(b"readyz", Readiness(ready))
    # Liveness: the process serves. Not ready (a store failing, say) is no reason to restart
    # it: a restart frees no disk.
    root.putChild(b"healthz", Readiness(lambda: True))
    # Idle connections close after a minute (twisted.web's default is 12 hours): edgecore
    # dials again when it needs the server, and a pile of idle sockets is a cheap attack.
    site = CertificateSite(
        root, requestFactory=BoundedRequest, reactor=reactor, timeout=idle_timeout
    )
    bound_http(site, http_limits)
    site.displayTracebacks = False
    site.counters = counters
    site.limiter = limiter
    return site
