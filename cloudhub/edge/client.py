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
import socket
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from cloudhub.certs.tls import client_tls_options
from cloudhub.edge.bootstrap import EdgeCredentials
from cloudhub.edge.metamanager import MetaStore
from cloudhub.edge.node import (
    CONNECT_TIMEOUT,
    DEFAULT_PROJECT_ID,
    CloseInfo,
    EdgeNodeBase,
    EdgeStats,
)
from cloudhub.errors import DecodeError
from cloudhub.interfaces import CLOSE_INVALID_PAYLOAD
from cloudhub.model import Message
from cloudhub.transport.websocket import (
    CLOSE_HANDSHAKE_TIMEOUT,
    OPEN_HANDSHAKE_TIMEOUT,
    LeanProtocolMixin,
    ReactorTimer,
    close_reason_bytes,
    masked_text_frame,
    with_factory_options,
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

# After answering the hub's close frame, how long to wait for the hub to drop TCP.
SERVER_DROP_TIMEOUT = 2.0

_STATE_OPEN = WebSocketProtocol.STATE_OPEN
_STATE_CLOSED = WebSocketProtocol.STATE_CLOSED


class MaskPool:
    """Frame masks from ``os.urandom`` (RFC 6455 §5.3 wants a strong source), 1,024 per call
    instead of a system call per frame (~4 µs in a VM, for every ACK an edge writes).

    Reactor thread only; emptied in a forked child so parent and child never share masks.
    """

    __slots__ = ("_pool", "_offset")

    SIZE = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._offset = 0

    def take(self) -> bytes:
        offset = self._offset
        if offset >= len(self._pool):
            self._pool = os.urandom(self.SIZE)
            offset = 0
        self._offset = offset + 4
        return self._pool[offset : offset + 4]

    def reset(self) -> None:
        self._pool = b""
        self._offset = 0


_masks = MaskPool()
os.register_at_fork(after_in_child=_masks.reset)


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
    factory.protocol = with_factory_options(_EdgeProtocol, factory)
    return factory


def set_user_timeout(transport: Any, seconds: float) -> bool:
    """``TCP_USER_TIMEOUT`` on the socket under ``transport`` (TLS wrappers included), where the
    platform has it (Linux): data unacknowledged that long ends the connection."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    for _ in range(4):  # TLS transport → TCP transport → socket
        if transport is None or option is None:
            return False
        handle = getattr(transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            try:
                handle.setsockopt(socket.IPPROTO_TCP, option, max(1, int(seconds * 1000)))
            except OSError:
                return False
            return True
        transport = getattr(transport, "transport", None)
    return False


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
        frame = masked_text_frame(payload, _masks.take())
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
        ws_factory = node._ws_factory
        made: type[Any] = ws_factory.protocol
        protocol: _EdgeProtocol = made() if issubclass(made, _EdgeProtocol) else _EdgeProtocol()
        protocol.factory = ws_factory
        protocol.node = node
        node._attempt = protocol
        return protocol


class EdgeNode(EdgeNodeBase[_EdgeProtocol]):
    """One simulated edgecore: connect, heartbeat, ACK, reconnect (module docstring).

    ``on_message(node, message)`` sees every cloud message except control operations, after
    the node stored and acknowledged it where §7.5 says so. ``random`` returns floats in
    [0, 1) for the backoff jitter. ``tls_options`` and ``ws_factory`` replace what would be
    built from ``credentials`` and :func:`edge_client_factory`, so many nodes can share them.
    """

    __slots__ = ("_tls", "_ws_factory", "_connecting")

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
        self._tls = tls_options
        self._ws_factory = ws_factory if ws_factory is not None else edge_client_factory(reactor)
        # The TCP+TLS connect under way (before the endpoint builds the protocol).
        self._connecting: Deferred[Any] | None = None

    @property
    def protocol(self) -> _EdgeProtocol | None:
        """The open connection (WebSocket handshake done, not closing), else None."""
        return self._link

    @protocol.setter
    def protocol(self, protocol: _EdgeProtocol | None) -> None:
        self._link = protocol

    # -- transport hooks --

    def _connecting_now(self) -> bool:
        return self._attempt is not None or self._connecting is not None

    def _cancel_connecting(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()

    def _close_attempt(self, attempt: _EdgeProtocol, code: int, reason: str) -> None:
        attempt.close_with(code, reason)

    def _can_write(self, link: _EdgeProtocol) -> bool:
        return bool(link.state == _STATE_OPEN)

    def _write(self, link: _EdgeProtocol, message: Message) -> None:
        link.send_payload(encode(message))

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
        # A partition that heals leaves this end of the connection half-open: the hub writes
        # nothing between messages, so only our unacknowledged keepalives can tell, and TCP's
        # retransmission backoff takes a minute or more to give up (make chaos: ~54 s). Give
        # up after two heartbeats without an acknowledgement instead.
        set_user_timeout(protocol.transport, 2 * self.heartbeat)

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

    # -- events from the protocol --

    def _received(self, protocol: _EdgeProtocol, payload: bytes) -> None:
        if protocol is not self._link:
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
        self._handle(message)
