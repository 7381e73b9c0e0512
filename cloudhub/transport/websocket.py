"""The WebSocket transport: what a stock edgecore v1.15 connects to (protocol §2, §4).

Autobahn does the opening handshake and the receive side (frame parsing, unmasking,
reassembly of fragments, size limits, ping/pong, the close handshake). The send side is ours
(performance-notes.md, levers 1-3): :meth:`WebSocketConnection.send_message` encodes the message
with :func:`cloudhub.wire.encode` and queues an unmasked text frame built here; all frames queued
in one reactor turn are written with one ``transport.write`` per connection, by one
``callLater(0)`` for the whole factory.

The handshake accepts any path; the node id comes from the ``node_id`` header and the project
id from ``project_id`` (any case: edgecore sends ``Node_id``/``Project_id``). No subprotocol and
no extension is ever accepted; compression is off. The client certificate is required and
verified against the hub's CA by the TLS options (:func:`websocket_listener`); its subject is
not compared with the node id (§4.2).

Contract towards the :class:`~cloudhub.interfaces.IConnectionHandler` (all calls on the reactor
thread, never re-entrantly from ``send_message`` or ``close``):

* Nothing at all is called for a connection whose TLS handshake fails (no or foreign client
  certificate), whose upgrade request is refused (no ``node_id`` header: HTTP 400 with the
  reason; not a WebSocket upgrade: 4xx), or that does not finish both within 30 s.
* ``connection_made(conn)`` is called once, right after the 101 response is written and before
  any ``message_received`` for ``conn``. ``conn.send_message`` works from inside it.
* If ``connection_made`` raises :class:`~cloudhub.errors.NodeRefused`, the connection is closed
  with code 1013 (``CLOSE_TRY_AGAIN_LATER``) and the exception's ``reason``, and the handler
  hears nothing more about it: no ``message_received`` and **no** ``connection_lost``. Any
  other exception is logged and treated the same way, with code 1011 "internal error".
* Once ``connection_made`` has returned, every message the edge sends is decoded and passed to
  ``message_received(conn, msg)`` in order, until the connection starts closing (the hub's
  ``close``, the edge's close frame, a message that does not decode, one over the size limit);
  then ``connection_lost(conn, reason)`` is called exactly once, when the TCP connection is
  gone. ``reason`` is one line ("closed by the hub (1008: ...)", "closed by the edge (1000)",
  "peer dropped the TCP connection ...").
* A message that does not decode closes that connection with 1007 (``CLOSE_INVALID_PAYLOAD``)
  and the decoder's message; a message over ``max_message_size`` with 1009
  (``CLOSE_TOO_BIG``); bytes that are not WebSocket framing drop the TCP connection (Autobahn's
  ``failByDrop``). Other connections are not affected.
* ``send_message`` drops the message (debug log) once the connection is closing or closed;
  ``close`` of a connection already closing does nothing. Frames queued before ``close`` are
  written before the close frame. ``header.sync`` is cleared on the wire (§2.4).

Messages are not interpreted here: keepalives, control operations and ACKs are the core's.
"""

from __future__ import annotations

import struct
from types import FunctionType
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IDelayedCall, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.tls import server_tls_options
from cloudhub.config import HubConfig
from cloudhub.endpoints import server_endpoint
from cloudhub.errors import DecodeError, NodeRefused
from cloudhub.interfaces import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    IConnection,
    IConnectionHandler,
)
from cloudhub.listening import ListeningService
from cloudhub.model import Message
from cloudhub.wire import decode, encode

__all__ = [
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_INTERNAL_ERROR",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "OPEN_HANDSHAKE_TIMEOUT",
    "ReactorTimer",
    "UnbufferedTLSFactory",
    "WebSocketConnection",
    "WebSocketHubFactory",
    "WebSocketHubProtocol",
    "close_reason_bytes",
    "masked_text_frame",
    "peer_address",
    "text_frame",
    "text_frame_header",
    "websocket_listener",
    "with_factory_options",
]

log = Logger()

# The injected reactor: IReactorTime (callLater, seconds) and, for the listener, IReactorSSL.
Reactor = Any

DEFAULT_MAX_MESSAGE_SIZE = 8 * 1024 * 1024
# edgecore's websocket.handshakeTimeout is 30 s (§4.2); here it bounds TCP accept -> 101,
# which includes the TLS handshake.
OPEN_HANDSHAKE_TIMEOUT = 30.0
# How long the side that sent a close frame waits for the answer before dropping TCP.
CLOSE_HANDSHAKE_TIMEOUT = 2.0
CLOSE_INTERNAL_ERROR = 1011

_STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING
_STATE_OPEN = WebSocketProtocol.STATE_OPEN
_STATE_CLOSED = WebSocketProtocol.STATE_CLOSED

# A close frame's payload is at most 125 bytes: 2 for the code, 123 for the reason.
_MAX_CLOSE_REASON = 123


# --- framing ---------------------------------------------------------------------------------

_FIN_TEXT = 0x81
_SHORT_HEADERS = tuple(bytes((_FIN_TEXT, length)) for length in range(126))


def text_frame_header(length: int) -> bytes:
    """The header of an unmasked, unfragmented text frame of ``length`` payload bytes
    (RFC 6455 §5.2: 7-bit, 16-bit or 64-bit length, always the shortest)."""
    if length < 126:
        return _SHORT_HEADERS[length]
    if length < 0x10000:
        return struct.pack("!BBH", _FIN_TEXT, 126, length)
    return struct.pack("!BBQ", _FIN_TEXT, 127, length)


def text_frame(payload: bytes) -> bytes:
    """A whole unmasked text frame (server to client)."""
    return text_frame_header(len(payload)) + payload


def masked_text_frame(payload: bytes, mask: bytes) -> bytes:
    """A whole masked text frame (client to server) with the 4-byte ``mask``."""
    length = len(payload)
    if length < 126:
        header = bytes((_FIN_TEXT, 0x80 | length))
    elif length < 0x10000:
        header = struct.pack("!BBH", _FIN_TEXT, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 0x80 | 127, length)
    if length:
        # XOR as one big integer: done in C, unlike a loop over the bytes.
        key = (mask * (length // 4 + 1))[:length]
        payload = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
            length, "little"
        )
    return header + mask + payload


def close_reason_bytes(reason: str) -> bytes:
    """``reason`` as UTF-8, cut to fit a close frame without splitting a character."""
    data = reason.encode("utf-8")
    if len(data) <= _MAX_CLOSE_REASON:
        return data
    return data[:_MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")


def peer_address(transport: ITransport) -> str:
    """The remote end of ``transport`` as ``host:port`` (``[host]:port`` for IPv6)."""
    address = transport.getPeer()
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class ReactorTimer:
    """Autobahn's timer interface (``call_later``) on an injected reactor.

    Autobahn's factories make a batched timer on txaio's global loop; replacing it with this
    puts the handshake and close timeouts on the reactor given to us (a ``Clock`` in tests).
    """

    __slots__ = ("_reactor",)

    def __init__(self, reactor: Reactor) -> None:
        self._reactor = reactor

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> IDelayedCall:
        return self._reactor.callLater(delay, func, *args, **kwargs)  # type: ignore[no-any-return]


class LeanProtocolMixin:
    """Hot paths of Autobahn's Twisted adapter without their per-call debug-log arguments,
    and without the ``message`` event machinery; shared by the hub and the edge client."""

    def dataReceived(self, data: bytes) -> None:
        this: Any = self
        this._dataReceived(data)

    def _onOpen(self) -> None:
        # The adapter would parse the peer certificate and the TLS channel id for WAMP.
        this: Any = self
        this.onOpen()

    def onMessageEnd(self) -> None:
        this: Any = self
        data = this.message_data
        this.message_data = None
        if not this.failedByMe:
            this.onMessage(data[0] if len(data) == 1 else b"".join(data), this.message_is_binary)


def with_factory_options(protocol: type[Any], factory: Any) -> type[Any]:
    """A subclass of the Autobahn ``protocol`` holding ``factory``'s options as class attributes.

    For each new connection Autobahn copies its ~40 options from the factory onto the
    protocol instance and pretty-prints them for a debug line that is built even when nobody
    logs it: ~0.5 ms of CPU and ~2 KB of instance dictionary per connection, measured in a
    reconnect storm. With the options on the class (and nothing left to copy), neither
    happens; every connection of the factory shares them, as it did before. Options set
    on the factory afterwards are not seen: build the class after ``setProtocolOptions``.
    """
    options = {}
    for name in protocol.CONFIG_ATTRS:
        value = getattr(factory, name)
        # A plain function (perMessageCompressionAccept) must not become a method.
        options[name] = staticmethod(value) if isinstance(value, FunctionType) else value
    return type(protocol.__name__, (protocol,), {**options, "CONFIG_ATTRS": ()})


# --- the connection the core sees ------------------------------------------------------------


@implementer(IConnection)
class WebSocketConnection:
    """One edge node's WebSocket, as the core sees it (:class:`IConnection`).

    A separate object from the Autobahn protocol because ``transport`` means the socket there.
    """

    __slots__ = ("node_id", "project_id", "peer", "_protocol")

    transport = "websocket"

    def __init__(
        self, protocol: WebSocketHubProtocol, node_id: str, project_id: str, peer: str
    ) -> None:
        self.node_id = node_id
        self.project_id = project_id
        self.peer = peer
        self._protocol: WebSocketHubProtocol | None = protocol

    @property
    def is_open(self) -> bool:
        """True while ``send_message`` would write (handshake done, no close started)."""
        protocol = self._protocol
        return protocol is not None and protocol.state == _STATE_OPEN

    def send_message(self, message: Message, encoded: bytes | None = None) -> None:
        """Queue ``message`` as a text frame; written at the end of this reactor turn.

        ``encoded`` is ``encode(message)`` if the caller has it (IConnection.send_message).

        Dropped (debug log) when the connection is closing or closed. Raises only what
        :func:`cloudhub.wire.encode` raises for a message JSON cannot carry (a caller's bug).
        """
        protocol = self._protocol
        if protocol is None or protocol.state != _STATE_OPEN:
            log.debug(
                "node {node}: connection closed, message {msg_id} dropped",
                node=self.node_id,
                msg_id=message.msg_id,
            )
            return
        if message.sync:  # §2.4: async writes clear it, and edgecore acts on it
            protocol.queue_payload(encode(message.copy(sync=False)))
        else:
            protocol.queue_payload(encode(message) if encoded is None else encoded)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame with ``code`` and ``reason``; TCP is dropped when the edge
        answers, or after :data:`CLOSE_HANDSHAKE_TIMEOUT`. Nothing if already closing."""
        protocol = self._protocol
        if protocol is not None:
            protocol.close_with(code, reason)

    def __repr__(self) -> str:
        return f"<WebSocketConnection node={self.node_id!r} peer={self.peer}>"


# --- Autobahn server side --------------------------------------------------------------------


class WebSocketHubProtocol(LeanProtocolMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """One TCP connection to the WebSocket port; see the module docstring for the contract."""

    factory: WebSocketHubFactory
    connection: WebSocketConnection | None = None
    # True from a successful connection_made until connection_lost has been called.
    in_session = False
    # Frames queued this reactor turn, written by the factory's flush.
    _pending: list[bytes] | None = None

    # -- handshake --

    def onConnect(self, request: ConnectionRequest) -> None:
        headers = request.headers  # Autobahn lowercases the names
        node_id = headers.get("node_id", "").strip()
        peer = peer_address(self.transport)  # type: ignore[arg-type]
        if not node_id:
            log.info("WebSocket upgrade from {peer} refused: no node_id header", peer=peer)
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "missing node_id header")
        project_id = headers.get("project_id", "").strip()
        self.connection = WebSocketConnection(self, node_id, project_id, peer)
        return None  # no subprotocol, whatever the client offered

    def onOpen(self) -> None:
        connection = self.connection
        assert connection is not None
        handler = self.factory.handler
        try:
            handler.connection_made(connection)
        except NodeRefused as refused:
            log.debug(
                "node {node} refused ({peer}): {reason}",
                node=connection.node_id,
                peer=connection.peer,
                reason=refused.reason,
            )
            self.close_with(CLOSE_TRY_AGAIN_LATER, refused.reason)
            return
        except Exception:
            log.failure("node {node}: connection_made failed; closing", node=connection.node_id)
            self.close_with(CLOSE_INTERNAL_ERROR, "internal error")
            return
        self.in_session = True
        # The upgrade request and response are read; ~2 KB a node while it stays connected.
        self.http_headers = {}
        self.http_request_data = b""
        self.http_response_data = ""
        log.debug(
            "node {node} connected over WebSocket from {peer} (project {project})",
            node=connection.node_id,
            peer=connection.peer,
            project=connection.project_id or "-",
        )

    # -- receive --

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self.in_session or self.state != _STATE_OPEN:
            return
        connection = self.connection
        assert connection is not None
        try:
            message = decode(payload)
        except DecodeError as error:
            log.info(
                "node {node}: closing, message does not decode: {error}",
                node=connection.node_id,
                error=error,
            )
            self.close_with(CLOSE_INVALID_PAYLOAD, str(error))
            return
        try:
            self.factory.handler.message_received(connection, message)
        except Exception:
            log.failure(
                "node {node}: message_received failed for {msg_id}",
                node=connection.node_id,
                msg_id=message.msg_id,
            )

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        # Autobahn would drop TCP without a word (failByDrop); tell the edge why instead.
        # failedByMe makes Autobahn discard the rest of the message as it arrives.
        self.failedByMe = True
        node = self.connection.node_id if self.connection else "?"
        log.info(
            "node {node}: closing, message of {size} bytes over the limit of {limit}",
            node=node,
            size=msg_size,
            limit=max_msg_size,
        )
        self.close_with(
            CLOSE_TOO_BIG, f"message of {msg_size} bytes exceeds the limit of {max_msg_size}"
        )

    # -- send --

    def queue_payload(self, payload: bytes) -> None:
        """Queue one message payload as a text frame for this turn's flush."""
        pending = self._pending
        if pending is None:
            self._pending = [text_frame_header(len(payload)), payload]
            self.factory.schedule_flush(self)
        else:
            pending.append(text_frame_header(len(payload)))
            pending.append(payload)

    def flush(self) -> None:
        """Write every queued frame with one ``transport.write``."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        if self.state == _STATE_OPEN:
            self.transport.write(b"".join(pending))  # type: ignore[union-attr]

    # -- close --

    def close_with(self, code: int, reason: str) -> None:
        """Start the close handshake with ``code`` (any code: Autobahn's ``sendClose`` allows
        only 1000 and 3000-4999) after writing the frames already queued."""
        state = self.state
        if state == _STATE_OPEN:
            self.flush()
            self.sendCloseFrame(code=code, reasonUtf8=close_reason_bytes(reason), isReply=False)
        elif state == _STATE_CONNECTING:
            self.dropConnection(abort=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The adapter logs TLS failures at error level; a client without a valid certificate
        # is not an error of the hub.
        if self.connection is None:
            log.debug(
                "connection from {peer} closed before the WebSocket handshake: {reason}",
                peer=self.peer,
                reason=reason.getErrorMessage(),
            )
        self._connectionLost(reason)  # type: ignore[arg-type]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._pending = None
        connection = self.connection
        if connection is None:
            return
        connection._protocol = None
        if not self.in_session:
            return  # refused: the handler never got it
        self.in_session = False
        why = self._describe_close()
        log.debug(
            "node {node} disconnected ({peer}): {why}",
            node=connection.node_id,
            peer=connection.peer,
            why=why,
        )
        try:
            self.factory.handler.connection_lost(connection, why)
        except Exception:
            log.failure("node {node}: connection_lost failed", node=connection.node_id)

    def _describe_close(self) -> str:
        if self.closedByMe and self.localCloseCode is not None:
            text = (self.localCloseReason or b"").decode("utf-8", "replace")
            return f"closed by the hub ({self.localCloseCode}{': ' + text if text else ''})"
        if self.remoteCloseCode is not None:
            text = self.remoteCloseReason or ""
            return f"closed by the edge ({self.remoteCloseCode}{': ' + text if text else ''})"
        return str(self.wasNotCleanReason or "connection lost")


class WebSocketHubFactory(WebSocketServerFactory):
    """Autobahn server factory for edge nodes; reports to ``handler`` (module docstring).

    ``max_message_size`` bounds one received message (and frame), in payload bytes; a larger
    one closes the connection with 1009.
    """

    protocol = WebSocketHubProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        handler: IConnectionHandler,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        reactor: Reactor = None,
    ) -> None:
        if reactor is None:
            raise TypeError("WebSocketHubFactory needs the reactor")
        # server=None: no Server header in the 101, like gorilla's Upgrader.
        super().__init__(server=None, reactor=reactor)
        self.handler = handler
        self.max_message_size = max_message_size
        self._batched_timer = ReactorTimer(reactor)
        self.setProtocolOptions(
            webStatus=False,  # a plain GET gets 426, not Autobahn's status page
            utf8validateIncoming=False,  # wire.decode checks UTF-8 and answers 1007
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            autoFragmentSize=0,
            failByDrop=True,
            openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            autoPingInterval=0,  # KubeEdge never pings; keepalive is application level
            autoPingTimeout=0,
            perMessageCompressionAccept=lambda offers: None,
        )
        self.protocol = with_factory_options(WebSocketHubProtocol, self)
        self._dirty: list[WebSocketHubProtocol] = []
        self._flush_call: IDelayedCall | None = None

    def schedule_flush(self, protocol: WebSocketHubProtocol) -> None:
        """Have ``protocol`` flushed at the end of this reactor turn (one timer for all)."""
        self._dirty.append(protocol)
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        dirty, self._dirty = self._dirty, []
        for protocol in dirty:
            protocol.flush()

    def stopFactory(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
            self._flush()
        super().stopFactory()


class UnbufferedTLSFactory(TLSMemoryBIOFactory):
    """TLS over TCP without Twisted's small-write aggregation.

    Twisted's default TLS transport holds each write for a ``callLater(0)`` of its own, per
    connection, to join small writes. :class:`WebSocketHubFactory` already writes each
    connection once per reactor turn, so that timer only costs: a heap push and pop per
    message on a busy hub, and one more reactor turn before the bytes leave.
    """

    protocol = TLSMemoryBIOProtocol


def websocket_listener(
    config: HubConfig,
    authority: CertificateAuthority,
    handler: IConnectionHandler,
    reactor: Reactor,
) -> ListeningService:
    """The WebSocket port (``cloudHub.websocket``: ``endpoint``, or ``address``/``port``) with
    mutual TLS, as a service.

    Client certificates are required and verified against the hub's CA; messages are limited
    to ``hub.maxMessageSize``; the listen backlog is ``hub.listenBacklog``.
    """
    settings = config.cloudhub.websocket
    factory = WebSocketHubFactory(handler, config.hub.max_message_size, reactor)
    tls = UnbufferedTLSFactory(
        server_tls_options(authority, "require"), False, factory, clock=reactor
    )
    endpoint = server_endpoint(
        reactor, settings.endpoint, settings.address, settings.port, config.hub.listen_backlog
    )
    return ListeningService("websocket", endpoint, tls)
