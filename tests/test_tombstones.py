"""Tombstones: an acknowledged delete is remembered, so a late older version cannot bring the
object back (issue 18, finding 2; protocol §6.3–§6.4).

Driven through MessageHandle with a fake connection and a ``Clock``; the SQLite store runs its
writer thread by hand (``ManualPool``), so a restart is: close the store, open the file again,
build a new MessageHandle from what it loads.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub import model
from cloudhub.errors import StaleMessage, Superseded
from cloudhub.handler import MessageHandle
from cloudhub.model import Message
from cloudhub.queue import NodeQueue
from cloudhub.store import ISyncStore, MemorySyncStore, SQLiteSyncStore, open_store
from cloudhub.upstream import Upstream

from .fakes import FakeConnection, pod, pod_message
from .test_api import ApiHarness, pod_body
from .test_store import ManualPool, ThreadlessReactor

RETENTION = 3600.0


def rvless_delete(uid: str) -> Message:
    """A delete without a resourceVersion (allowed for deletes, §6.3 step 5)."""
    return Message.new(
        "edgecontroller",
        "resource",
        "delete",
        "default/pod/nginx",
        pod(uid, ""),
        resource_version="",
    )


class TombstoneHubTests(SynchronousTestCase):
    """The rules through the hub, on the in-memory store (SQLite variant below)."""

    def setUp(self) -> None:
        self.clock = ThreadlessReactor()
        self.store = self.open_store()

    def open_store(self) -> ISyncStore:
        return MemorySyncStore(self.clock, tombstone_retention=RETENTION, purge_interval=10**9)

    def restart(self) -> None:
        """A new MessageHandle from what the store keeps (the memory store lives on)."""

    def hub(self) -> Upstream:
        self.handle = MessageHandle(self.clock, store=self.store)
        return Upstream(self.handle)

    def settle(self) -> None:
        self.clock.advance(0)

    def flush(self, upstream: Upstream) -> None:
        flushed = upstream.flush()
        self.settle()
        self.successResultOf(flushed)

    def deliver(self, upstream: Upstream, message: Message) -> None:
        """Send ``message`` to a connected edge-1 and ACK it."""
        result = upstream.send("edge-1", message)
        self.settle()
        connection = self.handle.sessions["edge-1"].connection
        assert isinstance(connection, FakeConnection)
        self.assertEqual(connection.sent[-1].msg_id, result and connection.sent[-1].msg_id)
        self.handle.message_received(connection, model.new_ack(connection.sent[-1]))
        self.settle()
        self.successResultOf(result)

    def connect(self) -> FakeConnection:
        connection = FakeConnection("edge-1")
        self.handle.connection_made(connection)
        return connection

    def test_late_older_version_after_acked_delete_is_stale(self) -> None:
        """The headline: insert rv5 ACKed, delete rv6 ACKed, a late rv5 is refused (409)."""
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, pod_message("u1", "5", "insert"))
        self.deliver(upstream, pod_message("u1", "6", "delete"))
        refused = self.failureResultOf(upstream.send("edge-1", pod_message("u1", "5")))
        refused.trap(StaleMessage)
        self.assertEqual((refused.value.acked, refused.value.pending), ("6", None))
        # Nothing new was sent to the edge nor stored as owed.
        self.assertEqual(self.handle.queues["edge-1"].pending, {})

    def test_late_older_version_after_restart_is_stale_newer_accepted(self) -> None:
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, pod_message("u1", "5", "insert"))
        self.deliver(upstream, pod_message("u1", "6", "delete"))
        self.flush(upstream)
        self.restart()
        upstream = self.hub()
        for late in ("5", "6"):
            self.failureResultOf(upstream.send("edge-1", pod_message("u1", late)), StaleMessage)
        connection = self.connect()
        self.deliver(upstream, pod_message("u1", "7", "insert"))  # a re-create: newer
        self.assertEqual(connection.sent[-1].resource_version, "7")
        self.failureResultOf(upstream.send("edge-1", pod_message("u1", "6")), StaleMessage)

    def records(self) -> dict[str, Any]:
        self.settle()
        result = self.store.records("edge-1")
        self.settle()
        return {r.uid: r for r in self.successResultOf(result)}

    def test_newer_version_after_the_delete_is_accepted_and_ends_the_tombstone(self) -> None:
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, pod_message("u1", "5", "insert"))
        self.deliver(upstream, pod_message("u1", "6", "delete"))
        self.assertIsNotNone(self.records()["u1"].deleted_at)
        recreated = upstream.send("edge-1", pod_message("u1", "7", "insert"))
        record = self.records()["u1"]
        self.assertEqual((record.deleted_at, record.acked_version), (None, 6))
        assert record.pending is not None
        self.assertEqual(record.pending.resource_version, "7")
        self.assertIsNone(self.store.deleted_version("edge-1", "u1"))
        # Owed and not yet acknowledged: the pending version is the one to beat.
        refused = self.failureResultOf(upstream.send("edge-1", pod_message("u1", "7")))
        self.assertEqual((refused.value.acked, refused.value.pending), ("6", "7"))
        connection = self.handle.sessions["edge-1"].connection
        self.handle.message_received(connection, model.new_ack(connection.sent[-1]))  # type: ignore[arg-type]
        self.settle()
        self.successResultOf(recreated)
        self.assertEqual(self.records()["u1"].acked_version, 7)
        self.restart()
        upstream = self.hub()
        self.failureResultOf(upstream.send("edge-1", pod_message("u1", "7")), StaleMessage)
        upstream.send("edge-1", pod_message("u1", "8"))

    def test_refused_in_a_batch_too(self) -> None:
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, pod_message("u1", "5", "insert"))
        self.deliver(upstream, pod_message("u1", "6", "delete"))
        results = upstream.send_many(
            [("edge-1", pod_message("u1", "4")), ("edge-1", pod_message("u2", "1"))]
        )
        self.assertIsInstance(results[0], StaleMessage)
        self.assertIsNone(results[1])
        self.assertEqual(self.handle.stats.refused_stale, 1)

    def test_late_retry_of_the_delete_itself_is_stale_newer_delete_accepted(self) -> None:
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, pod_message("u1", "6", "delete"))
        self.failureResultOf(
            upstream.send("edge-1", pod_message("u1", "6", "delete")), StaleMessage
        )
        self.deliver(upstream, pod_message("u1", "9", "delete"))
        self.assertEqual(self.store.deleted_version("edge-1", "u1"), 9)

    def test_delete_without_version_keeps_the_last_acknowledged_one(self) -> None:
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, pod_message("u1", "5", "insert"))
        self.deliver(upstream, rvless_delete("u1"))
        self.assertEqual(self.store.deleted_version("edge-1", "u1"), 5)
        refused = self.failureResultOf(upstream.send("edge-1", pod_message("u1", "5")))
        self.assertEqual(refused.value.acked, "5")
        self.deliver(upstream, pod_message("u1", "6"))

    def test_delete_without_version_covers_the_version_it_replaced(self) -> None:
        """rv5 acknowledged, rv7 owed (never acknowledged), then a delete without a version:
        rv7 was accepted before the delete, so a late rv7 must not come back either."""
        upstream = self.hub()
        connection = self.connect()
        self.deliver(upstream, pod_message("u1", "5", "insert"))
        self.handle.connection_lost(connection, "gone")
        replaced = upstream.send("edge-1", pod_message("u1", "7"))
        upstream.send("edge-1", rvless_delete("u1"))
        self.failureResultOf(replaced, Superseded)
        self.connect()
        self.settle()
        connection = self.handle.sessions["edge-1"].connection  # type: ignore[assignment]
        self.assertEqual(connection.sent[-1].operation, "delete")
        self.handle.message_received(connection, model.new_ack(connection.sent[-1]))
        self.assertEqual(self.store.deleted_version("edge-1", "u1"), 7)
        self.failureResultOf(upstream.send("edge-1", pod_message("u1", "7")), StaleMessage)
        self.deliver(upstream, pod_message("u1", "8"))

    def test_delete_without_any_known_version_refuses_nothing(self) -> None:
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, rvless_delete("u1"))
        record = self.records()["u1"]
        self.assertEqual((record.acked_version, record.pending), (None, None))
        self.assertIsNotNone(record.deleted_at)
        self.deliver(upstream, pod_message("u1", "1", "insert"))
        self.assertIsNone(self.records()["u1"].deleted_at)

    def test_expired_tombstone_refuses_nothing_purged_or_not(self) -> None:
        """Until it expires the rule holds although no purge ran (the next is 10**9 s away);
        from then on the object is unknown, as KubeEdge has it."""
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, pod_message("u1", "5", "insert"))
        self.deliver(upstream, pod_message("u1", "6", "delete"))
        self.clock.advance(RETENTION - 1)  # (the edge, silent, was dropped meanwhile)
        self.failureResultOf(upstream.send("edge-1", pod_message("u1", "5")), StaleMessage)
        self.clock.advance(1)
        self.connect()
        self.deliver(upstream, pod_message("u1", "5"))
        record = self.records()["u1"]
        self.assertEqual((record.acked_version, record.deleted_at), (5, None))

    def test_tombstones_stay_in_the_store_not_in_the_queue(self) -> None:
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, pod_message("u1", "5", "insert"))
        self.deliver(upstream, pod_message("u1", "6", "delete"))
        self.flush(upstream)
        self.restart()
        self.hub()
        queue = self.handle.queues["edge-1"]
        self.assertEqual((queue.acked, queue.pending), ({}, {}))
        self.assertTrue(queue.is_idle())
        self.assertEqual(self.store.deleted_version("edge-1", "u1"), 6)

    def test_pending_delete_restored_keeps_the_acknowledged_version(self) -> None:
        """A delete without a version still owed at a restart: its tombstone covers the
        version acknowledged before it."""
        upstream = self.hub()
        self.connect()
        self.deliver(upstream, pod_message("u1", "5", "insert"))
        self.handle.connection_lost(self.handle.sessions["edge-1"].connection, "gone")
        upstream.send("edge-1", rvless_delete("u1"))
        self.flush(upstream)
        self.restart()
        self.hub()
        connection = self.connect()
        self.settle()
        self.handle.message_received(connection, model.new_ack(connection.sent[-1]))
        self.assertEqual(self.store.deleted_version("edge-1", "u1"), 5)


class SQLiteTombstoneHubTests(TombstoneHubTests):
    """The same through an SQLite file, with a real restart (close, reopen, reload)."""

    def open_store(self) -> ISyncStore:
        self.pool = ManualPool(run_at_once=True)
        self.path = getattr(self, "path", None) or os.path.join(self.mktemp(), "cloudhub.db")
        store = SQLiteSyncStore(
            self.path,
            self.clock,
            threadpool=self.pool,  # type: ignore[arg-type]
            tombstone_retention=RETENTION,
            purge_interval=10**9,
        )
        self.addCleanup(self.close, store)
        return store

    def close(self, store: ISyncStore) -> None:
        closed = store.close()
        self.settle()
        self.successResultOf(closed)

    def restart(self) -> None:
        self.close(self.store)
        self.store = self.open_store()


class QueueWithoutStoreTests(SynchronousTestCase):
    def test_a_queue_without_a_store_keeps_no_tombstone(self) -> None:
        """Tombstones live in the sync store; a bare queue (tools, tests) forgets a delete."""
        queue = NodeQueue("edge-1")
        queue.offer(pod_message("u1", "6", "delete"), want_result=False)
        entry = queue.next_ready()
        assert entry is not None
        queue.acknowledge(entry.message.msg_id)
        queue.offer(pod_message("u1", "5"), want_result=False)
        self.assertIn("u1", queue.pending)


class RetentionWiringTests(SynchronousTestCase):
    def test_open_store_passes_the_retention_and_the_clock(self) -> None:
        clock = Clock()
        clock.advance(77)
        memory = open_store("memory", "", clock, tombstone_retention=90000)
        self.assertEqual(memory.tombstone_retention, 90000)
        memory.acknowledged("n1", "u1", 1, deleted=True)
        self.assertEqual(memory.load()[0].deleted_at, 77)
        path = os.path.join(self.mktemp(), "x.db")
        sqlite = open_store("sqlite", path, clock, tombstone_retention=90000)
        self.assertEqual(sqlite.tombstone_retention, 90000)
        self.successResultOf(sqlite.close())
        self.assertEqual(open_store("memory", "", clock).tombstone_retention, 24 * 3600)


class ApiTombstoneTests(ApiHarness, TestCase):
    """Through the real hub and its HTTP API, with a Python edge: 409 after a delete."""

    timeout = 60

    async def test_late_version_after_acknowledged_delete_409(self) -> None:
        await self.start_hub()
        await self.join("edge-1")
        for body in (pod_body("uid-t", "5"), pod_body("uid-t", "6", operation="delete")):
            reply = await self.post("edge-1", body, "?wait=ack&timeout=20")
            self.assertEqual(reply.code, 200, reply.body)
        reply = await self.post("edge-1", pod_body("uid-t", "5", operation="update"))
        self.assertEqual(reply.code, 409, reply.body)
        self.assertEqual(
            {k: v for k, v in reply.json.items() if k != "error"},
            {"reason": "stale", "uid": "uid-t", "resource_version": "5", "acked": "6",
             "pending": None},
        )  # fmt: skip
        [record] = await self.objects("edge-1")
        self.assertEqual((record["acked_version"], record["pending_version"]), ("6", None))
        reply = await self.post("edge-1", pod_body("uid-t", "7"), "?wait=ack&timeout=20")
        self.assertEqual(reply.code, 200, reply.body)


class ServiceRetentionTests(TestCase):
    """hub.store.tombstoneRetention as CloudHubService applies it (0: KubeEdge's behaviour)."""

    timeout = 60

    async def late_retry_accepted(self, retention: int) -> bool:
        from twisted.internet import reactor

        from cloudhub.config import parse_config
        from cloudhub.service import CloudHubService

        from .test_integration_ws import hub_config

        data = hub_config(os.path.abspath(self.mktemp())).as_dict()
        data["hub"]["store"]["tombstoneRetention"] = retention
        hub = CloudHubService(parse_config(data), reactor=reactor)
        self.addCleanup(hub.stopService)
        await hub.startService()
        node = FakeConnection("edge-1")
        hub.handle.connection_made(node)
        for rv, operation in (("5", "insert"), ("6", "delete")):
            sent = hub.upstream.send("edge-1", pod_message("u", rv, operation))
            hub.handle.message_received(node, model.new_ack(node.sent[-1]))
            await sent
        outcome: list[Any] = []
        late = hub.upstream.send("edge-1", pod_message("u", "5", "update"))
        # Refused at once as stale, or accepted (and ended by the hub's stop later).
        late.addErrback(lambda f: outcome.append(f.check(StaleMessage)))
        return not any(outcome)

    async def test_default_keeps_deletes_zero_forgets_them(self) -> None:
        self.assertFalse(await self.late_retry_accepted(86400))
        self.assertTrue(await self.late_retry_accepted(0))
