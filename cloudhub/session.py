"""NodeSession: one connected node — its keepalive watchdog and its send loops (§6.1, §6.4).

* Keepalive: one timer per node, pushed back by every ``operation: keepalive`` message; when it
  fires the node has been silent for ``keepaliveInterval`` seconds and the session ends.
* ACK mode: stop-and-wait, one message in flight, as KubeEdge. No ACK within
  ``retransmit_interval`` (5 s) → the same message again (same ``msg_id``), at most
  ``max_transmissions`` (5) in all; then the object backs off (5 ms doubling to 1000 s) and the
  next object goes.
* No-ACK: sent at once, in order.

All timers run on the injected reactor, so tests drive them with ``task.Clock``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from cloudhub.interfaces import IConnection
from cloudhub.model import Message
from cloudhub.queue import NodeQueue, PendingEntry
from cloudhub.stats import HubStats

log = Logger()

RETRANSMIT_INTERVAL = 5.0  # seconds between transmissions of an unacknowledged message
MAX_TRANSMISSIONS = 5  # 1 send + 4 resends, then backoff (§6.4)
BACKOFF_BASE = 0.005  # client-go's per-item exponential failure rate limiter
BACKOFF_MAX = 1000.0
# A retransmission timer this close to its message's due time counts as due (float rounding).
_DUE_SLACK = 0.001


def backoff_delay(failures: int) -> float:
    """Seconds an object waits after its ``failures``-th unanswered round (5 ms doubling)."""
    return min(BACKOFF_BASE * 2 ** max(failures - 1, 0), BACKOFF_MAX)


class NodeSession:
    """The life of one connection of one node; the node's :class:`NodeQueue` outlives it."""

    # Slots: one of these per connected node, 10,000 of them on a busy hub.
    __slots__ = (
        "connection",
        "node_id",
        "queue",
        "reactor",
        "keepalive_interval",
        "retransmit_interval",
        "max_transmissions",
        "_on_expired",
        "connected_at",
        "last_keepalive",
        "in_flight",
        "_in_flight_msg_id",
        "_watchdog",
        "_retransmit",
        "_retransmit_due",
        "_wakeup",
        "active",
        "stats",
        "_first_sent_at",
    )

    def __init__(
        self,
        connection: IConnection,
        queue: NodeQueue,
        reactor: Any,
        keepalive_interval: float,
        on_expired: Callable[[NodeSession], None],
        retransmit_interval: float = RETRANSMIT_INTERVAL,
        max_transmissions: int = MAX_TRANSMISSIONS,
        stats: HubStats | None = None,
    ) -> None:
        self.connection = connection
        self.node_id: str = connection.node_id
        self.queue = queue
        self.reactor = reactor
        self.keepalive_interval = keepalive_interval
        self.retransmit_interval = retransmit_interval
        self.max_transmissions = max_transmissions
        self._on_expired = on_expired
        self.connected_at: float = reactor.seconds()
        self.last_keepalive: float | None = None
        self.in_flight: PendingEntry | None = None
        self._in_flight_msg_id = ""
        self._watchdog: IDelayedCall | None = None
        # One retransmission timer per session, not per message: it is left running when an
        # ACK comes and, when it fires early for a later message, moved to that one's due time.
        self._retransmit: IDelayedCall | None = None
        self._retransmit_due = 0.0
        self._wakeup: IDelayedCall | None = None
        self.active = False
        self.stats = stats if stats is not None else HubStats()
        self._first_sent_at = 0.0

    # --- life --------------------------------------------------------------------------------

    def start(self) -> None:
        self.active = True
        self._watchdog = self.reactor.callLater(self.keepalive_interval, self._expire)
        # A new connection is a new chance: objects backing off are tried again at once.
        self.queue.release_delayed()
        self.queue.on_ready = self.pump
        self.pump()

    def stop(self) -> None:
        """End the session: cancel its timers; what is unacknowledged stays in the queue."""
        if not self.active:
            return
        self.active = False
        if self.queue.on_ready == self.pump:
            self.queue.on_ready = None
        for call in (self._watchdog, self._retransmit, self._wakeup):
            if call is not None and call.active():
                call.cancel()
        self._watchdog = self._retransmit = self._wakeup = None
        if self.in_flight is not None:
            self.queue.requeue(self.in_flight, front=True)
            self.in_flight = None

    def keepalive(self) -> None:
        self.last_keepalive = self.reactor.seconds()
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(self.keepalive_interval)

    def _expire(self) -> None:
        self._watchdog = None
        log.info(
            "node {node} sent no keepalive for {interval}s; disconnecting",
            node=self.node_id,
            interval=self.keepalive_interval,
        )
        self._on_expired(self)

    # --- sending -----------------------------------------------------------------------------

    def pump(self) -> None:
        """Send what may be sent now: every queued no-ACK message, then the next ACK one."""
        if not self.active:
            return
        queue = self.queue
        if queue.no_ack:
            send = self.connection.send_message
            for message, waiter in queue.take_no_ack():
                send(message)
                self.stats.sent += 1
                if waiter is not None:
                    waiter.callback(message)
        if self.in_flight is None:
            entry = queue.next_ready()
            if entry is not None:
                self._transmit(entry)

    def _transmit(self, entry: PendingEntry) -> None:
        self.in_flight = entry
        self._in_flight_msg_id = entry.message.msg_id
        entry.transmissions += 1
        stats = self.stats
        now = self.reactor.seconds()
        if entry.transmissions > 1:
            stats.retransmitted += 1
        else:
            self._first_sent_at = now
        stats.sent += 1
        self.connection.send_message(entry.message, entry.encoded)
        due = self._retransmit_due = now + self.retransmit_interval
        timer = self._retransmit
        if timer is None:
            self._retransmit = self.reactor.callLater(
                self.retransmit_interval, self._retransmit_timer
            )
        elif timer.getTime() > due + _DUE_SLACK:
            # Only after the clock stepped back: the timer would fire that much too late.
            timer.reset(self.retransmit_interval)

    def acknowledged(self, parent_msg_id: str) -> PendingEntry | None:
        """The edge acknowledged ``parent_msg_id``; returns the entry it completed, if any."""
        entry = self.queue.acknowledge(parent_msg_id)
        if entry is not None:
            self.stats.acknowledged += 1
        if self.in_flight is not None and parent_msg_id == self._in_flight_msg_id:
            if self.stats.ack_latency_observers:
                self.stats.observe_ack_latency(self.reactor.seconds() - self._first_sent_at)
            self._finish_in_flight()
            self.pump()
        return entry

    def _finish_in_flight(self) -> None:
        # The retransmission timer stays: the next transmission moves its due time.
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.transmissions = 0
            self.queue.forget_superseded(self._in_flight_msg_id)
            current = self.queue.pending.get(in_flight.uid)
            if current is not None and current is not in_flight:
                # A newer version arrived while this one was in flight: it goes next in turn.
                self.queue.requeue(current)

    def _retransmit_timer(self) -> None:
        self._retransmit = None
        if self.in_flight is None or not self.active:
            return
        remaining = self._retransmit_due - self.reactor.seconds()
        if remaining > _DUE_SLACK:
            # Armed for an earlier message, since acknowledged: wait for this one's turn.
            self._retransmit = self.reactor.callLater(remaining, self._retransmit_timer)
            return
        self._no_ack_in_time()

    def _no_ack_in_time(self) -> None:
        entry = self.in_flight
        if entry is None or not self.active:
            return
        if self.queue.pending.get(entry.uid) is not entry:
            # Superseded or acknowledged meanwhile: move on to what is owed now.
            self._finish_in_flight()
            self.pump()
            return
        if entry.transmissions < self.max_transmissions:
            self._transmit(entry)
            return
        entry.failures += 1
        delay = backoff_delay(entry.failures)
        if self.queue.store is not None:
            self.queue.store.note_attempt(
                self.node_id,
                entry.uid,
                entry.failures * self.max_transmissions,
                f"no ACK after {entry.transmissions} transmissions",
            )
        log.info(
            "node {node} did not acknowledge {msg_id} after {count} transmissions; "
            "retrying in {delay:.3f}s",
            node=self.node_id,
            msg_id=entry.message.msg_id,
            count=entry.transmissions,
            delay=delay,
        )
        self._finish_in_flight()
        self.queue.delay(entry, self.reactor.seconds() + delay)
        self._schedule_wakeup()
        self.pump()

    def _schedule_wakeup(self) -> None:
        earliest = self.queue.release_delayed(self.reactor.seconds())
        if earliest is None:
            return
        delay = max(earliest - self.reactor.seconds(), 0.0)
        if self._wakeup is not None and self._wakeup.active():
            if self._wakeup.getTime() <= earliest:
                return
            self._wakeup.cancel()
        self._wakeup = self.reactor.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._wakeup = None
        if not self.active:
            return
        self._schedule_wakeup()
        self.pump()

    def send_now(self, message: Message) -> None:
        """Write a message outside the queues (control-message answers, replies)."""
        self.connection.send_message(message)
