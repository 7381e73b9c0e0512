"""A 503 means "not accepted", always (issue 18, finding 4).

A commit that fails (a full disk) refuses every message it carried: the callers were told
503 / ``error``, so those messages are rolled back, in the store and in the node queues, and
never committed or delivered later; an older version they had replaced is owed again.
Acknowledgements and attempts of that commit are tried again. While commits fail, readiness
says so and the log says it once, then once a minute, then once when it recovers.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import cloudhub.store.sqlite as sqlite_module
from cloudhub.errors import Superseded
from cloudhub.handler import MessageHandle
from cloudhub.model import Message
from cloudhub.store import RolledBack, SQLiteSyncStore, StoreError

from .test_api import ApiTestCase, pod_body, wait_for
from .test_store import ManualPool, ThreadlessReactor, flaky, flaky_connect, message, put


class _Harness(SynchronousTestCase):
    """A SQLite store on a Clock, its writer thread run by hand, commits failing on demand."""

    def setUp(self) -> None:
        self.clock = ThreadlessReactor()
        self.pool = ManualPool()
        self.store = SQLiteSyncStore(
            os.path.join(self.mktemp(), "cloudhub.db"),
            self.clock,
            connect=flaky_connect,
            threadpool=self.pool,  # type: ignore[arg-type]
            retry_delay=2.0,
            log_interval=10.0,
        )
        self.rolled_back: list[RolledBack] = []
        self.store.on_rollback = self.rolled_back.extend

    def tearDown(self) -> None:
        flaky(self.store).fail_commits = False
        self.pool.run_at_once = True
        self.pool.run_all()
        self.clock.advance(10)
        closed = self.store.close()
        self.pool.run_all()
        self.successResultOf(closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def commit(self, fail: bool = False, delay: float = 0) -> None:
        """The next batch (after ``delay``) commits, or fails to."""
        self.clock.advance(delay)
        flaky(self.store).fail_commits = fail
        self.pool.run_next()
        flaky(self.store).fail_commits = False
        if fail:
            self.flushLoggedErrors(sqlite3.OperationalError)

    def pending(self) -> dict[str, Message | None]:
        return {r.uid: r.pending for r in self.store.load()}


class StoreRollbackTests(_Harness):
    def test_puts_of_a_failed_commit_are_never_written(self) -> None:
        first = put(self.store, "n1", "u1", "1")
        self.commit()
        put(self.store, "n1", "u2", "1")
        refused = self.store.flush()
        self.commit(fail=True)
        self.failureResultOf(refused, StoreError)
        self.assertEqual([(r.uid, r.record) for r in self.rolled_back], [("u2", None)])
        self.commit(delay=2)  # a probe: nothing was kept
        self.assertEqual(self.pending(), {"u1": first})
        self.assertEqual(self.store.messages_rolled_back, 1)

    def test_acks_and_attempts_of_a_failed_commit_are_tried_again(self) -> None:
        put(self.store, "n1", "u1", "1")
        put(self.store, "n1", "u2", "1")
        self.commit()
        self.store.note_attempt("n1", "u1", 3, "timeout")
        self.store.acknowledged("n1", "u2", 1, deleted=False)
        put(self.store, "n1", "u3", "1")
        self.commit(fail=True)
        self.commit(delay=2)
        records = {r.uid: r for r in self.store.load()}
        self.assertEqual(sorted(records), ["u1", "u2"])
        self.assertEqual((records["u1"].attempts, records["u1"].last_error), (3, "timeout"))
        self.assertEqual((records["u2"].pending, records["u2"].acked_version), (None, 1))

    def test_a_rolled_back_version_leaves_the_one_it_replaced_owed(self) -> None:
        older = put(self.store, "n1", "u1", "5")
        self.commit()
        newer = put(self.store, "n1", "u1", "6")
        self.commit(fail=True)
        [item] = self.rolled_back
        self.assertEqual((item.uid, item.msg_id), ("u1", newer.msg_id))
        assert item.record is not None
        self.assertEqual(item.record.pending, older)
        self.commit(delay=2)
        self.assertEqual(self.pending(), {"u1": older})

    def test_writes_since_the_failed_commit_are_kept(self) -> None:
        put(self.store, "n1", "u1", "5")
        self.commit()
        failed = put(self.store, "n1", "u1", "6")
        self.clock.advance(0)  # committing ...
        latest = put(self.store, "n1", "u1", "7")  # ... while these come in
        other = put(self.store, "n1", "u2", "1")
        flaky(self.store).fail_commits = True
        self.pool.run_next()
        flaky(self.store).fail_commits = False
        self.flushLoggedErrors(sqlite3.OperationalError)
        [item] = self.rolled_back
        self.assertEqual(item.msg_id, failed.msg_id)
        assert item.record is not None
        self.assertEqual(item.record.pending, latest)  # what the store will hold
        self.commit(delay=2)
        self.assertEqual(self.pending(), {"u1": latest, "u2": other})

    def test_a_rolled_back_recreate_leaves_the_tombstone(self) -> None:
        put(self.store, "n1", "u1", "5")
        self.store.acknowledged("n1", "u1", 5, deleted=True)
        self.commit()
        self.assertEqual(self.store.deleted_version("n1", "u1"), 5)
        put(self.store, "n1", "u1", "6")
        self.assertIsNone(self.store.deleted_version("n1", "u1"))
        self.commit(fail=True)
        self.assertEqual(self.store.deleted_version("n1", "u1"), 5)
        self.commit(delay=2)
        [record] = self.store.load()
        self.assertEqual((record.pending, record.acked_version), (None, 5))
        self.assertIsNotNone(record.deleted_at)

    def test_failing_until_a_commit_succeeds_probing_meanwhile(self) -> None:
        self.assertIsNone(self.store.failing)
        put(self.store, "n1", "u1", "1")
        self.commit(fail=True)
        self.assertIn("database or disk is full", self.store.failing or "")
        self.clock.advance(1.9)
        self.assertEqual(self.pool.jobs, [])
        self.commit(fail=True, delay=0.1)  # a probe, though nothing is buffered
        self.assertIsNotNone(self.store.failing)
        self.successResultOf(self.store.flush())  # nothing handed in: nothing to wait for
        self.commit(delay=2)
        self.assertIsNone(self.store.failing)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no more probes
        self.assertEqual(self.pending(), {})

    def test_failures_are_logged_once_then_once_per_interval(self) -> None:
        events: list[LogEvent] = []

        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") == sqlite_module.log.namespace:
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        put(self.store, "n1", "u1", "1")
        self.clock.advance(0)
        flaky(self.store).fail_commits = True
        for _ in range(12):  # 24 s of failures, a commit every 2 s
            self.pool.run_next()
            self.clock.advance(2)
        flaky(self.store).fail_commits = False
        self.pool.run_next()
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        with_traceback = [e for e in events if "log_failure" in e]
        self.assertEqual(len(with_traceback), 1)
        lines = [e for e in events if "log_failure" not in e]
        self.assertEqual(len(lines), 3)  # at 10 s, at 20 s, and the recovery
        self.assertEqual(lines[0]["count"], 5)
        self.assertIn("succeed again", lines[-1]["log_format"])


class HandleRollbackTests(_Harness):
    """The node queues forget what was rolled back, and owe again what it replaced."""

    def setUp(self) -> None:
        super().setUp()
        self.handle = MessageHandle(self.clock, store=self.store)

    def send(self, uid: str, rv: str) -> tuple[Message, Deferred[Message]]:
        sent = message(uid, rv)
        return sent, self.handle.send("edge-1", sent)

    def test_send_fails_and_the_older_version_is_owed_again(self) -> None:
        older, first = self.send("u1", "5")
        self.commit()
        newer, second = self.send("u1", "6")
        self.failureResultOf(first, Superseded)
        flushed = self.handle.flush()
        self.commit(fail=True)
        self.failureResultOf(flushed, StoreError)
        error = self.failureResultOf(second, StoreError)
        self.assertIn("not accepted", str(error.value))
        queue = self.handle.queues["edge-1"]
        self.assertEqual(queue.pending["u1"].message.msg_id, older.msg_id)
        self.assertEqual(list(queue.ready), ["u1"])
        self.assertNotIn(newer.msg_id, queue.by_msg_id)
        # The older version is delivered and acknowledged as usual.
        self.assertIsNotNone(queue.acknowledge(older.msg_id))
        self.commit(delay=2)
        [record] = self.store.load()
        self.assertEqual((record.pending, record.acked_version), (None, 5))

    def test_a_new_object_rolled_back_is_not_owed(self) -> None:
        _, sent = self.send("u1", "1")
        self.commit(fail=True)
        self.failureResultOf(sent, StoreError)
        queue = self.handle.queues["edge-1"]
        self.assertEqual((queue.depth, queue.ready, queue.by_msg_id), (0, {}, {}))
        self.commit(delay=2)
        self.assertEqual(self.pending(), {})
        again = self.handle.send("edge-1", message("u1", "1"))  # sent again: accepted
        self.assertNoResult(again)
        self.assertEqual(queue.depth, 1)
        self.commit()
        self.assertEqual(list(self.pending()), ["u1"])

    def test_store_failing_follows_the_store(self) -> None:
        self.assertIsNone(self.handle.store_failing)
        _, sent = self.send("u1", "1")
        self.commit(fail=True)
        self.failureResultOf(sent, StoreError)
        self.assertIn("disk is full", self.handle.store_failing or "")
        self.commit(delay=2)
        self.assertIsNone(self.handle.store_failing)


class _FullDisk:
    """``_write_batch`` failing as on a full disk while ``full``, for a real hub's store."""

    def __init__(self, only: str = "") -> None:
        self.full = False
        self.only = only  # fail only the commits that write an object whose uid has this
        self._write = sqlite_module._write_batch

    def __call__(self, conn: sqlite3.Connection, changes: Any, *args: Any) -> None:
        if self.full and (not self.only or any(self.only in uid for _, uid in changes)):
            raise sqlite3.OperationalError("database or disk is full")
        self._write(conn, changes, *args)


class ApiRefusalTests(ApiTestCase):
    async def test_503_is_never_delivered_later(self) -> None:
        disk = _FullDisk()
        self.patch(sqlite_module, "_write_batch", disk)
        await self.start_hub()
        first = await self.post("edge-1", pod_body("uid-a", "1", name="a"))
        self.assertEqual(first.code, 202)

        disk.full = True
        newer = await self.post("edge-1", pod_body("uid-a", "2", "update", name="a"))
        self.assertEqual(newer.code, 503, newer.body)
        other = await self.post("edge-1", pod_body("uid-b", "1", name="b"))
        self.assertEqual(other.code, 503)
        waited = await self.post("edge-1", pod_body("uid-c", "1", name="c"), "?wait=ack&timeout=5")
        self.assertEqual(waited.code, 503)
        batch = await self.call(
            b"POST", "/v1/messages", [{"node": "edge-1", "message": pod_body("uid-d", "1")}]
        )
        self.assertEqual(batch.code, 503)  # nothing accepted
        ready = await self.call(b"GET", "/readyz")
        self.assertEqual(ready.code, 503)
        self.assertEqual(ready.json["status"], "not ready")
        self.assertIn("sync store failing (database or disk is full)", ready.json["reason"])
        health = await self.call(b"GET", "/healthz")
        self.assertEqual(health.code, 200)
        self.assertIn("sync store failing", health.json["degraded"])
        self.assertIsNotNone(self.hub.handle.store_failing)

        disk.full = False  # space freed: a probe commit succeeds within a second
        await wait_for(lambda: self.hub.handle.store_failing is None)
        ready = await self.call(b"GET", "/readyz")
        self.assertEqual((ready.code, ready.json), (200, {"status": "ok"}))
        objects = await self.objects("edge-1")
        self.assertEqual(
            [(o["uid"], o["pending_version"]) for o in objects], [("uid-a", "1")]
        )  # accepted before: kept; refused: not there
        node = await self.join("edge-1")
        await wait_for(lambda: node.store.get("default/pod/a") is not None)
        self.assertEqual(node.store.get("default/pod/a").resource_version, "1")
        await wait_for(lambda: not self.hub.handle.queues["edge-1"].pending)
        for name in ("b", "c", "nginx"):
            self.assertIsNone(node.store.get(f"default/pod/{name}"))
        self.flushLoggedErrors(sqlite3.OperationalError)

    async def test_a_batch_reports_the_entries_of_a_failed_commit_as_errors(self) -> None:
        from cloudhub import api as api_module

        self.patch(api_module, "BATCH_SLICE", 2)
        disk = _FullDisk(only="bad")
        self.patch(sqlite_module, "_write_batch", disk)
        await self.start_hub()
        disk.full = True
        uids = ["uid-ok1", "uid-ok2", "uid-bad3", "uid-ok4"]
        entries = [{"node": "edge-1", "message": pod_body(uid, "1", name=uid[4:])} for uid in uids]
        reply = await self.call(b"POST", "/v1/messages", entries)
        self.assertEqual(reply.code, 200, reply.body)
        results = reply.json["results"]
        self.assertEqual([r["status"] for r in results], ["accepted", "accepted", "error", "error"])
        self.assertIn("not accepted", results[2]["error"])
        self.assertEqual((reply.json["accepted"], reply.json["refused"]), (2, 2))
        disk.full = False
        await wait_for(lambda: self.hub.handle.store_failing is None)
        objects = await self.objects("edge-1")
        self.assertEqual(sorted(o["uid"] for o in objects), ["uid-ok1", "uid-ok2"])
        self.assertEqual(sorted(self.hub.handle.queues["edge-1"].pending), ["uid-ok1", "uid-ok2"])
        self.flushLoggedErrors(sqlite3.OperationalError)
