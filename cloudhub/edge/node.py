"""What every edge node does whatever its transport: :class:`EdgeNodeBase`.

:class:`~cloudhub.edge.client.EdgeNode` (WebSocket) and
:class:`~cloudhub.edge.quic.QuicEdgeNode` (QUIC) share the node's state, the handling of cloud
messages (control-op ACKs, :class:`MetaStore` and its replies, ``on_message``), the heartbeat,
reconnecting with exponential backoff and jitter, and the bookkeeping of opens and closes
(:class:`CloseInfo`, the ``when_*`` Deferreds, :class:`EdgeStats`). A subclass connects, writes
and closes; it reports to the base through ``_opened``, ``_handle`` and ``_closed``.
"""

from __future__ import annotations

import random as _random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cloudhub.edge.metamanager import MetaStore
from cloudhub.interfaces import CLOSE_NORMAL, CLOSE_TRY_AGAIN_LATER
from cloudhub.model import (
    CONTROL_OPERATIONS,
    GROUP_RESOURCE,
    OP_RESPONSE,
    Message,
    new_control_ack,
    new_keepalive,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_PROJECT_ID",
    "CloseInfo",
    "EdgeNodeBase",
    "EdgeStats",
]

log = Logger()

Reactor = Any

# edgecore's default edgeHub.projectID (§8.2, ws-handshake.txt).
DEFAULT_PROJECT_ID = "e632aba927ea4ac2b575ec1603d56f10"
CONNECT_TIMEOUT = 30.0


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


# One connection (attempt) of a subclass: its protocol or attempt object.
ConnT = TypeVar("ConnT")


class EdgeNodeBase(ABC, Generic[ConnT]):
    """The transport-free part of an edge node (module docstring).

    Subclasses implement the hooks ``_connect`` (start an attempt; set ``_attempt`` when there
    is one), ``_close_attempt``, ``_can_write`` and ``_write``, and report an open connection
    with :meth:`_opened`, a cloud message with :meth:`_handle` and the end of an attempt with
    :meth:`_closed`. ``_link`` is the open connection; subclasses publish it under their own
    name (``protocol``, ``connection``).
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
        "last_close",
        "last_retry_delay",
        "_link",
        "_random",
        "_attempt",
        "_retry_call",
        "_heartbeat_loop",
        "_failures",
        "_running",
        "_open_waiters",
        "_close_waiters",
        "_stop_waiters",
    )

    # What __repr__ and the debug log call this kind of node and its connections.
    _NAME: ClassVar[str] = "EdgeNode"
    _CONNECTED_LOG: ClassVar[str] = "node {node} connected to {host}:{port}"
    _FAILED_LOG: ClassVar[str] = "node {node}: connection failed: {reason}"

    def __init__(
        self,
        reactor: Reactor,
        node_id: str,
        hub_host: str,
        port: int,
        project_id: str,
        heartbeat: float,
        reconnect: bool,
        on_message: Callable[[Self, Message], None] | None,
        *,
        random: Callable[[], float] = _random.random,
        store: MetaStore | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        jitter: float = 0.2,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
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
        # The open connection, else None.
        self._link: ConnT | None = None
        self.last_close: CloseInfo | None = None
        self.last_retry_delay: float | None = None
        self._random = random
        # The current connection attempt until it ends.
        self._attempt: ConnT | None = None
        self._retry_call: IDelayedCall | None = None
        self._heartbeat_loop: LoopingCall | None = None
        self._failures = 0
        self._running = False
        self._open_waiters: list[Deferred[Self]] = []
        self._close_waiters: list[Deferred[CloseInfo | None]] = []
        self._stop_waiters: list[Deferred[None]] = []

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<{self._NAME} {self.node_id} {state}>"

    # -- hooks of the transport --

    @abstractmethod
    def _connect(self) -> None:
        """Start one connection attempt to the hub."""

    def _connecting_now(self) -> bool:
        """Whether a connection attempt is under way (or a connection up)."""
        return self._attempt is not None

    def _cancel_connecting(self) -> None:
        """Called by :meth:`stop` before it closes the current attempt."""

    @abstractmethod
    def _close_attempt(self, attempt: ConnT, code: int, reason: str) -> None:
        """Close a connection or an attempt that is under way."""

    @abstractmethod
    def _can_write(self, link: ConnT) -> bool:
        """Whether ``link`` is open for messages."""

    @abstractmethod
    def _write(self, link: ConnT, message: Message) -> None:
        """Encode ``message`` and write it on ``link``."""

    def _prepare(self, message: Message) -> Message:
        """A cloud message (not a control operation) before it is stored and handed on."""
        return message

    # -- public API --

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def last_close_code(self) -> int | None:
        """The close code the hub sent last time (1013: node limit), or None."""
        return self.last_close.code if self.last_close else None

    @property
    def last_close_reason(self) -> str:
        return self.last_close.reason if self.last_close else ""

    def start(self) -> Deferred[Self]:
        """Start connecting (and reconnecting); the result is :meth:`when_connected`."""
        if not self._running:
            self._running = True
            if not self._connecting_now():
                self._connect()
        return self.when_connected()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection (code 1000); fires once it is gone."""
        self._running = False
        if self._retry_call is not None:
            if self._retry_call.active():
                self._retry_call.cancel()
            self._retry_call = None
        self._cancel_connecting()
        attempt = self._attempt
        if attempt is None:
            return succeed(None)
        stopped: Deferred[None] = Deferred()
        self._stop_waiters.append(stopped)
        self._close_attempt(attempt, CLOSE_NORMAL, "")
        return stopped

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the current connection; the node reconnects if it is still running."""
        if self._attempt is not None:
            self._close_attempt(self._attempt, code, reason)

    def when_connected(self) -> Deferred[Self]:
        """Fires with this node now if connected, else at the next successful open."""
        if self._link is not None:
            return succeed(self)
        waiting: Deferred[Self] = Deferred()
        self._open_waiters.append(waiting)
        return waiting

    def when_disconnected(self) -> Deferred[CloseInfo | None]:
        """Fires with the :class:`CloseInfo` of the current connection, or connection attempt,
        once it ends; at once with :attr:`last_close` (None if there was none) when there is
        neither (stopped, or waiting to reconnect)."""
        if not self._connecting_now():
            return succeed(self.last_close)
        waiting: Deferred[CloseInfo | None] = Deferred()
        self._close_waiters.append(waiting)
        return waiting

    def send(self, message: Message) -> None:
        """Write ``message`` to the hub; dropped (counted, debug log) when not connected."""
        link = self._link
        if link is None or not self._can_write(link):
            self.stats.sends_dropped += 1
            log.debug(
                "node {node}: not connected, message {msg_id} dropped",
                node=self.node_id,
                msg_id=message.msg_id,
            )
            return
        self._write(link, message)
        self.stats.messages_sent += 1

    def next_delay(self) -> float:
        """The next reconnect delay: ``initial_backoff`` doubling per failure up to
        ``max_backoff``, spread by ±``jitter``."""
        base = min(self.max_backoff, self.initial_backoff * 2.0 ** min(self._failures, 64))
        self._failures += 1
        return base * (1.0 + self.jitter * (2.0 * self._random() - 1.0))

    # -- reconnecting --

    def _retry(self, was_open: bool) -> None:
        if not (self._running and self.reconnect):
            self._running = False
            return
        if was_open and self.last_close_code != CLOSE_TRY_AGAIN_LATER:
            self._failures = 0
        delay = self.next_delay()
        self.last_retry_delay = delay
        self._retry_call = self._reactor.callLater(delay, self._connect)

    def _ended(self, info: CloseInfo) -> None:
        self.last_close = info
        waiting, self._close_waiters = self._close_waiters, []
        for waiter in waiting:
            waiter.callback(info)

    # -- events from the transport --

    def _opened(self: Self, link: ConnT) -> None:
        self._link = link
        self.stats.connects += 1
        log.debug(self._CONNECTED_LOG, node=self.node_id, host=self.hub_host, port=self.port)
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
        if self._link is not None:
            self.send(new_keepalive())
            self.stats.keepalives_sent += 1

    def _handle(self: Self, message: Message) -> None:
        """A message from the hub on the open connection."""
        self.stats.messages_received += 1
        if message.operation in CONTROL_OPERATIONS:
            # §2.3: viaduct answers these itself, before anything else sees them.
            self.send(new_control_ack(message))
            self.stats.control_acks_sent += 1
            return
        message = self._prepare(message)
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

    def _closed(self, attempt: ConnT, info: CloseInfo, gone: Deferred[None] | None = None) -> None:
        """``attempt`` ended; ``stop()`` fires once ``gone`` does (at once when None)."""
        if attempt is self._attempt:
            self._attempt = None
        if attempt is self._link:
            self._link = None
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
            log.debug(self._FAILED_LOG, node=self.node_id, reason=info.reason)
        self._ended(info)
        if not self._running:
            stopping, self._stop_waiters = self._stop_waiters, []
            if gone is None:
                for waiter in stopping:
                    waiter.callback(None)
            elif stopping:
                # e.g. once the UDP socket is closed too (nothing left in the reactor).
                def stopped(_: object) -> None:
                    for waiter in stopping:
                        waiter.callback(None)

                gone.addBoth(stopped)
            return
        self._retry(info.was_open)
