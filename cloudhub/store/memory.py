"""An in-process :class:`ISyncStore`: nothing survives the process (``hub.store.type: memory``).

For tests, and for hubs that prefer KubeEdge's own guarantee (the queue lives as long as the
process). It keeps pending messages in their persisted form, so it gives back exactly what
:class:`~cloudhub.store.sqlite.SQLiteSyncStore` would, and the two can be tested alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from cloudhub.model import Message
from cloudhub.store.interfaces import (
    DEFAULT_TOMBSTONE_PURGE_INTERVAL,
    DEFAULT_TOMBSTONE_RETENTION,
    ISyncStore,
    RollbackListener,
    StoreClosed,
    SyncRecord,
    check_seconds,
    decode_pending,
    encode_pending,
)


@dataclass(slots=True)
class _Row:
    kind: str = ""
    namespace: str = "null"
    name: str = ""
    resource: str = ""
    acked_version: int | None = None
    pending: str | None = None  # encode_pending() form
    seq: int = 0
    attempts: int = 0
    last_error: str = ""
    deleted_at: float | None = None  # set on a tombstone


@implementer(ISyncStore)
class MemorySyncStore:
    """Every write applies at once; ``flush()`` has nothing to wait for.

    ``clock`` (an ``IReactorTime``, normally the hub's reactor) dates tombstones; without one,
    the wall clock. ``tombstone_retention`` and ``purge_interval`` are in seconds.
    """

    def __init__(
        self,
        clock: Any = None,
        *,
        tombstone_retention: float = DEFAULT_TOMBSTONE_RETENTION,
        purge_interval: float = DEFAULT_TOMBSTONE_PURGE_INTERVAL,
    ) -> None:
        self._rows: dict[tuple[str, str], _Row] = {}
        self._last_seq = 0
        self._closed = False
        self._seconds = time.time if clock is None else clock.seconds
        self.tombstone_retention = check_seconds("tombstone_retention", tombstone_retention)
        self._purge_interval = check_seconds("purge_interval", purge_interval)
        self._tombstones: dict[tuple[str, str], None] = {}  # keys of rows with deleted_at
        self._next_purge = float("-inf")  # the first write purges
        # ISyncStore: this store never fails a commit, so it is never failing and never
        # rolls anything back (on_rollback is kept for the hub, never called).
        self.failing: str | None = None
        self.on_rollback: RollbackListener | None = None

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the in-memory sync store is closed")

    def _row(self, key: tuple[str, str]) -> _Row | None:
        """The row of ``key`` for a write: purges first when due; an expired tombstone is
        forgotten (so every write sees what it would after a purge)."""
        self._check_open()
        now = self._seconds()
        if now >= self._next_purge:
            self._next_purge = now + self._purge_interval
            self._purge(now)
        row = self._rows.get(key)
        if row is not None and row.deleted_at is not None and not self._live(row, now):
            del self._rows[key]
            del self._tombstones[key]
            return None
        return row

    def _purge(self, now: float) -> None:
        """Forget the tombstones expired at ``now``, oldest first.

        ``_tombstones`` is in deletion order, so this stops at the first one still kept: it
        costs what it purges. (Should the clock step back, a later one may wait for the next
        purge; :meth:`_live` treats it as gone meanwhile.)
        """
        cutoff = now - self.tombstone_retention
        expired = []
        for key in self._tombstones:
            deleted_at = self._rows[key].deleted_at
            if deleted_at is not None and deleted_at > cutoff:
                break
            expired.append(key)
        for key in expired:
            del self._tombstones[key]
            del self._rows[key]

    def _live(self, row: _Row, now: float) -> bool:
        """False for an expired tombstone (gone, purged or not)."""
        return row.deleted_at is None or row.deleted_at > now - self.tombstone_retention

    def _next_seq(self) -> int:
        self._last_seq += 1
        return self._last_seq

    # --- writes ------------------------------------------------------------------------------

    def put_pending(
        self,
        node_id: str,
        uid: str,
        message: Message,
        kind: str,
        namespace: str,
        name: str,
        encoded: bytes | None = None,
    ) -> None:
        key = (node_id, uid)
        row = self._row(key)
        if row is None:
            row = self._rows[key] = _Row()
        elif row.deleted_at is not None:
            row.deleted_at = None  # live again; acked_version kept
            del self._tombstones[key]
        row.kind, row.namespace, row.name = kind, namespace, name
        row.resource = message.resource
        row.pending = encode_pending(message, encoded)
        row.seq = self._next_seq()

    def acknowledged(self, node_id: str, uid: str, version: int | None, deleted: bool) -> None:
        key = (node_id, uid)
        row = self._row(key)
        # A seq is taken whether or not the record exists, as SQLiteSyncStore does.
        seq = self._next_seq()
        if row is None:
            row = self._rows[key] = _Row(seq=seq)
        row.pending = None
        row.acked_version = version
        row.attempts = 0
        row.last_error = ""
        if deleted:
            row.deleted_at = self._seconds()
            self._tombstones.pop(key, None)
            self._tombstones[key] = None  # to the back: the dict stays in deletion order
        elif row.deleted_at is not None:
            row.deleted_at = None
            del self._tombstones[key]

    def dropped(self, node_id: str, uid: str) -> None:
        row = self._row((node_id, uid))
        if row is not None:
            row.pending = None

    def note_attempt(self, node_id: str, uid: str, attempts: int, last_error: str) -> None:
        row = self._row((node_id, uid))
        if row is not None:
            row.attempts = attempts
            row.last_error = last_error

    def deleted_version(self, node_id: str, uid: str) -> int | None:
        row = self._rows.get((node_id, uid))
        if row is None or row.deleted_at is None or not self._live(row, self._seconds()):
            return None
        return row.acked_version

    # --- durability and reads ----------------------------------------------------------------

    def flush(self) -> Deferred[None]:
        if self._closed:
            return fail(StoreClosed("the in-memory sync store is closed"))
        return succeed(None)

    def load(self) -> list[SyncRecord]:
        self._check_open()
        return self._select(None)

    def records(self, node_id: str | None = None) -> Deferred[list[SyncRecord]]:
        if self._closed:
            return fail(StoreClosed("the in-memory sync store is closed"))
        return succeed(self._select(node_id))

    def close(self) -> Deferred[None]:
        self._closed = True
        return succeed(None)

    def _select(self, node_id: str | None) -> list[SyncRecord]:
        now = self._seconds()
        chosen = [
            (key, row)
            for key, row in self._rows.items()
            if (node_id is None or key[0] == node_id) and self._live(row, now)
        ]
        chosen.sort(key=lambda item: item[1].seq)
        return [
            SyncRecord(
                node_id=key[0],
                uid=key[1],
                kind=row.kind,
                namespace=row.namespace,
                name=row.name,
                resource=row.resource,
                acked_version=row.acked_version,
                pending=None if row.pending is None else decode_pending(row.pending, *key),
                seq=row.seq,
                attempts=row.attempts,
                last_error=row.last_error,
                deleted_at=row.deleted_at,
            )
            for key, row in chosen
        ]
