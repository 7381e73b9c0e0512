"""An edge node over WebSocket: what edgecore's edgehub and metamanager do on the wire.

:class:`EdgeNode` connects to the hub as edgecore v1.15 does (§4.1, ws-handshake.txt): mutual
TLS, ``GET /<projectID>/<nodeName>/events`` with Go's header spelling (``Connectionuse: msg``,
``Node_id``, ``Project_id``), no subprotocol, no extension. Once open it

* sends a keepalive at once and every ``heartbeat`` seconds (§2.2);
* answers the control operations ``ping``/``pong``/``config`` with ``"ack"`` (§2.3);
* stores cloud messages of group ``resource`` without a parent id in its :class:`MetaStore`
  and ACKs them by metamanager's rules (§7.5, :mod:`cloudhub.edge.metamanager`);
* hands every other message (replies with a ``parent_msg_id``, other groups), and the stored
  ones after storing, to ``on_message(node, message)``;
* reconnects after any close, with exponential backoff and jitter (1 s doubling to 30 s,
  ±20 %), which is quicker than edgecore's fixed 2 × heartbeat but keeps a node refused with
  1013 (node limit) from hammering the hub.

It is made to be cheap per node (a simulator runs thousands in one process): one small
object, a ``LoopingCall`` only while connected, and TLS options and the Autobahn factory that
many nodes can share (``tls_options=``, ``ws_factory=``). Frames are masked and written by us;
every message sent while handling one read (the ACKs of a burst) goes out in one write.
"""

from __future__ import annotations

import base64
import os
import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cloudhub.certs.tls import client_tls_options
from cloudhub.edge.bootstrap import EdgeCredentials
from cloudhub.edge.metamanager import MetaStore
from cloudhub.errors import DecodeError
from cloudhub.interfaces import CLOSE_INVALID_PAYLOAD, CLOSE_NORMAL, CLOSE_TRY_AGAIN_LATER
from cloudhub.model import (
    CONTROL_OPERATIONS,
    GROUP_RESOURCE,
    OP_RESPONSE,
    Message,
    new_control_ack,
    new_keepalive,
)
from cloudhub.transport.websocket import (
    CLOSE_HANDSHAKE_TIMEOUT,
    OPEN_HANDSHAKE_TIMEOUT,
    LeanProtocolMixin,
    ReactorTimer,
    close_reason_bytes,
    masked_text_frame,
)
from cloudhub.wire import decode, encode

__all__ = [
    "DEFAULT_PROJECT_ID",
    "CloseInfo",
    "EdgeNode",
    "EdgeStats",
    "edge_client_factory",
]

log = Logger()

Reactor = Any
OnMessage = Callable[["EdgeNode", Message], None]

# edgecore's default edgeHub.projectID (§8.2, ws-handshake.txt).
DEFAULT_PROJECT_ID = "e632aba927ea4ac2b575ec1603d56f10"
CONNECT_TIMEOUT = 30.0
# After answering the hub's close frame, how long to wait for the hub to drop TCP.
SERVER_DROP_TIMEOUT = 2.0

_STATE_OPEN = WebSocketProtocol.STATE_OPEN
_STATE_CLOSED = WebSocketProtocol.STATE_CLOSED


@dataclass(slots=True)
class EdgeStats:
    """Counters of one node (plain ints: read them, sum them)."""

    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    keepalives_sent: int = 0
    acks_sent: int = 0
    errors_sent: int = 0
    control_acks_sent: int = 0
    sends_dropped: int = 0
    decode_errors: int = 0


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """How a connection (or a connection attempt) ended.

    ``code`` and ``reason`` are from the hub's close frame when it sent one (1013 when the
    node limit refused us); otherwise ``code`` is None and ``reason`` says what happened.
    """

    code: int | None
    reason: str
    was_open: bool


def edge_client_factory(reactor: Reactor) -> WebSocketClientFactory:
    """The Autobahn options of an edge connection; one factory can serve many nodes."""
    factory = WebSocketClientFactory(reactor=reactor)
    factory._batched_timer = ReactorTimer(reactor)
    factory.setProtocolOptions(
        utf8validateIncoming=False,  # wire.decode checks UTF-8
        maxFramePayloadSize=0,  # gorilla sets no read limit (§2.1)
        maxMessagePayloadSize=0,
        autoFragmentSize=0,
        failByDrop=True,
        openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT,
        closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
        serverConnectionDropTimeout=0,  # ours runs on the injected reactor (onCloseFrame)
        autoPingInterval=0,
        autoPingTimeout=0,
        perMessageCompressionOffers=[],
    )
    return factory


class _EdgeProtocol(LeanProtocolMixin, WebSocketClientProtocol):  # type: ignore[misc]
    """One connection attempt of an :class:`EdgeNode`."""

    node: EdgeNode
    # Frames written while handling one read; None outside dataReceived.
    _batch: list[bytes] | None = None
    _drop_call: IDelayedCall | None = None

    def startHandshake(self) -> None:
        # edgecore's request byte for byte (ws-handshake.txt): Go's canonical header names in
        # Go's order, no Origin, no Pragma, no subprotocol, no extension.
        node = self.node
        key = base64.b64encode(os.urandom(16))
        self.websocket_key = key
        host = f"[{node.hub_host}]" if ":" in node.hub_host else node.hub_host
        request = (
            f"GET /{node.project_id}/{node.node_id}/events HTTP/1.1\r\n"
            f"Host: {host}:{node.port}\r\n"
            "User-Agent: Go-http-client/1.1\r\n"
            "Connection: Upgrade\r\n"
            "Connectionuse: msg\r\n"
            f"Node_id: {node.node_id}\r\n"
            f"Project_id: {node.project_id}\r\n"
            f"Sec-WebSocket-Key: {key.decode('ascii')}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "Upgrade: websocket\r\n"
            "\r\n"
        ).encode()
        self.http_request_data = request
        self.sendData(request)

    def dataReceived(self, data: bytes) -> None:
        # Everything written while handling this read (the ACKs of a burst, Autobahn's pongs
        # and close frames) leaves in one write, in order, once the read is handled.
        batch: list[bytes] = []
        self._batch = batch
        try:
            self._dataReceived(data)
        finally:
            self._batch = None
            if batch and self.state != _STATE_CLOSED:
                self.transport.write(b"".join(batch))  # type: ignore[union-attr]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        batch = self._batch
        if batch is not None and not sync and not chopsize:
            batch.append(data)
        else:
            super().sendData(data, sync, chopsize)

    def send_payload(self, payload: bytes) -> None:
        frame = masked_text_frame(payload, os.urandom(4))
        batch = self._batch
        if batch is not None:
            batch.append(frame)
        else:
            self.transport.write(frame)  # type: ignore[union-attr]

    def close_with(self, code: int, reason: str) -> None:
        if self.state == _STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=close_reason_bytes(reason), isReply=False)
        elif self.state != _STATE_CLOSED:
            self.dropConnection(abort=True)

    def onOpen(self) -> None:
        self.node._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.node._received(self, payload)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        result = super().onCloseFrame(code, reasonRaw)  # type: ignore[arg-type]
        # The hub drops TCP once the close handshake is done; if it does not, we do.
        if self.state != _STATE_CLOSED and self._drop_call is None:
            self._drop_call = self.node._reactor.callLater(SERVER_DROP_TIMEOUT, self._drop)
        return result

    def _drop(self) -> None:
        self._drop_call = None
        self.wasClean = False
        self.wasNotCleanReason = "the hub did not drop the TCP connection after the close"
        self.dropConnection(abort=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._drop_call is not None:
            if self._drop_call.active():
                self._drop_call.cancel()
            self._drop_call = None
        self._connectionLost(reason)  # type: ignore[arg-type]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.remoteCloseCode is not None:
            info = CloseInfo(self.remoteCloseCode, self.remoteCloseReason or "", True)
        elif self.closedByMe and self.localCloseCode is not None:
            text = (self.localCloseReason or b"").decode("utf-8", "replace")
            info = CloseInfo(
                None,
                f"closed by the edge ({self.localCloseCode}{': ' + text if text else ''})",
                True,
            )
        else:
            info = CloseInfo(None, str(self.wasNotCleanReason or reason or "connection lost"), True)
        self.node._closed(self, info)


class _ConnectFactory(Factory):
    """Builds the protocol of one connection attempt (the endpoint wraps it)."""

    noisy = False

    def __init__(self, node: EdgeNode) -> None:
        self.node = node

    def buildProtocol(self, addr: Any) -> _EdgeProtocol:
        node = self.node
        protocol = _EdgeProtocol()
        protocol.factory = node._ws_factory
        protocol.node = node
        node._attempt = protocol
        return protocol


class EdgeNode:
    """One simulated edgecore: connect, heartbeat, ACK, reconnect (module docstring).

    ``on_message(node, message)`` sees every cloud message except control operations, after
    the node stored and acknowledged it where §7.5 says so. ``random`` returns floats in
    [0, 1) for the backoff jitter. ``tls_options`` and ``ws_factory`` replace what would be
    built from ``credentials`` and :func:`edge_client_factory`, so many nodes can share them.
    """

    __slots__ = (
        "_reactor",
        "node_id",
        "hub_host",
        "port",
        "project_id",
        "heartbeat",
        "reconnect",
        "on_message",
        "store",
        "stats",
        "initial_backoff",
        "max_backoff",
        "jitter",
        "connect_timeout",
        "protocol",
        "last_close",
        "last_retry_delay",
        "_random",
        "_tls",
        "_ws_factory",
        "_attempt",
        "_connecting",
        "_retry_call",
        "_heartbeat_loop",
        "_failures",
        "_running",
        "_open_waiters",
        "_close_waiters",
        "_stop_waiters",
    )

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
        tls_options: IOpenSSLClientConnectionCreator | None = None,
        ws_factory: WebSocketClientFactory | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        jitter: float = 0.2,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        if tls_options is None:
            if credentials is None:
                raise ValueError("give credentials or tls_options")
            tls_options = client_tls_options(
                credentials.ca_pem, credentials.cert_pem, credentials.key_pem, hostname=hub_host
            )
        self._reactor = reactor
        self.node_id = node_id
        self.hub_host = hub_host
        self.port = port
        self.project_id = project_id
        self.heartbeat = heartbeat
        self.reconnect = reconnect
        self.on_message = on_message
        self.store = store if store is not None else MetaStore()
        self.stats = EdgeStats()
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self.connect_timeout = connect_timeout
        # The open connection (WebSocket handshake done, not closing), else None.
        self.protocol: _EdgeProtocol | None = None
        self.last_close: CloseInfo | None = None
        self.last_retry_delay: float | None = None
        self._random = random
        self._tls = tls_options
        self._ws_factory = ws_factory if ws_factory is not None else edge_client_factory(reactor)
        # The current connection attempt from TCP connect to connectionLost.
        self._attempt: _EdgeProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._retry_call: IDelayedCall | None = None
        self._heartbeat_loop: LoopingCall | None = None
        self._failures = 0
        self._running = False
        self._open_waiters: list[Deferred[EdgeNode]] = []
        self._close_waiters: list[Deferred[CloseInfo | None]] = []
        self._stop_waiters: list[Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<EdgeNode {self.node_id} {'connected' if self.connected else 'disconnected'}>"

    # -- public API --

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    @property
    def last_close_code(self) -> int | None:
        """The close code the hub sent last time (1013: node limit), or None."""
        return self.last_close.code if self.last_close else None

    @property
    def last_close_reason(self) -> str:
        return self.last_close.reason if self.last_close else ""

    def start(self) -> Deferred[EdgeNode]:
        """Start connecting (and reconnecting); the result is :meth:`when_connected`."""
        if not self._running:
            self._running = True
            if self._attempt is None and self._connecting is None:
                self._connect()
        return self.when_connected()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection (code 1000); fires once it is gone."""
        self._running = False
        if self._retry_call is not None:
            if self._retry_call.active():
                self._retry_call.cancel()
            self._retry_call = None
        if self._connecting is not None:
            self._connecting.cancel()
        attempt = self._attempt
        if attempt is None:
            return succeed(None)
        stopped: Deferred[None] = Deferred()
        self._stop_waiters.append(stopped)
        attempt.close_with(CLOSE_NORMAL, "")
        return stopped

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the current connection; the node reconnects if it is still running."""
        if self._attempt is not None:
            self._attempt.close_with(code, reason)

    def when_connected(self) -> Deferred[EdgeNode]:
        """Fires with this node now if connected, else at the next successful open."""
        if self.protocol is not None:
            return succeed(self)
        waiting: Deferred[EdgeNode] = Deferred()
        self._open_waiters.append(waiting)
        return waiting

    def when_disconnected(self) -> Deferred[CloseInfo | None]:
        """Fires with the :class:`CloseInfo` of the current connection, or connection attempt,
        once it ends; at once with :attr:`last_close` (None if there was none) when there is
        neither (stopped, or waiting to reconnect)."""
        if self._attempt is None and self._connecting is None:
            return succeed(self.last_close)
        waiting: Deferred[CloseInfo | None] = Deferred()
        self._close_waiters.append(waiting)
        return waiting

    def _ended(self, info: CloseInfo) -> None:
        self.last_close = info
        waiting, self._close_waiters = self._close_waiters, []
        for waiter in waiting:
            waiter.callback(info)

    def send(self, message: Message) -> None:
        """Write ``message`` to the hub; dropped (counted, debug log) when not connected."""
        protocol = self.protocol
        if protocol is None or protocol.state != _STATE_OPEN:
            self.stats.sends_dropped += 1
            log.debug(
                "node {node}: not connected, message {msg_id} dropped",
                node=self.node_id,
                msg_id=message.msg_id,
            )
            return
        protocol.send_payload(encode(message))
        self.stats.messages_sent += 1

    # -- connecting --

    def _connect(self) -> None:
        self._retry_call = None
        endpoint = SSL4ClientEndpoint(
            self._reactor, self.hub_host, self.port, self._tls, timeout=self.connect_timeout
        )
        connecting = endpoint.connect(_ConnectFactory(self))
        self._connecting = connecting
        connecting.addCallbacks(self._transport_connected, self._connect_failed)

    def _transport_connected(self, protocol: _EdgeProtocol) -> None:
        self._connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError, ConnectingCancelledError) and not self._running:
            self._ended(CloseInfo(None, "stopped", False))
            return
        self.stats.connect_failures += 1
        reason = failure.getErrorMessage()
        log.debug(
            "node {node}: cannot connect to {host}:{port}: {reason}",
            node=self.node_id,
            host=self.hub_host,
            port=self.port,
            reason=reason,
        )
        self._ended(CloseInfo(None, reason, False))
        self._retry(was_open=False)

    def _retry(self, was_open: bool) -> None:
        if not (self._running and self.reconnect):
            self._running = False
            return
        if was_open and self.last_close_code != CLOSE_TRY_AGAIN_LATER:
            self._failures = 0
        delay = self.next_delay()
        self.last_retry_delay = delay
        self._retry_call = self._reactor.callLater(delay, self._connect)

    def next_delay(self) -> float:
        """The next reconnect delay: ``initial_backoff`` doubling per failure up to
        ``max_backoff``, spread by ±``jitter``."""
        base = min(self.max_backoff, self.initial_backoff * 2.0 ** min(self._failures, 64))
        self._failures += 1
        return base * (1.0 + self.jitter * (2.0 * self._random() - 1.0))

    # -- events from the protocol --

    def _opened(self, protocol: _EdgeProtocol) -> None:
        self.protocol = protocol
        self.stats.connects += 1
        log.debug(
            "node {node} connected to {host}:{port}",
            node=self.node_id,
            host=self.hub_host,
            port=self.port,
        )
        loop = LoopingCall(self._keepalive)
        loop.clock = self._reactor
        self._heartbeat_loop = loop
        loop.start(self.heartbeat, now=True).addErrback(
            lambda failure: log.failure("node {node}: heartbeat failed", failure, node=self.node_id)
        )
        waiting, self._open_waiters = self._open_waiters, []
        for waiter in waiting:
            waiter.callback(self)

    def _keepalive(self) -> None:
        if self.protocol is not None:
            self.send(new_keepalive())
            self.stats.keepalives_sent += 1

    def _received(self, protocol: _EdgeProtocol, payload: bytes) -> None:
        if protocol is not self.protocol:
            return
        try:
            message = decode(payload)
        except DecodeError as error:
            self.stats.decode_errors += 1
            log.warn(
                "node {node}: closing, message does not decode: {error}",
                node=self.node_id,
                error=error,
            )
            protocol.close_with(CLOSE_INVALID_PAYLOAD, str(error))
            return
        self.stats.messages_received += 1
        if message.operation in CONTROL_OPERATIONS:
            # §2.3: viaduct answers these itself, before anything else sees them.
            self.send(new_control_ack(message))
            self.stats.control_acks_sent += 1
            return
        if not message.parent_msg_id and message.group == GROUP_RESOURCE:
            reply = self.store.apply(message)
            if reply is not None:
                self.send(reply)
                if reply.operation == OP_RESPONSE:
                    self.stats.acks_sent += 1
                else:
                    self.stats.errors_sent += 1
        if self.on_message is not None:
            try:
                self.on_message(self, message)
            except Exception:
                log.failure(
                    "node {node}: on_message failed for {msg_id}",
                    node=self.node_id,
                    msg_id=message.msg_id,
                )

    def _closed(self, protocol: _EdgeProtocol, info: CloseInfo) -> None:
        if protocol is self._attempt:
            self._attempt = None
        was_open = protocol is self.protocol
        if was_open:
            self.protocol = None
            self.stats.disconnects += 1
            loop, self._heartbeat_loop = self._heartbeat_loop, None
            if loop is not None and loop.running:
                loop.stop()
            log.debug(
                "node {node} disconnected: {code} {reason}",
                node=self.node_id,
                code=info.code,
                reason=info.reason,
            )
        else:
            info = CloseInfo(info.code, info.reason, False)
            self.stats.connect_failures += 1
            log.debug(
                "node {node}: connection failed: {reason}", node=self.node_id, reason=info.reason
            )
        self._ended(info)
        if not self._running:
            stopping, self._stop_waiters = self._stop_waiters, []
            for waiter in stopping:
                waiter.callback(None)
            return
        self._retry(was_open)
