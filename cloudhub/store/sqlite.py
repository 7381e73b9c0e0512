"""The embedded sync store: one SQLite file in WAL mode (design.md, "Embedded default").

Writes never block the reactor. They are buffered in the reactor thread, coalesced per
(node, uid), and committed by one dedicated writer thread, one transaction per batch; a batch
starts on the reactor turn after the first write (``callLater(0)``), and while it commits the
next one accumulates. Only the writer thread touches the database once writing has begun (and
``load()``, at startup, before it).

Tombstones (an acknowledged delete, kept ``tombstone_retention`` seconds, issue 18) are rows
with ``deleted_at`` set. Their keys, versions and times are also kept in memory (loaded at
open) so that :meth:`SQLiteSyncStore.deleted_version` answers without I/O. Expired ones are
deleted by the first commit after the store opens, then at most every ``purge_interval``
seconds, on a write, as ordinary deletes of the batch.

A failed commit (a full disk, an I/O error) refuses the messages of its batch: every
``flush()`` waiting for that batch fails, so each caller was told "not accepted" (the API
answers 503), and the batch's ``put_pending`` writes are rolled back, in the store and, through
:attr:`SQLiteSyncStore.on_rollback`, in the node queues: they are never retried, never
delivered later. The batch's other writes (acknowledgements, attempts, withdrawals, tombstone
purges) promise nothing to a caller and record what already happened on the edge: they stay
buffered, under the writes that came in since, and are tried again ``retry_delay`` seconds
later. While commits fail, :attr:`SQLiteSyncStore.failing` says why (readiness probes answer
503), a probe commit is tried every ``retry_delay`` even with nothing buffered, and the log
gets the first failure with its traceback, then one line per ``log_interval`` seconds, then one
line when a commit succeeds again.

Schema versions (``PRAGMA user_version``): 1 (cloudhub up to issue 18), 2 (adds
``deleted_at`` and its index). A version-1 file is migrated when it is opened; a file of a
newer version is refused.

Durability (``synchronous``):

* ``NORMAL`` (default): a committed batch is in the WAL file, i.e. handed to the kernel, when
  ``flush()`` fires; it survives ``kill -9`` of the hub. A power loss or kernel crash may undo
  the last batches before the next checkpoint (the database stays consistent: older state, not
  a corrupt one). One fsync per checkpoint, not per batch.
* ``FULL`` / ``EXTRA``: the WAL is fsync'd at every commit, so ``flush()`` also means "survives
  power loss". Costs one fsync per batch (batches amortise it across a reactor turn's writes).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorCore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from cloudhub.model import Message
from cloudhub.store.interfaces import (
    DEFAULT_TOMBSTONE_PURGE_INTERVAL,
    DEFAULT_TOMBSTONE_RETENTION,
    ISyncStore,
    RollbackListener,
    RolledBack,
    StoreClosed,
    StoreError,
    StoreSchemaError,
    SyncRecord,
    check_seconds,
    decode_pending,
    encode_pending,
)

log = Logger()

SCHEMA_VERSION = 2  # PRAGMA user_version of the files this module writes
SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")
WAL_AUTOCHECKPOINT_PAGES = 4000
# While commits fail: at most one log line per this many seconds (the first has the traceback).
FAILURE_LOG_INTERVAL = 60.0
# Text of one JSON statement's rows (a row longer than this goes alone).
JSON_CHUNK_CHARS = 4 * 1024 * 1024


def _json_rows_supported() -> bool:
    """Whether this SQLite runs the JSON statements: json_each (JSON1, built in since 3.38,
    an option before) and UPDATE ... FROM (3.33). Older ones get executemany."""
    if sqlite3.sqlite_version_info < (3, 33, 0):
        return False
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("SELECT json_extract(value, '$[0]') FROM json_each('[[1]]')").fetchall()
    except sqlite3.Error:
        return False
    finally:
        probe.close()
    return True


# Rows go to SQLite as JSON arrays (one statement per group) when this is true.
JSON_ROWS = _json_rows_supported()

_TABLE = "sync_record"
_SCHEMA = f"""
CREATE TABLE {_TABLE} (
    node_id       TEXT NOT NULL,
    uid           TEXT NOT NULL,
    kind          TEXT NOT NULL,
    namespace     TEXT NOT NULL,  -- "null" for cluster-scoped objects (ClusterObjectSync)
    name          TEXT NOT NULL,
    resource      TEXT NOT NULL,  -- wire form <ns>/<type>/<name>
    acked_version TEXT,           -- decimal: a resourceVersion is uint64, INTEGER is int64
    pending       TEXT,           -- wire JSON of the message owed (protocol §1.1), or NULL
    seq           INTEGER NOT NULL,
    attempts      INTEGER NOT NULL,
    last_error    TEXT NOT NULL,
    deleted_at    REAL,           -- a tombstone: when the delete was acknowledged (schema 2)
    PRIMARY KEY (node_id, uid)
)
"""
# Only tombstones are indexed: purging and loading them reads nothing else.
_TOMBSTONE_INDEX = (
    f"CREATE INDEX {_TABLE}_deleted_at ON {_TABLE} (deleted_at) WHERE deleted_at IS NOT NULL"
)
# Version 1 to 2: the column goes last, as in a file created at version 2.
_MIGRATE_1_TO_2 = (f"ALTER TABLE {_TABLE} ADD COLUMN deleted_at REAL", _TOMBSTONE_INDEX)
# Value columns (after node_id, uid, before seq) and what a row inserted without them holds;
# an inserted row without a seq takes the change's insert_seq.
_NAMES = (
    "kind",
    "namespace",
    "name",
    "resource",
    "acked_version",
    "pending",
    "attempts",
    "last_error",
    "deleted_at",
)
_DEFAULTS = ("", "null", "", "", None, None, 0, "", None)
_UPSERT_INTO = f"INSERT INTO {_TABLE} (node_id, uid, {', '.join(_NAMES)}, seq)"
_SELECT = (
    "SELECT node_id, uid, kind, namespace, name, resource, acked_version, pending, seq, "
    f"attempts, last_error, deleted_at FROM {_TABLE}"
)
# Not an expired tombstone (parameter: the oldest deleted_at still kept, exclusive).
_LIVE = "(deleted_at IS NULL OR deleted_at > ?)"
_PURGE = f"DELETE FROM {_TABLE} WHERE deleted_at IS NOT NULL AND deleted_at <= ?"

Key = tuple[str, str]  # (node_id, uid)
Connect = Callable[..., sqlite3.Connection]


# --- what a batch holds per key (reactor thread) -----------------------------------------------


@dataclass(slots=True)
class _Change:
    """The net effect of a run of writes on one (node, uid), in three ordered steps.

    Any run of writes reduces to: delete the row (``delete``), then set columns of the row if
    it exists (``update``), then insert or update the row (``upsert``). After a delete the row
    is known to be absent, so ``update`` is dropped; after an upsert it is known to exist, so
    later updates fold into the upsert. Applying the steps gives the same row as applying the
    writes one by one.
    """

    delete: bool = False
    update: dict[str, Any] | None = None
    upsert: dict[str, Any] | None = None
    insert_seq: int = 0  # seq of a row the upsert inserts when it sets no seq itself

    def set_if_present(self, fields: dict[str, Any]) -> None:
        if self.upsert is not None:
            self.upsert.update(fields)
        elif self.delete:
            pass  # the row is gone; setting columns of nothing does nothing
        elif self.update is None:
            self.update = dict(fields)
        else:
            self.update.update(fields)

    def set_or_create(self, fields: dict[str, Any], insert_seq: int) -> None:
        if self.upsert is None:
            self.upsert = fields
            self.insert_seq = insert_seq
        else:
            self.upsert.update(fields)

    def then(self, later: _Change) -> _Change:
        """This change followed by ``later`` (both left as they are)."""
        if later.delete:
            return later.copy()
        result = self.copy()
        if later.update:
            result.set_if_present(later.update)
        if later.upsert is not None:
            result.set_or_create(dict(later.upsert), later.insert_seq)
        return result

    def copy(self) -> _Change:
        return _Change(
            self.delete,
            None if self.update is None else dict(self.update),
            None if self.upsert is None else dict(self.upsert),
            self.insert_seq,
        )


@dataclass(slots=True)
class _Batch:
    changes: dict[Key, _Change]
    waiters: list[Deferred[None]] = field(default_factory=list)
    purge_before: float | None = None  # first delete tombstones with deleted_at <= this
    # The same writes but the put_pending ones: what is tried again if the commit fails.
    kept: dict[Key, _Change] = field(default_factory=dict)
    # (node, uid) -> msg_id of the batch's last put_pending for it: rolled back on failure.
    puts: dict[Key, str] = field(default_factory=dict)


class _CommitFailed(Exception):
    """A batch's commit failed (``error``); ``rows`` are the rows of the keys it put, as the
    file holds them after the rollback (None when they could not be read)."""

    def __init__(self, error: BaseException, rows: dict[Key, dict[str, Any]] | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.rows = rows


# --- database work (writer thread, or startup) -------------------------------------------------


def _columns(count: int) -> str:
    """The first ``count`` elements of each ``json_each`` row, as SQL values."""
    return ", ".join(f"json_extract(value, '$[{i}]')" for i in range(count))


_DELETE = f"DELETE FROM {_TABLE} WHERE (node_id, uid) IN (SELECT {_columns(2)} FROM json_each(?))"
_DELETE_ROW = f"DELETE FROM {_TABLE} WHERE node_id = ? AND uid = ?"


def _update_row_sql(columns: tuple[str, ...]) -> str:
    assignments = ", ".join(f"{c} = ?" for c in columns)
    return f"UPDATE {_TABLE} SET {assignments} WHERE node_id = ? AND uid = ?"


def _upsert_row_sql(columns: tuple[str, ...]) -> str:
    return (
        f"{_UPSERT_INTO} VALUES ({', '.join('?' * (len(_NAMES) + 3))}) "
        "ON CONFLICT (node_id, uid) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in columns)
    )


def _update_sql(columns: tuple[str, ...]) -> str:
    # Each row: the values of ``columns``, then node_id and uid.
    values = ", ".join(f"{c} = j.c{i}" for i, c in enumerate(columns))
    extracted = ", ".join(f"json_extract(value, '$[{i}]') AS c{i}" for i in range(len(columns)))
    n = len(columns)
    return (
        f"UPDATE {_TABLE} SET {values} FROM (SELECT {extracted}, "
        f"json_extract(value, '$[{n}]') AS node_id, json_extract(value, '$[{n + 1}]') AS uid "
        f"FROM json_each(?)) AS j WHERE {_TABLE}.node_id = j.node_id AND {_TABLE}.uid = j.uid"
    )


def _upsert_sql(columns: tuple[str, ...]) -> str:
    # Each row: node_id, uid, every _NAMES column, seq. WHERE true: SQLite's parser needs it
    # between a SELECT and ON CONFLICT.
    return (
        f"{_UPSERT_INTO} SELECT {_columns(len(_NAMES) + 3)} FROM json_each(?) WHERE true "
        "ON CONFLICT (node_id, uid) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in columns)
    )


def _write_batch(
    conn: sqlite3.Connection, changes: dict[Key, _Change], purge_before: float | None = None
) -> None:
    """Apply one batch in one transaction. Runs in the writer thread; reads ``changes`` only.

    ``purge_before``: delete the tombstones acknowledged at or before that time first (those
    already expired when the store opened: no change of the batch is meant for them).

    Each group of rows goes to SQLite as one JSON array (``json_each``), one statement per
    group: ``executemany`` would take and release the GIL for every row, and with a busy
    reactor thread each take waits for its switch interval (measured: a 5,000-row batch took
    6 s instead of 17 ms).
    """
    deletes: list[Key] = []
    updates: dict[tuple[str, ...], list[list[Any]]] = {}
    upserts: dict[tuple[str, ...], list[list[Any]]] = {}
    for key, change in changes.items():
        if change.delete:
            deletes.append(key)
        elif change.update:
            fields = change.update
            updates.setdefault(tuple(fields), []).append([*fields.values(), *key])
        if change.upsert is not None:
            fields = change.upsert
            row = [*key, *map(fields.get, _NAMES, _DEFAULTS), fields.get("seq", change.insert_seq)]
            upserts.setdefault(tuple(fields), []).append(row)
    # Steps of one key run in order (delete, update, upsert); different keys are independent.
    # Rows are grouped by the columns they set (in the order the writes set them).
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not changes and purge_before is None:
            # A probe while commits fail: it must write something to tell a disk that has
            # room again from one that has not (one page, in the WAL).
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if purge_before is not None:
            conn.execute(_PURGE, (purge_before,))
        if deletes:
            _apply(conn, _DELETE, _DELETE_ROW, deletes)
        for columns, rows in updates.items():
            _apply(conn, _update_sql(columns), _update_row_sql(columns), rows)
        for columns, rows in upserts.items():
            _apply(conn, _upsert_sql(columns), _upsert_row_sql(columns), rows)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _commit(
    conn: sqlite3.Connection,
    changes: dict[Key, _Change],
    purge_before: float | None,
    read_back: list[Key],
) -> None:
    """:func:`_write_batch`; when it fails, :class:`_CommitFailed` with the rows of
    ``read_back`` as the file holds them (the durable state the failed puts are rolled back
    to). Runs in the writer thread."""
    try:
        _write_batch(conn, changes, purge_before)
    except Exception as e:
        rows: dict[Key, dict[str, Any]] | None
        try:
            rows = _read_rows(conn, read_back)
        except sqlite3.Error:
            rows = None
        raise _CommitFailed(e, rows) from e


_ROW_COLUMNS = ("node_id", "uid", *_NAMES, "seq")
_SELECT_ROWS = f"SELECT {', '.join(_ROW_COLUMNS)} FROM {_TABLE}"


def _read_rows(conn: sqlite3.Connection, keys: list[Key]) -> dict[Key, dict[str, Any]]:
    """The rows of ``keys`` that exist, as column dicts (``pending`` as stored text)."""
    found: dict[Key, dict[str, Any]] = {}
    if not keys:
        return found
    if JSON_ROWS and not any(_has_nul(key) for key in keys):
        cursor = conn.execute(
            f"{_SELECT_ROWS} WHERE (node_id, uid) IN (SELECT {_columns(2)} FROM json_each(?))",
            (_json([list(key) for key in keys]),),
        )
        rows: list[Any] = cursor.fetchall()
    else:
        rows = []
        for key in keys:
            rows.extend(conn.execute(f"{_SELECT_ROWS} WHERE node_id = ? AND uid = ?", key))
    for row in rows:
        values = dict(zip(_ROW_COLUMNS, row, strict=True))
        found[(values.pop("node_id"), values.pop("uid"))] = values
    return found


def _after(row: dict[str, Any] | None, change: _Change | None) -> dict[str, Any] | None:
    """The row ``change`` leaves from ``row`` (None: no row), as a column dict."""
    if change is None:
        return row
    if change.delete:
        row = None
    if change.update and row is not None:
        row = {**row, **change.update}
    if change.upsert is not None:
        if row is None:
            row = {**dict(zip(_NAMES, _DEFAULTS, strict=True)), "seq": change.insert_seq}
        row = {**row, **change.upsert}
    return row


def _apply(conn: sqlite3.Connection, json_sql: str, row_sql: str, rows: list[Any]) -> None:
    """``json_sql`` over ``rows``, a JSON array of at most ~:data:`JSON_CHUNK_CHARS` at a time.

    Rows holding a NUL character go one by one through ``row_sql`` instead, since SQLite's
    JSON functions end a string at a NUL; so do all rows when this SQLite lacks what the JSON
    statements need (:data:`JSON_ROWS`). The chunks keep one value far below SQLite's
    length limit (1e9 bytes) and one ``json.dumps``, which holds the GIL, short.
    """
    if not JSON_ROWS:
        conn.executemany(row_sql, rows)
        return
    for chunk in _chunks(rows):
        text = _json(chunk)
        if "u0000" in text:  # perhaps an escaped NUL; a precise look, rarely needed
            with_nul = [row for row in chunk if _has_nul(row)]
            if with_nul:
                conn.executemany(row_sql, with_nul)
                chunk = [row for row in chunk if not _has_nul(row)]
                if not chunk:
                    continue
                text = _json(chunk)
        conn.execute(json_sql, (text,))


def _chunks(rows: list[Any]) -> Iterator[list[Any]]:
    """``rows`` in runs of about :data:`JSON_CHUNK_CHARS` characters of text each."""
    start = 0
    size = 0
    for index, row in enumerate(rows):
        size += 64 + sum(len(value) for value in row if value.__class__ is str)
        if size >= JSON_CHUNK_CHARS:
            yield rows[start : index + 1]
            start, size = index + 1, 0
    if start < len(rows):
        yield rows[start:]


def _has_nul(row: Any) -> bool:
    return any(value.__class__ is str and "\x00" in value for value in row)


def _json(rows: list[Any]) -> str:
    return json.dumps(rows, ensure_ascii=False, check_circular=False)


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        log.failure("rollback after a failed sync store commit failed too")


def _read(conn: sqlite3.Connection, node_id: str | None, cutoff: float) -> list[SyncRecord]:
    """Records, without the tombstones acknowledged at or before ``cutoff`` (expired)."""
    if node_id is None:
        rows: Iterable[tuple[Any, ...]] = conn.execute(
            f"{_SELECT} WHERE {_LIVE} ORDER BY seq, node_id, uid", (cutoff,)
        )
    else:
        rows = conn.execute(
            f"{_SELECT} WHERE node_id = ? AND {_LIVE} ORDER BY seq, uid", (node_id, cutoff)
        )
    return [_record(row) for row in rows]


def _read_tombstones(
    conn: sqlite3.Connection, cutoff: float
) -> dict[Key, tuple[int | None, float]]:
    """The unexpired tombstones, oldest first: (node, uid) -> (acked_version, deleted_at)."""
    nodes: dict[str, str] = {}  # one string per node id, not one per row
    tombstones: dict[Key, tuple[int | None, float]] = {}
    rows = conn.execute(
        f"SELECT node_id, uid, acked_version, deleted_at FROM {_TABLE} "
        "WHERE deleted_at IS NOT NULL AND deleted_at > ? ORDER BY deleted_at",
        (cutoff,),
    )
    for node, uid, acked, deleted_at in rows:
        node = nodes.setdefault(node, node)
        tombstones[(node, uid)] = (None if acked is None else int(acked), deleted_at)
    return tombstones


def _record(row: tuple[Any, ...]) -> SyncRecord:
    (
        node,
        uid,
        kind,
        namespace,
        name,
        resource,
        acked,
        pending,
        seq,
        attempts,
        last_error,
        deleted_at,
    ) = row
    return SyncRecord(
        node_id=node,
        uid=uid,
        kind=kind,
        namespace=namespace,
        name=name,
        resource=resource,
        acked_version=None if acked is None else int(acked),
        pending=None if pending is None else decode_pending(pending, node, uid),
        seq=seq,
        attempts=attempts,
        last_error=last_error,
        deleted_at=deleted_at,
    )


def _prepare_directory(path: str) -> None:
    """Create the missing directories above ``path``, mode 0700: pending messages may hold
    Secrets and ConfigMaps."""
    missing: list[str] = []
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o700)  # whatever the umask
        except OSError as e:
            raise StoreError(
                f"cannot create the directory {directory} of sync store {path}: {e.strerror}"
            ) from e


def _create_private_file(path: str) -> None:
    """Create the database file 0600 if absent (SQLite would use the umask)."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        raise StoreError(f"cannot create sync store {path}: {e.strerror}") from e
    os.close(descriptor)


def _ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    conn.execute("BEGIN IMMEDIATE")  # two processes creating the same file take turns
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreSchemaError(
                f"sync store {path} has schema version {version}, written by a newer cloudhub "
                f"(this one knows versions up to {SCHEMA_VERSION}); run that cloudhub, or "
                "point hub.store.path at another file"
            )
        if version == 0:
            tables = [
                row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            if tables:
                raise StoreSchemaError(
                    f"{path} is an SQLite database but not a cloudhub sync store "
                    f"(tables: {', '.join(sorted(tables))})"
                )
            conn.execute(_SCHEMA)
            conn.execute(_TOMBSTONE_INDEX)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version == 1:
            # Every record stays what it was: deleted_at NULL, a live record.
            for statement in _MIGRATE_1_TO_2:
                conn.execute(statement)
            conn.execute("PRAGMA user_version = 2")
            log.info(
                "sync store {path}: schema migrated from version 1 to 2 (tombstones); "
                "cloudhub versions before it cannot open the file any more",
                path=path,
            )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _open(path: str, synchronous: str, connect: Connect) -> sqlite3.Connection:
    in_memory = path == ":memory:"  # SQLite's private in-memory database: nothing on disk
    if not in_memory:
        _prepare_directory(path)
        _create_private_file(path)
    try:
        conn = connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open sync store {path}: {e}") from e
    try:
        conn.execute("PRAGMA busy_timeout = 5000")  # a CLI reading the file at the same time
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal" and not in_memory:
            log.warn(
                "sync store {path}: journal mode is {mode}, not WAL (filesystem without shared "
                "memory?); commits stay atomic but readers block the writer",
                path=path,
                mode=mode,
            )
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # Checkpoint every 16 MB of WAL instead of SQLite's 4 MB: a page written by several
        # batches is copied once. 200,000 pending messages written 1,000 a batch: -28 % time.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        _ensure_schema(conn, path)
    except BaseException as e:
        conn.close()
        if isinstance(e, sqlite3.Error):
            raise StoreError(f"cannot open sync store {path}: {e}") from e
        raise
    return conn


# --- the store ---------------------------------------------------------------------------------


@implementer(ISyncStore)
class SQLiteSyncStore:
    """:class:`ISyncStore` on an SQLite file; see the module docstring for the threading rules.

    Opening (directory, file, schema) happens in the constructor, in the calling thread: it is
    startup. Raises :class:`StoreError` (:class:`StoreSchemaError` for a file of a newer
    cloudhub or of something else).

    ``connect`` and ``threadpool`` are for tests (a connection that fails, a pool that runs
    work at once); the store starts and stops the pool, which must have one thread.
    ``retry_delay`` is how long after a failed commit the buffered changes are tried again
    (or a probe commit made, when nothing is buffered); ``log_interval`` at most how often a
    commit that keeps failing is logged.
    ``tombstone_retention`` is how long an acknowledged delete is remembered, and
    ``purge_interval`` at most how often expired ones are looked for (seconds, on the
    ``reactor``'s clock, which dates tombstones).
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        synchronous: str = "NORMAL",
        *,
        connect: Connect = sqlite3.connect,
        threadpool: ThreadPool | None = None,
        retry_delay: float = 1.0,
        tombstone_retention: float = DEFAULT_TOMBSTONE_RETENTION,
        purge_interval: float = DEFAULT_TOMBSTONE_PURGE_INTERVAL,
        log_interval: float = FAILURE_LOG_INTERVAL,
    ) -> None:
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise StoreError(
                f"sync store {path}: synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, "
                f"not {synchronous!r}"
            )
        self.path = path
        self.synchronous = mode
        self._reactor = reactor
        self._retry_delay = retry_delay
        self.tombstone_retention = check_seconds("tombstone_retention", tombstone_retention)
        self._purge_interval = check_seconds("purge_interval", purge_interval)
        self._conn = _open(path, mode, connect)
        # Tombstones expired now are left to the first commit (opening writes nothing, so
        # `cloudhub sync` beside a running hub changes nothing); they are never read again.
        self._purge_before: float | None = self._cutoff()
        self._next_purge = float("-inf")  # the first write looks for expired ones
        try:
            self._last_seq: int = self._conn.execute(
                f"SELECT COALESCE(MAX(seq), 0) FROM {_TABLE}"
            ).fetchone()[0]
            # (node, uid) -> (acked_version, deleted_at), in deletion order.
            self._tombstones = _read_tombstones(self._conn, self._purge_before)
        except sqlite3.Error as e:
            self._conn.close()
            raise StoreError(f"cannot read sync store {path}: {e}") from e
        if threadpool is None:
            threadpool = ThreadPool(1, 1, name=f"cloudhub-store:{path}")
        self._pool = threadpool
        self._pool_running = False
        self._shutdown_trigger: Any = None

        self._buffer: dict[Key, _Change] = {}
        self._kept: dict[Key, _Change] = {}  # the buffer's writes but put_pending (see _Batch)
        self._puts: dict[Key, str] = {}  # the buffer's put_pending: (node, uid) -> msg_id
        self._waiters: list[Deferred[None]] = []  # flushes waiting for the buffer's commit
        self._inflight: _Batch | None = None
        self._scheduled: Any = None  # IDelayedCall of the next batch
        self._retry_at = 0.0  # no batch before this time (after a failed commit)

        self._closed = False  # no more writes
        self._close_result: Any = None  # None, or what close() ended with once it ended
        self._close_done = False
        self._close_observers: list[Deferred[None]] = []

        # Why commits fail, while they do (None: the last commit succeeded); readiness.
        self.failing: str | None = None
        # Called with what a failed commit rolled back (the hub's MessageHandle sets it).
        self.on_rollback: RollbackListener | None = None
        self._log_interval = log_interval
        self._failing_since = 0.0
        self._failures_unlogged = 0  # failed commits since the last line logged
        self._refused_unlogged = 0  # messages rolled back since the last line logged
        self._failures_logged_at = 0.0

        # Figures for metrics and benchmarks.
        self.batches_committed = 0
        self.changes_committed = 0
        self.commit_failures = 0
        self.messages_rolled_back = 0  # put_pending writes refused by a failed commit

    def __repr__(self) -> str:
        return f"<SQLiteSyncStore {self.path!r} synchronous={self.synchronous}>"

    # --- writes (reactor thread, buffered) ---------------------------------------------------

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
        self._before_write(key)
        self._last_seq += 1
        # Encoded now, in the reactor thread: the message may change after we return, and the
        # writer thread must not read objects the reactor thread mutates.
        fields = {
            "kind": kind,
            "namespace": namespace,
            "name": name,
            "resource": message.resource,
            "pending": encode_pending(message, encoded),
            "seq": self._last_seq,
            "deleted_at": None,
        }
        self._tombstones.pop(key, None)
        self._puts[key] = message.msg_id
        change = self._buffer.get(key)
        if change is None:
            self._buffer[key] = _Change(upsert=fields, insert_seq=self._last_seq)
        else:
            change.set_or_create(fields, self._last_seq)
        self._schedule()

    def acknowledged(self, node_id: str, uid: str, version: int | None, deleted: bool) -> None:
        key = (node_id, uid)
        self._before_write(key)
        self._last_seq += 1  # the seq of the record if this creates it
        deleted_at = self._reactor.seconds() if deleted else None
        fields = {
            "pending": None,
            "acked_version": None if version is None else str(version),
            "attempts": 0,
            "last_error": "",
            "deleted_at": deleted_at,
        }
        self._tombstones.pop(key, None)
        if deleted_at is not None:
            self._tombstones[key] = (version, deleted_at)  # at the back: deletion order
        self._set_or_create(key, fields)

    def dropped(self, node_id: str, uid: str) -> None:
        key = (node_id, uid)
        self._before_write(key)
        self._set_if_present(key, {"pending": None})

    def note_attempt(self, node_id: str, uid: str, attempts: int, last_error: str) -> None:
        key = (node_id, uid)
        self._before_write(key)
        self._set_if_present(key, {"attempts": attempts, "last_error": last_error})

    def deleted_version(self, node_id: str, uid: str) -> int | None:
        tombstone = self._tombstones.get((node_id, uid))
        if tombstone is None or tombstone[1] <= self._cutoff():
            return None
        return tombstone[0]

    def _cutoff(self) -> float:
        """Tombstones acknowledged at or before this time are expired."""
        return float(self._reactor.seconds()) - self.tombstone_retention

    def _before_write(self, key: Key) -> None:
        """Refuse after close; purge when due; forget ``key``'s tombstone if expired.

        An expired tombstone goes as a delete of the batch, in call order with the other
        writes, so the file ends as the in-memory store would.
        """
        if self._closed:
            raise self._closed_error()
        now = float(self._reactor.seconds())
        cutoff = now - self.tombstone_retention
        if now >= self._next_purge:
            self._next_purge = now + self._purge_interval
            expired = []
            for candidate, (_, deleted_at) in self._tombstones.items():
                if deleted_at > cutoff:
                    break  # deletion order: the rest are newer (see MemorySyncStore._purge)
                expired.append(candidate)
            for candidate in expired:
                self._forget(candidate)
        tombstone = self._tombstones.get(key)
        if tombstone is not None and tombstone[1] <= cutoff:
            self._forget(key)

    def _forget(self, key: Key) -> None:
        del self._tombstones[key]
        self._buffer[key] = _Change(delete=True)  # whatever was buffered before: gone
        self._kept[key] = _Change(delete=True)
        self._schedule()

    def _set_or_create(self, key: Key, fields: dict[str, Any]) -> None:
        """A write other than put_pending: to the buffer and to the kept writes."""
        seq = self._last_seq
        for buffer, own in ((self._buffer, fields), (self._kept, dict(fields))):
            change = buffer.get(key)
            if change is None:
                buffer[key] = _Change(upsert=own, insert_seq=seq)
            else:
                change.set_or_create(own, seq)
        self._schedule()

    def _set_if_present(self, key: Key, fields: dict[str, Any]) -> None:
        for buffer, own in ((self._buffer, fields), (self._kept, dict(fields))):
            change = buffer.get(key)
            if change is None:
                buffer[key] = _Change(update=own)
            else:
                change.set_if_present(own)
        self._schedule()

    # --- batching ----------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Start a batch on a coming reactor turn, unless one is scheduled or committing."""
        if self._scheduled is not None or self._inflight is not None:
            return
        delay = max(0.0, self._retry_at - self._reactor.seconds()) if self._retry_at else 0.0
        self._scheduled = self._reactor.callLater(delay, self._start_batch)

    def _start_batch(self) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self._inflight is not None:
            return  # _committed / _commit_failed start the next one
        if not self._buffer and (self.failing is None or self._closed):
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        # (While commits fail, an empty batch is a probe: see _write_batch.)
        batch = _Batch(self._buffer, self._waiters, self._purge_before, self._kept, self._puts)
        self._buffer, self._waiters, self._purge_before = {}, [], None
        self._kept, self._puts = {}, {}
        self._inflight = batch
        done = deferToThreadPool(
            self._reactor,
            self._running_pool(),
            _commit,
            self._conn,
            batch.changes,
            batch.purge_before,
            list(batch.puts),
        )
        done.addCallbacks(
            self._committed, self._commit_failed, callbackArgs=(batch,), errbackArgs=(batch,)
        )

    def _committed(self, _: None, batch: _Batch) -> None:
        self._inflight = None
        self._retry_at = 0.0
        if batch.changes or batch.purge_before is not None:  # (not a probe)
            self.batches_committed += 1
            self.changes_committed += len(batch.changes)
        if self.failing is not None:
            self.failing = None
            log.info(
                "sync store {path}: commits succeed again, after {seconds:.1f}s of failures "
                "({count} failed commits, {refused} messages refused since the last report)",
                path=self.path,
                seconds=float(self._reactor.seconds()) - self._failing_since,
                count=self._failures_unlogged,
                refused=self._refused_unlogged,
            )
        for waiter in batch.waiters:
            waiter.callback(None)
        if self._buffer and self._inflight is None:
            self._start_batch()  # what came in while this batch committed

    def _commit_failed(self, failure: Failure, batch: _Batch) -> None:
        """The batch is refused: its puts are rolled back, its other writes tried again.

        Every ``flush()`` waiting for this batch fails, so every message it put was answered
        "not accepted": none may be committed or delivered later. Acknowledgements, attempts,
        withdrawals and purges record what already happened and promise nothing to a caller:
        they go back under the writes that came in since, so the next batch still applies
        everything kept in call order.
        """
        self._inflight = None
        self.commit_failures += 1
        self._retry_at = self._reactor.seconds() + self._retry_delay
        rows: dict[Key, dict[str, Any]] | None = None
        if failure.check(_CommitFailed):
            failed: _CommitFailed = failure.value  # type: ignore[assignment]
            rows = failed.rows
            failure = Failure(failed.error, type(failed.error), failed.error.__traceback__)
        # (Copies: the buffer's changes are folded into by later writes, the kept ones not.)
        merged = {key: change.copy() for key, change in batch.kept.items()}
        for key, later in self._buffer.items():
            earlier = merged.get(key)
            merged[key] = later if earlier is None else earlier.then(later)
        self._buffer = merged
        kept = dict(batch.kept)
        for key, later in self._kept.items():
            earlier = kept.get(key)
            kept[key] = later if earlier is None else earlier.then(later)
        self._kept = kept
        if batch.purge_before is not None:
            self._purge_before = batch.purge_before  # still before every buffered change
        reason = str(failure.value) or failure.value.__class__.__name__
        error = StoreError(
            f"sync store {self.path}: commit failed: {reason}; the messages of this commit "
            "were not accepted"
        )
        error.__cause__ = failure.value
        rolled_back = self._roll_back(batch, rows, error)
        self._log_failure(failure, reason, len(batch.changes), len(rolled_back))
        if rolled_back and self.on_rollback is not None:
            try:
                self.on_rollback(rolled_back)
            except Exception:
                log.failure(
                    "sync store {path}: rolling back the node queues failed", path=self.path
                )
        for waiter in batch.waiters:
            waiter.errback(Failure(error))
        if self._closed and not self._close_done:
            # close() is waiting for this very commit: it gives up rather than retry.
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.errback(Failure(error))
        elif not self._closed:
            self._schedule()  # what is buffered, or a probe: until a commit succeeds

    def _roll_back(
        self, batch: _Batch, rows: dict[Key, dict[str, Any]] | None, error: StoreError
    ) -> list[RolledBack]:
        """What the failed batch's puts leave, per object: the row in the file with the
        writes still buffered applied (those will be committed). The in-memory tombstones
        follow it (a rolled-back re-create leaves the tombstone it ended)."""
        if not batch.puts:
            return []
        if rows is None:
            log.error(
                "sync store {path}: after a failed commit, the records of its {count} "
                "messages could not be read back; older versions they replaced are owed "
                "again only after a restart",
                path=self.path,
                count=len(batch.puts),
            )
        self.messages_rolled_back += len(batch.puts)
        self._refused_unlogged += len(batch.puts)
        result: list[RolledBack] = []
        for key, msg_id in batch.puts.items():
            node_id, uid = key
            record: SyncRecord | None = None
            if rows is not None:
                row = _after(rows.get(key), self._buffer.get(key))
                if row is not None:
                    record = self._record_of(key, row)
                deleted_at = row.get("deleted_at") if row is not None else None
                self._tombstones.pop(key, None)
                if record is not None and deleted_at is not None:
                    self._tombstones[key] = (record.acked_version, deleted_at)
            result.append(RolledBack(node_id, uid, msg_id, record, error))
        return result

    def _record_of(self, key: Key, row: dict[str, Any]) -> SyncRecord:
        pending: Message | None = None
        if row.get("pending") is not None:
            try:
                pending = decode_pending(row["pending"], *key)
            except StoreError as e:
                log.error("sync store {path}: {error}", path=self.path, error=e)
        acked = row.get("acked_version")
        return SyncRecord(
            node_id=key[0],
            uid=key[1],
            kind=row.get("kind") or "",
            namespace=row.get("namespace") or "null",
            name=row.get("name") or "",
            resource=row.get("resource") or "",
            acked_version=None if acked is None else int(acked),
            pending=pending,
            seq=int(row.get("seq") or 0),
            attempts=int(row.get("attempts") or 0),
            last_error=row.get("last_error") or "",
            deleted_at=row.get("deleted_at"),
        )

    def _log_failure(self, failure: Failure, reason: str, changes: int, refused: int) -> None:
        """The first failure with its traceback; then a line per ``log_interval`` at most."""
        now = float(self._reactor.seconds())
        if self.failing is None:
            self.failing = reason
            self._failing_since = self._failures_logged_at = now
            self._failures_unlogged = 0
            self._refused_unlogged = 0
            log.failure(
                "sync store {path}: commit of {count} changes failed; its {refused} messages "
                "were refused (not accepted, rolled back); acknowledgements and attempts stay "
                "buffered and are tried again every {delay}s; further failures are logged at "
                "most every {interval}s",
                failure,
                path=self.path,
                count=changes,
                refused=refused,
                delay=self._retry_delay,
                interval=self._log_interval,
            )
            return
        self.failing = reason
        self._failures_unlogged += 1
        if now - self._failures_logged_at < self._log_interval:
            return
        log.error(
            "sync store {path}: commits still failing ({reason}): {count} failed commits and "
            "{refused} messages refused in the last {seconds:.0f}s, failing for {total:.0f}s",
            path=self.path,
            reason=reason,
            count=self._failures_unlogged,
            refused=self._refused_unlogged,
            seconds=now - self._failures_logged_at,
            total=now - self._failing_since,
        )
        self._failures_logged_at = now
        self._failures_unlogged = 0
        self._refused_unlogged = 0

    def _running_pool(self) -> ThreadPool:
        if not self._pool_running:
            self._pool.start()
            self._pool_running = True
            if IReactorCore.providedBy(self._reactor):
                # The writer thread must not outlive the reactor, nor buffered writes be lost
                # by a clean shutdown that forgot to close the store.
                self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                    "before", "shutdown", self._close_at_shutdown
                )
        return self._pool

    # --- flush, reads, close -----------------------------------------------------------------

    def flush(self) -> Deferred[None]:
        if self._closed:
            return fail(self._closed_error())
        return self._flush()

    def _flush(self) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        inflight = self._inflight
        if self._buffer:
            self._waiters.append(done)
            self._schedule()
        elif inflight is not None and (inflight.changes or inflight.purge_before is not None):
            inflight.waiters.append(done)  # (not a probe: that carries nothing handed in)
        else:
            done.callback(None)
        return done

    def load(self) -> list[SyncRecord]:
        if self._closed:
            raise self._closed_error()
        if self._buffer or self._inflight is not None:
            raise StoreError(
                f"sync store {self.path}: load() reads the file at startup, before any write; "
                "use records() once writing has begun"
            )
        try:
            return _read(self._conn, None, self._cutoff())
        except sqlite3.Error as e:
            raise StoreError(f"cannot read sync store {self.path}: {e}") from e

    def records(self, node_id: str | None = None) -> Deferred[list[SyncRecord]]:
        if self._closed:
            return fail(self._closed_error())

        cutoff = self._cutoff()

        def read(_: None) -> Deferred[list[SyncRecord]]:
            # Queued behind the commit in the one writer thread, so it sees that commit.
            return deferToThreadPool(
                self._reactor, self._running_pool(), _read, self._conn, node_id, cutoff
            )

        return self._flush().addCallback(read)

    def close(self) -> Deferred[None]:
        observer: Deferred[None] = Deferred()
        if self._close_done:
            _fire(observer, self._close_result)
            return observer
        self._close_observers.append(observer)
        if not self._closed:
            self._closed = True
            flushed = self._flush()
            if self._scheduled is not None and self._inflight is None:
                self._start_batch()  # now, not after a retry delay
            flushed.addBoth(self._release)
        return observer

    def _close_at_shutdown(self) -> Deferred[None]:
        self._shutdown_trigger = None  # firing: it must not be removed
        return self.close()

    def _release(self, result: Any) -> None:
        """Close the connection in the writer thread (after any queued read), stop the pool."""
        if isinstance(result, Failure):
            log.error(
                "sync store {path} closed with {count} changes not written: {error}",
                path=self.path,
                count=len(self._buffer),
                error=result.value,
            )
            self._buffer = {}

        def finish(outcome: Any) -> None:
            if isinstance(outcome, Failure):
                log.failure(
                    "sync store {path}: closing the database failed", outcome, path=self.path
                )
            if self._pool_running:
                self._pool.stop()
                self._pool_running = False
            if self._shutdown_trigger is not None:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None
            self._close_done = True
            self._close_result = result
            observers, self._close_observers = self._close_observers, []
            for observer in observers:
                _fire(observer, result)

        if self._pool_running:
            deferToThreadPool(self._reactor, self._pool, self._conn.close).addBoth(finish)
        else:
            try:
                self._conn.close()
            except sqlite3.Error:
                finish(Failure())
            else:
                finish(None)

    def _closed_error(self) -> StoreClosed:
        return StoreClosed(f"sync store {self.path} is closed")


def _fire(waiter: Deferred[None], result: Failure | None) -> None:
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(None)
