"""The HTTP channel's limits (issue 18, findings 1 and 8): a deadline for the request head,
414 / 431 for oversized request lines and headers, 400 for bare-LF framing.

Driven through the certificate site (what listens on port 10002) with a fake transport and a
Clock, and through ``bound_http`` on a plain site (what the HTTP API uses, JSON errors).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.token import TokenIssuer
from cloudhub.certs.web import IDLE_TIMEOUT, certificate_site
from tests.helpers_tls import make_config

PEER = IPv4Address("TCP", "192.0.2.7", 40000)
GET_READYZ = b"GET /readyz HTTP/1.1\r\nHost: hub\r\n\r\n"


class _Connection:
    def __init__(self, site: Any) -> None:
        self.channel = site.buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def answer(self) -> bytes:
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class CertificateSiteLimitsTestCase(SynchronousTestCase):
    _authority: CertificateAuthority | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        authority = CertificateSiteLimitsTestCase._authority
        if authority is None:
            authority = CertificateAuthority.load_or_create(
                make_config(os.path.abspath(self.mktemp()))
            )
            CertificateSiteLimitsTestCase._authority = authority
        self.site = certificate_site(
            authority, TokenIssuer(authority, 12, self.clock), self.clock, **self.site_options()
        )

    def site_options(self) -> dict[str, Any]:
        return {}

    def connect(self) -> _Connection:
        return _Connection(self.site)

    def assertStatus(self, connection: _Connection, code: int) -> bytes:
        """The answer's status is ``code``, it says Connection: close, and the channel closed."""
        answer = connection.answer
        self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % (code,)), answer[:200])
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nConnection: close", head)
        self.assertIn(b"\r\nContent-Length: %d" % (len(body),), head)
        self.assertTrue(connection.closed)
        return body


class HeadDeadlineTests(CertificateSiteLimitsTestCase):
    """Finding 1 (a): the head must be complete 10 s after connecting, whatever trickles in."""

    def test_trickled_head_cut_at_the_deadline(self) -> None:
        connection = self.connect()
        for byte in b"GET /readyz HTTP/1.1\r\nHost: x":
            if self.clock.seconds() >= 9.5:
                break
            connection.send(bytes([byte]))
            self.clock.advance(0.5)
        self.assertFalse(connection.closed)
        self.clock.advance(0.6)
        body = self.assertStatus(connection, 408)
        self.assertIn(b"request head not received within 10 s", body)
        self.assertEqual(self.site.http_counters.head_timeouts, 1)

    def test_slowloris_one_byte_every_20_seconds(self) -> None:
        """The issue's attack: the 60 s idle timeout restarts on every byte; this does not."""
        connection = self.connect()
        connection.send(b"G")
        self.clock.advance(9.9)
        self.assertFalse(connection.closed)
        self.clock.advance(0.2)
        self.assertStatus(connection, 408)

    def test_silent_connection_closed_without_an_answer(self) -> None:
        """Nothing was asked (or a TLS handshake never finished): closed, nothing written."""
        connection = self.connect()
        self.clock.advance(10.1)
        self.assertTrue(connection.closed)
        self.assertEqual(connection.answer, b"")
        self.assertEqual(self.site.http_counters.head_timeouts, 1)

    def test_peer_that_does_not_read_is_aborted(self) -> None:
        connection = self.connect()
        connection.send(b"GET")
        self.clock.advance(10.1)
        self.assertTrue(connection.closed)
        self.assertFalse(connection.transport.disconnected)
        self.clock.advance(15)
        self.assertTrue(connection.transport.disconnected)  # StringTransport: aborted
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_complete_request_then_idle_keep_alive(self) -> None:
        """A request sent in time is answered; the kept-alive idle connection lives on its
        idle timeout; the next request's deadline starts at its first byte."""
        connection = self.connect()
        self.clock.advance(9)
        connection.send(GET_READYZ)
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 200 "))
        self.assertFalse(connection.closed)
        self.clock.advance(30)
        self.assertFalse(connection.closed)
        connection.send(b"GET /ready")
        self.clock.advance(9.9)
        self.assertFalse(connection.closed)
        self.clock.advance(0.2)
        self.assertTrue(connection.closed)
        self.assertEqual(self.site.http_counters.head_timeouts, 1)

    def test_many_quick_requests_on_one_connection(self) -> None:
        connection = self.connect()
        for _ in range(30):
            connection.send(GET_READYZ)
            self.clock.advance(1)
        self.assertEqual(connection.answer.count(b"HTTP/1.1 200 "), 30)
        self.assertFalse(connection.closed)
        self.clock.advance(IDLE_TIMEOUT + 1)
        self.assertTrue(connection.closed)
        self.assertEqual(self.site.http_counters.head_timeouts, 0)

    def test_one_timer_per_connection(self) -> None:
        """Besides twisted.web's idle timeout, one deadline at most per connection."""
        connection = self.connect()
        connection.send(b"GET /readyz HTTP/1.1\r\n")
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        connection.send(b"Host: x\r\n\r\n")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # idle timeout only
        connection.transport.loseConnection()
        connection.channel.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slow_body_cut_at_the_request_deadline(self) -> None:
        """The certificate server also bounds the whole request (30 s from its first byte)."""
        connection = self.connect()
        connection.send(b"POST /nodeupgrade HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        for _ in range(29):
            connection.send(b"x")
            self.clock.advance(1)
        self.assertFalse(connection.closed)
        self.clock.advance(1.1)
        body = self.assertStatus(connection, 408)
        self.assertIn(b"request not received within 30 s", body)
        self.assertEqual(self.site.http_counters.request_timeouts, 1)


class SizeLimitTests(CertificateSiteLimitsTestCase):
    """Finding 8: 414, 431 and 400 with a reason, and the connection closes."""

    def test_request_line_over_8_kib(self) -> None:
        connection = self.connect()
        connection.send(b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        body = self.assertStatus(connection, 414)
        self.assertIn(b"8192 bytes", body)
        self.assertEqual(self.site.http_counters.uri_too_long, 1)

    def test_request_line_over_8_kib_without_its_end(self) -> None:
        """Refused as soon as the limit is crossed, not when the line ends."""
        connection = self.connect()
        connection.send(b"GET /" + b"a" * 8185)
        self.assertFalse(connection.closed)
        connection.send(b"a" * 10)
        self.assertStatus(connection, 414)

    def test_request_line_at_the_limit(self) -> None:
        line = b"GET /readyz?" + b"a" * (8192 - len(b"GET /readyz? HTTP/1.1")) + b" HTTP/1.1"
        self.assertEqual(len(line), 8192)
        connection = self.connect()
        connection.send(line + b"\r\nHost: x\r\n\r\n")
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 200 "), connection.answer)

    def test_headers_over_16_kib(self) -> None:
        connection = self.connect()
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(17))
        connection.send(b"GET /readyz HTTP/1.1\r\n" + headers + b"\r\n")
        body = self.assertStatus(connection, 431)
        self.assertIn(b"16384 bytes", body)
        self.assertEqual(self.site.http_counters.headers_too_large, 1)

    def test_one_header_over_16_kib_without_its_end(self) -> None:
        connection = self.connect()
        connection.send(b"GET /readyz HTTP/1.1\r\nCookie: " + b"c" * 16500)
        self.assertStatus(connection, 431)

    def test_too_many_headers(self) -> None:
        connection = self.connect()
        headers = b"".join(b"X-%d: 1\r\n" % (i,) for i in range(101))
        connection.send(b"GET /readyz HTTP/1.1\r\n" + headers + b"\r\n")
        body = self.assertStatus(connection, 431)
        self.assertIn(b"100 header", body)

    def test_headers_near_the_limit_are_fine(self) -> None:
        connection = self.connect()
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(15))
        connection.send(b"GET /readyz HTTP/1.1\r\n" + headers + b"\r\n")
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 200 "), connection.answer[:100])

    def test_limits_apply_to_each_request_of_a_connection(self) -> None:
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(10))
        connection = self.connect()
        request = b"GET /readyz HTTP/1.1\r\n" + headers + b"\r\n"
        connection.send(request * 3)
        self.assertEqual(connection.answer.count(b"HTTP/1.1 200 "), 3)
        self.assertFalse(connection.closed)

    def test_bare_lf_framing(self) -> None:
        """HTTP/1.1 lines end in CRLF; twisted.web waited (up to 16 KiB) for one that never
        came. Bare LF is refused with 400 (Go's edgecore always sends CRLF)."""
        for request in (
            b"GET /readyz HTTP/1.1\nHost: x\n\n",
            b"GET /readyz HTTP/1.1\r\nHost: x\n\n",
            b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-A: 1\nX-B: 2\r\n\r\n",
        ):
            connection = self.connect()
            connection.send(request)
            body = self.assertStatus(connection, 400)
            self.assertIn(b"bare LF", body)
        self.assertEqual(self.site.http_counters.bad_framing, 3)

    def test_bare_lf_split_across_reads(self) -> None:
        connection = self.connect()
        connection.send(b"GET /readyz HTTP/1.1\r")
        self.assertFalse(connection.closed)
        connection.send(b"\nHost: x\r\n\r\n")
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 200 "))
        connection = self.connect()
        connection.send(b"GET /readyz HTTP/1.1")
        connection.send(b"\n")
        self.assertStatus(connection, 400)

    def test_lf_in_a_body_is_fine(self) -> None:
        connection = self.connect()
        body = b'{"NodeName": "n"}\n\n'
        connection.send(
            b"POST /nodeupgrade HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 200 "), connection.answer)

    def test_other_bad_requests_get_a_reason(self) -> None:
        """twisted.web's own 400s (bad request line, header without colon) say why and close."""
        for request in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"):
            connection = self.connect()
            connection.send(request)
            body = self.assertStatus(connection, 400)
            self.assertIn(b"bad request", body)
        self.assertEqual(self.site.http_counters.bad_requests, 2)


class ConfiguredLimitsTests(CertificateSiteLimitsTestCase):
    def site_options(self) -> dict[str, Any]:
        from cloudhub.certs.web import HttpLimits

        return {
            "http_limits": HttpLimits(
                head_timeout=2.0, request_timeout=None, request_line=100, header_bytes=200
            )
        }

    def test_values_taken(self) -> None:
        connection = self.connect()
        connection.send(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n")
        self.assertStatus(connection, 414)
        connection = self.connect()
        connection.send(b"GET / HTTP/1.1\r\nX: " + b"a" * 200 + b"\r\n\r\n")
        self.assertStatus(connection, 431)
        connection = self.connect()
        self.clock.advance(2.1)
        self.assertTrue(connection.closed)

    def test_no_request_deadline(self) -> None:
        connection = self.connect()
        connection.send(b"POST /nodeupgrade HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        for _ in range(9):
            self.clock.advance(50)
            connection.send(b"x")
        self.assertFalse(connection.closed)


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


class BoundHttpTests(SynchronousTestCase):
    """``bound_http``: the same limits on another site (the HTTP API), JSON errors."""

    def test_json_errors(self) -> None:
        from cloudhub.certs.web import HttpLimits, bound_http

        clock = Clock()
        site = Site(_Hello(), reactor=clock)
        self.assertIs(bound_http(site, HttpLimits(request_timeout=None), json_errors=True), site)
        connection = _Connection(site)
        connection.send(GET_READYZ)
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 200 "))
        connection = _Connection(site)
        connection.send(b"GET /" + b"a" * 9000)
        answer = connection.answer
        self.assertTrue(answer.startswith(b"HTTP/1.1 414 "))
        self.assertIn(b"Content-Type: application/json", answer)
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        self.assertIn("request line", error)
        self.assertEqual(site.http_counters.uri_too_long, 1)  # type: ignore[attr-defined]
        connection = _Connection(site)
        connection.send(b"G")
        clock.advance(10.1)
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 408 "))


class ApiSiteTests(SynchronousTestCase):
    """The API site with the line the lead adds to ``api_site``:
    ``bound_http(site, HttpLimits(request_timeout=None), json_errors=True)``."""

    def setUp(self) -> None:
        from cloudhub.api import api_site
        from cloudhub.certs.web import HttpLimits, bound_http
        from cloudhub.store import MemorySyncStore

        self.clock = Clock()
        self.site = api_site(object(), MemorySyncStore(), self.clock, max_body=4096)  # type: ignore[arg-type]
        bound_http(self.site, HttpLimits(request_timeout=None), json_errors=True)

    def test_probes_served_and_limits_answered_in_json(self) -> None:
        connection = _Connection(self.site)
        connection.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 200 "), connection.answer)
        for request, code in [
            (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),
            (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 17000 + b"\r\n", 431),
            (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400),
        ]:
            connection = _Connection(self.site)
            connection.send(request)
            answer = connection.answer
            self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % code), answer[:100])
            self.assertIn(b"Content-Type: application/json", answer)
            self.assertIn("error", json.loads(answer.partition(b"\r\n\r\n")[2]))
            self.assertTrue(connection.closed)
        counters = self.site.http_counters  # type: ignore[attr-defined]
        self.assertEqual((counters.uri_too_long, counters.headers_too_large), (1, 1))
        self.assertEqual(counters.bad_framing, 1)

    def test_body_limit_still_413(self) -> None:
        connection = _Connection(self.site)
        connection.send(
            b"POST /v1/nodes/n/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
        )
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 413 "), connection.answer)

    def test_head_deadline(self) -> None:
        connection = _Connection(self.site)
        connection.send(b"GET /heal")
        self.clock.advance(10.1)
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 408 "), connection.answer)
        self.assertTrue(connection.closed)


class DeadlineAfterRefusalTests(CertificateSiteLimitsTestCase):
    def test_refused_body_gets_no_second_answer(self) -> None:
        """A body refused 413 and still trickling is closed at the deadline without a 408."""
        connection = self.connect()
        connection.send(b"POST /edge.crt HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 413 "))
        connection.send(b"x" * 1000)
        self.clock.advance(31)
        self.assertTrue(connection.closed)
        self.assertNotIn(b"408", connection.answer)
