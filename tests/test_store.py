"""The sync store (design.md, durable delivery; protocol §6.3–§6.5).

One behavioural suite runs against both stores; the SQLite store also has its file handling,
batching, failure and ``kill -9`` tests. Batching is driven deterministically with a
``Clock`` and a thread pool the test runs by hand; durability with a real reactor, a real
writer thread, and a real process killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import sys
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IReactorCore
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides
from zope.interface.verify import verifyObject

import cloudhub
from cloudhub.errors import CloudHubError
from cloudhub.model import Message
from cloudhub.store import (
    SCHEMA_VERSION,
    ISyncStore,
    MemorySyncStore,
    SQLiteSyncStore,
    StoreClosed,
    StoreError,
    StoreSchemaError,
    SyncRecord,
    open_store,
)

MAX_RV = 2**64 - 1


def message(uid: str, rv: str, operation: str = "update", name: str = "nginx") -> Message:
    content = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": rv},
    }
    return Message.new(
        "edgecontroller", "resource", operation, f"default/pod/{name}", content, resource_version=rv
    )


def put(store: ISyncStore, node: str, uid: str, rv: str, name: str = "nginx") -> Message:
    sent = message(uid, rv, name=name)
    store.put_pending(node, uid, sent, "Pod", "default", name)
    return sent


# --- doubles for driving the SQLite store without threads -------------------------------------


class ThreadlessReactor(Clock):
    """A Clock that also takes calls "from threads" (they run at once)."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class ShuttingDownReactor(ThreadlessReactor):
    """Also keeps system event triggers, so a test can play the reactor's shutdown."""

    def __init__(self) -> None:
        super().__init__()
        directlyProvides(self, IReactorCore)  # the part of it the store uses
        self.triggers: dict[int, tuple[str, str, Callable[[], Any]]] = {}

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], Any]) -> int:
        handle = len(self.triggers) + 1
        self.triggers[handle] = (phase, event, f)
        return handle

    def removeSystemEventTrigger(self, handle: int) -> None:
        del self.triggers[handle]


class ManualPool:
    """Stands in for the one writer thread: work waits until the test runs it."""

    def __init__(self, run_at_once: bool = False) -> None:
        self.run_at_once = run_at_once
        self.jobs: list[tuple[Callable[..., Any], Callable[..., Any], tuple[Any, ...]]] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def callInThreadWithCallback(
        self, on_result: Callable[..., Any], f: Callable[..., Any], *args: Any
    ) -> None:
        self.jobs.append((on_result, f, args))
        if self.run_at_once:
            self.run_all()

    def run_next(self) -> None:
        on_result, f, args = self.jobs.pop(0)
        try:
            result = f(*args)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def run_all(self) -> None:
        while self.jobs:
            self.run_next()


class FlakyConnection(sqlite3.Connection):
    """A connection whose COMMITs fail on demand (as with a full disk), and which counts them."""

    fail_commits = False
    commits = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if sql == "COMMIT":
            if self.fail_commits:
                raise sqlite3.OperationalError("database or disk is full")
            self.commits += 1
        return super().execute(sql, *args)


def flaky_connect(path: str, **options: Any) -> sqlite3.Connection:
    return sqlite3.connect(path, factory=FlakyConnection, **options)


def flaky(store: SQLiteSyncStore) -> FlakyConnection:
    connection = store._conn
    assert isinstance(connection, FlakyConnection)
    return connection


# --- the behaviour every store has --------------------------------------------------------------


class SyncStoreBehaviour:
    """Mixed into a TestCase whose ``make_store()`` returns a fresh, empty store."""

    def make_store(self) -> ISyncStore:
        raise NotImplementedError

    # Typing help: these come from TestCase.
    assertEqual: Any
    assertIsNone: Any
    assertIn: Any
    assertTrue: Any
    assertFalse: Any
    assertGreater: Any
    assertRaises: Any
    assertFailure: Any

    async def one(self, store: ISyncStore, node: str = "n1") -> SyncRecord:
        records = await store.records(node)
        self.assertEqual(len(records), 1, records)
        return records[0]

    def test_provides_interface(self) -> None:
        self.assertEqual(verifyObject(ISyncStore, self.make_store()), True)

    async def test_new_store_is_empty(self) -> None:
        store = self.make_store()
        self.assertEqual(store.load(), [])
        self.assertEqual(await store.records(), [])

    async def test_awkward_text_kept_exactly(self) -> None:
        """NUL, line separators, quotes, backslashes, non-BMP characters, escapes that look
        like JSON: in every column and every kind of write, stored and read back as given."""
        odd = ["a\x00b", "\u2028é😀", "\\\"'", "\\u0000", "plain", "x\x00"]
        store = self.make_store()
        expected = {}
        for i, text in enumerate(odd):
            node, uid = f"n{text}", f"u{text}{i}"
            sent = message(uid, str(i + 1), name=f"p{text}")
            store.put_pending(node, uid, sent, text, text, text)
            expected[(node, uid)] = (text, sent, i + 1)
        await store.flush()
        for i, text in enumerate(odd):
            store.note_attempt(f"n{text}", f"u{text}{i}", 3, f"error {text}")
        first = f"n{odd[0]}", f"u{odd[0]}0"
        store.acknowledged(*first, MAX_RV, deleted=False)
        gone = f"n{odd[-1]}", f"u{odd[-1]}{len(odd) - 1}"
        store.acknowledged(*gone, None, deleted=True)
        await store.flush()
        records = {(r.node_id, r.uid): r for r in await store.records()}
        self.assertEqual(set(records), set(expected))
        for key, record in records.items():
            text, sent, _ = expected[key]
            self.assertEqual((record.kind, record.namespace, record.name), (text, text, text))
            if key == gone:  # a tombstone
                self.assertEqual((record.pending, record.last_error), (None, ""))
                self.assertIsNotNone(record.deleted_at)
            elif key == first:  # an ACK clears attempts and the last error
                self.assertEqual((record.pending, record.acked_version), (None, MAX_RV))
                self.assertEqual(record.last_error, "")
            else:
                self.assertEqual(record.pending, sent)
                self.assertEqual(record.last_error, f"error {text}")

    async def test_put_pending_round_trip(self) -> None:
        store = self.make_store()
        sent = put(store, "n1", "u1", "5")
        await store.flush()
        self.assertEqual(
            await self.one(store),
            SyncRecord(
                node_id="n1",
                uid="u1",
                kind="Pod",
                namespace="default",
                name="nginx",
                resource="default/pod/nginx",
                acked_version=None,
                pending=sent,
                seq=1,
                attempts=0,
                last_error="",
            ),
        )

    async def test_message_is_captured_when_handed_in(self) -> None:
        store = self.make_store()
        sent = put(store, "n1", "u1", "5")
        original = sent.copy(content={**sent.content})
        sent.content["metadata"] = {}
        record = await self.one(store)
        self.assertEqual(record.pending, original)

    async def test_acknowledged_clears_pending_and_attempts(self) -> None:
        store = self.make_store()
        put(store, "n1", "u1", "5")
        await store.flush()
        store.note_attempt("n1", "u1", 3, "no ACK in 5s")
        await store.flush()
        store.acknowledged("n1", "u1", 5, deleted=False)
        record = await self.one(store)
        self.assertEqual((record.pending, record.acked_version), (None, 5))
        self.assertEqual((record.attempts, record.last_error), (0, ""))
        self.assertEqual(
            (record.kind, record.name, record.resource), ("Pod", "nginx", "default/pod/nginx")
        )

    async def test_replacing_pending_keeps_acked_and_attempts_and_takes_new_seq(self) -> None:
        store = self.make_store()
        put(store, "n1", "u1", "5")
        store.acknowledged("n1", "u1", 5, deleted=False)
        first = await self.one(store)
        put(store, "n1", "u1", "6")
        store.note_attempt("n1", "u1", 2, "timeout")
        await store.flush()
        newer = put(store, "n1", "u1", "7")
        record = await self.one(store)
        self.assertEqual((record.pending, record.acked_version), (newer, 5))
        self.assertEqual((record.attempts, record.last_error), (2, "timeout"))
        self.assertGreater(record.seq, first.seq)

    async def test_acknowledged_delete_leaves_a_tombstone(self) -> None:
        clock = Clock()
        clock.advance(1000)
        store = self.make_store(clock=clock)
        put(store, "n1", "u1", "5")
        put(store, "n1", "u2", "5")
        store.acknowledged("n1", "u1", 5, deleted=False)
        store.note_attempt("n1", "u1", 2, "timeout")
        await store.flush()
        store.acknowledged("n1", "u1", 6, deleted=True)
        self.assertEqual(store.deleted_version("n1", "u1"), 6)
        self.assertIsNone(store.deleted_version("n1", "u2"))
        self.assertIsNone(store.deleted_version("n2", "u1"))
        records = {r.uid: r for r in await store.records()}
        self.assertEqual(set(records), {"u1", "u2"})
        tombstone = records["u1"]
        self.assertEqual((tombstone.pending, tombstone.acked_version), (None, 6))
        self.assertEqual(
            (tombstone.deleted_at, tombstone.attempts, tombstone.last_error), (1000, 0, "")
        )
        self.assertEqual((tombstone.kind, tombstone.name), ("Pod", "nginx"))
        self.assertIsNone(records["u2"].deleted_at)

    async def test_tombstone_without_a_version(self) -> None:
        """A delete acknowledged with no version known: a tombstone that refuses nothing."""
        store = self.make_store(clock=Clock())
        store.acknowledged("n1", "u1", None, deleted=True)
        record = await self.one(store)
        self.assertEqual((record.acked_version, record.deleted_at, record.kind), (None, 0, ""))
        self.assertIsNone(store.deleted_version("n1", "u1"))

    async def test_put_pending_on_a_tombstone_makes_it_live(self) -> None:
        clock = Clock()
        store = self.make_store(clock=clock)
        put(store, "n1", "u1", "5")
        store.acknowledged("n1", "u1", 6, deleted=True)
        first = await self.one(store)
        clock.advance(10)
        newer = put(store, "n1", "u1", "7")
        self.assertIsNone(store.deleted_version("n1", "u1"))
        record = await self.one(store)
        self.assertEqual(
            (record.pending, record.acked_version, record.deleted_at), (newer, 6, None)
        )
        self.assertGreater(record.seq, first.seq)
        store.acknowledged("n1", "u1", 7, deleted=False)
        record = await self.one(store)
        self.assertEqual((record.pending, record.acked_version, record.deleted_at), (None, 7, None))

    async def test_tombstone_expires_even_before_a_purge(self) -> None:
        clock = Clock()
        store = self.make_store(clock=clock, tombstone_retention=10, purge_interval=10**9)
        put(store, "n1", "u1", "5")
        store.acknowledged("n1", "u1", 6, deleted=True)
        clock.advance(9.5)
        self.assertEqual(store.deleted_version("n1", "u1"), 6)
        self.assertEqual([r.uid for r in await store.records()], ["u1"])
        clock.advance(0.5)  # 10 s: expired, not purged (the next purge is 10**9 s away)
        self.assertIsNone(store.deleted_version("n1", "u1"))
        self.assertEqual(await store.records(), [])
        self.assertEqual(await store.records("n1"), [])

    async def test_expired_tombstone_is_forgotten_by_a_write(self) -> None:
        """A write to an expired tombstone meets no record (as after a purge)."""
        clock = Clock()
        store = self.make_store(clock=clock, tombstone_retention=10, purge_interval=10**9)
        put(store, "n1", "u1", "5")
        put(store, "n1", "u2", "5")
        store.acknowledged("n1", "u1", 6, deleted=True)
        store.acknowledged("n1", "u2", 6, deleted=True)
        clock.advance(11)
        store.note_attempt("n1", "u2", 3, "x")  # needs a record: none
        store.dropped("n1", "u2")
        again = put(store, "n1", "u1", "3")
        record = await self.one(store)
        self.assertEqual((record.uid, record.pending, record.acked_version), ("u1", again, None))
        store.acknowledged("n1", "u2", 1, deleted=False)  # creates a new record
        records = {r.uid: r for r in await store.records()}
        self.assertEqual((records["u2"].acked_version, records["u2"].kind), (1, ""))

    async def test_retention_zero_remembers_no_delete(self) -> None:
        """``tombstone_retention: 0`` is KubeEdge's behaviour: the record goes at once."""
        store = self.make_store(clock=Clock(), tombstone_retention=0)
        put(store, "n1", "u1", "5")
        store.acknowledged("n1", "u1", 6, deleted=True)
        self.assertIsNone(store.deleted_version("n1", "u1"))
        self.assertEqual(await store.records(), [])

    def test_retention_must_be_seconds(self) -> None:
        for bad in (-1, float("nan"), float("inf")):
            error = self.assertRaises(StoreError, self.make_store, tombstone_retention=bad)
            self.assertIn("tombstone_retention must be a number of seconds >= 0", str(error))
        self.assertRaises(StoreError, self.make_store, purge_interval=-5)

    async def test_deleted_again_renews_the_tombstone(self) -> None:
        clock = Clock()
        store = self.make_store(clock=clock, tombstone_retention=10)
        store.acknowledged("n1", "u1", 6, deleted=True)
        clock.advance(8)
        put(store, "n1", "u1", "7")
        store.acknowledged("n1", "u1", 8, deleted=True)
        clock.advance(8)  # 16 s after the first delete, 8 after the second
        self.assertEqual(store.deleted_version("n1", "u1"), 8)
        self.assertEqual((await self.one(store)).deleted_at, 8)

    async def test_acknowledged_without_a_record_creates_one(self) -> None:
        store = self.make_store()
        store.acknowledged("n1", "u1", 7, deleted=False)
        record = await self.one(store)
        self.assertEqual((record.acked_version, record.pending, record.kind), (7, None, ""))
        self.assertEqual(record.namespace, "null")

    async def test_dropped_clears_pending_keeps_acked(self) -> None:
        store = self.make_store()
        put(store, "n1", "u1", "5")
        store.acknowledged("n1", "u1", 5, deleted=False)
        await store.flush()
        put(store, "n1", "u1", "6")
        store.note_attempt("n1", "u1", 5, "gave up")
        await store.flush()
        store.dropped("n1", "u1")
        record = await self.one(store)
        self.assertEqual((record.pending, record.acked_version), (None, 5))
        self.assertEqual((record.attempts, record.last_error), (5, "gave up"))

    async def test_dropped_and_note_attempt_need_a_record(self) -> None:
        store = self.make_store()
        store.dropped("n1", "u1")
        store.note_attempt("n1", "u2", 1, "x")
        await store.flush()
        self.assertEqual(await store.records(), [])

    async def test_note_attempt_last_value_wins(self) -> None:
        store = self.make_store()
        put(store, "n1", "u1", "5")
        for attempt in range(1, 6):
            store.note_attempt("n1", "u1", attempt, f"error {attempt}")
        record = await self.one(store)
        self.assertEqual((record.attempts, record.last_error), (5, "error 5"))

    async def test_put_then_acknowledged_in_one_turn(self) -> None:
        store = self.make_store()
        put(store, "n1", "u1", "5")
        store.acknowledged("n1", "u1", 5, deleted=False)
        record = await self.one(store)
        self.assertEqual((record.pending, record.acked_version), (None, 5))
        self.assertEqual((record.kind, record.name), ("Pod", "nginx"))

    async def test_acknowledged_delete_then_put_in_one_turn(self) -> None:
        store = self.make_store()
        put(store, "n1", "u1", "5")
        store.acknowledged("n1", "u1", 5, deleted=False)
        store.note_attempt("n1", "u1", 4, "x")
        await store.flush()
        store.acknowledged("n1", "u1", None, deleted=True)
        store.dropped("n1", "u1")  # of nothing: the record is gone
        newer = put(store, "n1", "u1", "9")
        record = await self.one(store)
        self.assertEqual((record.pending, record.acked_version), (newer, None))
        self.assertEqual((record.attempts, record.last_error), (0, ""))

    async def test_put_then_acknowledged_delete_in_one_turn_leaves_a_tombstone(self) -> None:
        store = self.make_store(clock=Clock())
        put(store, "n1", "u1", "5")
        store.acknowledged("n1", "u1", 5, deleted=True)
        record = await self.one(store)
        self.assertEqual((record.pending, record.acked_version, record.deleted_at), (None, 5, 0))

    async def test_records_of_one_node_in_seq_order(self) -> None:
        store = self.make_store()
        put(store, "a", "u3", "1")
        put(store, "b", "u1", "1")
        put(store, "a", "u1", "1")
        await store.flush()
        put(store, "a", "u3", "2")  # moves to the back
        put(store, "b", "u2", "1")
        self.assertEqual([r.uid for r in await store.records("a")], ["u1", "u3"])
        everything = await store.records()
        self.assertEqual(
            [(r.node_id, r.uid) for r in everything],
            [("b", "u1"), ("a", "u1"), ("a", "u3"), ("b", "u2")],
        )
        self.assertEqual([r.seq for r in everything], sorted(r.seq for r in everything))
        self.assertEqual(await store.records("nobody"), [])

    async def test_uint64_resource_version_and_cluster_scoped(self) -> None:
        store = self.make_store()
        node_message = Message.new(
            "edgecontroller",
            "resource",
            "update",
            "null/configmap/c",
            {"kind": "Node", "metadata": {"uid": "u1", "name": "c"}},
            resource_version=str(MAX_RV),
        )
        store.put_pending("n1", "u1", node_message, "Node", "null", "c")
        store.acknowledged("n1", "u1", MAX_RV, deleted=False)
        record = await self.one(store)
        self.assertEqual((record.acked_version, record.namespace), (MAX_RV, "null"))

    async def test_flush_callers_share_one_commit(self) -> None:
        store = self.make_store()
        put(store, "n1", "u1", "5")
        first, second = store.flush(), store.flush()
        put(store, "n1", "u2", "5")
        third = store.flush()
        await first
        await second
        await third
        self.assertEqual(len(await store.records()), 2)

    async def test_closed_store_refuses_clearly(self) -> None:
        store = self.make_store()
        put(store, "n1", "u1", "5")
        await store.close()
        error = self.assertRaises(StoreClosed, put, store, "n1", "u2", "5")
        self.assertIn("closed", str(error))
        self.assertRaises(StoreClosed, store.acknowledged, "n1", "u1", 5, False)
        self.assertRaises(StoreClosed, store.dropped, "n1", "u1")
        self.assertRaises(StoreClosed, store.note_attempt, "n1", "u1", 1, "")
        self.assertRaises(StoreClosed, store.acknowledged, "n1", "u1", 5, True)
        await self.assertFailure(store.flush(), StoreClosed)
        await self.assertFailure(store.records(), StoreClosed)
        await store.close()  # again: same outcome


class MemorySyncStoreTests(SyncStoreBehaviour, TestCase):
    def make_store(self, clock: Any = None, **options: Any) -> ISyncStore:
        return MemorySyncStore(clock, **options)

    def test_purge_forgets_expired_tombstones_oldest_first(self) -> None:
        clock = Clock()
        store = MemorySyncStore(clock, tombstone_retention=10, purge_interval=5)
        store.acknowledged("n1", "u1", 1, deleted=True)  # t=0; the first write purged
        clock.advance(4)
        store.acknowledged("n1", "u2", 1, deleted=True)  # t=4; no purge before t=5
        clock.advance(7)  # t=11: u1 expired
        store.acknowledged("n1", "u3", 1, deleted=True)  # purges u1
        self.assertEqual(sorted(store._rows), [("n1", "u2"), ("n1", "u3")])
        self.assertEqual(list(store._tombstones), [("n1", "u2"), ("n1", "u3")])
        clock.advance(4)  # t=15: u2 expired, but the next purge is at 16
        store.note_attempt("n9", "x", 1, "")
        self.assertIn(("n1", "u2"), store._rows)
        clock.advance(1)
        store.note_attempt("n9", "x", 1, "")
        self.assertEqual(list(store._rows), [("n1", "u3")])

    def test_without_a_clock_the_wall_clock_dates_tombstones(self) -> None:
        import time

        store = MemorySyncStore()
        before = time.time()
        store.acknowledged("n1", "u1", 1, deleted=True)
        [record] = store.load()
        assert record.deleted_at is not None
        self.assertTrue(before <= record.deleted_at <= time.time())
        self.assertEqual(store.tombstone_retention, 24 * 3600)


class _ClockedReactor:
    """The real reactor, except that ``seconds()`` is a Clock's (dates tombstones)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def seconds(self) -> float:
        return self._clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


# The table as cloudhub wrote it before tombstones (schema version 1), verbatim.
_SCHEMA_VERSION_1 = """
CREATE TABLE sync_record (
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
    PRIMARY KEY (node_id, uid)
)
"""


class SQLiteSyncStoreTests(SyncStoreBehaviour, TestCase):
    """The same behaviour through a real file, a real writer thread and the real reactor."""

    def make_store(
        self, path: str | None = None, clock: Clock | None = None, **options: Any
    ) -> SQLiteSyncStore:
        path = path or os.path.join(self.mktemp(), "data", "cloudhub.db")
        store = SQLiteSyncStore(
            path, reactor if clock is None else _ClockedReactor(clock), **options
        )
        self.addCleanup(store.close)
        return store

    async def test_reopened_file_has_the_same_records_in_order(self) -> None:
        store = self.make_store()
        for index in range(20):
            put(store, f"node-{index % 3}", f"u{index}", str(index + 1), name=f"p{index}")
        for index in range(0, 20, 4):
            store.acknowledged(f"node-{index % 3}", f"u{index}", index + 1, deleted=False)
        store.acknowledged("node-1", "u1", None, deleted=True)
        store.note_attempt("node-2", "u2", 3, "no ACK")
        put(store, "node-0", "u0", "50", name="p0")  # a newer version goes to the back
        before = await store.records()
        await store.close()

        reopened = self.make_store(store.path)
        after = reopened.load()
        self.assertEqual(after, before)
        self.assertEqual(len(after), 20)  # with the tombstone of u1
        self.assertEqual(after[-1].uid, "u0")
        put(reopened, "node-9", "new", "1")
        self.assertGreater((await reopened.records("node-9"))[0].seq, after[-1].seq)

    async def test_file_directory_modes_wal_and_schema_version(self) -> None:
        top = self.mktemp()
        path = os.path.join(top, "a", "b", "cloudhub.db")
        store = self.make_store(path)
        put(store, "n1", "u1", "5")
        await store.flush()
        for directory in (top, os.path.dirname(os.path.dirname(path)), os.path.dirname(path)):
            self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700, directory)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        other = sqlite3.connect(path)
        self.addCleanup(other.close)
        self.assertEqual(other.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(other.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(store._conn.execute("PRAGMA synchronous").fetchone()[0], 1)  # NORMAL
        self.assertEqual(store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0], 4000)

    async def test_synchronous_is_configurable(self) -> None:
        store = self.make_store(synchronous="full")
        self.assertEqual(store.synchronous, "FULL")
        self.assertEqual(store._conn.execute("PRAGMA synchronous").fetchone()[0], 2)
        error = self.assertRaises(StoreError, self.make_store, synchronous="OFF")
        self.assertIn("synchronous must be one of NORMAL, FULL, EXTRA", str(error))

    def test_newer_schema_is_refused(self) -> None:
        path = os.path.join(self.mktemp(), "cloudhub.db")
        self.make_store(path).close()
        connection = sqlite3.connect(path)
        connection.execute("PRAGMA user_version = 99")
        connection.close()
        error = self.assertRaises(StoreSchemaError, SQLiteSyncStore, path, reactor)
        self.assertIn("schema version 99, written by a newer cloudhub", str(error))
        self.assertIn(path, str(error))

    async def test_tombstones_survive_reopening(self) -> None:
        clock = Clock()
        clock.advance(5000)
        store = self.make_store(clock=clock)
        put(store, "n1", "u1", "5")
        store.acknowledged("n1", "u1", 6, deleted=True)
        store.acknowledged("n1", "u2", None, deleted=True)
        before = await store.records()
        await store.close()
        reopened = self.make_store(store.path, clock=clock)
        self.assertEqual(reopened.load(), before)
        self.assertEqual(reopened.deleted_version("n1", "u1"), 6)
        self.assertIsNone(reopened.deleted_version("n1", "u2"))
        self.assertEqual(
            [(r.uid, r.acked_version, r.deleted_at) for r in before],
            [("u1", 6, 5000), ("u2", None, 5000)],
        )

    async def test_expired_tombstones_are_deleted_by_the_first_commit_after_opening(
        self,
    ) -> None:
        clock = Clock()
        store = self.make_store(clock=clock, tombstone_retention=100)
        store.acknowledged("n1", "old", 1, deleted=True)
        clock.advance(50)
        store.acknowledged("n1", "young", 2, deleted=True)
        await store.close()
        clock.advance(60)  # "old" expired at 100, "young" at 150
        reopened = self.make_store(store.path, clock=clock, tombstone_retention=100)
        self.assertEqual([r.uid for r in reopened.load()], ["young"])  # never loaded
        self.assertIsNone(reopened.deleted_version("n1", "old"))
        self.assertEqual(reopened.deleted_version("n1", "young"), 2)
        self.assertEqual(self._raw_uids(store.path), ["old", "young"])  # opening wrote nothing
        put(reopened, "n2", "u1", "1")
        await reopened.flush()
        self.assertEqual(self._raw_uids(store.path), ["u1", "young"])

    async def test_purge_while_running_deletes_expired_rows(self) -> None:
        clock = Clock()
        store = self.make_store(clock=clock, tombstone_retention=10, purge_interval=5)
        store.acknowledged("n1", "u1", 1, deleted=True)
        clock.advance(6)
        store.acknowledged("n1", "u2", 1, deleted=True)
        await store.flush()
        clock.advance(5)  # t=11: u1 expired; a purge is due
        put(store, "n1", "u3", "1")
        await store.flush()
        self.assertEqual(self._raw_uids(store.path), ["u2", "u3"])
        self.assertEqual(list(store._tombstones), [("n1", "u2")])

    def _raw_uids(self, path: str) -> list[str]:
        connection = sqlite3.connect(path)
        try:
            return [
                row[0] for row in connection.execute("SELECT uid FROM sync_record ORDER BY uid")
            ]
        finally:
            connection.close()

    async def test_version_1_file_is_migrated(self) -> None:
        """A file written by cloudhub before tombstones (schema 1) opens, keeps every record,
        and works: tombstones included, after reopening too."""
        path = os.path.join(self.mktemp(), "cloudhub.db")
        os.makedirs(os.path.dirname(path))
        pending = message("u1", "5")
        from cloudhub.store.interfaces import encode_pending

        connection = sqlite3.connect(path)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(_SCHEMA_VERSION_1)
        connection.execute("PRAGMA user_version = 1")
        connection.execute(
            "INSERT INTO sync_record VALUES ('n1', 'u1', 'Pod', 'default', 'nginx', "
            "'default/pod/nginx', '4', ?, 7, 2, 'no ACK')",
            (encode_pending(pending),),
        )
        connection.execute(
            "INSERT INTO sync_record VALUES ('n1', 'u2', 'Pod', 'default', 'web', "
            f"'default/pod/web', '{MAX_RV}', NULL, 3, 0, '')"
        )
        connection.commit()
        connection.close()

        clock = Clock()
        store = self.make_store(path, clock=clock)
        self.assertEqual(store._conn.execute("PRAGMA user_version").fetchone()[0], 2)
        records = store.load()
        self.assertEqual(
            [(r.uid, r.acked_version, r.pending, r.seq, r.attempts, r.deleted_at) for r in records],
            [("u2", MAX_RV, None, 3, 0, None), ("u1", 4, pending, 7, 2, None)],
        )
        store.acknowledged("n1", "u1", 5, deleted=True)
        put(store, "n1", "u3", "1")
        self.assertEqual((await store.records())[-1].seq, 9)  # after the file's highest
        await store.close()
        reopened = self.make_store(path, clock=clock)
        self.assertEqual(reopened.deleted_version("n1", "u1"), 5)
        self.assertEqual(len(reopened.load()), 3)
        indexes = [row[1] for row in reopened._conn.execute("PRAGMA index_list(sync_record)")]
        self.assertIn("sync_record_deleted_at", indexes)

    def test_migrated_and_new_files_have_the_same_columns(self) -> None:
        old = os.path.join(self.mktemp(), "old.db")
        os.makedirs(os.path.dirname(old))
        connection = sqlite3.connect(old)
        connection.execute(_SCHEMA_VERSION_1)
        connection.execute("PRAGMA user_version = 1")
        connection.close()
        migrated = self.make_store(old)
        new = self.make_store()

        def columns(store: SQLiteSyncStore) -> list[tuple[Any, ...]]:
            return list(store._conn.execute("PRAGMA table_info(sync_record)"))

        self.assertEqual(columns(migrated), columns(new))
        self.assertEqual(columns(new)[-1][1:3], ("deleted_at", "REAL"))

    def test_foreign_database_is_refused(self) -> None:
        path = self.mktemp()
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE accounts (id INTEGER)")
        connection.close()
        error = self.assertRaises(StoreSchemaError, SQLiteSyncStore, path, reactor)
        self.assertIn("not a cloudhub sync store (tables: accounts)", str(error))

    def test_file_that_is_not_a_database(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as garbage:
            garbage.write(b"this is not SQLite" * 100)
        error = self.assertRaises(StoreError, SQLiteSyncStore, path, reactor)
        self.assertIn(f"cannot open sync store {path}", str(error))
        self.assertIsInstance(error, CloudHubError)

    def test_directory_that_cannot_be_created(self) -> None:
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        path = os.path.join(blocker, "sub", "cloudhub.db")
        error = self.assertRaises(StoreError, SQLiteSyncStore, path, reactor)
        self.assertIn(f"cannot create the directory {os.path.abspath(blocker)}", str(error))

    def test_corrupt_pending_message_is_named(self) -> None:
        path = os.path.join(self.mktemp(), "cloudhub.db")
        self.make_store(path).close()
        connection = sqlite3.connect(path)
        connection.execute(
            "INSERT INTO sync_record VALUES ('n1', 'u1', 'Pod', 'default', 'p', 'default/pod/p', "
            "NULL, '{\"header\": 5', 1, 0, '', NULL)"
        )
        connection.commit()
        connection.close()
        store = self.make_store(path)
        error = self.assertRaises(StoreError, store.load)
        self.assertIn("pending message of node 'n1' object u1 is corrupt", str(error))

    async def test_sqlite_in_memory_database(self) -> None:
        store = self.make_store(":memory:")
        put(store, "n1", "u1", "5")
        self.assertEqual(len(await store.records()), 1)
        self.assertFalse(os.path.exists(":memory:"))

    def test_load_after_writes_is_refused(self) -> None:
        store = self.make_store()
        put(store, "n1", "u1", "5")
        error = self.assertRaises(StoreError, store.load)
        self.assertIn("use records()", str(error))

    async def test_failed_commit_fails_flush_then_recovers(self) -> None:
        store = self.make_store(connect=flaky_connect, retry_delay=0.1)
        older = put(store, "n1", "u1", "5")
        await store.flush()
        flaky(store).fail_commits = True
        put(store, "n1", "u1", "6")
        store.note_attempt("n1", "u1", 2, "x")
        error = await self.assertFailure(store.flush(), StoreError)
        self.assertIn("commit failed: database or disk is full", str(error))
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        flaky(store).fail_commits = False
        store.acknowledged("n2", "u2", 3, deleted=False)
        # The refused message was rolled back (issue 18); the attempts were kept and written.
        record = await self.one(store)
        self.assertEqual((record.pending, record.attempts), (older, 2))
        self.assertEqual(len(await store.records()), 2)

    async def test_close_reports_a_failed_last_commit(self) -> None:
        store = SQLiteSyncStore(
            os.path.join(self.mktemp(), "cloudhub.db"), reactor, connect=flaky_connect
        )
        flaky(store).fail_commits = True
        put(store, "n1", "u1", "5")
        await self.assertFailure(store.close(), StoreError)
        self.flushLoggedErrors(sqlite3.OperationalError)
        await self.assertFailure(store.close(), StoreError)  # the same outcome again
        self.assertRaises(StoreClosed, put, store, "n1", "u2", "5")

    async def test_many_writes_in_one_turn_are_one_commit(self) -> None:
        store = self.make_store(connect=flaky_connect)
        flaky(store).commits = 0  # not the schema's
        for index in range(1000):
            put(store, f"n{index % 10}", f"u{index}", "1")
            store.acknowledged(f"n{index % 10}", f"u{index}", 1, deleted=False)
            if index % 100 == 0:
                store.flush()  # ten callers, one commit
        await store.flush()
        self.assertEqual((flaky(store).commits, store.batches_committed), (1, 1))
        self.assertEqual(store.changes_committed, 1000)

    async def test_kill_9_loses_nothing_flushed(self) -> None:
        """A hub killed with SIGKILL keeps every write a flush() confirmed; the file is sound."""
        path = os.path.join(self.mktemp(), "cloudhub.db")
        count = 3000
        child = _KilledWriter()
        root = os.path.dirname(os.path.dirname(os.path.abspath(cloudhub.__file__)))
        environment = {**os.environ, "PYTHONPATH": root}
        reactor.spawnProcess(  # type: ignore[attr-defined]
            child,
            sys.executable,
            [sys.executable, "-c", _WRITER_SCRIPT, path, str(count)],
            env=environment,
        )
        await child.flushed
        await deferLater(reactor, 0.3, lambda: None)  # it keeps writing, unflushed
        assert child.transport is not None
        child.transport.signalProcess("KILL")
        reason = await child.ended
        assert isinstance(reason, ProcessTerminated), reason
        self.assertEqual(reason.signal, signal.SIGKILL)
        self.assertIn(b"writing more", child.output)

        check = sqlite3.connect(path)
        self.assertEqual(check.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        check.close()
        store = self.make_store(path)
        records = {(r.node_id, r.uid): r for r in store.load()}  # decodes every message
        for index in range(count):
            record = records[(f"node-{index % 7}", f"u{index}")]
            if index % 3 == 0:
                self.assertEqual((record.pending, record.acked_version), (None, index + 1))
            else:
                assert record.pending is not None
                self.assertEqual(record.pending.resource_version, str(index + 1))
        self.assertGreater(len(records), count)  # and some of what came after


class SQLiteSmallChunksTests(SQLiteSyncStoreTests):
    """The same again with JSON statements of a few rows each (big batches are cut up)."""

    def setUp(self) -> None:
        import cloudhub.store.sqlite as sqlite_module

        self.patch(sqlite_module, "JSON_CHUNK_CHARS", 300)


class SQLiteWithoutJsonTests(SQLiteSyncStoreTests):
    """The same again as on an SQLite without JSON functions or UPDATE ... FROM (< 3.33)."""

    def setUp(self) -> None:
        import cloudhub.store.sqlite as sqlite_module

        self.patch(sqlite_module, "JSON_ROWS", False)


class _KilledWriter(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.flushed: Deferred[None] = Deferred()
        self.ended: Deferred[BaseException] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"writing more" in self.output and not self.flushed.called:
            self.flushed.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        if not self.flushed.called:
            self.flushed.errback(AssertionError(f"writer ended early: {self.output!r}"))
        self.ended.callback(reason.value)  # type: ignore[arg-type]


_WRITER_SCRIPT = """
import sys
# What a hub sets while it runs (cloudhub.tuning): behind this script's busy loop, the
# writer thread would wait 5 ms for the GIL after every call into SQLite and fall behind.
sys.setswitchinterval(0.001)
from twisted.internet import reactor
from cloudhub.model import Message
from cloudhub.store.sqlite import SQLiteSyncStore

path, count = sys.argv[1], int(sys.argv[2])
store = SQLiteSyncStore(path, reactor)

def write(index):
    uid, name = f"u{index}", f"p{index}"
    content = {"kind": "Pod", "metadata": {"uid": uid, "name": name, "namespace": "default"}}
    sent = Message.new("edgecontroller", "resource", "update", f"default/pod/{name}", content,
                       resource_version=str(index + 1))
    node = f"node-{index % 7}"
    store.put_pending(node, uid, sent, "Pod", "default", name)
    if index % 3 == 0:
        store.acknowledged(node, uid, index + 1, deleted=False)

def first():
    for index in range(count):
        write(index)
        if index % 500 == 499:
            store.flush()  # batches of several turns' worth, as a busy hub has
    store.flush().addCallback(flushed)

def flushed(_):
    print("flushed", flush=True)
    more(count)

def more(start):
    if start == count:
        print("writing more", flush=True)
    for index in range(start, start + 300):
        write(index)
    reactor.callLater(0, more, start + 300)

reactor.callWhenRunning(first)
reactor.run()
"""


# --- batching, deterministically ----------------------------------------------------------------


class SQLiteBatchingTests(SynchronousTestCase):
    """The batch rules, with a Clock for the reactor and a writer thread run by hand."""

    def setUp(self) -> None:
        self.clock = ThreadlessReactor()
        self.pool = ManualPool()
        self.store = SQLiteSyncStore(
            os.path.join(self.mktemp(), "cloudhub.db"),
            self.clock,
            connect=flaky_connect,
            threadpool=self.pool,  # type: ignore[arg-type]
            retry_delay=2.0,
        )
        flaky(self.store).commits = 0  # not the schema's

    def tearDown(self) -> None:
        self.pool.run_at_once = True
        self.pool.run_all()
        self.clock.advance(10)
        closed = self.store.close()
        self.pool.run_all()
        self.successResultOf(closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_writes_during_a_commit_form_the_next_batch(self) -> None:
        put(self.store, "n1", "u1", "1")
        self.assertEqual(self.pool.jobs, [])  # nothing before the next turn
        self.clock.advance(0)
        self.assertEqual(len(self.pool.jobs), 1)  # batch 1 committing
        put(self.store, "n1", "u2", "1")
        put(self.store, "n1", "u3", "1")
        waiting = self.store.flush()
        self.clock.advance(0)
        self.assertEqual(len(self.pool.jobs), 1)  # still batch 1: one commit at a time
        self.pool.run_next()  # batch 1 done; batch 2 starts at once
        self.assertNoResult(waiting)
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.run_next()
        self.successResultOf(waiting)
        self.assertEqual(
            (self.store.batches_committed, self.store.changes_committed, flaky(self.store).commits),
            (2, 3, 2),
        )

    def test_flush_with_nothing_buffered_waits_for_the_commit_in_flight(self) -> None:
        put(self.store, "n1", "u1", "1")
        self.clock.advance(0)
        waiting = self.store.flush()
        self.assertNoResult(waiting)
        self.pool.run_next()
        self.successResultOf(waiting)
        self.successResultOf(self.store.flush())  # nothing owed: at once

    def test_failed_commit_is_retried_after_the_delay(self) -> None:
        flaky(self.store).fail_commits = True
        put(self.store, "n1", "u1", "1")
        first = self.store.flush()
        self.clock.advance(0)
        self.pool.run_next()
        self.failureResultOf(first, StoreError)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        flaky(self.store).fail_commits = False
        second = self.store.flush()
        self.clock.advance(1.9)
        self.assertEqual(self.pool.jobs, [])  # not before retry_delay
        self.clock.advance(0.1)
        self.pool.run_next()
        self.successResultOf(second)
        self.assertEqual(self.store.commit_failures, 1)

    def test_failed_batch_goes_under_the_writes_that_came_since(self) -> None:
        put(self.store, "n1", "u1", "1")
        put(self.store, "n1", "u2", "1")
        self.clock.advance(0)
        self.pool.run_next()
        self.store.note_attempt("n1", "u1", 3, "timeout")  # batch that will fail
        self.store.acknowledged("n1", "u2", None, deleted=True)
        self.clock.advance(0)
        self.store.dropped("n1", "u1")  # written while it commits
        newer = put(self.store, "n1", "u2", "5")
        flaky(self.store).fail_commits = True
        self.pool.run_next()
        self.flushLoggedErrors(sqlite3.OperationalError)
        flaky(self.store).fail_commits = False
        self.clock.advance(2)
        self.pool.run_next()
        records = {r.uid: r for r in self.store.load()}
        self.assertEqual(
            (records["u1"].pending, records["u1"].attempts, records["u1"].last_error),
            (None, 3, "timeout"),
        )
        self.assertEqual((records["u2"].pending, records["u2"].acked_version), (newer, None))

    def test_reactor_shutdown_closes_the_store(self) -> None:
        """The writer thread must not outlive the reactor, nor a clean stop lose writes."""
        reactor = ShuttingDownReactor()
        pool = ManualPool(run_at_once=True)
        path = os.path.join(self.mktemp(), "cloudhub.db")
        store = SQLiteSyncStore(path, reactor, threadpool=pool)  # type: ignore[arg-type]
        self.assertEqual(reactor.triggers, {})  # no thread yet, nothing to stop
        put(store, "n1", "u1", "1")
        reactor.advance(0)
        [(phase, event, trigger)] = reactor.triggers.values()
        self.assertEqual((phase, event), ("before", "shutdown"))
        put(store, "n1", "u2", "1")  # not flushed by anyone: shutdown writes it
        self.successResultOf(trigger())
        self.assertTrue(pool.stopped)
        self.assertRaises(StoreClosed, put, store, "n1", "u3", "1")
        reopened = SQLiteSyncStore(path, self.clock)
        self.assertEqual([r.uid for r in reopened.load()], ["u1", "u2"])
        self.successResultOf(reopened.close())

    def test_close_removes_the_shutdown_trigger(self) -> None:
        reactor = ShuttingDownReactor()
        store = SQLiteSyncStore(
            os.path.join(self.mktemp(), "cloudhub.db"),
            reactor,
            threadpool=ManualPool(run_at_once=True),  # type: ignore[arg-type]
        )
        put(store, "n1", "u1", "1")
        reactor.advance(0)
        self.assertEqual(len(reactor.triggers), 1)
        self.successResultOf(store.close())
        self.assertEqual(reactor.triggers, {})

    def test_close_commits_at_once_despite_retry_delay(self) -> None:
        put(self.store, "n1", "u1", "1")
        self.clock.advance(0)
        self.pool.run_next()
        flaky(self.store).fail_commits = True
        self.store.acknowledged("n1", "u1", 1, deleted=False)  # kept when its commit fails
        put(self.store, "n1", "u2", "1")  # refused: rolled back
        self.clock.advance(0)
        self.pool.run_next()
        self.flushLoggedErrors(sqlite3.OperationalError)
        flaky(self.store).fail_commits = False
        closed = self.store.close()
        self.pool.run_all()
        self.successResultOf(closed)
        self.assertTrue(self.pool.stopped)
        reopened = SQLiteSyncStore(self.store.path, self.clock)
        self.assertEqual(
            [(r.uid, r.pending, r.acked_version) for r in reopened.load()], [("u1", None, 1)]
        )
        self.successResultOf(reopened.close())


# --- the SQLite store is the memory store, however writes fall into batches --------------------

_NODES = ("a", "b")
_UIDS = ("u1", "u2", "u3")
_key = st.tuples(st.sampled_from(_NODES), st.sampled_from(_UIDS))
_ALL_KEYS = [(node, uid) for node in _NODES for uid in _UIDS]
_operation = st.one_of(
    st.tuples(st.just("put"), _key, st.integers(1, 9)),
    st.tuples(st.just("ack"), _key, st.one_of(st.none(), st.integers(1, MAX_RV))),
    st.tuples(st.just("ack_delete"), _key, st.one_of(st.none(), st.integers(1, MAX_RV))),
    st.tuples(st.just("drop"), _key),
    st.tuples(st.just("attempt"), _key, st.integers(0, 5), st.sampled_from(["", "timeout"])),
    st.tuples(st.just("turn")),  # a reactor turn: a batch starts unless one is committing
    st.tuples(st.just("commit")),  # the writer thread commits the batch in flight
    st.tuples(st.just("failed_commit")),  # ... or fails to
)


class SQLiteMatchesMemoryTests(SynchronousTestCase):
    """Any interleaving of writes, turns, commits and failed commits ends as applying the writes
    one by one does (the in-memory store), in the file and after reopening it; but the
    put_pending writes of a failed commit, which were refused (issue 18: rolled back).

    Tombstones included: with the default retention none expires; with a 3 s retention and a
    5 s purge interval (each turn is 1 s) they expire, are purged, and are written to while
    expired but not yet purged."""

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_operation, max_size=50))
    def test_same_records(self, operations: list[tuple[Any, ...]]) -> None:
        self.check(operations, {})

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_operation, max_size=50))
    @example([("ack_delete", ("a", "u1"), 6), *[("turn",)] * 3, ("put", ("a", "u1"), 3)])
    def test_same_records_with_expiring_tombstones(self, operations: list[tuple[Any, ...]]) -> None:
        self.check(operations, {"tombstone_retention": 3.0, "purge_interval": 5.0})

    def check(self, operations: list[tuple[Any, ...]], timing: dict[str, float]) -> None:
        clock = ThreadlessReactor()
        pool = ManualPool()
        path = os.path.join(self.mktemp(), "cloudhub.db")
        store = SQLiteSyncStore(
            path,
            clock,
            connect=flaky_connect,
            threadpool=pool,  # type: ignore[arg-type]
            retry_delay=1.0,
            **timing,
        )
        # Which batch each put went to (the buffer it joined), and which batches failed.
        buffers: list[Any] = []  # kept alive, so that their ids stay theirs
        put_in: dict[int, int] = {}  # index of a put operation -> id of its buffer
        failed: set[int] = set()
        commit_failed = store._commit_failed

        def failing(failure: Failure, batch: Any) -> None:
            failed.add(id(batch.changes))
            buffered = id(store._buffer)
            commit_failed(failure, batch)
            # What was buffered goes on in a new buffer (under the kept writes).
            buffers.append(store._buffer)
            for index, buffer in put_in.items():
                if buffer == buffered:
                    put_in[index] = id(store._buffer)

        store._commit_failed = failing  # type: ignore[method-assign]
        messages: dict[int, Message] = {}
        for index, operation in enumerate(operations):
            kind = operation[0]
            if kind == "turn":
                clock.advance(1)  # 1: past the retry delay too
            elif kind == "commit":
                pool.run_all()
            elif kind == "failed_commit":
                flaky(store).fail_commits = True
                pool.run_all()
                flaky(store).fail_commits = False
            else:
                if kind == "put":  # one message for both, so the two records compare equal
                    messages[index] = message(operation[1][1], str(operation[2]))
                    operation = (*operation, messages[index])
                _apply(store, operation)
                if kind == "put":
                    buffers.append(store._buffer)
                    put_in[index] = id(store._buffer)
        flushed = store.flush()
        for _ in range(5):
            pool.run_all()
            clock.advance(1)
        self.successResultOf(flushed)
        self.flushLoggedErrors(sqlite3.OperationalError)
        # The reference: the same writes at the same times, but the refused puts.
        store_clock, clock = clock, ThreadlessReactor()
        reference = MemorySyncStore(clock, **timing)
        for index, operation in enumerate(operations):
            kind = operation[0]
            if kind == "turn":
                clock.advance(1)
            elif kind == "put" and put_in[index] in failed:
                reference._next_seq()  # the store took a seq for it too
            elif kind not in ("commit", "failed_commit"):
                if kind == "put":
                    operation = (*operation, messages[index])
                _apply(reference, operation)
        clock.advance(store_clock.seconds() - clock.seconds())  # the final flush's turns
        expected = reference.load()
        self.assertEqual(store.load(), expected)
        self.assertEqual(
            [store.deleted_version(*key) for key in _ALL_KEYS],
            [reference.deleted_version(*key) for key in _ALL_KEYS],
        )
        closed = store.close()
        pool.run_all()
        self.successResultOf(closed)
        reopened = SQLiteSyncStore(path, clock, **timing)
        self.assertEqual(reopened.load(), expected)
        self.assertEqual(
            [reopened.deleted_version(*key) for key in _ALL_KEYS],
            [reference.deleted_version(*key) for key in _ALL_KEYS],
        )
        self.successResultOf(reopened.close())


def _apply(store: ISyncStore, operation: tuple[Any, ...]) -> None:
    kind, (node, uid) = operation[0], operation[1]
    if kind == "put":
        store.put_pending(node, uid, operation[3], "Pod", "default", "nginx")
    elif kind == "ack":
        store.acknowledged(node, uid, operation[2], deleted=False)
    elif kind == "ack_delete":
        store.acknowledged(node, uid, operation[2], deleted=True)
    elif kind == "drop":
        store.dropped(node, uid)
    else:
        store.note_attempt(node, uid, operation[2], operation[3])


class OpenStoreTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        self.assertIsInstance(open_store("memory", "", reactor), MemorySyncStore)
        store = open_store("sqlite", os.path.join(self.mktemp(), "x.db"), reactor)
        self.assertIsInstance(store, SQLiteSyncStore)
        self.successResultOf(store.close())
        error = self.assertRaises(StoreError, open_store, "redis", "", reactor)
        self.assertIn("unknown sync store type 'redis'", str(error))
