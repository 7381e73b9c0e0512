"""The sync store: what each node has acknowledged and what is still owed to it (design.md).

:class:`ISyncStore` is the contract; :class:`MemorySyncStore` (``hub.store.type: memory``) and
:class:`SQLiteSyncStore` (``sqlite``, the default) implement it. :func:`open_store` picks one
from the configuration.
"""

from __future__ import annotations

from typing import Any

from cloudhub.store.interfaces import (
    DEFAULT_TOMBSTONE_RETENTION,
    ISyncStore,
    RollbackListener,
    RolledBack,
    StoreClosed,
    StoreError,
    StoreSchemaError,
    SyncRecord,
)
from cloudhub.store.memory import MemorySyncStore
from cloudhub.store.sqlite import SCHEMA_VERSION, SYNCHRONOUS_MODES, SQLiteSyncStore

__all__ = [
    "DEFAULT_TOMBSTONE_RETENTION",
    "SCHEMA_VERSION",
    "SYNCHRONOUS_MODES",
    "ISyncStore",
    "MemorySyncStore",
    "RollbackListener",
    "RolledBack",
    "SQLiteSyncStore",
    "StoreClosed",
    "StoreError",
    "StoreSchemaError",
    "SyncRecord",
    "open_store",
]


def open_store(
    kind: str,
    path: str,
    reactor: Any,
    synchronous: str = "NORMAL",
    tombstone_retention: float = DEFAULT_TOMBSTONE_RETENTION,
) -> ISyncStore:
    """The store ``hub.store.type`` names: ``"sqlite"`` at ``path``, or ``"memory"``.

    Opens it now (startup: may block); raises :class:`StoreError` when it cannot.
    ``tombstone_retention``: seconds an acknowledged delete is remembered (``reactor`` time).
    """
    if kind == "memory":
        return MemorySyncStore(reactor, tombstone_retention=tombstone_retention)
    if kind == "sqlite":
        return SQLiteSyncStore(path, reactor, synchronous, tombstone_retention=tombstone_retention)
    raise StoreError(f"unknown sync store type {kind!r} (known: sqlite, memory)")
