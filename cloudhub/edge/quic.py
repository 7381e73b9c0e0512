"""An edge node over QUIC: :class:`QuicEdgeNode`, the QUIC twin of :class:`EdgeNode`.

It speaks what :mod:`cloudhub.transport.quic` serves: standard QUIC (aioquic's sans-IO
connection on a Twisted UDP socket), TLS 1.3 with ALPN ``kubeedge-viaduct``, the client
certificate from the node's :class:`EdgeCredentials`, and the hub's certificate verified
against ``credentials.ca_pem`` and the host name or IP it was asked to connect to. Then, as
KubeEdge's viaduct QUIC lane (§3):

* it opens the control stream (stream 0), writes the header message (``Node_id``,
  ``Project_id``) and waits for the hub's ``"ack"``; only then is the node connected
  (``"nack"`` or a close is a failed attempt);
* it writes its messages on one stream of its own (``msg`` prefix, then packer frames) and
  reads the hub's streams the same way;
* it sends a keepalive at once and every ``heartbeat`` seconds, answers the control operations
  ``ping``/``pong``/``config`` with ``"ack"`` (§2.3), stores cloud messages of group
  ``resource`` without a parent id in its :class:`MetaStore` and ACKs them by metamanager's
  rules (§7.5), hands every message to ``on_message(node, message)``;
* it reconnects after any close with exponential backoff and jitter, as :class:`EdgeNode`.

The protobuf lane has no resourceVersion (§2.5): a message arrives with an empty
``resource_version``, so the node takes it from the object's ``metadata.resourceVersion`` when
the content has one (as edgecore's ``meta_v2`` table does), before storing it.

The hub's close reaches :attr:`last_close` as QUIC application error code (= the WebSocket
close codes: 1013 node limit, 1008 certificate refused or keepalive timeout, ...) and reason.
"""

from __future__ import annotations

import ipaddress
import random as _random
from collections.abc import Callable
from typing import Any

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from cloudhub.edge.bootstrap import EdgeCredentials
from cloudhub.edge.metamanager import MetaStore
from cloudhub.edge.node import CONNECT_TIMEOUT, DEFAULT_PROJECT_ID, CloseInfo, EdgeNodeBase
from cloudhub.interfaces import CLOSE_INVALID_PAYLOAD, CLOSE_NORMAL
from cloudhub.model import (
    OP_RESPONSE,
    Message,
    new_response,
)
from cloudhub.transport.quic import (
    ALPN,
    CLOSE_INTERNAL_ERROR,
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_DATAGRAM_READ,
    STREAM_PREFIX,
    MessageStreamReader,
    QuicStreamError,
    close_reason,
    describe_termination,
    header_message,
)
from cloudhub.wire import encode_frame

__all__ = ["QuicEdgeNode", "client_configuration"]

log = Logger()

Reactor = Any
OnMessage = Callable[["QuicEdgeNode", Message], None]


def client_configuration(
    credentials: EdgeCredentials | None, hub_host: str, idle_timeout: float = 60.0
) -> QuicConfiguration:
    """An edge's QUIC settings: ALPN, trust only the hub's CA, check ``hub_host`` (DNS or IP
    SAN), present the node's certificate (none when ``credentials`` is None)."""
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name=hub_host.strip("[]"),
        idle_timeout=idle_timeout,
    )
    if credentials is not None:
        configuration.load_verify_locations(cadata=credentials.ca_pem)
        configuration.certificate = x509.load_pem_x509_certificate(credentials.cert_pem)
        configuration.private_key = load_pem_private_key(credentials.key_pem, None)
    return configuration


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _object_resource_version(content: Any) -> str:
    if isinstance(content, dict):
        metadata = content.get("metadata")
        if isinstance(metadata, dict):
            version = metadata.get("resourceVersion")
            if isinstance(version, str):
                return version
    return ""


# Life of one connection attempt.
_RESOLVING = 0
_HANDSHAKE = 1  # QUIC handshake running
_HEADER = 2  # header written, waiting for the hub's answer
_OPEN = 3
_CLOSING = 4  # close() sent CONNECTION_CLOSE; the attempt ends right after
_GONE = 5


class _Datagrams(DatagramProtocol):
    """The UDP socket of one attempt, connected to the hub's address."""

    noisy = False

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.attempt.datagram(data, addr)

    def connectionRefused(self) -> None:
        self.attempt.refused()

    def stopProtocol(self) -> None:
        # Also reached when the reactor drops the socket by itself: epoll reports a queued
        # ICMP error (port unreachable) of a connected UDP socket as a disconnection.
        self.attempt.refused()


class _Attempt:
    """One connection attempt of a :class:`QuicEdgeNode`, from resolving to terminated."""

    __slots__ = (
        "node",
        "state",
        "quic",
        "address",
        "port",
        "timer",
        "timer_at",
        "flush_call",
        "connect_timer",
        "control",
        "readers",
        "out_stream",
        "pending",
        "early",
    )

    def __init__(self, node: QuicEdgeNode) -> None:
        self.node = node
        self.state = _RESOLVING
        self.quic: QuicConnection | None = None
        self.address: tuple[str, int] | None = None
        self.port: Any = None
        self.timer: IDelayedCall | None = None
        self.timer_at: float | None = None
        self.flush_call: IDelayedCall | None = None
        self.connect_timer: IDelayedCall | None = node._reactor.callLater(
            node.connect_timeout, self.timed_out
        )
        self.control: MessageStreamReader | None = None
        self.readers: dict[int, MessageStreamReader] = {}
        self.out_stream: int | None = None
        self.pending: list[bytes] = []
        # Hub messages that arrived before the header ack (other streams may overtake it).
        self.early: list[Message] | None = []

    # -- starting --

    def start(self) -> None:
        node = self.node
        host = node.hub_host.strip("[]")
        if _is_ip(host):
            self.resolved(host)
            return
        resolving: Deferred[str] = node._reactor.resolve(host)
        resolving.addCallbacks(self.resolved, self.resolve_failed)

    def resolve_failed(self, failure: Failure) -> None:
        if self.state == _RESOLVING:
            self.finish(
                CloseInfo(
                    None, f"cannot resolve {self.node.hub_host}: {failure.getErrorMessage()}", False
                )
            )

    def resolved(self, ip: str) -> None:
        if self.state != _RESOLVING:
            return
        node = self.node
        reactor = node._reactor
        self.address = (ip, node.port)
        try:
            self.port = reactor.listenUDP(
                0,
                _Datagrams(self),
                interface="::" if ":" in ip else "",
                maxPacketSize=MAX_DATAGRAM_READ,
            )
            # Connected UDP: datagrams from elsewhere are not delivered, and an ICMP
            # "port unreachable" comes back as connectionRefused (a quick failure).
            self.port.connect(ip, node.port)
        except Exception as error:
            self.finish(CloseInfo(None, f"cannot open a UDP socket: {error}", False))
            return
        self.quic = QuicConnection(configuration=node._configuration)
        self.state = _HANDSHAKE
        self.quic.connect(self.address, now=reactor.seconds())
        self.transmit()

    # -- receiving --

    def datagram(self, data: bytes, addr: Any) -> None:
        quic = self.quic
        if quic is None or self.state == _GONE:
            return
        try:
            quic.receive_datagram(data, self.address, now=self.node._reactor.seconds())
        except Exception:
            log.failure("node {node}: QUIC receive failed", node=self.node.node_id)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")
            return
        self.process_events()
        self.schedule_flush()

    def refused(self) -> None:
        # ICMP port unreachable: nothing (any more) listens on the hub's UDP port.
        if self.state != _GONE:
            self.finish(
                CloseInfo(None, "connection refused (nothing listens on that UDP port)", False)
            )

    def process_events(self) -> None:
        quic = self.quic
        assert quic is not None
        event = quic.next_event()
        while event is not None:
            kind = type(event)
            if kind is events.StreamDataReceived:
                if self.state in (_HEADER, _OPEN):
                    self.stream_data(event)  # type: ignore[arg-type]
            elif kind is events.HandshakeCompleted:
                self.handshake_completed()
            elif kind is events.StopSendingReceived:
                if event.stream_id == self.out_stream:  # type: ignore[attr-defined]
                    self.out_stream = None
            elif kind is events.StreamReset:
                self.readers.pop(event.stream_id, None)  # type: ignore[attr-defined]
            elif kind is events.ConnectionTerminated:
                self.terminated(event)  # type: ignore[arg-type]
                return
            event = quic.next_event()

    def handshake_completed(self) -> None:
        if self.state != _HANDSHAKE:
            return
        quic = self.quic
        assert quic is not None
        node = self.node
        stream_id = quic.get_next_available_stream_id()  # 0: the control stream (§3)
        quic.send_stream_data(
            stream_id, encode_frame(header_message(node.node_id, node.project_id))
        )
        self.control = MessageStreamReader(stream_id, node.max_message_size, expect_prefix=False)
        self.state = _HEADER

    def stream_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        node = self.node
        try:
            if stream_id == 0:
                assert self.control is not None
                for message in self.control.feed(event.data):
                    self.control_message(message)
                    if self.state not in (_HEADER, _OPEN):
                        return
                return
            reader = self.readers.get(stream_id)
            if reader is None:
                # The hub's streams start with the prefix; it may reuse ours without one.
                reader = MessageStreamReader(
                    stream_id, node.max_message_size, expect_prefix=bool(stream_id & 1)
                )
                self.readers[stream_id] = reader
            for message in reader.feed(event.data):
                if self.state == _OPEN:
                    node._received(self, message)
                elif self.state == _HEADER and self.early is not None:
                    self.early.append(message)
                else:
                    return
            if event.end_stream:
                del self.readers[stream_id]
                reader.finish()
        except QuicStreamError as error:
            node.stats.decode_errors += 1
            log.warn("node {node}: closing, {error}", node=node.node_id, error=error.reason)
            self.close(error.code, error.reason)

    def control_message(self, message: Message) -> None:
        if self.state == _HEADER:
            if message.operation == OP_RESPONSE and message.content == "ack":
                self.opened()
            elif message.operation == OP_RESPONSE and message.content == "nack":
                # The hub closes next, with the reason (or the connect timeout ends it).
                log.info("node {node}: the hub refused the header message", node=self.node.node_id)
            else:
                self.close(
                    CLOSE_INVALID_PAYLOAD,
                    f"the hub did not accept the header message ({message.content!r})",
                )
        elif message.operation != OP_RESPONSE:
            # §3: each side acks whatever else arrives on the control stream.
            self.write_control(new_response(message, "ack"))

    def write_control(self, message: Message) -> None:
        quic = self.quic
        assert quic is not None
        try:
            quic.send_stream_data(0, encode_frame(message))
        except (RuntimeError, ValueError):
            return
        self.schedule_flush()

    def opened(self) -> None:
        self.state = _OPEN
        self.cancel_connect_timer()
        early, self.early = self.early, None
        node = self.node
        node._opened(self)
        for message in early or ():
            if self.state != _OPEN:
                break
            node._received(self, message)

    # -- sending --

    def send(self, frame: bytes) -> None:
        self.pending.append(frame)
        self.schedule_flush()

    def schedule_flush(self) -> None:
        if self.flush_call is None and self.state != _GONE:
            self.flush_call = self.node._reactor.callLater(0, self.transmit)

    def push_pending(self) -> None:
        pending = self.pending
        quic = self.quic
        if not pending or quic is None:
            return
        self.pending = []
        data = b"".join(pending)
        if self.out_stream is not None:
            try:
                quic.send_stream_data(self.out_stream, data)
                return
            except (RuntimeError, ValueError):
                pass
        self.out_stream = quic.get_next_available_stream_id()
        quic.send_stream_data(self.out_stream, STREAM_PREFIX + data)

    def transmit(self) -> None:
        """Send what aioquic has for the hub and re-arm the connection's one timer."""
        call, self.flush_call = self.flush_call, None
        if call is not None and call.active():
            call.cancel()
        quic = self.quic
        if quic is None or self.state == _GONE:
            return
        reactor = self.node._reactor
        if self.state == _OPEN:
            self.push_pending()
        for data, _ in quic.datagrams_to_send(now=reactor.seconds()):
            port = self.port
            if port is None:  # a write reported ECONNREFUSED: the attempt is over
                return
            try:
                port.write(data)
            except OSError:
                pass  # buffer full: QUIC's loss recovery resends
        if self.state == _GONE:
            return
        timer_at = quic.get_timer()
        timer = self.timer
        if timer_at is None:
            if timer is not None and timer.active():
                timer.cancel()
            self.timer = self.timer_at = None
            return
        if timer is not None and timer.active():
            if timer_at != self.timer_at:
                timer.reset(max(0.0, timer_at - reactor.seconds()))
        else:
            self.timer = reactor.callLater(max(0.0, timer_at - reactor.seconds()), self.timer_fired)
        self.timer_at = timer_at

    def timer_fired(self) -> None:
        self.timer = None
        quic = self.quic
        if quic is None or self.state == _GONE:
            return
        now = max(self.timer_at or 0.0, self.node._reactor.seconds())
        self.timer_at = None
        quic.handle_timer(now=now)
        self.process_events()
        if self.state != _GONE:
            self.transmit()

    # -- ending --

    def timed_out(self) -> None:
        self.connect_timer = None
        node = self.node
        reason = f"no connection to {node.hub_host}:{node.port} within {node.connect_timeout:g} s"
        if self.quic is not None and self.state != _GONE:
            self.quic.close(error_code=CLOSE_NORMAL, reason_phrase="connect timeout")
            self.transmit()
        self.finish(CloseInfo(None, reason, False))

    def cancel_connect_timer(self) -> None:
        call, self.connect_timer = self.connect_timer, None
        if call is not None and call.active():
            call.cancel()

    def close(self, code: int, reason: str) -> None:
        """Send CONNECTION_CLOSE (after what is queued) and end the attempt at once; the
        hub's side drains on its own."""
        if self.state == _GONE:
            return
        was_open = self.state == _OPEN
        quic = self.quic
        if quic is not None and self.state != _CLOSING:
            if was_open:
                self.push_pending()
            quic.close(error_code=code, reason_phrase=close_reason(reason))
            self.state = _CLOSING
            self.transmit()
        self.finish(
            CloseInfo(
                None, f"closed by the edge ({code}{': ' + reason if reason else ''})", was_open
            )
        )

    def terminated(self, event: events.ConnectionTerminated) -> None:
        was_open = self.state == _OPEN
        if event.frame_type is None:  # the hub's application close: its code and reason
            info = CloseInfo(event.error_code, event.reason_phrase, was_open)
        else:
            info = CloseInfo(None, describe_termination(event), was_open)
        self.finish(info)

    def finish(self, info: CloseInfo) -> None:
        if self.state == _GONE:
            return
        was_open = self.state == _OPEN or (self.state == _CLOSING and info.was_open)
        self.state = _GONE
        self.cancel_connect_timer()
        for call in (self.timer, self.flush_call):
            if call is not None and call.active():
                call.cancel()
        self.timer = self.flush_call = None
        self.pending = []
        self.readers.clear()
        port, self.port = self.port, None
        closed: Deferred[None] = succeed(None)
        if port is not None:
            closed = port.stopListening() or succeed(None)
        self.node._closed(self, CloseInfo(info.code, info.reason, was_open), closed)


class QuicEdgeNode(EdgeNodeBase[_Attempt]):
    """One simulated edge node over QUIC: connect, heartbeat, ACK, reconnect (module docstring).

    The API is :class:`~cloudhub.edge.client.EdgeNode`'s. ``configuration`` replaces the
    :class:`QuicConfiguration` built from ``credentials`` (tests use it for a client without
    a certificate; many nodes may share one).
    """

    __slots__ = ("max_message_size", "_configuration")

    _NAME = "QuicEdgeNode"
    _CONNECTED_LOG = "node {node} connected over QUIC to {host}:{port}"
    _FAILED_LOG = "node {node}: QUIC connection failed: {reason}"

    def __init__(
        self,
        reactor: Reactor,
        node_id: str,
        hub_host: str,
        port: int,
        credentials: EdgeCredentials | None,
        project_id: str = DEFAULT_PROJECT_ID,
        heartbeat: float = 15.0,
        reconnect: bool = True,
        on_message: OnMessage | None = None,
        *,
        random: Callable[[], float] = _random.random,
        store: MetaStore | None = None,
        configuration: QuicConfiguration | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        jitter: float = 0.2,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if configuration is None:
            if credentials is None:
                raise ValueError("give credentials or configuration")
            configuration = client_configuration(
                credentials, hub_host, idle_timeout=max(60.0, 4.0 * heartbeat)
            )
        super().__init__(
            reactor,
            node_id,
            hub_host,
            port,
            project_id,
            heartbeat,
            reconnect,
            on_message,
            random=random,
            store=store,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            jitter=jitter,
            connect_timeout=connect_timeout,
        )
        self.max_message_size = max_message_size
        self._configuration = configuration

    @property
    def connection(self) -> _Attempt | None:
        """The open connection (header acked, not closing), else None."""
        return self._link

    @connection.setter
    def connection(self, connection: _Attempt | None) -> None:
        self._link = connection

    # -- transport hooks --

    def _close_attempt(self, attempt: _Attempt, code: int, reason: str) -> None:
        attempt.close(code, reason)

    def _can_write(self, link: _Attempt) -> bool:
        return link.state == _OPEN

    def _write(self, link: _Attempt, message: Message) -> None:
        # Written at the end of this reactor turn.
        if message.sync:
            message = message.copy(sync=False)
        link.send(encode_frame(message))

    def _prepare(self, message: Message) -> Message:
        if not message.resource_version:
            # §2.5: protobuf drops it; the object's own metadata still has it.
            version = _object_resource_version(message.content)
            if version:
                message = message.copy(resource_version=version)
        return message

    # -- connecting --

    def _connect(self) -> None:
        self._retry_call = None
        attempt = _Attempt(self)
        self._attempt = attempt
        attempt.start()

    # -- events from the attempt --

    def _received(self, attempt: _Attempt, message: Message) -> None:
        if attempt is not self._link:
            return
        self._handle(message)
