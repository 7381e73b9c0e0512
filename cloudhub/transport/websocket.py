"""The WebSocket transport: what a stock edgecore v1.15 connects to (protocol §2, §4).

Autobahn does the opening handshake and the receive side (frame parsing, unmasking,
reassembly of fragments, size limits, ping/pong, the close handshake). The send side is ours
(performance-notes.md, levers 1-3): :meth:`WebSocketConnection.send_message` encodes the message
with :func:`cloudhub.wire.encode` and queues an unmasked text frame built here; all frames queued
in one reactor turn are written with one ``transport.write`` per connection, by one
``callLater(0)`` for the whole factory.

The handshake accepts any path; the node id comes from the ``node_id`` header and the project
id from ``project_id`` (any case: edgecore sends ``Node_id``/``Project_id``), read as Go reads
them: the first value of a repeated header, its bytes as sent, decoded as UTF-8 (strictly);
the node id must be a Kubernetes node name (:mod:`cloudhub.nodeid`). No subprotocol and
no extension is ever accepted; compression is off. The client certificate is required and
verified against the hub's CA by the TLS options (:func:`websocket_listener`). Beyond KubeEdge
(§4.2 compares nothing), the node the certificate names is compared with the node id under
the factory's ``node_identity`` mode (:mod:`cloudhub.certs.identity`): with ``enforce`` a
certificate for another node, or naming none, gets HTTP 403 with the reason instead of the
101 (edgecore then retries as after any failed dial, and never believes it is connected);
``warn`` lets it in, logged and counted; ``off`` checks nothing.

Contract towards the :class:`~cloudhub.interfaces.IConnectionHandler` (all calls on the reactor
thread, never re-entrantly from ``send_message`` or ``close``):

* Nothing at all is called for a connection whose TLS handshake fails (no or foreign client
  certificate), whose upgrade request is refused (no ``node_id`` header, one that is not a
  node name or not UTF-8: HTTP 400 with the reason; a node id its certificate does not name
  under ``enforce``: 403 with the reason; a request over ``max_request_size``
  bytes: 431, or 414 for its request line alone; not a WebSocket upgrade: 4xx), or that does
  not finish both within ``handshake_timeout`` (``hub.limits.handshakeTimeout``).
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
  (``CLOSE_TOO_BIG``); bytes that are not WebSocket framing with 1002 (protocol error) and
  Autobahn's reason, after which nothing more is read. Other connections are not affected.
* A peer that does not take what the hub writes is dropped (TCP aborted, no close frame):
  when its data has waited ``write_timeout`` seconds (``cloudHub.writeTimeout``), or at once
  when more than ``max_output_buffer`` bytes wait (:class:`WebSocketHubFactory`); pongs to
  its pings count too. ``connection_lost`` says "dropped by the hub: ...".
* ``send_message`` drops the message (debug log) once the connection is closing or closed;
  ``close`` of a connection already closing does nothing. Frames queued before ``close`` are
  written before the close frame. ``header.sync`` is cleared on the wire (§2.4).

Messages are not interpreted here: keepalives, control operations and ACKs are the core's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import FunctionType
from typing import Any, NoReturn

import txaio
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
from cloudhub.certs.identity import DEFAULT_MODE, NodeIdentity
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
from cloudhub.limits import handshake_admission
from cloudhub.listening import ListeningService
from cloudhub.model import Message
from cloudhub.nodeid import validate_node_id
from cloudhub.wire import decode, encode

__all__ = [
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_PROTOCOL_ERROR",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_OUTPUT_BUFFER",
    "DEFAULT_WRITE_TIMEOUT",
    "MAX_REQUEST_SIZE",
    "OPEN_HANDSHAKE_TIMEOUT",
    "ReactorTimer",
    "UnbufferedTLSFactory",
    "WebSocketConnection",
    "WebSocketHubFactory",
    "WebSocketHubProtocol",
    "WebSocketStats",
    "close_reason_bytes",
    "first_header_values",
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
# The deadline from TCP accept to the 101 (TLS handshake and the whole upgrade request
# included); a peer that has not finished by then is dropped. edgecore gives up after its
# own websocket.handshakeTimeout of 30 s (§4.2).
OPEN_HANDSHAKE_TIMEOUT = 10.0
# The upgrade request (request line + headers + the empty line) may have at most this many
# bytes: more is refused with 431 (414 when the request line alone is that long). edgecore's
# is ~330 bytes.
MAX_REQUEST_SIZE = 16 * 1024
# cloudHub.writeTimeout's default: how long a connection may keep data its peer does not take.
DEFAULT_WRITE_TIMEOUT = 30.0
# Bytes a connection may queue beyond what its peer takes before it is dropped.
DEFAULT_MAX_OUTPUT_BUFFER = 16 * 1024 * 1024
# How long the side that sent a close frame waits for the answer before dropping TCP.
CLOSE_HANDSHAKE_TIMEOUT = 2.0
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INTERNAL_ERROR = 1011

_STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING
_STATE_OPEN = WebSocketProtocol.STATE_OPEN
_STATE_CLOSING = WebSocketProtocol.STATE_CLOSING
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


def first_header_values(request: bytes, names: tuple[bytes, ...]) -> list[bytes]:
    """The first value of each header in ``names`` (lowercase) in the raw HTTP ``request``
    head, as sent (surrounding spaces and tabs removed), ``b""`` for a header not there.

    As Go's ``Header.Get``: a repeated header counts once, with its first value. Autobahn
    has already checked the head's syntax (CRLF lines, no folding) before ``onConnect``.
    """
    found: dict[bytes, bytes] = {}
    wanted = set(names)
    for line in request.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            key = name.strip().lower()
            if key in wanted and key not in found:
                found[key] = value.strip(b" \t")
    return [found.get(name, b"") for name in names]


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
    # While the transport has paused us (its buffer went over Twisted's 64 KiB mark and has
    # not drained since): the write timeout, and the bytes written since (slow peers).
    _write_timer: IDelayedCall | None = None
    _backlog = 0
    # After a protocol violation nothing more is read (the framing is lost).
    _discard_input = False

    # -- receive path, before anything else --

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == _STATE_OPEN:
            if not self._discard_input:
                self._dataReceived(data)
        elif state == _STATE_CONNECTING:
            self._request_data(data)
        elif state == _STATE_CLOSING:
            if not self._discard_input:
                self._dataReceived(data)
        # Closed: Autobahn would keep appending it to self.data until TCP is gone.

    def _request_data(self, data: bytes) -> None:
        """Bytes of the upgrade request: buffered up to the factory's ``max_request_size``,
        and handed to Autobahn only when the empty line that ends the head has arrived (it
        scans the whole buffer on every call: quadratic for a request sent byte by byte)."""
        buffered = self.data
        limit = self.factory.max_request_size
        if b"\r\n\r\n" not in buffered[-3:] + data:
            if len(buffered) + len(data) > limit:
                self._request_too_large(buffered + data, limit)
            else:
                self.data = buffered + data
            return
        head = buffered + data
        if head.find(b"\r\n\r\n", 0, limit) < 0:
            self._request_too_large(head, limit)
            return
        self._dataReceived(data)

    def _request_too_large(self, head: bytes, limit: int) -> None:
        self.data = b""
        self.factory.stats.requests_too_large += 1
        if head.find(b"\r\n", 0, limit) < 0:
            code, reason = 414, f"URI Too Long (request line over {limit} bytes)"
        else:
            code, reason = 431, f"Request Header Fields Too Large (over {limit} bytes)"
        log.info(
            "WebSocket upgrade from {peer} refused: {code} {reason}",
            peer=peer_address(self.transport),  # type: ignore[arg-type]
            code=code,
            reason=reason,
        )
        self.failHandshake(reason, code)

    def onOpenHandshakeTimeout(self) -> None:
        if self.state == _STATE_CONNECTING:
            self.factory.stats.handshake_timeouts += 1
            log.info(
                "connection from {peer} dropped: no WebSocket upgrade within {timeout:g} s",
                peer=self.peer,
                timeout=self.factory.openHandshakeTimeout,
            )
        super().onOpenHandshakeTimeout()

    # -- handshake --

    def onConnect(self, request: ConnectionRequest) -> None:
        # Autobahn's header values are Latin-1 decoded and repeated ones joined with ", ";
        # Go (gorilla) takes the first value, bytes as sent: read those from the raw request.
        peer = peer_address(self.transport)  # type: ignore[arg-type]
        values = first_header_values(self.http_request_data, (b"node_id", b"project_id"))
        node_id, project_id = "", ""
        for name, raw in zip(("node_id", "project_id"), values, strict=True):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._refuse_upgrade(peer, f"{raw!r:.80}", f"{name} header is not valid UTF-8")
            if name == "node_id":
                node_id = text
            else:
                project_id = text
        if not node_id:
            log.info("WebSocket upgrade from {peer} refused: no node_id header", peer=peer)
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "missing node_id header")
        problem = validate_node_id(node_id)
        if problem is not None:
            self._refuse_upgrade(peer, f"{node_id!r:.80}", f"invalid node_id header: {problem}")
        identity = self.factory.identity
        if identity.active:
            # The TLS handshake is done (the request came through it): the verified chain's
            # leaf is the peer certificate. Not a TLS transport (tests): no certificate.
            get_certificate = getattr(self.transport, "getPeerCertificate", None)
            certificate = get_certificate() if get_certificate is not None else None
            verdict = identity.admit(certificate, node_id, peer)
            if not verdict.allowed:
                raise ConnectionDeny(ConnectionDeny.FORBIDDEN, f"node identity: {verdict.reason}")
        self.connection = WebSocketConnection(self, node_id, project_id, peer)
        return None  # no subprotocol, whatever the client offered

    def _refuse_upgrade(self, peer: str, value: str, reason: str) -> NoReturn:
        self.factory.stats.node_ids_refused += 1
        log.info(
            "WebSocket upgrade from {peer} refused: {reason} ({value})",
            peer=peer,
            reason=reason,
            value=value,
        )
        raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, reason)

    def onOpen(self) -> None:
        connection = self.connection
        assert connection is not None
        handler = self.factory.handler
        # From here on the transport tells us when its peer stops taking data.
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
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
            data = b"".join(pending)
            self.transport.write(data)  # type: ignore[union-attr]
            if self._write_timer is not None:
                self._count_backlog(len(data))

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's own writes: the 101 or an HTTP error, pongs, close frames.
        super().sendData(data, sync, chopsize)
        if self._write_timer is not None:
            self._count_backlog(len(data))

    # -- slow peers: the transport as our consumer (IPushProducer) --

    def pauseProducing(self) -> None:
        """The transport holds more than it can pass on (Twisted: over 64 KiB): from now on
        the connection has ``write_timeout`` seconds to drain, and may write at most
        ``max_output_buffer`` more bytes meanwhile. One timer, only while paused."""
        if self._write_timer is None and self.state != _STATE_CLOSED:
            factory = self.factory
            self._backlog = 0
            self._write_timer = factory.reactor.callLater(
                factory.write_timeout, self._write_timed_out
            )

    def resumeProducing(self) -> None:
        """Everything written has been handed to the kernel."""
        timer = self._write_timer
        if timer is not None:
            self._write_timer = None
            if timer.active():
                timer.cancel()
        self._backlog = 0

    def stopProducing(self) -> None:
        self.resumeProducing()

    def _count_backlog(self, size: int) -> None:
        self._backlog += size
        limit = self.factory.max_output_buffer
        if self._backlog > limit:
            self.factory.stats.output_overflows += 1
            self._drop_slow_peer(f"more than {limit} bytes not taken by the peer")

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.factory.stats.write_timeouts += 1
        self._drop_slow_peer(
            f"data not taken by the peer for {self.factory.write_timeout:g} s (writeTimeout)"
        )

    def _drop_slow_peer(self, why: str) -> None:
        """Abort the TCP connection: a close frame would wait behind what the peer is not
        reading. Autobahn's ``dropConnection`` without its warning (this line is enough)."""
        timer, self._write_timer = self._write_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.state == _STATE_CLOSED:
            return
        connection = self.connection
        log.info(
            "node {node} ({peer}): connection dropped, {why}",
            node=connection.node_id if connection else "?",
            peer=connection.peer if connection else self.peer,
            why=why,
        )
        self._pending = None
        self.wasClean = False
        self.wasNotCleanReason = f"dropped by the hub: {why}"
        self.droppedByMe = True
        self.unregisterProducer()
        self.state = _STATE_CLOSED
        txaio.resolve(self.is_closed, self)  # type: ignore[attr-defined]
        self._closeConnection(abort=True)

    # -- protocol violations --

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        # Autobahn's failByDrop (still set: it stops the frame parser at the violation) would
        # drop TCP without a word. Instead: the close frame with the code (1002 for a
        # protocol violation, 1007 for a close reason that is not UTF-8) after what is queued,
        # nothing more read (the framing is lost), TCP dropped when the peer closes or after
        # the close handshake timeout, as for every close the hub starts.
        if self.state == _STATE_CLOSED:
            return
        self.failedByMe = True
        self._discard_input = True
        self.data = b""
        self.factory.stats.protocol_errors += 1
        connection = self.connection
        log.info(
            "node {node} ({peer}): closing, WebSocket protocol error: {reason}",
            node=connection.node_id if connection else "?",
            peer=connection.peer if connection else self.peer,
            reason=reason,
        )
        self.close_with(code, reason)

    # -- close --

    def close_with(self, code: int, reason: str) -> None:
        """Start the close handshake with ``code`` (any code: Autobahn's ``sendClose`` allows
        only 1000 and 3000-4999) after writing the frames already queued."""
        state = self.state
        if state == _STATE_OPEN:
            self.flush()
            if self.state != _STATE_OPEN:  # the flush found a peer not reading
                return
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
        self.resumeProducing()  # no write timer left behind
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


@dataclass(slots=True)
class WebSocketStats:
    """Counters of the WebSocket listener (plain ints): each limit reached."""

    requests_too_large: int = 0  # upgrade request over max_request_size: 431 / 414
    handshake_timeouts: int = 0  # no upgrade within handshake_timeout: dropped
    node_ids_refused: int = 0  # node_id not a node name, or not UTF-8: 400
    protocol_errors: int = 0  # WebSocket protocol violations: closed with 1002 (1007)
    write_timeouts: int = 0  # data not taken by the peer for write_timeout: dropped
    output_overflows: int = 0  # more than max_output_buffer not taken: dropped
    # Node identity (cloudhub.certs.identity): refused under enforce (403); let in under warn
    # with another node's certificate, or with one naming no node.
    identity_refused: int = 0
    identity_mismatches: int = 0
    identity_unnamed: int = 0


class WebSocketHubFactory(WebSocketServerFactory):
    """Autobahn server factory for edge nodes; reports to ``handler`` (module docstring).

    ``max_message_size`` bounds one received message (and frame), in payload bytes; a larger
    one closes the connection with 1009.

    Limits (issue 18; each reached one is counted in :attr:`stats`):

    * ``max_request_size``: bytes of the upgrade request (request line and headers); more
      is answered 431 (414 if the request line alone is that long) before it is all read.
    * ``handshake_timeout``: seconds from TCP accept to the 101 (TLS included); then the
      connection is dropped.
    * ``write_timeout``: seconds a connection may keep data its peer does not take: from the
      moment its transport holds more than it can pass on (Twisted pauses its producer
      over 64 KiB unsent) until it has drained completely; then TCP is aborted.
    * ``max_output_buffer``: bytes written meanwhile (pongs included) beyond which TCP is
      aborted at once. What a connection can hold is thus at most this plus 64 KiB and the
      kernel's socket buffer.

    ``node_identity`` (``enforce``, ``warn``, ``off``: ``hub.nodeIdentity``) says what to do
    with a client certificate that does not name the connecting node (module docstring);
    :attr:`identity` applies it.
    """

    protocol = WebSocketHubProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        handler: IConnectionHandler,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        reactor: Reactor = None,
        *,
        max_request_size: int = MAX_REQUEST_SIZE,
        handshake_timeout: float = OPEN_HANDSHAKE_TIMEOUT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        max_output_buffer: int = DEFAULT_MAX_OUTPUT_BUFFER,
        node_identity: str = DEFAULT_MODE,
    ) -> None:
        if reactor is None:
            raise TypeError("WebSocketHubFactory needs the reactor")
        # server=None: no Server header in the 101, like gorilla's Upgrader.
        super().__init__(server=None, reactor=reactor)
        self.handler = handler
        self.max_message_size = max_message_size
        self.max_request_size = max_request_size
        self.write_timeout = write_timeout
        self.max_output_buffer = max_output_buffer
        self.stats = WebSocketStats()
        self.identity = NodeIdentity(node_identity, self.stats, "WebSocket")
        self._batched_timer = ReactorTimer(reactor)
        self.setProtocolOptions(
            webStatus=False,  # a plain GET gets 426, not Autobahn's status page
            utf8validateIncoming=False,  # wire.decode checks UTF-8 and answers 1007
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            autoFragmentSize=0,
            failByDrop=True,  # stops the parser at a violation; the hub sends 1002 (above)
            openHandshakeTimeout=handshake_timeout,
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
    *,
    node_identity: str | None = None,
) -> ListeningService:
    """The WebSocket port (``cloudHub.websocket``: ``endpoint``, or ``address``/``port``) with
    mutual TLS, as a service.

    Client certificates are required and verified against the hub's CA; messages are limited
    to ``hub.maxMessageSize``; the listen backlog is ``hub.listenBacklog``; a peer that leaves
    data unread for ``cloudHub.writeTimeout`` seconds, or more than
    ``hub.limits.maxOutputBuffer`` bytes, is dropped; the upgrade request is bounded by
    ``hub.limits.websocketRequestSize`` and ``hub.limits.handshakeTimeout``; the node a
    client certificate names is checked under ``node_identity``, by default
    ``hub.nodeIdentity`` (``warn`` while the config has no such key).
    """
    settings = config.cloudhub.websocket
    factory = WebSocketHubFactory(
        handler,
        config.hub.max_message_size,
        reactor,
        write_timeout=float(config.cloudhub.write_timeout),
        max_request_size=config.hub.limits.websocket_request_size,
        handshake_timeout=float(config.hub.limits.handshake_timeout),
        max_output_buffer=config.hub.limits.max_output_buffer,
        node_identity=node_identity or str(getattr(config.hub, "node_identity", DEFAULT_MODE)),
    )
    tls = UnbufferedTLSFactory(
        server_tls_options(authority, "require"), False, factory, clock=reactor
    )
    endpoint = server_endpoint(
        reactor, settings.endpoint, settings.address, settings.port, config.hub.listen_backlog
    )
    # New handshakes at a bounded pace, so a reconnect storm cannot starve connected nodes;
    # nothing stays in the way of an admitted connection.
    admission = handshake_admission(tls, config.hub.limits.websocket, reactor)
    return ListeningService("websocket", endpoint, admission)
