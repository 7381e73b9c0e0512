"""An in-process :class:`ISyncStore`: nothing survives the process (``hub.store.type: memory``).

For tests, and for hubs that prefer KubeEdge's own guarantee (the queue lives as long as the
process). It keeps pending messages in their persisted form, so it gives back exactly what
:class:`~cloudhub.store.sqlite.SQLiteSyncStore` would, and the two can be tested alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from cloudhub.model import Message
from cloudhub.store.interfaces import (
    ISyncStore,
    StoreClosed,
    SyncRecord,
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


@implementer(ISyncStore)
class MemorySyncStore:
    """Every write applies at once; ``flush()`` has nothing to wait for."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], _Row] = {}
        self._last_seq = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the in-memory sync store is closed")

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
        self._check_open()
        row = self._rows.get((node_id, uid))
        if row is None:
            row = self._rows[(node_id, uid)] = _Row()
        row.kind, row.namespace, row.name = kind, namespace, name
        row.resource = message.resource
        row.pending = encode_pending(message, encoded)
        row.seq = self._next_seq()

    def acknowledged(self, node_id: str, uid: str, version: int | None, deleted: bool) -> None:
        self._check_open()
        if deleted:
            self._rows.pop((node_id, uid), None)
            return
        # A seq is taken whether or not the record exists, as SQLiteSyncStore does.
        seq = self._next_seq()
        row = self._rows.get((node_id, uid))
        if row is None:
            row = self._rows[(node_id, uid)] = _Row(seq=seq)
        row.pending = None
        row.acked_version = version
        row.attempts = 0
        row.last_error = ""

    def dropped(self, node_id: str, uid: str) -> None:
        self._check_open()
        row = self._rows.get((node_id, uid))
        if row is not None:
            row.pending = None

    def note_attempt(self, node_id: str, uid: str, attempts: int, last_error: str) -> None:
        self._check_open()
        row = self._rows.get((node_id, uid))
        if row is not None:
            row.attempts = attempts
            row.last_error = last_error

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
        chosen = [
            (key, row) for key, row in self._rows.items() if node_id is None or key[0] == node_id
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
            )
            for key, row in chosen
        ]
