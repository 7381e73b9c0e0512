"""cloudhub.transport.websocket: Autobahn on a fake transport, then real mutual TLS on loopback.

The unit tests push bytes into the hub protocol and read what it writes (``StringTransport``,
``Clock``). The integration tests listen on 127.0.0.1 port 0 with the hub's real TLS options and
use :class:`cloudhub.edge.client.EdgeNode` or raw TLS sockets as the edge, including the exact
upgrade request and frames of a real edgecore (shared/testdata/edgecore).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    SSL4ClientEndpoint,
    TCP4ClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.tls import client_tls_options
from cloudhub.edge.bootstrap import EdgeCredentials, make_csr, new_key
from cloudhub.edge.client import EdgeNode
from cloudhub.errors import NodeRefused
from cloudhub.interfaces import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    IConnection,
    IConnectionHandler,
)
from cloudhub.model import Message, new_keepalive
from cloudhub.transport.websocket import (
    WebSocketConnection,
    WebSocketHubFactory,
    WebSocketHubProtocol,
    masked_text_frame,
    text_frame,
    text_frame_header,
    websocket_listener,
)
from cloudhub.wire import decode, encode
from tests.helpers_tls import key_pem, make_config, start_server

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDGECORE_DIR = os.path.join(REPO_ROOT, "..", "shared", "testdata", "edgecore")
PROJECT_ID = "e632aba927ea4ac2b575ec1603d56f10"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# The upgrade request of a real edgecore v1.15.4 (ws-handshake.txt), for the unit tests; the
# integration test reads it from the capture itself.
EDGECORE_REQUEST = (
    b"GET /e632aba927ea4ac2b575ec1603d56f10/edge-node-1/events HTTP/1.1\r\n"
    b"Host: 127.0.0.1:10000\r\n"
    b"User-Agent: Go-http-client/1.1\r\n"
    b"Connection: Upgrade\r\n"
    b"Connectionuse: msg\r\n"
    b"Node_id: edge-node-1\r\n"
    b"Project_id: e632aba927ea4ac2b575ec1603d56f10\r\n"
    b"Sec-WebSocket-Key: aSdB5ohiXP4CRL8s6KpxYQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Upgrade: websocket\r\n"
    b"\r\n"
)
EDGECORE_ACCEPT = b"BTS/zwEZ9W7zUOSFkWLx1VjSq9M="  # what ws-handshake.txt shows for that key


def upgrade_request(node_id: str | None = "edge-node-1", extra: bytes = b"") -> bytes:
    lines = [
        b"GET /p/n/events HTTP/1.1",
        b"Host: 127.0.0.1:10000",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    ]
    if node_id is not None:
        lines.append(b"Node_id: " + node_id.encode())
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


# --- frames ----------------------------------------------------------------------------------


def parse_frames(data: bytes) -> tuple[list[tuple[int, bool, bytes]], bytes]:
    """(opcode, masked, unmasked payload) of each whole frame in ``data``, and the rest."""
    frames = []
    while len(data) >= 2:
        first, second = data[0], data[1]
        assert first & 0x80, "fragmented frame"
        masked = bool(second & 0x80)
        length = second & 0x7F
        offset = 2
        if length == 126:
            (length,) = struct.unpack("!H", data[2:4])
            offset = 4
        elif length == 127:
            (length,) = struct.unpack("!Q", data[2:10])
            offset = 10
        mask = b""
        if masked:
            mask = data[offset : offset + 4]
            offset += 4
        if len(data) < offset + length:
            break
        payload = data[offset : offset + length]
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frames.append((first & 0x0F, masked, payload))
        data = data[offset + length :]
    return frames, data


def close_of(payload: bytes) -> tuple[int, str]:
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8")


def client_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    """A masked frame of any opcode (``masked_text_frame`` makes text frames only)."""
    frame = bytearray(masked_text_frame(payload, b"\x01\x02\x03\x04"))
    frame[0] = (0x80 if fin else 0) | opcode
    return bytes(frame)


def keepalive_payload(msg_id: str = "k-1") -> bytes:
    return encode(new_keepalive().copy(msg_id=msg_id))


# --- a handler that records ------------------------------------------------------------------


@implementer(IConnectionHandler)
class RecordingHandler:
    """Records the three events; refuses the nodes in ``refuse``; lets a test wait for a state."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.refuse = set(refuse)
        self.events: list[tuple[Any, ...]] = []
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def connection_made(self, connection: IConnection) -> None:
        if connection.node_id in self.refuse:
            self._add(("refused", connection))
            raise NodeRefused(connection.node_id, "node limit 1 reached")
        self._add(("made", connection))

    def message_received(self, connection: IConnection, message: object) -> None:
        self._add(("message", connection, message))

    def connection_lost(self, connection: IConnection, reason: str) -> None:
        self._add(("lost", connection, reason))

    def _add(self, event: tuple[Any, ...]) -> None:
        self.events.append(event)
        still = []
        for predicate, waiting in self._waiting:
            if predicate():
                waiting.callback(None)
            else:
                still.append((predicate, waiting))
        self._waiting = still

    def wait(self, predicate: Callable[[], bool]) -> Deferred[None]:
        if predicate():
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append((predicate, waiting))
        return waiting

    def of(self, kind: str, node_id: str | None = None) -> list[tuple[Any, ...]]:
        return [
            e for e in self.events if e[0] == kind and (node_id is None or e[1].node_id == node_id)
        ]

    def connection(self, node_id: str) -> WebSocketConnection:
        return self.of("made", node_id)[-1][1]  # type: ignore[no-any-return]

    def messages(self, node_id: str) -> list[Message]:
        return [e[2] for e in self.of("message", node_id)]


# --- unit tests: the hub protocol on a StringTransport ---------------------------------------


class CountingTransport(StringTransport):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def unregisterProducer(self) -> None:
        # Autobahn unregisters on every drop; real transports allow it without a producer.
        self.producer = None


class Unit:
    """One hub factory on a Clock, with connections on fake transports."""

    def __init__(
        self, handler: RecordingHandler, max_message_size: int = 8 * 1024 * 1024, **options: Any
    ):
        self.clock = Clock()
        self.handler = handler
        self.factory = WebSocketHubFactory(handler, max_message_size, self.clock, **options)

    def connect(self, request: bytes = EDGECORE_REQUEST, port: int = 40000) -> tuple[Any, Any]:
        address = IPv4Address("TCP", "10.0.0.5", port)
        protocol = self.factory.buildProtocol(address)
        transport = CountingTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(request)
        return protocol, transport

    def open(self, port: int = 40000) -> tuple[Any, CountingTransport, WebSocketConnection]:
        protocol, transport = self.connect(port=port)
        response, _, rest = transport.value().partition(b"\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 101 "), response
        transport.clear()
        transport.writes.clear()
        return protocol, transport, protocol.connection

    @staticmethod
    def lose(protocol: Any) -> None:
        protocol.connectionLost(Failure(ConnectionDone()))


class HandshakeUnitTests(SynchronousTestCase):
    def test_edgecore_request(self) -> None:
        """edgecore's upgrade request gets a plain 101 (no Server header, no subprotocol, no
        extension) with the right accept key, and the handler a connection named by the
        headers."""
        handler = RecordingHandler()
        unit = Unit(handler)
        protocol, transport = unit.connect(EDGECORE_REQUEST)
        response = transport.value()
        head = response.split(b"\r\n\r\n")[0].split(b"\r\n")
        self.assertEqual(head[0], b"HTTP/1.1 101 Switching Protocols")
        headers = {line.split(b":")[0].lower(): line.split(b": ", 1)[1] for line in head[1:]}
        self.assertEqual(headers[b"sec-websocket-accept"], EDGECORE_ACCEPT)
        self.assertEqual(headers[b"upgrade"].lower(), b"websocket")
        self.assertEqual(sorted(headers), [b"connection", b"sec-websocket-accept", b"upgrade"])
        [(kind, connection)] = handler.events
        self.assertEqual(kind, "made")
        self.assertTrue(verifyObject(IConnection, connection))
        self.assertEqual(connection.node_id, "edge-node-1")
        self.assertEqual(connection.project_id, PROJECT_ID)
        self.assertEqual(connection.transport, "websocket")
        self.assertEqual(connection.peer, "10.0.0.5:40000")
        self.assertTrue(connection.is_open)

    def test_handshake_text_released_once_open(self) -> None:
        """An idle node does not keep its upgrade request and response (memory per node)."""
        unit = Unit(RecordingHandler())
        protocol, _ = unit.connect(EDGECORE_REQUEST)
        self.assertEqual(
            (protocol.http_headers, protocol.http_request_data, protocol.http_response_data),
            ({}, b"", ""),
        )

    def test_header_case_and_path_do_not_matter(self) -> None:
        handler = RecordingHandler()
        request = upgrade_request(None, b"NODE_ID: n-7\r\nproject_ID: p\r\n")
        Unit(handler).connect(request.replace(b"/p/n/events", b"/anything"))
        [(_, connection)] = handler.events
        self.assertEqual((connection.node_id, connection.project_id), ("n-7", "p"))

    def test_missing_node_id(self) -> None:
        """No node_id header, or an empty one: HTTP 400 with the reason, nothing reported."""
        for request in (upgrade_request(None), upgrade_request("")):
            handler = RecordingHandler()
            protocol, transport = Unit(handler).connect(request)
            self.assertTrue(
                transport.value().startswith(b"HTTP/1.1 400 missing node_id header\r\n"),
                transport.value(),
            )
            self.assertTrue(transport.disconnecting)
            Unit.lose(protocol)
            self.assertEqual(handler.events, [])

    def test_plain_get_is_not_upgraded(self) -> None:
        handler = RecordingHandler()
        _, transport = Unit(handler).connect(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 426 "), transport.value())
        self.assertEqual(handler.events, [])

    def test_no_subprotocol_no_extension(self) -> None:
        handler = RecordingHandler()
        extra = (
            b"Sec-WebSocket-Protocol: chat\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        )
        _, transport = Unit(handler).connect(upgrade_request("n", extra))
        head = transport.value().split(b"\r\n\r\n")[0].lower()
        self.assertTrue(head.startswith(b"http/1.1 101 "))
        self.assertNotIn(b"sec-websocket-protocol", head)
        self.assertNotIn(b"sec-websocket-extensions", head)

    def test_options(self) -> None:
        """No auto ping, no fragmentation, no compression, a 10 s handshake deadline,
        the size limit on frames and messages, timers on the injected reactor."""
        unit = Unit(RecordingHandler(), max_message_size=4096)
        factory = unit.factory
        self.assertEqual((factory.autoPingInterval, factory.autoPingTimeout), (0, 0))
        self.assertEqual(factory.autoFragmentSize, 0)
        self.assertIsNone(factory.perMessageCompressionAccept([object()]))
        self.assertEqual(factory.openHandshakeTimeout, 10)
        self.assertTrue(factory.failByDrop)
        self.assertEqual((factory.maxMessagePayloadSize, factory.maxFramePayloadSize), (4096, 4096))
        self.assertIsNone(factory.server)
        protocol, _ = unit.connect(b"")
        self.assertEqual(len(unit.clock.getDelayedCalls()), 1)  # the open handshake timeout
        self.assertRaises(TypeError, WebSocketHubFactory, RecordingHandler())
        # The connection sees the factory's options without a copy of its own (CPU and
        # memory per connection: with_factory_options).
        self.assertIsInstance(protocol, WebSocketHubProtocol)
        for name in (
            "maxMessagePayloadSize",
            "maxFramePayloadSize",
            "openHandshakeTimeout",
            "failByDrop",
            "perMessageCompressionAccept",
            "autoPingInterval",
        ):
            self.assertNotIn(name, vars(protocol))
        self.assertEqual(
            (protocol.maxMessagePayloadSize, protocol.maxFramePayloadSize), (4096, 4096)
        )
        self.assertIsNone(protocol.perMessageCompressionAccept([object()]))

    def test_open_handshake_timeout(self) -> None:
        """A connection that never finishes the upgrade is dropped after 10 s (on the
        injected reactor), without a word to the handler, and counted."""
        handler = RecordingHandler()
        unit = Unit(handler)
        protocol, transport = unit.connect(b"GET / HTTP/1.1\r\n")
        unit.clock.advance(9)
        self.assertFalse(transport.disconnecting)
        unit.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        Unit.lose(protocol)
        self.assertEqual(handler.events, [])
        self.assertEqual(unit.factory.stats.handshake_timeouts, 1)

    def test_handshake_timeout_is_a_parameter(self) -> None:
        """A slow-header client (one byte now and then) is dropped at the deadline whatever
        it sends meanwhile."""
        unit = Unit(RecordingHandler(), handshake_timeout=3)
        protocol, transport = unit.connect(b"G")
        for byte in b"ET / HTTP/1.1\r\nHost: x\r\n":
            unit.clock.advance(0.1)
            protocol.dataReceived(bytes([byte]))
        self.assertFalse(transport.disconnecting)
        unit.clock.advance(3 - unit.clock.seconds())
        self.assertTrue(transport.disconnecting)

    def test_request_headers_too_large(self) -> None:
        """An upgrade request over 16 KiB is answered 431 and dropped as soon as the 16 KiB
        are in, without a word to the handler and without keeping the bytes (finding 7)."""
        handler = RecordingHandler()
        unit = Unit(handler)
        head = upgrade_request("edge-1")[:-2]
        protocol, transport = unit.connect(head)
        filler = b"X-Filler: " + b"f" * 1000 + b"\r\n"
        while len(protocol.data) + len(filler) <= 16 * 1024:
            protocol.dataReceived(filler)
            self.assertEqual(transport.value(), b"")
        protocol.dataReceived(filler)
        status = transport.value().split(b"\r\n", 1)[0]
        self.assertEqual(status, b"HTTP/1.1 431 Request Header Fields Too Large (over 16384 bytes)")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.data, b"")
        protocol.dataReceived(filler * 100)  # still arriving: not kept
        self.assertEqual(protocol.data, b"")
        Unit.lose(protocol)
        self.assertEqual(handler.events, [])
        self.assertEqual(unit.factory.stats.requests_too_large, 1)

    def test_request_in_one_piece_too_large(self) -> None:
        handler = RecordingHandler()
        unit = Unit(handler)
        _, transport = unit.connect(upgrade_request("edge-1", b"X-Big: " + b"b" * 20000 + b"\r\n"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value()[:80])
        self.assertEqual(handler.events, [])

    def test_request_line_too_long(self) -> None:
        handler = RecordingHandler()
        unit = Unit(handler)
        _, transport = unit.connect(b"GET /" + b"p" * 17000)
        self.assertEqual(
            transport.value().split(b"\r\n", 1)[0],
            b"HTTP/1.1 414 URI Too Long (request line over 16384 bytes)",
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(unit.factory.stats.requests_too_large, 1)

    def test_request_size_limit_is_exact_and_a_parameter(self) -> None:
        """A head of exactly ``max_request_size`` bytes is accepted, one more is not; frames
        after the head in the same read do not count."""
        for extra, accepted in ((0, True), (1, False)):
            handler = RecordingHandler()
            base = upgrade_request("edge-1", b"X-Pad: \r\n")
            request = base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (1024 - len(base) + extra))
            self.assertEqual(len(request), 1024 + extra)
            unit = Unit(handler, max_request_size=1024)
            _, transport = unit.connect(request + client_frame(b"x" * 2000))
            status = transport.value().split(b"\r\n", 1)[0]
            if accepted:
                self.assertEqual(status, b"HTTP/1.1 101 Switching Protocols")
                self.assertEqual([e[0] for e in handler.events], ["made"])
            else:
                self.assertEqual(status[:13], b"HTTP/1.1 431 ")
                self.assertEqual(handler.events, [])

    def test_request_byte_by_byte(self) -> None:
        """edgecore's request one byte per read: accepted (Autobahn parses it once)."""
        handler = RecordingHandler()
        protocol, transport = Unit(handler).connect(b"")
        for i in range(len(EDGECORE_REQUEST)):
            protocol.dataReceived(EDGECORE_REQUEST[i : i + 1])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        self.assertEqual(handler.connection("edge-node-1").project_id, PROJECT_ID)

    def test_refused(self) -> None:
        """NodeRefused: close 1013 with the reason; no messages, and no connection_lost."""
        handler = RecordingHandler(refuse=("edge-node-1",))
        unit = Unit(handler)
        protocol, transport = unit.connect(EDGECORE_REQUEST + client_frame(keepalive_payload()))
        frames, _ = parse_frames(transport.value().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(frames[0][0], 8)
        self.assertEqual(close_of(frames[0][2]), (1013, "node limit 1 reached"))
        protocol.dataReceived(client_frame(keepalive_payload("k-2")))
        protocol.dataReceived(client_frame(struct.pack("!H", 1013), opcode=8))
        self.assertTrue(transport.disconnecting)
        Unit.lose(protocol)
        self.assertEqual([e[0] for e in handler.events], ["refused"])
        self.assertFalse(protocol.connection.is_open)

    def test_connection_made_bug(self) -> None:
        """Another exception from connection_made: logged, closed with 1011, not reported."""
        handler = RecordingHandler()

        def broken(connection: IConnection) -> None:
            raise RuntimeError("bug")

        handler.connection_made = broken  # type: ignore[method-assign]
        protocol, transport = Unit(handler).connect()
        frames, _ = parse_frames(transport.value().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(close_of(frames[0][2]), (1011, "internal error"))
        Unit.lose(protocol)
        self.assertEqual(handler.events, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ReceiveUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.handler = RecordingHandler()
        self.unit = Unit(self.handler, max_message_size=1024)
        self.protocol, self.transport, self.connection = self.unit.open()

    def received(self) -> list[str]:
        return [m.msg_id for m in self.handler.messages("edge-node-1")]

    def test_text_binary_fragmented(self) -> None:
        """Text and binary messages, and a message in fragments, each decode to one message."""
        payload = keepalive_payload("frag")
        self.protocol.dataReceived(
            client_frame(keepalive_payload("text"))
            + client_frame(keepalive_payload("binary"), opcode=2)
            + client_frame(payload[:10], opcode=1, fin=False)
            + client_frame(payload[10:50], opcode=0, fin=False)
            + client_frame(payload[50:], opcode=0, fin=True)
        )
        self.assertEqual(self.received(), ["text", "binary", "frag"])
        self.assertEqual(self.transport.value(), b"")

    def test_bytes_in_pieces(self) -> None:
        data = client_frame(keepalive_payload("a")) + client_frame(keepalive_payload("b"))
        for i in range(len(data)):
            self.protocol.dataReceived(data[i : i + 1])
        self.assertEqual(self.received(), ["a", "b"])

    def test_ping_answered(self) -> None:
        self.protocol.dataReceived(client_frame(b"obs-ping", opcode=9))
        frames, _ = parse_frames(self.transport.value())
        self.assertEqual(frames, [(10, False, b"obs-ping")])
        self.assertEqual(self.received(), [])

    def assertClosedWith(self, code: int, reason_pattern: str) -> None:
        frames, _ = parse_frames(self.transport.value())
        self.assertEqual(frames[-1][0], 8)
        got_code, reason = close_of(frames[-1][2])
        self.assertEqual(got_code, code)
        self.assertRegex(reason, reason_pattern)
        self.assertLessEqual(len(frames[-1][2]), 125)

    def finish_close(self, reason: str) -> None:
        self.protocol.dataReceived(client_frame(struct.pack("!H", 1000), opcode=8))
        self.assertTrue(self.transport.disconnecting)
        Unit.lose(self.protocol)
        [lost] = self.handler.of("lost")
        self.assertEqual(lost[2], reason)

    def test_invalid_json(self) -> None:
        """A message that does not decode: close 1007 with the decoder's reason; what follows
        is not delivered; connection_lost once the TCP connection is gone."""
        self.protocol.dataReceived(
            client_frame(b"{not json") + client_frame(keepalive_payload("after"))
        )
        self.assertClosedWith(CLOSE_INVALID_PAYLOAD, "^message is not valid JSON")
        self.assertEqual(self.received(), [])
        self.assertFalse(self.connection.is_open)
        self.finish_close(
            "closed by the hub (1007: message is not valid JSON: Expecting property name "
            "enclosed in double quotes: line 1 column 2 (char 1))"
        )

    def test_invalid_utf8(self) -> None:
        self.protocol.dataReceived(client_frame(b'{"header":{"msg_id":"\xff"}}'))
        self.assertClosedWith(CLOSE_INVALID_PAYLOAD, "^message is not valid UTF-8")

    def test_wrong_field_type(self) -> None:
        self.protocol.dataReceived(client_frame(b'{"header":{"timestamp":"x"}}'))
        self.assertClosedWith(CLOSE_INVALID_PAYLOAD, "header.timestamp must be an integer")

    def test_too_big(self) -> None:
        """Over max_message_size: close 1009, the rest of the message is discarded unread."""
        self.protocol.dataReceived(client_frame(b"x" * 1025)[:600])
        self.assertClosedWith(CLOSE_TOO_BIG, "^message of 1025 bytes exceeds the limit of 1024$")
        self.protocol.dataReceived(client_frame(b"x" * 1025)[600:])
        self.assertEqual(self.received(), [])
        self.finish_close(
            "closed by the hub (1009: message of 1025 bytes exceeds the limit of 1024)"
        )

    def test_too_big_in_fragments(self) -> None:
        self.protocol.dataReceived(
            client_frame(b"x" * 1000, fin=False) + client_frame(b"x" * 100, opcode=0)
        )
        self.assertClosedWith(CLOSE_TOO_BIG, "exceeds the limit of 1024")
        self.assertEqual(self.received(), [])

    def test_exactly_the_limit(self) -> None:
        # Padded in the content: msg_id is bounded by the decoder.
        def padded(size: int) -> bytes:
            return encode(new_keepalive().copy(msg_id="k", content="x" * size))

        payload = padded(1024 - len(padded(0)))
        self.assertEqual(len(payload), 1024)
        self.protocol.dataReceived(client_frame(payload))
        self.assertEqual(len(self.received()), 1)

    def test_garbage(self) -> None:
        """Bytes that are not WebSocket framing: close 1002 (protocol error) with the reason,
        nothing more is read; TCP goes when the edge closes, or after the close handshake
        timeout (issue 18, finding 11)."""
        self.protocol.dataReceived(b"\x8f\x80garbage garbage")
        self.assertClosedWith(1002, "^control frame using reserved opcode 15$")
        self.assertFalse(self.connection.is_open)
        self.assertEqual(self.unit.factory.stats.protocol_errors, 1)
        # Whatever follows is not parsed: not even a close frame (the framing is lost).
        self.protocol.dataReceived(client_frame(keepalive_payload("after")))
        self.protocol.dataReceived(client_frame(struct.pack("!H", 1000), opcode=8))
        self.assertEqual(self.protocol.data, b"")
        self.assertFalse(self.transport.disconnecting)
        self.unit.clock.advance(2)  # CLOSE_HANDSHAKE_TIMEOUT
        self.assertTrue(self.transport.disconnecting)
        Unit.lose(self.protocol)
        self.assertEqual(self.received(), [])
        [lost] = self.handler.of("lost")
        self.assertEqual(
            lost[2], "closed by the hub (1002: control frame using reserved opcode 15)"
        )

    def test_unmasked_client_frame(self) -> None:
        self.protocol.dataReceived(text_frame(keepalive_payload()))
        self.assertClosedWith(1002, "^unmasked client-to-server frame$")
        self.assertEqual(self.received(), [])

    def test_protocol_errors_after_queued_frames(self) -> None:
        """Frames queued before the violation are written before the close frame; a second
        violation changes nothing."""
        self.connection.send_message(new_keepalive().copy(msg_id="queued"))
        self.protocol.dataReceived(client_frame(b"x", opcode=0))  # continuation, no message
        frames, _ = parse_frames(self.transport.value())
        self.assertEqual([f[0] for f in frames], [1, 8])
        self.assertEqual(decode(frames[0][2]).msg_id, "queued")
        self.assertEqual(
            close_of(frames[1][2]),
            (1002, "received continuation data frame outside fragmented message"),
        )
        self.protocol.dataReceived(b"\x8f\x80")
        self.assertEqual(len(parse_frames(self.transport.value())[0]), 2)
        self.assertEqual(self.unit.factory.stats.protocol_errors, 1)

    def test_bad_close_code(self) -> None:
        self.protocol.dataReceived(client_frame(struct.pack("!H", 1005), opcode=8))
        self.assertClosedWith(1002, "^invalid close code 1005$")

    def test_edge_closes(self) -> None:
        self.protocol.dataReceived(client_frame(struct.pack("!H", 1000) + b"bye", opcode=8))
        frames, _ = parse_frames(self.transport.value())
        self.assertEqual(frames[-1][0], 8)
        Unit.lose(self.protocol)
        self.assertEqual(self.handler.of("lost")[0][2], "closed by the edge (1000: bye)")

    def test_tcp_lost(self) -> None:
        Unit.lose(self.protocol)
        Unit.lose(self.protocol)  # twice: still one connection_lost
        [lost] = self.handler.of("lost")
        self.assertIn("peer dropped the TCP connection", lost[2])

    def test_handler_bug_in_message_received(self) -> None:
        """An exception from message_received is logged; the connection goes on."""
        calls = []

        def broken(connection: IConnection, message: object) -> None:
            calls.append(message)
            raise RuntimeError("bug")

        self.handler.message_received = broken  # type: ignore[method-assign]
        self.protocol.dataReceived(
            client_frame(keepalive_payload("1")) + client_frame(keepalive_payload("2"))
        )
        self.assertEqual(len(calls), 2)
        self.assertTrue(self.connection.is_open)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class SendUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.handler = RecordingHandler()
        self.unit = Unit(self.handler)
        self.protocol, self.transport, self.connection = self.unit.open()

    def messages(self, count: int, size: int = 10) -> list[Message]:
        return [
            Message.new("edgecontroller", "resource", "insert", f"default/pod/p{i}", "x" * size)
            for i in range(count)
        ]

    def test_coalesced(self) -> None:
        """Messages sent in one reactor turn leave in one write, as valid unmasked text
        frames carrying wire.encode of each message, in order."""
        messages = self.messages(3)
        for message in messages:
            self.connection.send_message(message)
        self.assertEqual(self.transport.writes, [])
        self.unit.clock.advance(0)
        self.assertEqual(len(self.transport.writes), 1)
        frames, rest = parse_frames(self.transport.writes[0])
        self.assertEqual(rest, b"")
        self.assertEqual([(op, masked) for op, masked, _ in frames], [(1, False)] * 3)
        self.assertEqual([p for _, _, p in frames], [encode(m) for m in messages])
        self.assertEqual([decode(p) for _, _, p in frames], messages)
        self.connection.send_message(messages[0])
        self.unit.clock.advance(0)
        self.assertEqual(len(self.transport.writes), 2)

    def test_one_flush_for_all_connections(self) -> None:
        """One timer per turn for the whole factory, one write per connection."""
        other_protocol, other_transport, other = self.unit.open(port=40001)
        self.connection.send_message(self.messages(1)[0])
        other.send_message(self.messages(1)[0])
        self.connection.send_message(self.messages(1)[0])
        self.assertEqual(len(self.unit.clock.getDelayedCalls()), 1)
        self.unit.clock.advance(0)
        self.assertEqual(len(self.transport.writes), 1)
        self.assertEqual(len(other_transport.writes), 1)
        self.assertEqual(len(parse_frames(self.transport.writes[0])[0]), 2)

    def test_frame_lengths(self) -> None:
        """7-bit, 16-bit and 64-bit payload lengths, each at its edges."""
        for size in (0, 125, 126, 65535, 65536, 70000):
            header = text_frame_header(size)
            frames, rest = parse_frames(header + b"a" * size)
            self.assertEqual((frames, rest), ([(1, False, b"a" * size)], b""))
            self.assertEqual(len(header), 2 if size < 126 else 4 if size < 65536 else 10)
        big = self.messages(1, size=70000)[0]
        self.connection.send_message(big)
        self.unit.clock.advance(0)
        frames, _ = parse_frames(self.transport.value())
        self.assertEqual(decode(frames[0][2]), big)

    def test_masked_frames(self) -> None:
        for size in (0, 1, 3, 4, 5, 125, 126, 300, 65536):
            payload = os.urandom(size)
            frame = masked_text_frame(payload, b"\xa1\xb2\xc3\xd4")
            self.assertEqual(parse_frames(frame), ([(1, True, payload)], b""))

    def test_sync_cleared(self) -> None:
        message = self.messages(1)[0].copy(sync=True)
        self.connection.send_message(message)
        self.unit.clock.advance(0)
        frames, _ = parse_frames(self.transport.value())
        self.assertNotIn(b'"sync"', frames[0][2])
        self.assertTrue(message.sync)

    def test_encoded_bytes_reused(self) -> None:
        """Bytes the core already encoded (for the sync store) go out as they are."""
        message = self.messages(1)[0]
        encoded = encode(message)
        self.connection.send_message(message, encoded)
        self.unit.clock.advance(0)
        frames, _ = parse_frames(self.transport.value())
        self.assertIs(frames[0][2].__class__, bytes)
        self.assertEqual(frames[0][2], encoded)

    def test_encoded_ignored_for_sync_message(self) -> None:
        """A sync message's stored bytes say sync:true; the wire form must not (§2.4)."""
        message = self.messages(1)[0].copy(sync=True)
        self.connection.send_message(message, encode(message))
        self.unit.clock.advance(0)
        frames, _ = parse_frames(self.transport.value())
        self.assertNotIn(b'"sync"', frames[0][2])
        self.assertEqual(decode(frames[0][2]), message.copy(sync=False))

    def test_close_after_send(self) -> None:
        """Frames queued before close are written first; then the close frame; nothing after."""
        self.connection.send_message(self.messages(1)[0])
        self.connection.close(CLOSE_POLICY, "replaced by a newer connection")
        self.connection.send_message(self.messages(1)[0])
        self.connection.close(CLOSE_POLICY, "again")
        self.unit.clock.advance(0)
        frames, _ = parse_frames(self.transport.value())
        self.assertEqual([op for op, _, _ in frames], [1, 8])
        self.assertEqual(close_of(frames[1][2]), (CLOSE_POLICY, "replaced by a newer connection"))
        self.assertEqual(self.handler.of("lost"), [])
        # The edge does not answer: TCP is dropped after the close handshake timeout.
        self.unit.clock.advance(2)
        self.assertTrue(self.transport.disconnecting)
        Unit.lose(self.protocol)
        [lost] = self.handler.of("lost")
        self.assertEqual(lost[2], "closed by the hub (1008: replaced by a newer connection)")
        self.connection.send_message(self.messages(1)[0])
        self.connection.close(CLOSE_POLICY, "closed")

    def test_long_close_reason(self) -> None:
        self.connection.close(CLOSE_POLICY, "é" * 100)
        frames, _ = parse_frames(self.transport.value())
        code, reason = close_of(frames[0][2])
        self.assertEqual(reason, "é" * 61)

    def test_send_from_connection_made(self) -> None:
        """connection_made may send at once; the frame follows the 101."""
        handler = RecordingHandler()
        unit = Unit(handler)
        greeting = self.messages(1)[0]

        def made(connection: IConnection) -> None:
            connection.send_message(greeting)

        handler.connection_made = made  # type: ignore[method-assign]
        _, transport = unit.connect()
        unit.clock.advance(0)
        frames, _ = parse_frames(transport.value().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(decode(frames[0][2]), greeting)


# --- integration: real TLS on loopback -------------------------------------------------------


def edge_credentials(authority: CertificateAuthority) -> EdgeCredentials:
    key = new_key()
    der = authority.sign_csr(make_csr(key))
    cert = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    return EdgeCredentials(authority.ca_pem, cert, key_pem(key))


class RawClient(Protocol):
    """Bytes in and out of a TLS connection, with waiting on what has arrived."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[bytes] = Deferred()
        self._waiting: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        still = []
        for predicate, waiting in self._waiting:
            if predicate(self.received):
                waiting.callback(self.received)
            else:
                still.append((predicate, waiting))
        self._waiting = still

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        for _, waiting in self._waiting:
            waiting.callback(self.received)
        self._waiting = []
        self.lost.callback(self.received)

    def wait(self, predicate: Callable[[bytes], bool]) -> Deferred[bytes]:
        if predicate(self.received):
            return succeed(self.received)
        waiting: Deferred[bytes] = Deferred()
        self._waiting.append((predicate, waiting))
        return waiting


class IntegrationTests(TestCase):
    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.config = make_config(self.mktemp(), websocket={"address": "127.0.0.1", "port": 0})
        self.authority = CertificateAuthority.load_or_create(self.config)
        self.credentials = edge_credentials(self.authority)
        self.handler = RecordingHandler(refuse=("full",))

    async def start_hub(self, max_message_size: int = 8 * 1024 * 1024) -> int:
        factory = WebSocketHubFactory(self.handler, max_message_size, reactor)
        port, _, _ = await start_server(self, factory, self.authority, "require")
        return port  # type: ignore[no-any-return]

    def node(self, port: int, node_id: str, **kwargs: Any) -> EdgeNode:
        kwargs.setdefault("credentials", self.credentials)
        kwargs.setdefault("reconnect", False)
        node = EdgeNode(reactor, node_id, "127.0.0.1", port, **kwargs)
        self.addCleanup(node.stop)
        return node

    async def raw(
        self, port: int, credentials: EdgeCredentials | None, to_send: bytes = b""
    ) -> RawClient:
        options = client_tls_options(
            self.authority.ca_pem,
            credentials.cert_pem if credentials else None,
            credentials.key_pem if credentials else None,
            hostname="127.0.0.1",
        )
        client = RawClient()
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, options)
        await connectProtocol(endpoint, client)

        def cleanup() -> Deferred[bytes]:
            client.transport.loseConnection()  # type: ignore[union-attr]
            return client.lost

        self.addCleanup(cleanup)
        if to_send:
            client.transport.write(to_send)  # type: ignore[union-attr]
        return client

    async def test_messages_both_ways(self) -> None:
        """The edge connects with its headers; its keepalive reaches the handler; a message
        from the hub reaches the edge, is stored, and its ACK comes back."""
        port = await self.start_hub()
        node = self.node(port, "edge-node-1")
        await node.start()
        await self.handler.wait(lambda: bool(self.handler.messages("edge-node-1")))
        connection = self.handler.connection("edge-node-1")
        self.assertEqual(connection.project_id, PROJECT_ID)
        self.assertRegex(connection.peer, r"^127\.0\.0\.1:\d+$")
        [keepalive] = self.handler.messages("edge-node-1")
        self.assertEqual((keepalive.operation, keepalive.content), ("keepalive", "ping"))

        pod = Message.new(
            "edgecontroller",
            "resource",
            "insert",
            "default/pod/nginx",
            {"kind": "Pod", "metadata": {"name": "nginx", "uid": "u-1"}},
            resource_version="12345",
        )
        connection.send_message(pod)
        await self.handler.wait(lambda: len(self.handler.messages("edge-node-1")) == 2)
        ack = self.handler.messages("edge-node-1")[1]
        self.assertEqual(
            (ack.operation, ack.parent_msg_id, ack.content), ("response", pod.msg_id, "OK")
        )
        self.assertEqual(node.store.get("default/pod/nginx").resource_version, "12345")  # type: ignore[union-attr]

        await node.stop()
        await self.handler.wait(lambda: bool(self.handler.of("lost")))
        self.assertEqual(self.handler.of("lost")[0][2], "closed by the edge (1000)")
        self.assertEqual(
            [e[0] for e in self.handler.events], ["made", "message", "message", "lost"]
        )

    async def test_listener_service(self) -> None:
        """websocket_listener: the configured address, port 0, required client certificates;
        binary messages are accepted like text ones."""
        service = websocket_listener(self.config, self.authority, self.handler, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        await service.listening
        node = self.node(service.bound_port, "edge-node-2")
        await node.start()
        node.protocol.sendMessage(keepalive_payload("as-binary"), isBinary=True)  # type: ignore[union-attr]
        await self.handler.wait(lambda: len(self.handler.messages("edge-node-2")) == 2)
        self.assertEqual(self.handler.messages("edge-node-2")[1].msg_id, "as-binary")
        # TLS writes go out with the factory's one flush per turn, without Twisted's own
        # aggregation timer per connection (UnbufferedTLSFactory).
        connection = self.handler.connection("edge-node-2")
        tls = connection._protocol.transport
        self.assertIs(type(tls), TLSMemoryBIOProtocol)
        connection.send_message(self.handler.messages("edge-node-2")[0])
        connection._protocol.flush()
        self.assertEqual(len(tls._appSendBuffer), 0)
        await node.stop()
        await self.handler.wait(lambda: bool(self.handler.of("lost")))

    async def test_listener_requires_client_certificate(self) -> None:
        """websocket_listener's own TLS (UnbufferedTLSFactory) refuses a client without a
        certificate before any WebSocket byte; the handler hears nothing."""
        service = websocket_listener(self.config, self.authority, self.handler, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        await service.listening
        client = await self.raw(service.bound_port, None, EDGECORE_REQUEST)
        self.assertEqual(await client.lost, b"")
        self.assertEqual(self.handler.events, [])

    async def test_edgecore_capture(self) -> None:
        """The upgrade request of a real edgecore, then the masked frames it sent (scenario H),
        over TLS with a valid client certificate."""
        request = read_handshake()
        frames = read_edgecore_frames()
        port = await self.start_hub()
        client = await self.raw(port, self.credentials, request)
        response = await client.wait(lambda data: b"\r\n\r\n" in data)
        self.assertTrue(response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), response)
        self.assertIn(b"Sec-WebSocket-Accept: " + EDGECORE_ACCEPT + b"\r\n", response)
        self.assertEqual(self.handler.connection("edge-node-1").project_id, PROJECT_ID)
        client.transport.write(b"".join(raw for raw, _ in frames))  # type: ignore[union-attr]
        await self.handler.wait(lambda: len(self.handler.messages("edge-node-1")) == len(frames))
        self.assertEqual(
            [m.msg_id for m in self.handler.messages("edge-node-1")], [i for _, i in frames]
        )
        self.assertTrue(self.handler.messages("edge-node-1")[-1].is_empty)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await self.handler.wait(lambda: bool(self.handler.of("lost")))

    async def test_missing_node_id(self) -> None:
        port = await self.start_hub()
        client = await self.raw(port, self.credentials, upgrade_request(None))
        response = await client.lost
        self.assertTrue(response.startswith(b"HTTP/1.1 400 missing node_id header\r\n"), response)
        self.assertEqual(self.handler.events, [])

    async def test_missing_node_id_edge_node(self) -> None:
        """What an edge sees of a 400: no close code, the status and reason in the text."""
        port = await self.start_hub()
        node = self.node(port, "")
        node.start()
        info = await node.when_disconnected()
        assert info is not None
        self.assertEqual((info.code, info.was_open), (None, False))
        self.assertIn("400", info.reason)
        self.assertIn("missing node_id header", info.reason)

    async def test_no_client_certificate(self) -> None:
        port = await self.start_hub()
        client = await self.raw(port, None, EDGECORE_REQUEST)
        self.assertEqual(await client.lost, b"")
        self.assertEqual(self.handler.events, [])

    async def test_foreign_client_certificate(self) -> None:
        """A certificate from another CA fails TLS; the edge sees no close code."""
        port = await self.start_hub()
        other = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        foreign = edge_credentials(other)
        credentials = EdgeCredentials(self.authority.ca_pem, foreign.cert_pem, foreign.key_pem)
        client = await self.raw(port, credentials, EDGECORE_REQUEST)
        self.assertEqual(await client.lost, b"")
        node = self.node(port, "edge-node-1", credentials=credentials)
        node.start()
        info = await node.when_disconnected()
        self.assertIsNotNone(info)
        self.assertEqual((info.code, info.was_open), (None, False))  # type: ignore[union-attr]
        self.assertFalse(node.connected)
        self.assertEqual(self.handler.events, [])

    async def test_not_tls(self) -> None:
        port = await self.start_hub()
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(EDGECORE_REQUEST)  # type: ignore[union-attr]
        await client.lost
        self.assertEqual(self.handler.events, [])

    async def test_refused(self) -> None:
        """NodeRefused: the edge sees 1013 and the reason; the handler no connection_lost."""
        port = await self.start_hub()
        node = self.node(port, "full")
        node.start()
        info = await node.when_disconnected()
        self.assertEqual(
            (info.code, info.reason),
            (CLOSE_TRY_AGAIN_LATER, "node limit 1 reached"),  # type: ignore[union-attr]
        )
        self.assertEqual(node.last_close_code, CLOSE_TRY_AGAIN_LATER)
        await self.handler.wait(lambda: bool(self.handler.of("refused")))
        self.assertEqual([e[0] for e in self.handler.events], ["refused"])

    async def test_bad_connections_alone(self) -> None:
        """Invalid JSON (1007), an oversized message (1009) and garbage close only the
        connection that sent them; another node goes on exchanging messages."""
        port = await self.start_hub(max_message_size=4096)
        good = self.node(port, "good")
        await good.start()
        bad_json = self.node(port, "bad-json")
        too_big = self.node(port, "too-big")
        await bad_json.start()
        await too_big.start()
        garbage = await self.raw(port, self.credentials, upgrade_request("garbage"))
        await garbage.wait(lambda data: b"\r\n\r\n" in data)

        bad_json.protocol.sendMessage(b'{"header": nope}')  # type: ignore[union-attr]
        too_big.protocol.sendMessage(b"x" * 5000)  # type: ignore[union-attr]
        garbage.transport.write(b"\xff" * 64)  # type: ignore[union-attr]

        info = await bad_json.when_disconnected()
        self.assertEqual(info.code, CLOSE_INVALID_PAYLOAD)  # type: ignore[union-attr]
        self.assertIn("not valid JSON", info.reason)  # type: ignore[union-attr]
        info = await too_big.when_disconnected()
        self.assertEqual(
            (info.code, info.reason),  # type: ignore[union-attr]
            (CLOSE_TOO_BIG, "message of 5000 bytes exceeds the limit of 4096"),
        )
        await garbage.lost
        await self.handler.wait(lambda: len(self.handler.of("lost")) == 3)
        self.assertEqual(
            sorted(e[1].node_id for e in self.handler.of("lost")),
            ["bad-json", "garbage", "too-big"],
        )

        connection = self.handler.connection("good")
        pod = Message.new("edgecontroller", "resource", "update", "default/pod/a", {}, "7")
        connection.send_message(pod)
        await self.handler.wait(
            lambda: any(m.parent_msg_id == pod.msg_id for m in self.handler.messages("good"))
        )
        good.send(new_keepalive().copy(msg_id="still-here"))
        await self.handler.wait(lambda: self.handler.messages("good")[-1].msg_id == "still-here")
        self.assertTrue(connection.is_open)

    async def test_hub_closes_and_edge_reconnects(self) -> None:
        port = await self.start_hub()
        node = self.node(port, "edge-node-1", reconnect=True, initial_backoff=0.05)
        await node.start()
        await self.handler.wait(lambda: bool(self.handler.of("made")))
        first = self.handler.connection("edge-node-1")
        first.close(CLOSE_POLICY, "keepalive timeout")
        info = await node.when_disconnected()
        self.assertEqual((info.code, info.reason), (CLOSE_POLICY, "keepalive timeout"))  # type: ignore[union-attr]
        await node.when_connected()
        await self.handler.wait(lambda: len(self.handler.of("made")) == 2)
        self.assertIsNot(self.handler.connection("edge-node-1"), first)
        self.assertEqual(
            [e[0] for e in self.handler.events if e[0] != "message"], ["made", "lost", "made"]
        )


# --- the capture -----------------------------------------------------------------------------


def _read(name: str) -> str:
    path = os.path.join(EDGECORE_DIR, name)
    if not os.path.exists(path):
        raise SkipTest(f"{path} not found: the shared edgecore captures are not checked out")
    with open(path, encoding="utf-8") as stream:
        return stream.read()


def read_handshake() -> bytes:
    """The first raw upgrade request of ws-handshake.txt, from its hex dump."""
    lines = _read("ws-handshake.txt").splitlines()
    start = next(i for i, line in enumerate(lines) if "raw handshake bytes (" in line)
    size = int(re.search(r"raw handshake bytes \((\d+)\)", lines[start]).group(1))  # type: ignore[union-attr]
    data = b""
    for line in lines[start + 1 :]:
        match = re.match(r"\s+([0-9a-f]{6})\s+((?:[0-9a-f]{2} ){0,31}[0-9a-f]{2})(?:\s|$)", line)
        if not match:
            break
        assert int(match.group(1), 16) == len(data)
        data += bytes.fromhex(match.group(2))
    assert len(data) == size, (len(data), size)
    assert data == EDGECORE_REQUEST, data
    return data


def read_edgecore_frames() -> list[tuple[bytes, str]]:
    """(raw masked frame, msg_id) of every frame edgecore sent in scenario H."""
    text = _read("ws-frames.txt")
    section = text.split("## Scenario H", 1)[1].split("\n## ", 1)[0]
    frames: list[tuple[bytes, str]] = []
    incoming = False
    raw = b""
    for line in section.splitlines():
        if "<- frame #" in line:
            incoming = True
        elif "-> " in line:
            incoming = False
        elif incoming and "raw frame hex (" in line:
            raw = bytes.fromhex(line.split("): ", 1)[1].strip())
        elif incoming and "decoded: msg_id=" in line:
            msg_id = re.search(r"decoded: msg_id=(\S*)", line).group(1)  # type: ignore[union-attr]
            frames.append((raw, msg_id))
    assert len(frames) == 7, frames
    return frames


class CaptureTests(SynchronousTestCase):
    def test_hub_frame_matches_capture(self) -> None:
        """The pod insert the stand-in cloud sent in scenario H, re-framed by us, is the same
        bytes."""
        section = _read("ws-frames.txt").split("## Scenario H", 1)[1].split("\n## ", 1)[0]
        lines = section.splitlines()
        start = next(i for i, line in enumerate(lines) if "-> sending pod insert" in line)
        hex_line = next(line for line in lines[start:] if "raw frame hex (" in line)
        raw = bytes.fromhex(hex_line.split("): ", 1)[1].strip())
        frames, _ = parse_frames(raw)
        self.assertEqual(text_frame(encode(decode(frames[0][2]))), raw)

    def test_edgecore_frames_unit(self) -> None:
        handler = RecordingHandler()
        unit = Unit(handler)
        protocol, _ = unit.connect(read_handshake())
        frames = read_edgecore_frames()
        protocol.dataReceived(b"".join(raw for raw, _ in frames))
        self.assertEqual(
            [m.msg_id for m in handler.messages("edge-node-1")], [i for _, i in frames]
        )


def _accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


class AcceptKeyTests(SynchronousTestCase):
    def test_capture_accept(self) -> None:
        self.assertEqual(_accept(b"aSdB5ohiXP4CRL8s6KpxYQ=="), EDGECORE_ACCEPT)
