"""MessageHandle: the core every transport reports to (design.md; KubeEdge's handler + dispatcher).

It owns the node sessions and the per-node queues, enforces the node limit, answers viaduct
control messages, feeds keepalives to the watchdogs, matches ACKs, and hands everything else an
edge sends to the subscribers (§6.7). It knows nothing of WebSocket or QUIC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cloudhub import model
from cloudhub.budget import Budget, OverLimit
from cloudhub.errors import (
    DeliveryStopped,
    HubNotRunning,
    InvalidMessage,
    MessageRefused,
    NodeRefused,
    StaleMessage,
)
from cloudhub.interfaces import CLOSE_GOING_AWAY, CLOSE_POLICY, IConnection, IConnectionHandler
from cloudhub.model import Message
from cloudhub.nodeid import validate_node_id
from cloudhub.queue import NodeQueue
from cloudhub.session import RETRANSMIT_INTERVAL, NodeSession
from cloudhub.stats import HubStats
from cloudhub.store.interfaces import ISyncStore, RolledBack, SyncRecord

log = Logger()

EVENT_CONNECTED = "connected"
EVENT_DISCONNECTED = "disconnected"


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """A node connected or disconnected (KubeEdge publishes the same, §4.3, §4.4)."""

    node_id: str
    event: str  # EVENT_CONNECTED / EVENT_DISCONNECTED
    timestamp: float
    transport: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    project_id: str
    transport: str
    peer: str
    connected_at: float
    last_keepalive: float | None
    pending: int


MessageCallback = Callable[[str, Message], Any]
EventCallback = Callable[[NodeEvent], Any]


@implementer(IConnectionHandler)
class MessageHandle:
    """Sessions, queues and routing for every node of one hub process.

    A handle built with a ``store`` serves at once from what ``store.load()`` returns (tools,
    tests). :class:`~cloudhub.service.CloudHubService` builds it with ``running=False`` and
    calls :meth:`attach` once its store is open, :meth:`detach` when it stops: subscribers
    stay across restarts, queues are rebuilt from the store at each start.

    ``budget`` bounds what may be owed per node, in all, and to how many node ids that have
    not connected (:mod:`cloudhub.budget`; the defaults when not given). Its counts are
    rebuilt from the store's records at each :meth:`attach`.
    """

    def __init__(
        self,
        reactor: Any,
        keepalive_interval: float = 30.0,
        node_limit: int = 500,
        retransmit_interval: float = RETRANSMIT_INTERVAL,
        store: ISyncStore | None = None,
        *,
        running: bool = True,
        budget: Budget | None = None,
    ) -> None:
        self.reactor = reactor
        self.keepalive_interval = keepalive_interval
        self.node_limit = node_limit
        self.retransmit_interval = retransmit_interval
        self.sessions: dict[str, NodeSession] = {}
        self.queues: dict[str, NodeQueue] = {}
        self.budget = budget if budget is not None else Budget()
        # Node ids owed something that have not connected since the start and were not
        # restored from the store: at most budget.unknown_nodes of them.
        self.unknown_nodes: set[str] = set()
        self._subscribers: list[tuple[MessageCallback, str | None]] = []
        self._event_subscribers: list[EventCallback] = []
        self.stats = HubStats()
        self.store: ISyncStore | None = None
        # False before the hub's start and after its stop: nothing is accepted then, so a
        # message is never taken without the store that makes it durable.
        self.running = running
        # False from the moment the hub starts stopping: no new node session (a handshake
        # that completes during the stop would otherwise outlive it).
        self.serving_nodes = running
        # The store's last commit while it is let go (detach): flush() waits for it.
        self._released: Deferred[None] | None = None
        self._release_observers: list[Deferred[None]] = []
        self._release_failure: Failure | None = None
        if store is not None:
            self.attach(store, store.load())

    def attach(self, store: ISyncStore, records: Iterable[SyncRecord]) -> int:
        """Serve from ``store``, whose ``records`` (in ``seq`` order) become the node queues.

        Starts accepting messages; returns how many undelivered messages were restored.
        """
        self.store = store
        if hasattr(store, "on_rollback"):
            store.on_rollback = self._rolled_back
        self.queues = {}
        self.budget.reset()
        self.unknown_nodes = set()  # nodes restored from the store are known
        restored = 0
        for record in records:
            self._queue(record.node_id).restore(record)
            restored += record.pending is not None
        if restored:
            log.info("{count} undelivered messages restored from the sync store", count=restored)
        self.running = True
        self.serving_nodes = True
        self._released = None
        self._release_failure = None
        return restored

    def stop_accepting(self) -> None:
        """Refuse new messages from now on (:class:`HubNotRunning`); the hub is stopping."""
        self.running = False

    def detach(self, released: Deferred[None] | None = None) -> None:
        """Let go of the store and the queues (the hub stopped; sessions are closed first).

        Whoever still waits on a :meth:`send` gets :class:`DeliveryStopped`: what the store
        holds stays owed and is delivered after the next start. ``released`` fires when the
        store's last commit is done: until then :meth:`flush` waits for it, so nothing is
        reported durable before it is.
        """
        self.running = False
        self.stop_serving()
        if released is not None:
            self._released = released
            released.addBoth(self._store_released)
        queues, self.queues = self.queues, {}
        for queue in queues.values():
            queue.stop_waiting(_stopped_error(queue.node_id))
        self.budget.reset()
        self.unknown_nodes = set()
        if getattr(self.store, "on_rollback", None) == self._rolled_back:
            self.store.on_rollback = None  # type: ignore[union-attr]
        self.store = None

    def _rolled_back(self, rolled_back: list[RolledBack]) -> None:
        """A commit failed: its messages were answered "not accepted"; the queues forget them
        and owe again what they had replaced (see :meth:`NodeQueue.roll_back`)."""
        forgotten = 0
        for item in rolled_back:
            queue = self.queues.get(item.node_id)
            if queue is not None and queue.roll_back(item):
                forgotten += 1
        if forgotten:
            log.debug("{count} messages of a failed commit forgotten", count=forgotten)

    @property
    def store_failing(self) -> str | None:
        """Why the sync store's commits fail, while they do (None: they succeed, or no store).

        Readiness follows it: ``ready=lambda: self.is_ready and handle.store_failing is None``.
        """
        return getattr(self.store, "failing", None) if self.store is not None else None

    # --- IConnectionHandler -----------------------------------------------------------------

    def connection_made(self, connection: IConnection) -> None:
        node_id = connection.node_id
        if not self.serving_nodes:
            raise NodeRefused(node_id, "hub shutting down")
        old = self.sessions.get(node_id)
        if old is None and len(self.sessions) >= self.node_limit:
            self.stats.node_limit_refusals += 1
            log.warn(
                "node {node} from {peer} refused: node limit {limit} reached",
                node=node_id,
                peer=connection.peer,
                limit=self.node_limit,
            )
            raise NodeRefused(node_id, f"node limit {self.node_limit} reached")
        if old is not None:
            log.info(
                "node {node} connected again from {peer}; closing its older connection",
                node=node_id,
                peer=connection.peer,
            )
            self._end(old, "replaced by a newer connection")
            old.connection.close(CLOSE_POLICY, "replaced by a newer connection of this node")
        self.unknown_nodes.discard(node_id)  # known from now on
        session = NodeSession(
            connection,
            self._queue(node_id),
            self.reactor,
            self.keepalive_interval,
            self._expired,
            retransmit_interval=self.retransmit_interval,
            stats=self.stats,
        )
        self.sessions[node_id] = session
        log.info(
            "node {node} connected over {transport} from {peer} (project {project})",
            node=node_id,
            transport=connection.transport,
            peer=connection.peer,
            project=connection.project_id,
        )
        self._publish_event(
            NodeEvent(node_id, EVENT_CONNECTED, self.reactor.seconds(), connection.transport)
        )
        session.start()

    def message_received(self, connection: IConnection, message: Message) -> None:
        session = self.sessions.get(connection.node_id)
        if session is None or session.connection is not connection:
            return  # a connection already replaced or expired; it is being closed
        self.stats.received += 1
        operation = message.operation
        if operation == model.OP_KEEPALIVE:
            session.keepalive()
        elif operation == model.OP_RESPONSE:
            # Only ever an ACK (§6.7 step 3); content is not inspected.
            if message.parent_msg_id:
                session.acknowledged(message.parent_msg_id)
        elif operation in model.CONTROL_OPERATIONS:
            session.send_now(model.new_control_ack(message))
        elif message.is_empty:
            pass  # what edgecore writes as it shuts down (ws-frames.txt, frame #7)
        elif operation == model.OP_ERROR:
            log.warn(
                "node {node} reports an error for {parent}: {content}",
                node=connection.node_id,
                parent=message.parent_msg_id,
                content=message.content,
            )
        else:
            self._publish(connection.node_id, message)

    def connection_lost(self, connection: IConnection, reason: str) -> None:
        session = self.sessions.get(connection.node_id)
        if session is not None and session.connection is connection:
            self._end(session, reason)

    # --- sessions ----------------------------------------------------------------------------

    def _queue(self, node_id: str) -> NodeQueue:
        queue = self.queues.get(node_id)
        if queue is None:
            queue = self.queues[node_id] = NodeQueue(node_id, self.store, self.stats, self.budget)
        return queue

    def _new_node(self, node_id: str) -> NodeQueue:
        """The queue of a node id that has none yet, for a message sent to it: a valid id,
        and within the budget of node ids that have not connected (raises otherwise)."""
        _check_node_id(node_id)
        self.budget.check_unknown(node_id, len(self.unknown_nodes))
        return self._queue(node_id)

    def _offered(self, queue: NodeQueue, new: bool) -> None:
        """After an offer to ``queue`` (``new``: made for it): a new queue that owes nothing
        (the message was refused) is let go, else its node counts as not connected."""
        if new:
            if queue.is_idle():
                del self.queues[queue.node_id]
            else:
                self.unknown_nodes.add(queue.node_id)

    def _expired(self, session: NodeSession) -> None:
        self.stats.keepalive_timeouts += 1
        self._end(session, "keepalive timeout")
        session.connection.close(
            CLOSE_POLICY, f"no keepalive for {self.keepalive_interval:g} seconds"
        )

    def _end(self, session: NodeSession, reason: str) -> None:
        session.stop()
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
        log.info("node {node} disconnected: {reason}", node=session.node_id, reason=reason)
        self._publish_event(
            NodeEvent(
                session.node_id,
                EVENT_DISCONNECTED,
                self.reactor.seconds(),
                session.connection.transport,
                reason,
            )
        )

    def stop_serving(self) -> None:
        """The hub is stopping: close every node's connection (1001) and take no new one."""
        self.serving_nodes = False
        self.close_all(CLOSE_GOING_AWAY, "hub shutting down")

    def close_all(self, code: int, reason: str) -> None:
        """Close every node's connection; queues are kept."""
        for session in list(self.sessions.values()):
            self._end(session, reason)
            session.connection.close(code, reason)

    # --- sending -----------------------------------------------------------------------------

    def send(self, node_id: str, message: Message) -> Deferred[Message]:
        """Queue ``message`` for ``node_id`` (connected or not); see :meth:`NodeQueue.offer`."""
        if not self.running:
            raise HubNotRunning("the hub is not running: nothing was accepted")
        queue = self.queues.get(node_id)
        new = queue is None
        if queue is None:
            try:
                queue = self._new_node(node_id)
            except OverLimit as refused:  # counted by the budget (refusals, per limit)
                return fail(refused)
        try:
            result = queue.offer(_to_wire(node_id, message))
        finally:
            self._offered(queue, new)
        assert result is not None
        if result.called:
            result.addErrback(self._count_refusal)
        return result

    def send_many(self, entries: Iterable[tuple[str, Message]]) -> list[MessageRefused | None]:
        """Queue many messages without a Deferred each: one result per entry, in order.

        ``None`` means accepted; a :class:`MessageRefused` (stale, invalid, over a limit:
        :class:`~cloudhub.budget.OverLimit`) says why not. What
        was accepted is durable once :meth:`flush` fires.
        """
        if not self.running:
            raise HubNotRunning("the hub is not running: nothing was accepted")
        results: list[MessageRefused | None] = []
        stats = self.stats
        queues = self.queues
        for node_id, message in entries:
            queue = queues.get(node_id)
            new = queue is None
            try:
                if queue is None:
                    queue = self._new_node(node_id)
                try:
                    queue.offer(_to_wire(node_id, message), want_result=False)
                finally:
                    if new:
                        self._offered(queue, new)
            except StaleMessage as refused:
                stats.refused_stale += 1
                results.append(refused)
            except InvalidMessage as refused:
                stats.refused_invalid += 1
                results.append(refused)
            except OverLimit as refused:  # counted by the budget (refusals, per limit)
                results.append(refused)
            else:
                results.append(None)
        return results

    def _count_refusal(self, failure: Failure) -> Failure:
        if failure.check(StaleMessage):
            self.stats.refused_stale += 1
        elif failure.check(InvalidMessage):
            self.stats.refused_invalid += 1
        return failure

    def flush(self) -> Deferred[None]:
        """Fires once every message accepted before the call is durable in the sync store."""
        if self.store is not None:
            return self.store.flush()
        if self._released is not None:
            waiter: Deferred[None] = Deferred()
            self._release_observers.append(waiter)
            return waiter
        if self._release_failure is not None:
            return fail(self._release_failure)  # what was accepted may not be durable
        return succeed(None)

    def _store_released(self, result: object) -> object:
        self._released = None
        self._release_failure = result if isinstance(result, Failure) else None
        observers, self._release_observers = self._release_observers, []
        for waiter in observers:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)
        return result

    # --- subscribers -------------------------------------------------------------------------

    def subscribe(self, callback: MessageCallback, group: str | None = None) -> Callable[[], None]:
        entry = (callback, group)
        self._subscribers.append(entry)
        return lambda: self._subscribers.remove(entry) if entry in self._subscribers else None

    def subscribe_events(self, callback: EventCallback) -> Callable[[], None]:
        self._event_subscribers.append(callback)
        return lambda: (
            self._event_subscribers.remove(callback)
            if callback in self._event_subscribers
            else None
        )

    def _publish(self, node_id: str, message: Message) -> None:
        for callback, group in list(self._subscribers):
            if group is None or group == message.group:
                try:
                    callback(node_id, message)
                except Exception:
                    log.failure("subscriber {callback!r} failed", callback=callback)

    def _publish_event(self, event: NodeEvent) -> None:
        for callback in list(self._event_subscribers):
            try:
                callback(event)
            except Exception:
                log.failure("node event subscriber {callback!r} failed", callback=callback)

    def nodes(self) -> list[NodeInfo]:
        return [
            NodeInfo(
                node_id=s.node_id,
                project_id=s.connection.project_id,
                transport=s.connection.transport,
                peer=s.connection.peer,
                connected_at=s.connected_at,
                last_keepalive=s.last_keepalive,
                pending=s.queue.depth,
            )
            for s in self.sessions.values()
        ]


def _check_node_id(node_id: str) -> None:
    """A message for a node that could never connect (transports refuse such ids) is refused
    here rather than kept forever (issue 18, finding 9)."""
    problem = validate_node_id(node_id)
    if problem is not None:
        shown = node_id if len(node_id) <= 64 else node_id[:64] + "..."
        raise InvalidMessage(shown, problem)


def _stopped_error(node_id: str) -> Callable[[str], Exception]:
    def error(msg_id: str) -> Exception:
        return DeliveryStopped(
            f"the hub stopped before message {msg_id} for node {node_id!r} was delivered"
        )

    return error


def _to_wire(node_id: str, message: Message) -> Message:
    """The message with its resource in wire form; ``node/<id>/`` prefixes must name ``node_id``."""
    resource = message.resource
    if resource.startswith("node/"):
        target = model.target_node(resource)
        if target != node_id:
            raise InvalidMessage(node_id, f"resource {resource!r} names node {target!r}")
        message = message.copy(resource=model.trim_resource(resource))
    if not message.msg_id:
        message = message.copy(
            msg_id=model.new_msg_id(), timestamp=message.timestamp or model.now_ms()
        )
    if message.sync:
        message = message.copy(sync=False)  # every transport write clears it (§2.4)
    return message
