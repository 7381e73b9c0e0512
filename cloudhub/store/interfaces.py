"""The sync store's contract: what the hub keeps per (node, object) across restarts (design.md).

KubeEdge keeps this in ObjectSync / ClusterObjectSync objects named ``<node>.<uid>`` (§6.3–§6.5):
the last resourceVersion the edge acknowledged. We also keep the newest undelivered message
itself, since there is no API server to re-read the object from, so that nothing the hub
accepted is lost by a disconnect or a ``kill -9`` of the hub.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

from cloudhub import wire
from cloudhub.errors import CloudHubError, DecodeError
from cloudhub.model import Message

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


# How long an acknowledged delete is remembered (seconds), so that a late older version of the
# object is refused as stale instead of re-creating it on the edge (issue 18, finding 2).
DEFAULT_TOMBSTONE_RETENTION = 24 * 3600.0
# At most how often a store looks for expired tombstones to forget (seconds; on a write).
DEFAULT_TOMBSTONE_PURGE_INTERVAL = 3600.0


class StoreError(CloudHubError):
    """The sync store could not open, read or commit; the message names the file and why.

    A failed commit fails the ``flush()`` Deferreds waiting for it (the HTTP API answers 503:
    not accepted) and rolls back the ``put_pending`` writes it carried (see
    :class:`RolledBack`): they are never committed later. Its other writes stay buffered and
    are tried again with the next batch.
    """


class StoreClosed(StoreError):
    """A write, flush or read reached a store after ``close()``."""


class StoreSchemaError(StoreError):
    """The database file holds a schema this version of cloudhub does not know."""


def check_seconds(name: str, value: float) -> float:
    """``value`` as a float; :class:`StoreError` unless it is a finite number >= 0."""
    seconds = float(value)
    if not 0 <= seconds < float("inf"):
        raise StoreError(f"sync store: {name} must be a number of seconds >= 0, not {value!r}")
    return seconds


def encode_pending(message: Message, encoded: bytes | None = None) -> str:
    """The persisted form of a pending message: its WebSocket-lane JSON (§1.1), as text.

    Every store keeps this form, so what a store gives back is what any other would.
    ``encoded`` is ``wire.encode(message)`` when the caller already made it (the queue
    encodes each message once, for the store and the wire).
    """
    return (wire.encode(message) if encoded is None else encoded).decode("utf-8")


def decode_pending(text: str, node_id: str, uid: str) -> Message:
    """The message back from :func:`encode_pending`; :class:`StoreError` names the record."""
    try:
        # Trusted: written by a hub, perhaps one from before a limit (msg_id length) came in;
        # refusing it now would stop the hub from starting.
        return wire.decode(text.encode("utf-8"), trusted=True)
    except DecodeError as e:
        raise StoreError(f"pending message of node {node_id!r} object {uid} is corrupt: {e}") from e


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """What the hub knows about one object on one node (ObjectSync ``<node>.<uid>``, §6.3).

    ``pending`` is the newest message still owed to the node (None once acknowledged or
    withdrawn); ``acked_version`` the resourceVersion the edge last acknowledged (None when it
    never acknowledged a versioned message). ``seq`` orders pending messages for replay after a
    restart: each ``put_pending`` takes the next number, so a superseding version goes to the
    back, as in :class:`cloudhub.queue.NodeQueue` once the old version was sent.

    ``deleted_at`` is set on a *tombstone*: the edge acknowledged the object's delete at that
    time (the store's clock, seconds since the epoch). A tombstone has no ``pending``; its
    ``acked_version`` is the version the delete closed (see :meth:`ISyncStore.acknowledged`),
    and versions not newer are refused as stale until it expires, ``tombstone_retention``
    seconds later. Expired tombstones are never returned.
    """

    node_id: str
    uid: str
    kind: str
    namespace: str  # "null" for a cluster-scoped object (ClusterObjectSync, §6.3)
    name: str
    resource: str  # wire form, "<ns>/<type>/<name>"
    acked_version: int | None
    pending: Message | None
    seq: int
    attempts: int
    last_error: str
    deleted_at: float | None = None


@dataclass(frozen=True, slots=True)
class RolledBack:
    """A ``put_pending`` of a commit that failed: its message was not accepted.

    ``msg_id`` is the message's (the last one put for the object in that commit);
    ``record`` what the store holds for the object now (the durable record, with the writes
    still to be committed applied; None: nothing), whose ``pending`` message is owed again if
    the rolled-back one had replaced it; ``error`` what the message's waiters are failed with.
    """

    node_id: str
    uid: str
    msg_id: str
    record: SyncRecord | None
    error: StoreError


RollbackListener = Callable[[list[RolledBack]], object]


class ISyncStore(Interface):
    """Durable per-node delivery state. Every method is called from the reactor thread.

    Writes (``put_pending``, ``acknowledged``, ``dropped``, ``note_attempt``) return at once
    and are durable after the next ``flush()`` fires; they raise :class:`StoreClosed` after
    ``close()``. Their effect is that of applying them one after the other, in call order,
    however an implementation batches them.

    Tombstones: an acknowledged delete leaves a record (``deleted_at`` set) for
    ``tombstone_retention`` seconds, measured on the store's clock (the reactor it was given).
    An expired tombstone is gone for every purpose (reads, :meth:`deleted_version`, a new
    ``put_pending``) whether or not it was purged yet; stores purge them at most every purge
    interval, on a write.
    """

    tombstone_retention = Attribute("Seconds an acknowledged delete is remembered (float).")
    failing = Attribute(
        "None while commits succeed; while they fail, why (str). Readiness follows it: a store "
        "that cannot commit accepts nothing. A store that never fails keeps None."
    )
    on_rollback = Attribute(
        "A RollbackListener or None, set by the hub: called, in the reactor thread and before "
        "the failed flush() Deferreds fire, with the puts a failed commit rolled back, so the "
        "node queues forget those messages (and owe again what they had replaced). A store "
        "that never fails never calls it."
    )

    def load() -> list[SyncRecord]:
        """Every record, ordered by ``seq``. Called once at startup, before any write; may block."""

    def put_pending(
        node_id: str,
        uid: str,
        message: Message,
        kind: str,
        namespace: str,
        name: str,
        encoded: bytes | None = None,
    ) -> None:
        """Record (or replace) the message owed to ``node_id`` for object ``uid``.

        ``encoded``, when given, is ``wire.encode(message)``, so the store need not encode again.

        Keeps ``acked_version``, ``attempts`` and ``last_error``; takes a new ``seq``. The
        message is captured as it is now (later changes to the object are not recorded).
        On a tombstone it makes the record live again (``deleted_at`` cleared, ``acked_version``
        kept); an expired tombstone is forgotten first (a new record).
        """

    def acknowledged(node_id: str, uid: str, version: int | None, deleted: bool) -> None:
        """The edge acknowledged: ``pending`` cleared, ``acked_version = version``, attempts reset.

        ``deleted=True`` (an acknowledged delete) makes the record a tombstone (``deleted_at`` =
        now) where KubeEdge deletes the ObjectSync (§6.4, ``saveSuccessPoint``); ``version``
        is then the newest version the delete closed (None: the tombstone refuses nothing). A
        record is created if there was none.
        """

    def dropped(node_id: str, uid: str) -> None:
        """The pending message was withdrawn without an ACK: ``pending`` cleared, the rest kept."""

    def note_attempt(node_id: str, uid: str, attempts: int, last_error: str) -> None:
        """Delivery attempts of the pending message so far, and the last error ("" for none).

        Cheap and coalesced: only the last value per (node, uid) is written. Ignored when there
        is no record.
        """

    def deleted_version(node_id: str, uid: str) -> int | None:
        """The ``acked_version`` of the object's unexpired tombstone, else None.

        Reflects every write handed in before the call (answered from memory: no I/O).
        """

    def flush() -> Deferred[None]:
        """Fires once every write handed in before this call is durable.

        Fails with :class:`StoreError` when the commit failed: then the messages put in that
        commit were not accepted and are rolled back (``on_rollback``), never written later.
        Callers in the same reactor turn share one commit.
        """

    def records(node_id: str | None = None) -> Deferred[list[SyncRecord]]:
        """Records of one node (all nodes when None), ordered by ``seq``, for the CLI and API.

        Reflects every write handed in before the call.
        """

    def close() -> Deferred[None]:
        """Flush, then release the store; fires when done (fails if the last flush failed).

        Calling it again returns the same outcome.
        """
