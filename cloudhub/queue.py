"""What the hub owes one node: the per-node queue and store (protocol §6.3–§6.6).

Two classes of message (§6.3): *ACK mode* messages carry a k8s object and are kept, newest
version per object UID, until the edge acknowledges them; *no-ACK* messages are sent once, in
order. This module holds the data and the rules (classification, resourceVersion, supersede);
the timers and transmissions are :class:`cloudhub.session.NodeSession`'s.

Tombstones (beyond KubeEdge, which forgets an object once its delete is acknowledged): the
sync store remembers an acknowledged delete for its ``tombstone_retention``, and while it does,
a message for that object whose resourceVersion is not newer than the tombstone's is refused
as stale, so a late retry of an older version cannot bring the object back on the edge. A
newer version (a re-create) is accepted and ends the tombstone. A tombstone's version is the
newest the hub knew for the object when the delete was accepted: the delete's own
resourceVersion, the last acknowledged one, or that of the message the delete replaced (a
delete may come without a resourceVersion, §6.3 step 5). A queue without a store keeps none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail

from cloudhub import model, wire
from cloudhub.budget import Budget, OverLimit
from cloudhub.errors import (
    InvalidMessage,
    ResourceVersionError,
    StaleMessage,
    Superseded,
)
from cloudhub.model import Message
from cloudhub.stats import HubStats
from cloudhub.store.interfaces import ISyncStore, RolledBack, SyncRecord

_NO_ACK_RESOURCE_MARKERS = ("podlist", "membership", "twin/cloud_updated", "serviceaccounttoken")
_NO_ACK_EDGECONTROLLER_TYPES = frozenset({"node", "lease", "nodepatch", "podpatch", "podstatus"})

# Most no-ACK messages kept for an offline node; older ones are dropped first, as edgecore's
# own 100-entry FIFO does (§6.6): no-ACK messages are best effort by definition.
NO_ACK_BACKLOG = 1000


def is_ack_mode(message: Message) -> bool:
    """True when the edge is expected to acknowledge ``message`` (§6.3, step 3).

    ``message.resource`` is in wire form (``<ns>/<type>/<name>``).
    """
    resource = message.resource
    for marker in _NO_ACK_RESOURCE_MARKERS:
        if marker in resource:
            return False
    operation = message.operation
    if operation in model.CSI_OPERATIONS or operation == model.OP_APPLICATION_RESPONSE:
        return False
    if message.group == model.GROUP_USER or message.source == "nodeupgradejobcontroller":
        return False
    if operation == model.OP_RESPONSE and (
        message.content == "OK" or _is_go_error(message.content)
    ):
        return False
    if message.source == model.SOURCE_EDGECONTROLLER:
        kind = model.resource_type(resource)
        if kind in _NO_ACK_EDGECONTROLLER_TYPES or (
            kind == "pod" and operation == model.OP_RESPONSE
        ):
            return False
    return True


def _is_go_error(content: Any) -> bool:
    # A Go error marshals as {"ErrStatus": {...}} for a k8s StatusError (§1.2).
    return isinstance(content, dict) and "ErrStatus" in content and len(content) == 1


class PendingEntry:
    """The newest undelivered message for one object, and who waits for its ACK."""

    __slots__ = (
        "uid",
        "message",
        "version",
        "delete",
        "waiters",
        "transmissions",
        "failures",
        "encoded",
        "floor",
        "size",
    )

    def __init__(
        self,
        uid: str,
        message: Message,
        version: int | None,
        delete: bool,
        encoded: bytes | None = None,
        size: int = 0,
    ) -> None:
        self.uid = uid
        self.message = message
        # wire.encode(message) when it was made for the store; the transport reuses it.
        self.encoded = encoded
        self.version = version  # None for deletes without a resourceVersion
        self.delete = delete
        self.waiters: list[Deferred[Message]] = []
        self.transmissions = 0  # sends of this message in the current round (≤ 5)
        self.failures = 0  # rounds that ended without an ACK (drives the backoff)
        # For a delete: the version its tombstone will carry (see the module docstring).
        self.floor: int | None = version
        # Bytes it counts against the budget (its encoded size; see cloudhub.budget).
        self.size = size


class NodeQueue:
    """Everything owed to one node, whether or not it is connected.

    ``on_ready`` (set by the node's session while it is connected) is called when there is
    something new to send. ``budget`` (shared by the queues of one hub) bounds what may be
    owed (:mod:`cloudhub.budget`); a queue without one gets the default limits of its own.
    """

    def __init__(
        self,
        node_id: str,
        store: ISyncStore | None = None,
        stats: HubStats | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.stats = stats if stats is not None else HubStats()
        self.budget = budget if budget is not None else Budget()
        # Bytes owed: the sizes of the pending entries and of the no-ACK backlog's messages.
        self.owed_bytes = 0
        self.pending: dict[str, PendingEntry] = {}
        self.ready: dict[str, None] = {}  # uids to send, in order (a dict is an ordered set)
        self.delayed: dict[str, float] = {}  # uid -> time it may be sent again (backoff)
        self.by_msg_id: dict[str, str] = {}  # msg_id of a pending message -> uid
        self.acked: dict[str, int] = {}  # uid -> last acknowledged resourceVersion
        # A list, not a deque: an empty deque costs 600 bytes, times 10,000 idle nodes; the
        # front is dropped only when the backlog is full.
        self.no_ack: list[tuple[Message, Deferred[Message] | None]] = []
        # The encoded size of each no-ACK message in the backlog (0 while connected: taken
        # at once), counted against the budget's bytes.
        self.no_ack_sizes: list[int] = []
        self.on_ready: Callable[[], None] | None = None

    # --- accepting -------------------------------------------------------------------------

    def offer(self, message: Message, want_result: bool = True) -> Deferred[Message] | None:
        """Take ``message`` (resource in wire form) for delivery.

        Returns a Deferred that fires with the message once the edge acknowledges it (ACK
        mode) or once it is written (no-ACK mode); it fails with :class:`StaleMessage`,
        :class:`InvalidMessage`, :class:`~cloudhub.budget.OverLimit` (the node or the hub is
        owed as much as it may be) or later :class:`Superseded`. ``want_result=False`` skips
        the Deferred for callers that do not wait (returns None; refusals still raise).
        """
        if not is_ack_mode(message):
            try:
                self._admit_no_ack(message)
            except OverLimit as refused:
                if want_result:
                    return fail(refused)
                raise
            waiter: Deferred[Message] | None = Deferred() if want_result else None
            self.no_ack[-1] = (message, waiter)
            self._notify()
            return waiter
        try:
            entry = self._admit(message)
        except (InvalidMessage, StaleMessage, OverLimit) as refused:
            if want_result:
                return fail(refused)
            raise
        waiter = None
        if want_result:
            waiter = Deferred()
            entry.waiters.append(waiter)
        self._notify()
        return waiter

    def _admit_no_ack(self, message: Message) -> None:
        # Appended with no waiter yet (offer() sets it): a refusal leaves nothing behind.
        # Sized only while the node is offline: a session takes the backlog at once.
        size = len(wire.encode(message)) if self.on_ready is None else 0
        full = len(self.no_ack) >= NO_ACK_BACKLOG
        self.budget.check(self, False, size - (self.no_ack_sizes[0] if full else 0))
        if full:
            _, dropped = self.no_ack.pop(0)
            self._release_bytes(self.no_ack_sizes.pop(0))
            self.stats.dropped += 1
            if dropped is not None:
                dropped.errback(InvalidMessage(self.node_id, "no-ACK backlog full, dropped"))
        self.no_ack.append((message, None))
        self.no_ack_sizes.append(size)
        self.owed_bytes += size
        self.budget.bytes += size

    def _release_bytes(self, size: int) -> None:
        self.owed_bytes -= size
        self.budget.bytes -= size

    def _owe(self, entry: PendingEntry) -> None:
        """Count ``entry``, new in ``pending``, against the budget (O(1))."""
        self.owed_bytes += entry.size
        budget = self.budget
        budget.messages += 1
        budget.bytes += entry.size

    def _release(self, entry: PendingEntry) -> None:
        """``entry`` left ``pending`` (acknowledged, superseded, rolled back)."""
        self.owed_bytes -= entry.size
        budget = self.budget
        budget.messages -= 1
        budget.bytes -= entry.size

    def _admit(self, message: Message) -> PendingEntry:
        uid = model.object_uid(message.content)
        if not uid:
            raise InvalidMessage(
                self.node_id,
                f"{message.operation} {message.resource or '(no resource)'} is delivered with "
                "acknowledgement and needs content.metadata.uid",
            )
        delete = model.is_delete(message)
        version: int | None = None
        if message.resource_version:
            try:
                version = model.parse_resource_version(message.resource_version)
            except ResourceVersionError as e:
                raise InvalidMessage(self.node_id, str(e)) from None
        elif not delete:
            raise InvalidMessage(
                self.node_id,
                f"{message.operation} of object {uid} needs header.resourceversion",
            )
        current = self.pending.get(uid)
        acked = self.acked.get(uid)
        # The object's tombstone: only while nothing newer is known (a re-create ends it).
        deleted: int | None = None
        if current is None and acked is None and self.store is not None:
            deleted = self.store.deleted_version(self.node_id, uid)
        always = delete or message.operation == model.OP_RESPONSE
        if not always:
            assert version is not None
            pending_version = current.version if current is not None else None
            if current is not None and (current.delete or (pending_version or 0) >= version):
                raise self._stale(uid, message, acked, current)
            if current is None and acked is not None and acked >= version:
                raise self._stale(uid, message, acked, None)
        if deleted is not None and version is not None and version <= deleted:
            # Not newer than the acknowledged delete: a late retry (deletes too: the edge
            # already acknowledged this delete or a newer one).
            raise self._stale(uid, message, deleted, None)
        # Encoded once, here, for the store and for every transmission on the JSON lane; its
        # size is what the message counts against the budget.
        encoded = wire.encode(message)
        size = len(encoded)
        # A newer version replaces what is owed for the object: counted once (issue 18).
        self.budget.check(self, current is None, size - (current.size if current else 0))
        entry = PendingEntry(
            uid, message, version, delete, encoded if self.store is not None else None, size
        )
        if delete:
            known = [entry.version, acked, deleted]
            if current is not None:
                known.append(current.floor if current.delete else current.version)
            entry.floor = max((v for v in known if v is not None), default=None)
        if deleted is not None:
            # A re-create: the store's record lives again and keeps the delete's version as
            # its acknowledged one; so does this queue.
            self.acked[uid] = deleted
        if current is not None:
            self._supersede(current, entry)
            self._release(current)
        self.pending[uid] = entry
        self._owe(entry)
        self.by_msg_id[message.msg_id] = uid
        if uid not in self.delayed:
            self.ready[uid] = None
        if self.store is not None:
            content = message.content
            self.store.put_pending(
                self.node_id,
                uid,
                message,
                model.object_kind(content),
                model.object_namespace(content),
                model.object_name(content),
                encoded,
            )
        return entry

    def restore(self, record: SyncRecord) -> PendingEntry | None:
        """Take back what the sync store kept across a restart (records in ``seq`` order).

        Returns the entry made owed, if any. It counts against the budget but is never refused:
        what the store holds is delivered even above a limit (only new messages are refused).
        """
        uid = record.uid
        if record.deleted_at is not None:
            return None  # a tombstone: the store answers for it (deleted_version), until it expires
        if record.acked_version is not None:
            self.acked[uid] = record.acked_version
        message = record.pending
        if message is None:
            return None
        version = None
        if message.resource_version:
            try:
                version = model.parse_resource_version(message.resource_version)
            except ResourceVersionError:
                version = None
        # Sized as at its acceptance; the encoding is not kept (the transport makes it again).
        size = len(wire.encode(message))
        entry = PendingEntry(uid, message, version, model.is_delete(message), size=size)
        if entry.delete and record.acked_version is not None:
            # (What a delete replaced before the restart is not kept: its acked version is.)
            entry.floor = max(record.acked_version, version or 0)
        replaced = self.pending.get(uid)
        if replaced is not None:
            self._release(replaced)
        self.pending[uid] = entry
        self._owe(entry)
        self.by_msg_id[message.msg_id] = uid
        self.ready[uid] = None
        return entry

    def roll_back(self, rolled_back: RolledBack) -> bool:
        """Forget a message whose commit failed: it was answered "not accepted" (issue 18).

        Only if it is still the object's owed entry (a newer version, an ACK since, leave it
        as it is). Its waiters fail with the store's error; what the store still holds for the
        object (``rolled_back.record``: the version it had replaced, its acknowledged version,
        a tombstone it had ended) is what this queue owes and knows again. Returns whether
        the entry was forgotten.

        (A message sent to a connected edge before its commit failed may have reached it;
        its late ACK is ignored, as that of a superseded message, and the older version
        owed again is sent after it.)
        """
        uid = rolled_back.uid
        entry = self.pending.get(uid)
        if entry is None or entry.message.msg_id != rolled_back.msg_id:
            return False
        del self.pending[uid]
        self._release(entry)
        self.ready.pop(uid, None)
        if entry.transmissions == 0:
            self.by_msg_id.pop(rolled_back.msg_id, None)
        # (Else kept while it may be in flight, as for a superseded one: forget_superseded.)
        self.acked.pop(uid, None)
        record = rolled_back.record
        restored = None
        if record is not None:
            delayed = uid in self.delayed
            restored = self.restore(record)
            if restored is not None:
                restored.failures = entry.failures
                if delayed:
                    self.ready.pop(uid, None)  # still backing off
        if restored is None:
            self.delayed.pop(uid, None)
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter.errback(rolled_back.error)
        if restored is not None:
            self._notify()
        return True

    def _stale(
        self, uid: str, message: Message, acked: int | None, current: PendingEntry | None
    ) -> StaleMessage:
        pending = None
        if current is not None:
            pending = "delete" if current.delete else str(current.version)
        return StaleMessage(
            self.node_id,
            uid,
            message.resource_version,
            None if acked is None else str(acked),
            pending,
        )

    def _supersede(self, old: PendingEntry, new: PendingEntry) -> None:
        # The old msg_id stays known while it may be in flight, so a late ACK of it still
        # records that the edge holds that version (see acknowledge()).
        new.failures = old.failures
        self.stats.superseded += 1
        if old.transmissions == 0:
            # Not in flight: no ACK of it can be waited for any more.
            self.by_msg_id.pop(old.message.msg_id, None)
        for waiter in old.waiters:
            waiter.errback(
                Superseded(self.node_id, old.uid, old.message.msg_id, new.message.msg_id)
            )
        old.waiters.clear()

    def _notify(self) -> None:
        if self.on_ready is not None:
            self.on_ready()

    # --- sending ---------------------------------------------------------------------------

    def next_ready(self) -> PendingEntry | None:
        """The next ACK-mode entry to transmit (removed from the ready order), or None."""
        while self.ready:
            uid = next(iter(self.ready))
            del self.ready[uid]
            entry = self.pending.get(uid)
            if entry is not None:
                return entry
        return None

    def requeue(self, entry: PendingEntry, front: bool = False) -> None:
        """Put an unacknowledged entry back in the ready order (connection lost)."""
        uid = entry.uid
        if uid not in self.pending or uid in self.delayed:
            return
        if front:
            self.ready = {uid: None, **self.ready}
        else:
            self.ready[uid] = None

    def delay(self, entry: PendingEntry, until: float) -> None:
        """Hold an entry back until ``until`` (backoff after unanswered transmissions)."""
        self.ready.pop(entry.uid, None)
        self.delayed[entry.uid] = until

    def release_delayed(self, now: float | None = None) -> float | None:
        """Move entries whose backoff is over (all, when ``now`` is None) to the ready order.

        Returns the earliest time a still-delayed entry becomes ready, or None.
        """
        earliest: float | None = None
        for uid, until in list(self.delayed.items()):
            if now is None or until <= now:
                del self.delayed[uid]
                if uid in self.pending:
                    self.ready[uid] = None
            elif earliest is None or until < earliest:
                earliest = until
        return earliest

    def acknowledge(self, msg_id: str) -> PendingEntry | None:
        """Record the edge's ACK of ``msg_id``; returns the entry it completed, if any.

        An ACK of a message that was since superseded still records the version the edge now
        holds; a second ACK of the same message does nothing (counts once).
        """
        uid = self.by_msg_id.pop(msg_id, None)
        if uid is None:
            return None
        entry = self.pending.get(uid)
        if entry is None or entry.message.msg_id != msg_id:
            return None  # superseded: the newer entry stays owed
        del self.pending[uid]
        self._release(entry)
        self.ready.pop(uid, None)
        self.delayed.pop(uid, None)
        if self.store is not None:
            # A delete leaves a tombstone at its floor (the store forgets it when it expires).
            version = entry.floor if entry.delete else entry.version
            self.store.acknowledged(self.node_id, uid, version, entry.delete)
        if entry.delete:
            self.acked.pop(uid, None)
        elif entry.version is not None:
            self.acked[uid] = max(entry.version, self.acked.get(uid, 0))
        for waiter in entry.waiters:
            waiter.callback(entry.message)
        entry.waiters.clear()
        return entry

    def take_no_ack(self) -> list[tuple[Message, Deferred[Message] | None]]:
        """All queued no-ACK messages, in order, handed over for sending."""
        taken, self.no_ack = self.no_ack, []
        self._release_bytes(sum(self.no_ack_sizes))
        self.no_ack_sizes = []
        return taken

    def stop_waiting(self, error: Callable[[str], Exception]) -> None:
        """Fail every Deferred still waiting here with ``error(msg_id)`` (the hub stopped).

        Pending messages stay in the store; queued no-ACK messages were never stored and are
        let go, as at a restart.
        """
        for entry in self.pending.values():
            waiters, entry.waiters = entry.waiters, []
            for waiter in waiters:
                waiter.errback(error(entry.message.msg_id))
        backlog, self.no_ack = self.no_ack, []
        self._release_bytes(sum(self.no_ack_sizes))
        self.no_ack_sizes = []
        for message, no_ack_waiter in backlog:
            if no_ack_waiter is not None:
                no_ack_waiter.errback(error(message.msg_id))

    def forget_superseded(self, msg_id: str) -> None:
        """Drop the ACK index of a superseded message once it can no longer be in flight."""
        uid = self.by_msg_id.get(msg_id)
        if uid is not None:
            entry = self.pending.get(uid)
            if entry is None or entry.message.msg_id != msg_id:
                del self.by_msg_id[msg_id]

    @property
    def depth(self) -> int:
        """Messages owed: ACK-mode entries pending plus queued no-ACK messages."""
        return len(self.pending) + len(self.no_ack)

    def is_idle(self) -> bool:
        return not self.pending and not self.no_ack and not self.acked
