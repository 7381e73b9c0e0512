"""cloudhub.limits (issue 18, finding 1): connections per listener and per source address, a
reserve of file descriptors, and a slowloris run against a real certificate server."""

from __future__ import annotations

import os
import resource
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.tls import client_tls_options, server_tls_options
from cloudhub.certs.token import TokenIssuer
from cloudhub.certs.web import HttpLimits, certificate_site
from cloudhub.limits import (
    ConnectionLimiter,
    DescriptorBudget,
    HandshakeAdmission,
    ThrottledLog,
    handshake_admission,
    open_descriptors,
    raise_descriptor_limit,
    websocket_handshake_done,
)
from tests.helpers_tls import make_config


def v4(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class _Limiter:
    """A ConnectionLimiter around a trivial factory, connections made on fake transports."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("reserve", None)
        self.factory = ConnectionLimiter(Factory.forProtocol(Protocol), Clock(), **options)
        self.open: list[Any] = []

    def connect(self, addr: Any) -> bool:
        protocol = self.factory.buildProtocol(addr)
        if protocol is None:
            return False
        protocol.makeConnection(StringTransport(peerAddress=addr))
        self.open.append(protocol)
        return True

    def close(self, protocol: Any) -> None:
        self.open.remove(protocol)
        protocol.connectionLost(Failure(Exception("closed")))


class ConnectionCapTests(SynchronousTestCase):
    def test_per_address_cap(self) -> None:
        limiter = _Limiter(per_address=32, max_connections=1024)
        admitted = [limiter.connect(v4("192.0.2.1", 1000 + i)) for i in range(40)]
        self.assertEqual(admitted, [True] * 32 + [False] * 8)
        counters = limiter.factory.counters
        self.assertEqual((counters.accepted, counters.refused_address), (32, 8))
        self.assertEqual(limiter.factory.open_from("192.0.2.1"), 32)
        # Another address is not affected.
        self.assertTrue(limiter.connect(v4("192.0.2.2")))
        # A slot freed is a slot to take again.
        limiter.close(limiter.open[0])
        self.assertEqual(limiter.factory.open_from("192.0.2.1"), 31)
        self.assertTrue(limiter.connect(v4("192.0.2.1")))
        self.assertFalse(limiter.connect(v4("192.0.2.1")))
        self.assertEqual(limiter.factory.open, 33)

    def test_ipv4_mapped_addresses_count_as_ipv4(self) -> None:
        limiter = _Limiter(per_address=2)
        self.assertTrue(limiter.connect(v4("192.0.2.1")))
        self.assertTrue(limiter.connect(IPv6Address("TCP", "::ffff:192.0.2.1", 1)))
        self.assertFalse(limiter.connect(v4("192.0.2.1")))

    def test_per_listener_cap(self) -> None:
        limiter = _Limiter(per_address=0, max_connections=5)
        admitted = [limiter.connect(v4(f"192.0.2.{i}")) for i in range(1, 8)]
        self.assertEqual(admitted, [True] * 5 + [False] * 2)
        self.assertEqual(limiter.factory.counters.refused_listener, 2)
        limiter.close(limiter.open[-1])
        self.assertTrue(limiter.connect(v4("192.0.2.99")))

    def test_loopback_exemption(self) -> None:
        limiter = _Limiter(per_address=1, exempt_loopback=True)
        for host in ("127.0.0.1", "127.0.0.1", "::1", "::1"):
            addr = IPv6Address("TCP", host, 1) if ":" in host else v4(host)
            self.assertTrue(limiter.connect(addr))
        self.assertTrue(limiter.connect(v4("192.0.2.1")))
        self.assertFalse(limiter.connect(v4("192.0.2.1")))

    def test_unix_sockets_have_no_address_cap(self) -> None:
        limiter = _Limiter(per_address=1, max_connections=3)
        admitted = [limiter.connect(UNIXAddress(b"/run/api.sock")) for _ in range(4)]
        self.assertEqual(admitted, [True, True, True, False])

    def test_refusals_logged_at_most_every_10_seconds(self) -> None:
        limiter = _Limiter(per_address=1)
        limiter.connect(v4("192.0.2.1"))
        with capturedLogs() as events:
            for _ in range(100):
                limiter.connect(v4("192.0.2.1"))
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(limiter.factory.counters.refused_address, 100)

    def test_bad_values(self) -> None:
        for options in ({"per_address": -1}, {"max_connections": -1}, {"reserve": -1}):
            self.assertRaises(
                ValueError, ConnectionLimiter, Factory.forProtocol(Protocol), Clock(), **options
            )


class DescriptorReserveTests(SynchronousTestCase):
    """Finding 1 (c): a listener stops admitting before the process runs out of descriptors,
    and a listener with a larger reserve stops first."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.counted = 0
        self.open_fds = 100
        self.budget = DescriptorBudget(
            self.clock, limit=1000, count=self.count, refresh=1.0, margin=16
        )

    def count(self) -> int:
        self.counted += 1
        return self.open_fds

    def limiter(self, reserve: int) -> _Limiter:
        return _Limiter(reserve=reserve, budget=self.budget, per_address=0, max_connections=0)

    def test_reserve_protects_the_other_listeners(self) -> None:
        certificates, edges = self.limiter(reserve=256), self.limiter(reserve=32)
        taken = 0
        while certificates.connect(v4("198.51.100.1")):
            taken += 1
            self.open_fds += 1  # what accept() opened
        # 100 open at the start, then until 256 remain free of 1000.
        self.assertEqual(taken, 1000 - 256 - 100)
        self.assertEqual(certificates.factory.counters.refused_descriptors, 1)
        # The edges' listener still admits, down to its own reserve.
        taken = 0
        while edges.connect(v4("198.51.100.2")):
            taken += 1
            self.open_fds += 1
        self.assertEqual(taken, 256 - 32)
        self.assertEqual(edges.factory.counters.refused_descriptors, 1)

    def test_descriptors_opened_elsewhere_count(self) -> None:
        """Files, the store, other listeners: the count is the process's, not the limiter's."""
        certificates = self.limiter(reserve=256)
        self.assertTrue(certificates.connect(v4("198.51.100.1")))
        self.open_fds = 1000 - 256  # something else opened hundreds of files
        self.clock.advance(1)
        self.assertFalse(certificates.connect(v4("198.51.100.1")))
        self.open_fds = 500
        self.clock.advance(1)
        self.assertTrue(certificates.connect(v4("198.51.100.1")))

    def test_counted_rarely_far_from_the_reserve(self) -> None:
        certificates = self.limiter(reserve=256)
        for i in range(100):
            certificates.connect(v4("198.51.100.1", i))
            self.open_fds += 1
        self.assertEqual(self.counted, 1)
        self.clock.advance(1)
        certificates.connect(v4("198.51.100.1"))
        self.assertEqual(self.counted, 2)

    def test_no_limit(self) -> None:
        budget = DescriptorBudget(self.clock, limit=None)
        self.assertIsNone(budget.free(10))
        limiter = _Limiter(reserve=10, budget=budget)
        self.assertTrue(limiter.connect(v4("198.51.100.1")))

    def test_real_count_and_limit(self) -> None:
        before = open_descriptors()
        if before is None:
            self.skipTest("no /proc/self/fd or /dev/fd")
        with open(os.devnull, "rb"):
            self.assertEqual(open_descriptors(), before + 1)
        budget = DescriptorBudget(Clock())
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        free = budget.free()
        if soft == resource.RLIM_INFINITY:
            self.assertIsNone(free)
        else:
            self.assertEqual(free, soft - before)

    def test_raise_descriptor_limit(self) -> None:
        calls: list[tuple[int, int]] = []
        limits = [(1024, 4096)]
        self.patch(resource, "getrlimit", lambda which: limits[-1])
        self.patch(
            resource, "setrlimit", lambda which, value: (calls.append(value), limits.append(value))
        )
        self.assertEqual(raise_descriptor_limit(), 4096)
        self.assertEqual(calls, [(4096, 4096)])
        self.assertEqual(raise_descriptor_limit(), 4096)  # already there: nothing to do
        self.assertEqual(len(calls), 1)


class ThrottledLogTests(SynchronousTestCase):
    def test_once_per_interval_with_the_count(self) -> None:
        now = [0.0]
        throttled = ThrottledLog(Logger(), 10.0, clock=lambda: now[0])
        with capturedLogs() as events:
            self.assertTrue(throttled.emit("refused {n}", n=1))
            for _ in range(5):
                now[0] += 1
                self.assertFalse(throttled.emit("refused {n}", n=2))
            now[0] = 11
            self.assertTrue(throttled.emit("refused {n}", n=3))
        self.assertEqual([e["n"] for e in events], [1, 3])
        self.assertEqual(events[1]["suppressed"], 5)


class _Slow(Protocol):
    """Connects, optionally sends a few bytes, and records how the connection ended."""

    def __init__(self, first: bytes = b"") -> None:
        self.first = first
        self.received = b""
        self.lost: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        if self.first:
            self.transport.write(self.first)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(self.received)


class SlowlorisTests(TestCase):
    """Finding 1 at small scale on real sockets: dozens of slow connections from one address
    are capped and cut at the head deadline; a request from elsewhere is served meanwhile."""

    timeout = 30

    async def test_slow_connections_capped_and_cut(self) -> None:
        authority = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        site = certificate_site(
            authority,
            TokenIssuer(authority, 12, global_reactor),  # type: ignore[arg-type]
            global_reactor,  # type: ignore[arg-type]
            http_limits=HttpLimits(head_timeout=2.0, request_timeout=3.0),
        )
        limiter = ConnectionLimiter(
            TLSMemoryBIOFactory(server_tls_options(authority, "request"), False, site),
            global_reactor,  # type: ignore[arg-type]
            per_address=32,
            max_connections=1024,
        )
        port = global_reactor.listenTCP(0, limiter, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        tls = client_tls_options(authority.ca_pem, hostname="127.0.0.1")
        clients: list[_Slow] = []

        async def connect(protocol: _Slow, endpoint: Any) -> _Slow:
            await connectProtocol(endpoint, protocol)
            clients.append(protocol)
            return protocol

        # 10 TLS connections trickling a request head, then 30 that never finish the TLS
        # handshake: 40 from 127.0.0.1, 32 allowed.
        for _ in range(10):
            await connect(
                _Slow(b"GET /readyz HTTP/1.1\r\n"),
                SSL4ClientEndpoint(global_reactor, "127.0.0.1", number, tls),
            )
        for _ in range(30):
            await connect(_Slow(), TCP4ClientEndpoint(global_reactor, "127.0.0.1", number))
        await deferLater(global_reactor, 0.2, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(limiter.counters.refused_address, 8)
        self.assertEqual(limiter.open_from("127.0.0.1"), 32)
        refused = [c for c in clients if c.lost.called]
        self.assertEqual(len(refused), 8)

        # A legitimate edge from another address is served while the slow ones are held.
        edge = await connect(
            _Slow(b"GET /readyz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n"),
            SSL4ClientEndpoint(
                global_reactor, "127.0.0.1", number, tls, bindAddress=("127.0.0.2", 0)
            ),
        )
        answer = await edge.lost
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nok"), answer)

        # The head deadline (2 s here) cuts every slow connection: 408 for those that asked.
        for client in clients:
            if not client.lost.called:
                await client.lost
        answers = [c.received for c in clients if c is not edge]
        self.assertEqual(sum(a.startswith(b"HTTP/1.1 408 ") for a in answers), 10)
        self.assertEqual(site.http_counters.head_timeouts, 10 + 30 - 8)
        await deferLater(global_reactor, 0.1, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(limiter.open, 0)


# --- handshake admission (reconnect storms) --------------------------------------------------


class _FakeTransport:
    """What HandshakeAdmission uses of a tcp.Server."""

    def __init__(self) -> None:
        self.protocol: Any = None
        self.paused = False
        self.disconnecting = False
        self.disconnected = False
        self.aborted = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def abortConnection(self) -> None:
        self.aborted = self.disconnecting = True

    def loseConnection(self) -> None:
        self.disconnecting = True


class _Handshaking(Protocol):
    _handshakeDone = False
    received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _HandshakeFactory(Factory):
    protocol = _Handshaking

    def __init__(self) -> None:
        self.built: list[_Handshaking] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.built.append(protocol)
        return protocol


class _Port:
    """Accepts like tcp.Port: buildProtocol, a transport, makeConnection."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.transports: list[_FakeTransport] = []

    def accept(self, host: str = "10.0.0.1") -> _FakeTransport | None:
        protocol = self.factory.buildProtocol(v4(host))
        if protocol is None:
            return None
        transport = _FakeTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return transport


class HandshakeAdmissionTests(SynchronousTestCase):
    def make(self, **options: Any) -> tuple[Clock, _HandshakeFactory, HandshakeAdmission, _Port]:
        clock = Clock()
        wrapped = _HandshakeFactory()
        admission = HandshakeAdmission(wrapped, clock, **options)
        return clock, wrapped, admission, _Port(admission)

    def test_cap_on_handshakes_in_progress(self) -> None:
        clock, wrapped, admission, port = self.make(max_handshakes=2)
        transports = [port.accept() for _ in range(5)]
        self.assertEqual(len(wrapped.built), 2)
        self.assertEqual((admission.in_progress, admission.waiting), (2, 3))
        self.assertEqual([t.paused for t in transports], [False, False, True, True, True])
        clock.advance(0.05)
        self.assertEqual(len(wrapped.built), 2)  # nothing finished: nothing more admitted
        wrapped.built[0]._handshakeDone = True
        clock.advance(0.01)
        self.assertEqual(len(wrapped.built), 3)
        third = transports[2]
        self.assertIs(third.protocol, wrapped.built[2])  # no wrapper left on it
        self.assertIs(wrapped.built[2].transport, third)
        self.assertFalse(third.paused)
        transports[1].disconnected = True  # a failed handshake frees its slot too
        clock.advance(0.01)
        self.assertEqual(len(wrapped.built), 4)
        counters = admission.counters
        self.assertEqual((counters.admitted, counters.queued, counters.completed), (4, 3, 2))
        self.assertEqual((counters.peak_waiting, counters.peak_in_progress), (3, 2))

    def test_rate(self) -> None:
        clock, wrapped, admission, port = self.make(max_handshakes=0, per_second=100, burst=5)
        for _ in range(300):
            port.accept()
        self.assertEqual(len(wrapped.built), 5)  # the burst at once
        for _ in range(100):
            clock.advance(0.01)
        self.assertTrue(100 <= len(wrapped.built) - 5 <= 101, len(wrapped.built))
        self.assertEqual(admission.in_progress, 0)  # no cap: nothing tracked
        for _ in range(300):
            clock.advance(0.01)
        self.assertEqual(len(wrapped.built), 300)
        self.assertEqual(admission.waiting, 0)
        self.assertFalse(clock.getDelayedCalls())  # idle: no timer left

    def test_established_connection_untouched(self) -> None:
        clock, wrapped, admission, port = self.make(max_handshakes=1)
        first = port.accept()
        second = port.accept()
        assert first is not None and second is not None
        wrapped.built[0]._handshakeDone = True
        clock.advance(0.01)
        for transport, protocol in zip((first, second), wrapped.built, strict=True):
            self.assertIs(type(transport.protocol), _Handshaking)
            transport.protocol.dataReceived(b"x")
            self.assertEqual(protocol.received, b"x")
        wrapped.built[1]._handshakeDone = True
        clock.advance(0.01)
        self.assertEqual(admission.in_progress, 0)
        self.assertFalse(clock.getDelayedCalls())

    def test_queue_full_or_off_closes_at_once(self) -> None:
        clock, wrapped, admission, port = self.make(max_handshakes=1, queue=1)
        self.assertIsNotNone(port.accept())
        self.assertIsNotNone(port.accept())  # waits
        self.assertIsNone(port.accept())
        self.assertEqual(admission.counters.refused, 1)
        clock, wrapped, admission, port = self.make(max_handshakes=1, queue=0)
        self.assertIsNotNone(port.accept())
        self.assertIsNone(port.accept())
        self.assertEqual((admission.counters.refused, admission.counters.queued), (1, 0))

    def test_waiting_too_long_is_closed(self) -> None:
        clock, wrapped, admission, port = self.make(max_handshakes=1, max_wait=2.0, slot_timeout=60)
        port.accept()
        late = port.accept()
        assert late is not None
        clock.pump([0.5] * 5)
        self.assertTrue(late.aborted)
        self.assertEqual(admission.counters.expired, 1)
        self.assertEqual(len(wrapped.built), 1)

    def test_slot_timeout(self) -> None:
        clock, wrapped, admission, port = self.make(max_handshakes=1, slot_timeout=1.0)
        port.accept()  # a peer that never finishes its handshake
        waiting = port.accept()
        assert waiting is not None
        clock.pump([0.1] * 9)
        self.assertTrue(waiting.paused)
        clock.pump([0.1] * 2)
        self.assertFalse(waiting.paused)
        self.assertEqual(admission.counters.slot_timeouts, 1)

    def test_stop_closes_the_waiting(self) -> None:
        clock, wrapped, admission, port = self.make(max_handshakes=1)
        admission.doStart()
        port.accept()
        waiting = port.accept()
        assert waiting is not None
        admission.doStop()
        self.assertTrue(waiting.aborted)
        self.assertFalse(clock.getDelayedCalls())

    def test_reconfigure(self) -> None:
        clock, wrapped, admission, port = self.make(max_handshakes=1)
        port.accept()
        for _ in range(3):
            port.accept()
        admission.configure(max_handshakes=0, per_second=0, queue=10)
        clock.advance(0.01)
        self.assertEqual((len(wrapped.built), admission.waiting), (4, 0))

    def test_websocket_predicate(self) -> None:
        class Inner:
            state = 1

        class Outer:
            wrappedProtocol: Any = Inner()

        outer = Outer()
        self.assertFalse(websocket_handshake_done(outer))
        outer.wrappedProtocol.state = 3
        self.assertTrue(websocket_handshake_done(outer))
        outer.wrappedProtocol = None
        self.assertTrue(websocket_handshake_done(outer))

    def test_from_config(self) -> None:
        class Limits:
            max_handshakes = 7
            handshakes_per_second = 50

        admission = handshake_admission(_HandshakeFactory(), Limits(), Clock())
        self.assertEqual((admission.max_handshakes, admission.per_second), (7, 50.0))
        self.assertEqual(admission.queue, 10_000)
        self.assertIs(admission.done, websocket_handshake_done)


class _Greeter(Protocol):
    """Done with its "handshake" once it has answered the first line."""

    answered = False

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"hello " + data)  # type: ignore[union-attr]
        self.answered = True


class _Reader(Protocol):
    def __init__(self) -> None:
        self.answer: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"edge")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(data)


class HandshakeAdmissionOverTcpTests(TestCase):
    """The placeholder really is replaced on a twisted.internet.tcp connection."""

    async def test_waiting_connections_served_in_turn(self) -> None:
        admission = HandshakeAdmission(
            Factory.forProtocol(_Greeter),
            global_reactor,
            max_handshakes=1,
            done=lambda protocol: protocol.answered,
        )
        port = global_reactor.listenTCP(0, admission, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(global_reactor, "127.0.0.1", port.getHost().port)
        readers = [_Reader() for _ in range(6)]
        for reader in readers:
            await connectProtocol(endpoint, reader)
        answers = []
        for reader in readers:
            reader.answer.addTimeout(10, global_reactor)
            answers.append(await reader.answer)
            self.addCleanup(reader.transport.loseConnection)  # type: ignore[union-attr]
        self.assertEqual(answers, [b"hello edge"] * 6)
        self.assertEqual(admission.counters.admitted, 6)
        self.assertGreaterEqual(admission.counters.queued, 1)
        self.assertEqual(admission.counters.peak_in_progress, 1)
