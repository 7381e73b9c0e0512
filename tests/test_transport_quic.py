"""cloudhub.transport.quic without sockets: the hub's DatagramProtocol against an aioquic client.

Datagrams are carried between :class:`QuicHubProtocol` (on a fake UDP transport) and a client
:class:`aioquic.quic.connection.QuicConnection` by :class:`Link`, on a ``task.Clock``: real TLS
1.3 and real QUIC packets, no network, no sleeping. The real-socket tests (the QUIC edge node
against MessageHandle) are in test_integration_quic.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import timedelta
from typing import Any

from aioquic import tls
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.config import HubConfig
from cloudhub.edge.bootstrap import EdgeCredentials
from cloudhub.edge.quic import client_configuration
from cloudhub.errors import CloudHubError
from cloudhub.interfaces import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    IConnection,
)
from cloudhub.model import Message, new_keepalive
from cloudhub.transport import quic as quic_module
from cloudhub.transport.quic import (
    ALPN,
    STREAM_PREFIX,
    HeaderError,
    HubQuicConnection,
    MessageStreamReader,
    QuicHubConnection,
    QuicHubProtocol,
    QuicStreamError,
    check_aioquic,
    check_protobuf,
    header_message,
    parse_header_message,
)
from cloudhub.wire import encode_frame, message_from_protobuf, pack
from cloudhub.wire.packer import HEADER_SIZE
from tests.fakes import pod_message
from tests.helpers_tls import key_pem, load_ca_key, make_config, pem, sign_client_cert
from tests.test_transport_websocket import EDGECORE_DIR, RecordingHandler, edge_credentials

HUB_ADDR = ("10.0.0.1", 10001)
PROJECT_ID = "e632aba927ea4ac2b575ec1603d56f10"


class FakeUDP:
    """What the hub writes: (datagram, address) pairs."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def take(self, addr: Any = None) -> list[tuple[bytes, Any]]:
        """What was sent (to ``addr`` only, if given), removed from the record."""
        taken = [s for s in self.sent if addr is None or s[1] == addr]
        self.sent = [s for s in self.sent if not (addr is None or s[1] == addr)]
        return taken


_AUTHORITIES: dict[str, tuple[HubConfig, CertificateAuthority]] = {}


def authority(name: str, base: str) -> CertificateAuthority:
    """One CA per name for the whole test run (making one costs key generations)."""
    if name not in _AUTHORITIES:
        config = make_config(base)
        _AUTHORITIES[name] = (config, CertificateAuthority.load_or_create(config))
    return _AUTHORITIES[name][1]


def ca_key(name: str) -> ec.EllipticCurvePrivateKey:
    return load_ca_key(_AUTHORITIES[name][0])


class Hub:
    """A QuicHubProtocol on a Clock and a FakeUDP."""

    def __init__(self, ca: CertificateAuthority, handler: Any = None, **kwargs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.udp = FakeUDP()
        self.handler = handler if handler is not None else RecordingHandler()
        self.protocol = QuicHubProtocol(self.handler, ca, self.clock, **kwargs)
        self.protocol.makeConnection(self.udp)  # type: ignore[arg-type]

    def feed(self, data: bytes, addr: Any = ("10.0.0.9", 5555)) -> None:
        self.protocol.datagramReceived(data, addr)
        self.clock.advance(0)


class Link:
    """One aioquic client talking to ``hub`` through memory."""

    def __init__(
        self,
        hub: Hub,
        credentials: EdgeCredentials | None,
        address: tuple[str, int] = ("10.0.0.2", 4000),
        ca_pem: bytes | None = None,
        alpn: str = ALPN,
    ) -> None:
        self.hub = hub
        self.address = address
        configuration = client_configuration(credentials, "127.0.0.1")
        configuration.alpn_protocols = [alpn]
        if credentials is None:
            configuration.load_verify_locations(cadata=ca_pem)
        self.client = QuicConnection(configuration=configuration)
        self.events: list[events.QuicEvent] = []
        self.streams: dict[int, bytes] = {}
        self.client.connect(HUB_ADDR, now=hub.clock.seconds())

    def pump(self, rounds: int = 50) -> None:
        """Carry datagrams both ways until neither side has anything to say, letting time
        pass up to the client's next timer when it is close (pacing, ACK delay)."""
        clock = self.hub.clock
        for _ in range(rounds):
            moved = False
            timer = self.client.get_timer()
            hub_calls = [c.getTime() for c in clock.getDelayedCalls()]
            soonest = min([t for t in [timer, *hub_calls] if t is not None], default=None)
            if soonest is not None and soonest - clock.seconds() <= 0.03:
                clock.advance(max(0.0, soonest - clock.seconds()))
                if timer is not None and timer <= clock.seconds():
                    self.client.handle_timer(now=clock.seconds())
                    self._collect()
            for data, _ in self.client.datagrams_to_send(now=clock.seconds()):
                moved = True
                self.hub.protocol.datagramReceived(data, self.address)
            clock.advance(0)
            for data, _ in self.hub.udp.take(self.address):
                moved = True
                self.client.receive_datagram(data, HUB_ADDR, now=clock.seconds())
            self._collect()
            if not moved:
                return

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Let ``seconds`` pass in small steps, pumping (timers: ACK delay, loss, closing)."""
        clock = self.hub.clock
        end = clock.seconds() + seconds
        while clock.seconds() < end:
            clock.advance(step)
            timer = self.client.get_timer()
            if timer is not None and timer <= clock.seconds():
                self.client.handle_timer(now=clock.seconds())
                self._collect()
            self.pump()

    def _collect(self) -> None:
        event = self.client.next_event()
        while event is not None:
            self.events.append(event)
            if isinstance(event, events.StreamDataReceived):
                self.streams[event.stream_id] = self.streams.get(event.stream_id, b"") + event.data
            event = self.client.next_event()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def handshake_done(self) -> bool:
        return bool(self.of(events.HandshakeCompleted))

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.client.send_stream_data(stream_id, data, end_stream=end)
        self.pump()

    def header(self, content: Any = None, node_id: str = "edge-1") -> None:
        message = header_message(node_id, PROJECT_ID)
        if content is not None:
            message.content = content
        self.send(0, encode_frame(message))

    def messages_on(self, stream_id: int, prefix: bool = True) -> list[Message]:
        data = self.streams.get(stream_id, b"")
        reader = MessageStreamReader(stream_id, 1 << 20, expect_prefix=prefix)
        return list(reader.feed(data))

    def closed(self) -> events.ConnectionTerminated | None:
        terminated = self.of(events.ConnectionTerminated)
        return terminated[0] if terminated else None


def quiet(test: SynchronousTestCase) -> None:
    """aioquic logs protocol errors on the stdlib logger ``quic``; keep them off stderr."""
    logger = logging.getLogger("quic")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    test.addCleanup(logger.setLevel, level)


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = authority("hub", self.mktemp())
        self.credentials = _credentials(self.ca)

    def hub(self, **kwargs: Any) -> Hub:
        return Hub(self.ca, **kwargs)

    def connected(self, hub: Hub | None = None, node_id: str = "edge-1") -> tuple[Link, Hub]:
        hub = hub or self.hub()
        link = Link(hub, self.credentials)
        link.pump()
        self.assertTrue(link.handshake_done)
        link.header(node_id=node_id)
        return link, hub


_CREDENTIALS: dict[int, EdgeCredentials] = {}


def _credentials(ca: CertificateAuthority) -> EdgeCredentials:
    if id(ca) not in _CREDENTIALS:
        _CREDENTIALS[id(ca)] = edge_credentials(ca)
    return _CREDENTIALS[id(ca)]


# --- aioquic internals ------------------------------------------------------------------------


class AioquicInternalsTests(SynchronousTestCase):
    """The transport leans on aioquic privates (design.md): these fail if a release moves them."""

    def test_request_client_certificate_flag_exists(self) -> None:
        context = tls.Context(is_client=False)
        self.assertIs(context._request_client_certificate, False)
        self.assertIsNone(context._peer_certificate)
        check_aioquic()

    def test_check_fails_without_the_flag(self) -> None:
        class Context(tls.Context):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                del self._request_client_certificate

        self.patch(tls, "Context", Context)
        with self.assertRaises(CloudHubError) as caught:
            check_aioquic()
        self.assertIn("_request_client_certificate", str(caught.exception))
        self.assertIn("aioquic>=1.7,<1.8", str(caught.exception))

    def test_protobuf_runtime_is_upb(self) -> None:
        check_protobuf()

    def test_quic_refuses_pure_python_protobuf(self) -> None:
        """PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python: the QUIC listener is not built."""
        from cloudhub.config import parse_config

        self.patch(quic_module, "protobuf_backend", lambda: "python")
        config = parse_config({"cloudHub": {"quic": {"enable": True}}})
        with self.assertRaises(CloudHubError) as caught:
            quic_module.quic_listener(config, None, None, None)  # type: ignore[arg-type]
        self.assertIn("upb", str(caught.exception))
        self.assertIn("'python'", str(caught.exception))

    def test_check_fails_without_stream_limits(self) -> None:
        class Connection(QuicConnection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                del self._local_max_streams_bidi

        self.patch(quic_module, "QuicConnection", Connection)
        with self.assertRaises(CloudHubError) as caught:
            check_aioquic()
        self.assertIn("_local_max_streams_bidi", str(caught.exception))

    def test_server_sets_the_flag_and_limits(self) -> None:
        ca = authority("hub", self.mktemp())
        hub = Hub(ca, max_incoming_streams=7)
        link = Link(hub, _credentials(ca))
        link.pump()
        [connection] = hub.protocol.connections
        self.assertIsInstance(connection.quic, HubQuicConnection)
        self.assertIs(connection.quic.tls._request_client_certificate, True)
        self.assertIsNotNone(connection.quic.peer_certificate)
        # The client learnt the limits from the transport parameters.
        self.assertEqual(link.client._remote_max_streams_bidi, 7)
        self.assertEqual(link.client._remote_max_streams_uni, 0)


# --- framing ----------------------------------------------------------------------------------


class FramingTests(SynchronousTestCase):
    def messages(self, count: int) -> list[Message]:
        return [pod_message(f"uid-{i}", str(i + 1), "insert") for i in range(count)]

    def test_byte_by_byte(self) -> None:
        messages = self.messages(3)
        data = STREAM_PREFIX + b"".join(encode_frame(m) for m in messages)
        reader = MessageStreamReader(4, 1 << 20, expect_prefix=True)
        got = [m for i in range(len(data)) for m in reader.feed(data[i : i + 1])]
        self.assertEqual([m.msg_id for m in got], [m.msg_id for m in messages])
        self.assertEqual(got[0].content, messages[0].content)
        reader.finish()

    def test_without_prefix(self) -> None:
        [message] = self.messages(1)
        reader = MessageStreamReader(1, 1 << 20, expect_prefix=False)
        self.assertEqual(list(reader.feed(encode_frame(message)))[0].msg_id, message.msg_id)

    def test_bad_prefix(self) -> None:
        for prefix in (b"str", b"shr", b"\x01\x01\x01"):
            reader = MessageStreamReader(4, 1 << 20, expect_prefix=True)
            with self.assertRaises(QuicStreamError) as caught:
                list(reader.feed(prefix + encode_frame(self.messages(1)[0])))
            self.assertEqual(caught.exception.code, CLOSE_INVALID_PAYLOAD)
            self.assertIn(repr(prefix), caught.exception.reason)

    def test_bad_frame_after_good_ones(self) -> None:
        good = self.messages(2)
        data = STREAM_PREFIX + b"".join(encode_frame(m) for m in good) + pack(b"\xff\xff\xff")
        reader = MessageStreamReader(4, 1 << 20, expect_prefix=True)
        got = []
        with self.assertRaises(QuicStreamError) as caught:
            for message in reader.feed(data):
                got.append(message)
        self.assertEqual(len(got), 2)
        self.assertEqual(caught.exception.code, CLOSE_INVALID_PAYLOAD)

    def test_oversized_frame(self) -> None:
        reader = MessageStreamReader(4, 100, expect_prefix=True)
        with self.assertRaises(QuicStreamError) as caught:
            list(reader.feed(STREAM_PREFIX + pack(b"x" * 101)[:HEADER_SIZE]))
        self.assertEqual(caught.exception.code, CLOSE_TOO_BIG)
        self.assertIn("101 bytes", caught.exception.reason)

    def test_end_inside_frame_or_prefix(self) -> None:
        reader = MessageStreamReader(4, 1 << 20, expect_prefix=True)
        list(reader.feed(b"ms"))
        self.assertRaises(QuicStreamError, reader.finish)
        reader = MessageStreamReader(4, 1 << 20, expect_prefix=True)
        list(reader.feed(STREAM_PREFIX + encode_frame(self.messages(1)[0])[:-1]))
        self.assertRaises(QuicStreamError, reader.finish)

    def test_header_message_round_trip(self) -> None:
        """What the edge writes is what KubeEdge's header message looks like (§3)."""
        message = message_from_protobuf(encode_frame(header_message("edge1", PROJECT_ID))[10:])
        self.assertEqual((message.resource, message.operation), ("header", "header"))
        self.assertEqual((message.source, message.group), ("", ""))
        self.assertEqual(message.content, {"Node_id": ["edge1"], "Project_id": [PROJECT_ID]})
        self.assertEqual(
            parse_header_message(message), {"node_id": "edge1", "project_id": PROJECT_ID}
        )

    def test_header_variants(self) -> None:
        def parse(content: Any, operation: str = "header") -> dict[str, str]:
            return parse_header_message(Message.new("", "", operation, "header", content))

        self.assertEqual(
            parse({"NODE_ID": "e", "project_ID": [" p "]}), {"node_id": "e", "project_id": "p"}
        )
        self.assertEqual(parse('{"Node_id":["e"]}'), {"node_id": "e"})
        self.assertEqual(parse({"Node_id": []}), {"node_id": ""})
        for bad in ("not json", b"\xff", ["Node_id"], {"Node_id": [1]}, {"Node_id": 5}, None):
            self.assertRaises(HeaderError, parse, bad)
        self.assertRaises(HeaderError, parse, {"Node_id": ["e"]}, "keepalive")


# --- the hub protocol -------------------------------------------------------------------------


class HandshakeTests(Base):
    def test_header_exchange(self) -> None:
        link, hub = self.connected()
        [ack] = link.messages_on(0, prefix=False)
        self.assertEqual((ack.operation, ack.content), ("response", "ack"))
        self.assertEqual((ack.resource, ack.group), ("header", ""))
        [made] = hub.handler.of("made")
        connection = made[1]
        self.assertIsInstance(connection, QuicHubConnection)
        verifyObject(IConnection, connection)
        self.assertEqual(
            (connection.node_id, connection.project_id, connection.transport, connection.peer),
            ("edge-1", PROJECT_ID, "quic", "10.0.0.2:4000"),
        )
        self.assertTrue(connection.is_open)
        self.assertEqual(hub.protocol.stats.handshakes_refused, 0)

    def test_no_client_certificate(self) -> None:
        hub = self.hub()
        link = Link(hub, None, ca_pem=self.ca.ca_pem)
        link.pump()
        link.header()  # written at once, as an impatient client would: never read
        link.run(2)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(
            (closed.error_code, closed.reason_phrase),
            (CLOSE_POLICY, "a client certificate is required"),
        )
        self.assertEqual(hub.handler.events, [])
        self.assertEqual(hub.protocol.stats.handshakes_refused, 1)
        self.assertEqual(hub.protocol.connections, set())
        self.assertEqual(hub.protocol.connections_by_cid, {})

    def test_certificate_of_another_ca(self) -> None:
        other = authority("other", self.mktemp())
        hub = self.hub()
        foreign = _credentials(other)
        link = Link(hub, EdgeCredentials(self.ca.ca_pem, foreign.cert_pem, foreign.key_pem))
        link.pump()
        link.header()
        link.run(2)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(closed.error_code, CLOSE_POLICY)
        self.assertIn("not signed by this hub's CA", closed.reason_phrase)
        self.assertEqual(hub.handler.events, [])

    def test_expired_certificate(self) -> None:
        hub = self.hub()
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.ca.clock()
        cert = sign_client_cert(
            self.ca.ca_certificate, ca_key("hub"), key, now - timedelta(days=10), timedelta(days=1)
        )
        link = Link(hub, EdgeCredentials(self.ca.ca_pem, pem(cert), key_pem(key)))
        link.pump()
        link.run(1)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(closed.error_code, CLOSE_POLICY)
        self.assertIn("expired", closed.reason_phrase)

    def test_wrong_alpn_fails_the_handshake(self) -> None:
        quiet(self)
        hub = self.hub()
        link = Link(hub, self.credentials, alpn="h3")
        link.pump()
        link.run(1)
        self.assertFalse(link.handshake_done)
        self.assertIsNotNone(link.closed())
        self.assertEqual(hub.handler.events, [])

    def test_bad_header_json_nack(self) -> None:
        hub = self.hub()
        link = Link(hub, self.credentials)
        link.pump()
        link.header(content="{not json")
        [nack] = link.messages_on(0, prefix=False)
        self.assertEqual((nack.operation, nack.content), ("response", "nack"))
        link.run(1)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(closed.error_code, CLOSE_INVALID_PAYLOAD)
        self.assertIn("not JSON", closed.reason_phrase)
        self.assertEqual(hub.handler.events, [])
        self.assertEqual(hub.protocol.stats.headers_refused, 1)

    def test_missing_node_id(self) -> None:
        hub = self.hub()
        link = Link(hub, self.credentials)
        link.pump()
        link.header(content={"Project_id": [PROJECT_ID]})
        link.run(1)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(
            (closed.error_code, closed.reason_phrase), (CLOSE_POLICY, "missing node_id header")
        )
        self.assertEqual(link.messages_on(0, prefix=False), [])
        self.assertEqual(hub.handler.events, [])

    def test_node_refused(self) -> None:
        hub = self.hub(handler=RecordingHandler(refuse=("edge-1",)))
        link, _ = self.connected(hub)
        link.run(2)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(
            (closed.error_code, closed.reason_phrase),
            (CLOSE_TRY_AGAIN_LATER, "node limit 1 reached"),
        )
        self.assertEqual([e[0] for e in hub.handler.events], ["refused"])
        self.assertEqual(hub.protocol.connections, set())

    def test_connection_made_fails(self) -> None:
        handler = RecordingHandler()

        def broken(connection: IConnection) -> None:
            raise RuntimeError("bug")

        handler.connection_made = broken  # type: ignore[method-assign]
        link, hub = self.connected(self.hub(handler=handler))
        link.run(1)
        closed = link.closed()
        assert closed is not None
        self.assertEqual((closed.error_code, closed.reason_phrase), (1011, "internal error"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(handler.events, [])

    def test_setup_timeout(self) -> None:
        hub = self.hub()
        link = Link(hub, self.credentials)
        link.pump()
        self.assertTrue(link.handshake_done)
        link.run(29, step=1)
        self.assertIsNone(link.closed())
        link.run(6, step=0.5)  # the close, then the client's draining period
        closed = link.closed()
        assert closed is not None
        self.assertEqual(closed.error_code, CLOSE_POLICY)
        self.assertIn("within 30 seconds", closed.reason_phrase)
        self.assertEqual(hub.protocol.stats.setup_timeouts, 1)
        self.assertEqual(hub.protocol._setting_up, 0)

    def test_stream_before_header(self) -> None:
        hub = self.hub()
        link = Link(hub, self.credentials)
        link.pump()
        link.send(4, STREAM_PREFIX + encode_frame(new_keepalive()))
        link.run(1)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(closed.error_code, CLOSE_INVALID_PAYLOAD)
        self.assertIn("before the header exchange", closed.reason_phrase)

    def test_retry(self) -> None:
        hub = self.hub(retry=True)
        link, _ = self.connected(hub)
        self.assertEqual(hub.protocol.stats.retries, 1)
        self.assertEqual(len(hub.handler.of("made")), 1)


class StreamTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.link, self.hub_ = self.connected(self.hub(max_message_size=4096))
        self.connection = self.hub_.handler.of("made")[0][1]

    def received(self) -> list[Message]:
        return [e[2] for e in self.hub_.handler.of("message")]

    def test_messages_in_order_on_several_streams(self) -> None:
        first = [pod_message(f"a{i}", "1", "insert") for i in range(3)]
        second = [pod_message(f"b{i}", "1", "insert") for i in range(2)]
        self.link.send(4, STREAM_PREFIX + b"".join(encode_frame(m) for m in first))
        self.link.send(8, STREAM_PREFIX + encode_frame(second[0]))
        self.link.send(8, encode_frame(second[1]))
        self.assertEqual([m.msg_id for m in self.received()], [m.msg_id for m in first + second])
        self.assertEqual(self.received()[0].content, first[0].content)
        self.assertTrue(all(e[1] is self.connection for e in self.hub_.handler.of("message")))

    def test_split_prefix_and_frame(self) -> None:
        message = pod_message("a", "1", "insert")
        data = STREAM_PREFIX + encode_frame(message)
        for i in range(0, len(data), 7):
            self.link.send(4, data[i : i + 7])
        self.assertEqual([m.msg_id for m in self.received()], [message.msg_id])

    def test_client_may_write_on_the_hub_stream(self) -> None:
        self.connection.send_message(pod_message("x", "1", "insert"))
        self.link.pump()
        ack = Message.new("edgecontroller", "resource", "response", "default/pod/nginx", "OK")
        self.link.send(1, encode_frame(ack))  # viaduct reuses streams: no prefix
        self.assertEqual([m.msg_id for m in self.received()], [ack.msg_id])

    def test_bad_prefix_closes(self) -> None:
        self.link.send(4, b"str" + encode_frame(new_keepalive()))
        self.assert_closed(CLOSE_INVALID_PAYLOAD, "b'str'")

    def test_bad_frame_closes(self) -> None:
        self.link.send(4, STREAM_PREFIX + encode_frame(new_keepalive()) + pack(b"\x0a\xff"))
        self.assertEqual(len(self.received()), 1)
        self.assert_closed(CLOSE_INVALID_PAYLOAD, "not a valid protobuf")

    def test_oversized_frame_closes(self) -> None:
        self.link.send(4, STREAM_PREFIX + pack(b"\x00" * 5000))
        self.assert_closed(CLOSE_TOO_BIG, "5000 bytes")

    def test_stream_ending_inside_a_frame_closes(self) -> None:
        self.link.send(4, STREAM_PREFIX + encode_frame(new_keepalive())[:-2], end=True)
        self.assert_closed(CLOSE_INVALID_PAYLOAD, "ended inside a packer frame")

    def test_finished_stream_is_released(self) -> None:
        """A client stream ended cleanly is ended by the hub too, so its slot is freed."""
        for stream_id in (4, 8):
            self.link.send(stream_id, STREAM_PREFIX + encode_frame(new_keepalive()), end=True)
        self.link.run(0.5)
        self.assertEqual(len(self.received()), 2)
        self.assertEqual(self.connection.readers, {})
        ends = [e for e in self.link.of(events.StreamDataReceived) if e.stream_id in (4, 8)]
        self.assertEqual([(e.data, e.end_stream) for e in ends], [(b"", True), (b"", True)])
        self.assertIsNone(self.link.closed())

    def test_control_stream_messages_are_acked_not_passed_on(self) -> None:
        ping = Message.new("", "", "ping", "header", "x")
        self.link.send(0, encode_frame(ping))
        ack = self.link.messages_on(0, prefix=False)[-1]
        self.assertEqual((ack.parent_msg_id, ack.content), (ping.msg_id, "ack"))
        self.assertEqual(self.received(), [])

    def test_send_one_stream_prefix_once_in_order(self) -> None:
        messages = [pod_message(f"m{i}", "1", "insert") for i in range(4)]
        for message in messages[:3]:
            self.connection.send_message(message.copy(sync=True))
        self.link.pump()
        self.connection.send_message(messages[3])
        self.link.pump()
        got = self.link.messages_on(1)
        self.assertEqual([m.msg_id for m in got], [m.msg_id for m in messages])
        self.assertFalse(any(m.sync for m in got))
        self.assertEqual(self.link.streams[1].count(STREAM_PREFIX), 1)
        self.assertEqual(sorted(self.link.streams), [0, 1])

    def assert_closed(self, code: int, reason_part: str) -> None:
        self.link.run(2)
        closed = self.link.closed()
        assert closed is not None
        self.assertEqual(closed.error_code, code)
        self.assertIn(reason_part, closed.reason_phrase)
        [lost] = self.hub_.handler.of("lost")
        self.assertIn(f"closed by the hub ({code}: ", lost[2])
        self.assertEqual(self.hub_.protocol.stats.stream_errors, 1)


class CloseTests(Base):
    def test_close_by_hub(self) -> None:
        link, hub = self.connected()
        connection = hub.handler.of("made")[0][1]
        connection.send_message(pod_message("a", "1", "insert"))
        connection.close(CLOSE_POLICY, "replaced by a newer connection")
        connection.send_message(pod_message("b", "1", "insert"))
        connection.close(CLOSE_POLICY, "again")
        self.assertFalse(connection.is_open)
        link.pump()
        self.assertEqual([m.resource for m in link.messages_on(1)], ["default/pod/nginx"])
        self.assertEqual(hub.handler.of("lost"), [])  # not before aioquic's closing period
        link.run(2)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(
            (closed.error_code, closed.reason_phrase),
            (CLOSE_POLICY, "replaced by a newer connection"),
        )
        [lost] = hub.handler.of("lost")
        self.assertEqual(lost[2], "closed by the hub (1008: replaced by a newer connection)")
        self.assertEqual(hub.protocol.connections, set())
        self.assertEqual(hub.protocol.connections_by_cid, {})
        self.assertEqual(hub.clock.getDelayedCalls(), [])
        connection.send_message(pod_message("c", "1", "insert"))
        connection.close(CLOSE_POLICY, "closed")

    def test_close_by_edge(self) -> None:
        link, hub = self.connected()
        link.client.close(error_code=1000, reason_phrase="bye")
        link.run(2)
        [lost] = hub.handler.of("lost")
        self.assertEqual(lost[2], "closed by the edge (1000: bye)")
        self.assertEqual(hub.protocol.connections, set())
        self.assertEqual(hub.clock.getDelayedCalls(), [])

    def test_edge_vanishes_idle_timeout(self) -> None:
        link, hub = self.connected()
        hub.clock.advance(61)  # no packet for longer than the idle timeout
        [lost] = hub.handler.of("lost")
        self.assertIn("idle timeout", lost[2])
        self.assertEqual(hub.protocol.connections, set())

    def test_shutdown(self) -> None:
        link, hub = self.connected()
        hub.protocol.shutdown()
        hub.protocol.doStop()
        [lost] = hub.handler.of("lost")
        self.assertEqual(lost[2], "closed by the hub (1001: hub shutting down)")
        for data, _ in hub.udp.take():
            link.client.receive_datagram(data, HUB_ADDR, now=hub.clock.seconds())
        link.run(1)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(closed.error_code, CLOSE_GOING_AWAY)
        self.assertEqual(hub.clock.getDelayedCalls(), [])

    def test_one_timer_per_connection_and_one_flush_per_turn(self) -> None:
        hub = self.hub()
        links = []
        for i in range(3):
            link = Link(hub, self.credentials, address=("10.0.0.2", 4000 + i))
            link.pump()
            link.header(node_id=f"edge-{i}")
            links.append(link)
        for link in links:
            link.run(0.2)
        connections = [e[1] for e in hub.handler.of("made")]
        self.assertEqual(len(connections), 3)
        calls = hub.clock.getDelayedCalls()
        self.assertEqual(len(calls), len({id(c.timer) for c in connections if c.timer}))
        self.assertLessEqual(len(calls), 3)
        for connection in connections:
            connection.send_message(new_keepalive())
            connection.send_message(new_keepalive())
        now = [c for c in hub.clock.getDelayedCalls() if c.getTime() == hub.clock.seconds()]
        self.assertEqual(len(now), 1)
        hub.clock.advance(0)
        for link in links:
            link.pump()
            self.assertEqual(len(link.messages_on(1)), 2)


class HostileInputTests(Base):
    def bogus_initial(self, size: int = 1200, version: int = 1) -> bytes:
        dcid, scid = os.urandom(8), os.urandom(8)
        head = (
            bytes([0xC0]) + version.to_bytes(4, "big") + b"\x08" + dcid + b"\x08" + scid + b"\x00"
        )
        rest = size - len(head) - 2
        return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)

    def test_bogus_initials_leave_no_state(self) -> None:
        link, hub = self.connected()
        before = dict(hub.protocol.connections_by_cid)
        for _ in range(200):
            hub.protocol.datagramReceived(self.bogus_initial(), ("10.0.0.66", 1234))
            hub.protocol.datagramReceived(os.urandom(1300), ("10.0.0.66", 1234))
            hub.protocol.datagramReceived(os.urandom(40), ("10.0.0.66", 1234))
        hub.clock.advance(0)
        self.assertEqual(hub.protocol.connections_by_cid, before)
        self.assertEqual(len(hub.protocol.connections), 1)
        self.assertEqual(hub.protocol.stats.bogus_initials, 200)
        # The only answers: Version Negotiation, to random long headers of 1,200+ bytes whose
        # "version" is not one we speak (stateless, and smaller than what triggered it).
        answers = [d for d, a in hub.udp.sent if a[0] == "10.0.0.66"]
        self.assertEqual(len(answers), hub.protocol.stats.version_negotiations)
        self.assertTrue(all(d[1:5] == b"\x00\x00\x00\x00" and len(d) < 100 for d in answers))
        # Garbage with the live connection's own CID does not decrypt and changes nothing.
        for cid in before:
            hub.protocol.datagramReceived(b"\x40" + cid + os.urandom(60), link.address)
        keepalive = new_keepalive()
        link.send(4, STREAM_PREFIX + encode_frame(keepalive))
        self.assertEqual([e[2].msg_id for e in hub.handler.of("message")], [keepalive.msg_id])
        self.assertIsNone(link.closed())

    def test_version_negotiation(self) -> None:
        hub = self.hub()
        hub.feed(self.bogus_initial(version=0x0A0A0A0A))
        [(packet, addr)] = hub.udp.take()
        self.assertEqual(addr, ("10.0.0.9", 5555))
        self.assertEqual(packet[1:5], b"\x00\x00\x00\x00")
        self.assertIn(b"\x00\x00\x00\x01", packet)  # QUIC v1 offered
        hub.feed(self.bogus_initial(size=600, version=0x0A0A0A0A))  # too small: no answer
        hub.feed(self.bogus_initial(version=0))  # a VN packet: never answered
        self.assertEqual(hub.udp.take(), [])
        self.assertEqual(hub.protocol.stats.version_negotiations, 1)

    def test_edgecore_gquic_datagram_is_dropped(self) -> None:
        """The first datagram of a stock edgecore's QUIC (gQUIC Q044, quic.txt)."""
        path = os.path.join(EDGECORE_DIR, "quic.txt")
        if not os.path.exists(path):
            raise SkipTest("shared/testdata/edgecore/quic.txt not present")
        text = open(path, encoding="utf-8").read()
        section = text.split("## first datagram in full")[1]
        rows = re.findall(r"^\s+([0-9a-f]{6})  ((?:[0-9a-f]{2} )+)", section, re.M)
        datagram = bytes.fromhex("".join(row[1] for row in rows))
        self.assertEqual((len(datagram), datagram[1:5]), (1072, b"Q044"))
        hub = self.hub()
        hub.feed(datagram)
        self.assertEqual(hub.udp.take(), [])
        self.assertEqual(hub.protocol.connections, set())
        self.assertEqual(hub.protocol.stats.gquic_datagrams, 1)

    def test_pending_handshakes_bounded(self) -> None:
        hub = self.hub(max_pending_handshakes=2)
        links = [Link(hub, self.credentials, address=("10.0.0.3", 7000 + i)) for i in range(3)]
        for link in links:
            link.pump()
        self.assertEqual(len(hub.protocol.connections), 2)
        self.assertEqual(hub.protocol.stats.setups_dropped, 1)
        self.assertFalse(links[2].handshake_done)
        links[0].header(node_id="edge-a")
        links[2].run(1.5)  # its Initial is resent and now gets a slot
        self.assertTrue(links[2].handshake_done)
