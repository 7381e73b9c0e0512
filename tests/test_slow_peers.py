"""Peers that stop reading are dropped (issue 18, finding 6).

WebSocket: the hub protocol is its transport's push producer; the fake transport here pauses it
as Twisted's TCP transport does (more than 64 KiB unsent) and resumes it when "drained". From a
pause, the connection has ``write_timeout`` seconds to drain and may write at most
``max_output_buffer`` more bytes (pongs included); then TCP is aborted. All on a ``Clock``;
one test runs real TLS over loopback against an edge that stops reading.

QUIC: bytes the hub has queued in aioquic for a connection (its message stream and the control
stream) are bounded the same way, checked at each transmit.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.interfaces import CLOSE_POLICY
from cloudhub.model import Message, new_keepalive
from cloudhub.transport.websocket import (
    DEFAULT_MAX_OUTPUT_BUFFER,
    DEFAULT_WRITE_TIMEOUT,
    WebSocketHubFactory,
)
from tests.helpers_tls import make_config, start_server
from tests.test_transport_quic import Base
from tests.test_transport_websocket import (
    EDGECORE_REQUEST,
    CountingTransport,
    RawClient,
    RecordingHandler,
    Unit,
    client_frame,
    edge_credentials,
    parse_frames,
)

PAUSE_AT = 64 * 1024  # Twisted's FileDescriptor.bufferSize


class SlowTransport(CountingTransport):
    """Pauses its registered push producer when more than 64 KiB are unsent, as Twisted's
    TCP transport does, and resumes it when :meth:`drain` empties the buffer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsent = 0
        self.paused = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unsent += len(data)
        if self.producer is not None and self.unsent > PAUSE_AT:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.unsent = 0
        if self.producer is not None and self.paused:
            self.paused = False
            self.producer.resumeProducing()

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def big_message(size: int = 2000) -> Message:
    return new_keepalive().copy(content="x" * size)


class WebSocketSlowPeerTests(SynchronousTestCase):
    def open(self, **options: Any) -> tuple[Any, SlowTransport, Any]:
        self.handler = RecordingHandler()
        self.unit = Unit(self.handler, **options)
        protocol = self.unit.factory.buildProtocol(None)
        transport = SlowTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(EDGECORE_REQUEST)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        transport.clear()
        self.assertIs(transport.producer, protocol)
        self.assertTrue(transport.streaming)
        return protocol, transport, protocol.connection

    def lost_reason(self, protocol: Any) -> str:
        Unit.lose(protocol)
        [lost] = self.handler.of("lost")
        return lost[2]  # type: ignore[no-any-return]

    def test_defaults(self) -> None:
        factory = WebSocketHubFactory(RecordingHandler(), reactor=reactor)
        self.assertEqual(factory.write_timeout, DEFAULT_WRITE_TIMEOUT)
        self.assertEqual(DEFAULT_WRITE_TIMEOUT, 30)
        self.assertEqual(factory.max_output_buffer, DEFAULT_MAX_OUTPUT_BUFFER)
        self.assertEqual(DEFAULT_MAX_OUTPUT_BUFFER, 16 * 1024 * 1024)

    def test_edge_not_reading_many_no_ack_messages(self) -> None:
        """The issue's case: thousands of no-ACK messages to an edge that does not read. With
        the default cap (16 MiB) the connection is aborted once 16 MiB more than Twisted's
        64 KiB are queued, not after 180 MB; counted, and the core told."""
        protocol, transport, connection = self.open()
        for _ in range(10_000):  # ~20 MB
            connection.send_message(big_message())
        self.unit.clock.advance(0)
        self.assertTrue(transport.aborted)
        self.assertFalse(connection.is_open)
        self.assertEqual(self.unit.factory.stats.output_overflows, 1)
        self.assertEqual(self.unit.clock.getDelayedCalls(), [])  # no write timer left
        self.assertIsNone(transport.producer)
        self.assertEqual(
            self.lost_reason(protocol),
            f"dropped by the hub: more than {DEFAULT_MAX_OUTPUT_BUFFER} bytes not taken by "
            "the peer",
        )

    def test_cap_counts_from_the_pause(self) -> None:
        """Up to the cap after the pause is fine; a drain starts the count again."""
        protocol, transport, connection = self.open(max_output_buffer=100_000)
        connection.send_message(big_message(70_000))  # pauses (70 KB > 64 KiB)
        self.unit.clock.advance(0)
        self.assertTrue(transport.paused)
        connection.send_message(big_message(20_000))
        self.unit.clock.advance(0)
        self.assertFalse(transport.aborted)  # 90 KB written since the pause
        transport.drain()
        connection.send_message(big_message(70_000))  # pauses again, count from 70 KB
        self.unit.clock.advance(0)
        self.assertFalse(transport.aborted)
        connection.send_message(big_message(40_000))
        self.unit.clock.advance(0)
        self.assertTrue(transport.aborted)

    def test_write_timeout(self) -> None:
        """Data the peer does not take for write_timeout seconds: TCP aborted, logged once,
        counted. One timer, armed only while paused."""
        protocol, transport, connection = self.open()
        self.assertEqual(self.unit.clock.getDelayedCalls(), [])  # idle: no timer at all
        connection.send_message(big_message(100_000))
        self.unit.clock.advance(0)
        [timer] = self.unit.clock.getDelayedCalls()
        for _ in range(10):
            connection.send_message(big_message())
        self.unit.clock.advance(0)
        self.assertEqual(self.unit.clock.getDelayedCalls(), [timer])
        self.unit.clock.advance(29.9)
        self.assertFalse(transport.aborted)
        self.unit.clock.advance(0.1)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.unit.factory.stats.write_timeouts, 1)
        self.assertEqual(
            self.lost_reason(protocol),
            "dropped by the hub: data not taken by the peer for 30 s (writeTimeout)",
        )

    def test_drain_disarms_the_write_timeout(self) -> None:
        protocol, transport, connection = self.open(write_timeout=5)
        for _ in range(3):
            connection.send_message(big_message(100_000))
            self.unit.clock.advance(4)
            self.assertEqual(len(self.unit.clock.getDelayedCalls()), 1)
            transport.drain()
            self.assertEqual(self.unit.clock.getDelayedCalls(), [])
        self.assertFalse(transport.aborted)
        self.assertTrue(connection.is_open)

    def test_ping_flood_with_pongs_not_read(self) -> None:
        """Autobahn answers every ping with a pong; pongs the peer does not read count
        against the same cap, and once dropped nothing more is answered or kept."""
        protocol, transport, connection = self.open(max_output_buffer=256 * 1024)
        ping = client_frame(b"p" * 125, opcode=9)
        for _ in range(2_000):  # 2,000 pongs of 127 bytes: ~250 KB past the pause
            protocol.dataReceived(ping * 5)
            if transport.aborted:
                break
        self.assertTrue(transport.aborted)
        written = len(transport.value())
        self.assertLess(written, PAUSE_AT + 256 * 1024 + 127 * 5)
        protocol.dataReceived(ping * 1000)
        self.assertEqual(len(transport.value()), written)
        self.assertEqual(protocol.data, b"")
        self.assertEqual(self.unit.factory.stats.output_overflows, 1)

    def test_close_with_a_full_buffer(self) -> None:
        """The core closes a connection whose queued frames go over the cap: aborted, and the
        close frame is not queued behind them."""
        protocol, transport, connection = self.open(max_output_buffer=100_000)
        connection.send_message(big_message(70_000))
        self.unit.clock.advance(0)
        connection.send_message(big_message(200_000))
        connection.close(CLOSE_POLICY, "bye")
        self.assertTrue(transport.aborted)
        frames, _ = parse_frames(transport.value().split(b"\r\n\r\n", 1)[-1])
        self.assertNotIn(8, [f[0] for f in frames])
        self.assertIn("not taken by the peer", self.lost_reason(protocol))

    def test_many_idle_connections_no_timers(self) -> None:
        handler = RecordingHandler()
        unit = Unit(handler)
        for port in range(100):
            unit.connect(EDGECORE_REQUEST.replace(b"edge-node-1", b"edge-%d" % port), port)
        self.assertEqual(len(handler.of("made")), 100)
        self.assertEqual(unit.clock.getDelayedCalls(), [])


class WebSocketSlowPeerIntegrationTests(TestCase):
    """Real TLS over loopback: an edge that stops reading is dropped at the cap."""

    timeout = 60

    async def test_edge_stops_reading(self) -> None:
        config = make_config(self.mktemp())
        authority = CertificateAuthority.load_or_create(config)
        handler = RecordingHandler()
        factory = WebSocketHubFactory(handler, reactor=reactor, max_output_buffer=1024 * 1024)
        port, _, _ = await start_server(self, factory, authority, "require")
        client = await self._raw(authority, port)
        client.transport.write(EDGECORE_REQUEST)  # type: ignore[union-attr]
        await client.wait(lambda data: b"\r\n\r\n" in data)
        client.transport.pauseProducing()  # type: ignore[union-attr]  # stops reading
        await handler.wait(lambda: bool(handler.of("made")))
        connection = handler.connection("edge-node-1")
        message = big_message(64 * 1024)
        turns = 0
        while connection.is_open and turns < 2000:  # at most ~2 GB offered
            for _ in range(16):
                connection.send_message(message)
            turns += 1
            await deferLater(reactor, 0, lambda: None)
        self.assertFalse(connection.is_open)
        await handler.wait(lambda: bool(handler.of("lost")))
        [lost] = handler.of("lost")
        self.assertEqual(
            lost[2], "dropped by the hub: more than 1048576 bytes not taken by the peer"
        )
        self.assertEqual(factory.stats.output_overflows, 1)
        client.transport.resumeProducing()  # type: ignore[union-attr]

    async def _raw(self, authority: CertificateAuthority, port: int) -> RawClient:
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        from cloudhub.certs.tls import client_tls_options

        credentials = edge_credentials(authority)
        options = client_tls_options(
            authority.ca_pem, credentials.cert_pem, credentials.key_pem, hostname="127.0.0.1"
        )
        client = RawClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options), client)

        def cleanup() -> Deferred[bytes]:
            client.transport.abortConnection()  # type: ignore[union-attr]
            return client.lost

        self.addCleanup(cleanup)
        return client


class QuicSlowPeerTests(Base):
    """The edge's datagrams stop arriving at it (it reads nothing, acknowledges nothing)."""

    def test_output_cap(self) -> None:
        hub = self.hub(max_output_buffer=256 * 1024)
        link, _ = self.connected(hub)
        [(_, connection)] = hub.handler.of("made")
        for _ in range(20):
            connection.send_message(big_message(10_000))
        hub.clock.advance(0)
        self.assertTrue(connection.is_open)  # 200 KB queued
        for _ in range(10):
            connection.send_message(big_message(10_000))
        hub.clock.advance(0)
        self.assertFalse(connection.is_open)
        self.assertEqual(hub.protocol.stats.output_overflows, 1)
        link.run(1)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(closed.error_code, CLOSE_POLICY)
        self.assertIn("not taken by the peer", closed.reason_phrase)

    def test_write_timeout(self) -> None:
        hub = self.hub(write_timeout=5)
        link, _ = self.connected(hub)
        [(_, connection)] = hub.handler.of("made")
        for _ in range(10):
            connection.send_message(big_message(10_000))  # 100 KB, more than 64 KiB
        hub.clock.advance(0)
        hub.clock.advance(4)
        self.assertTrue(connection.is_open)
        hub.clock.advance(2)  # aioquic's own timer (loss detection) wakes the check
        for _ in range(20):
            if not connection.is_open:
                break
            hub.clock.advance(1)
        self.assertFalse(connection.is_open)
        self.assertEqual(hub.protocol.stats.write_timeouts, 1)

    def test_reading_edge_not_dropped(self) -> None:
        hub = self.hub(max_output_buffer=256 * 1024, write_timeout=5)
        link, _ = self.connected(hub)
        [(_, connection)] = hub.handler.of("made")
        for _ in range(60):  # 600 KB in all, read as it comes
            for _ in range(5):
                connection.send_message(big_message(2_000))
            hub.clock.advance(0)
            link.run(0.2)
        self.assertTrue(connection.is_open)
        self.assertEqual(len(link.messages_on(1)), 300)
