"""What the hub may owe (issue 18, finding 5): per node, in all, to how many node ids.

Driven through MessageHandle with a fake connection and task.Clock (no sockets); the restart
case through a real SQLite file (closed, reopened, reloaded).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from cloudhub import model, wire
from cloudhub.api import ApiResource
from cloudhub.budget import Budget, HubOverLimit, NodeOverLimit, OverLimit
from cloudhub.errors import MessageRefused, StaleMessage
from cloudhub.handler import MessageHandle
from cloudhub.model import Message
from cloudhub.queue import NO_ACK_BACKLOG, NodeQueue
from cloudhub.store import ISyncStore, MemorySyncStore, SQLiteSyncStore
from cloudhub.upstream import Upstream

from .fakes import FakeConnection, pod_message
from .test_store import ManualPool, ThreadlessReactor


def size(message: Message) -> int:
    return len(wire.encode(message))


def user_message(text: str = "x") -> Message:
    """A no-ACK message (group user)."""
    return Message.new("app", "user", "update", "default/data/x", {"text": text})


class LimitsTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = ThreadlessReactor()
        self.store: ISyncStore = self.open_store()

    def open_store(self) -> ISyncStore:
        return MemorySyncStore()

    def hub(self, **limits: int) -> Upstream:
        self.handle = MessageHandle(self.clock, store=self.store, budget=Budget(**limits))
        return Upstream(self.handle)

    def settle(self) -> None:
        self.clock.advance(0)

    def flush(self, upstream: Upstream) -> None:
        flushed = upstream.flush()
        self.settle()
        self.successResultOf(flushed)

    def connect(self, node_id: str) -> FakeConnection:
        connection = FakeConnection(node_id)
        self.handle.connection_made(connection)
        return connection

    def ack_all(self, connection: FakeConnection) -> None:
        """ACK every ACK-mode message the edge got, one at a time (stop-and-wait)."""
        acked: set[str] = set()
        while True:
            fresh = [
                m
                for m in connection.sent
                if m.msg_id not in acked and m.group == "resource" and m.operation != "response"
            ]
            if not fresh:
                return
            for message in fresh:
                acked.add(message.msg_id)
                self.handle.message_received(connection, model.new_ack(message))
            self.settle()


class PerNodeLimitTests(LimitsTestCase):
    def test_messages_per_node(self) -> None:
        upstream = self.hub(node_messages=3)
        results = upstream.send_many(
            [("edge-1", pod_message(f"u{i}", "1", "insert", f"p{i}")) for i in range(4)]
        )
        self.assertEqual(results[:3], [None, None, None])
        refused = results[3]
        self.assertIsInstance(refused, NodeOverLimit)
        self.assertIsInstance(refused, MessageRefused)
        assert isinstance(refused, NodeOverLimit)
        self.assertEqual((refused.limit, refused.value), ("hub.limits.nodeMessages", 3))
        self.assertIn("hub.limits.nodeMessages 3", str(refused))
        # send() fails the same way, as for a stale message; nothing was stored.
        failure = self.failureResultOf(
            upstream.send("edge-1", pod_message("u9", "1", "insert", "p9")), NodeOverLimit
        )
        self.assertEqual(failure.value.limit, "hub.limits.nodeMessages")
        self.assertEqual(len(self.handle.queues["edge-1"].pending), 3)
        self.assertEqual(len([r for r in self.store.load() if r.pending is not None]), 3)
        # Other nodes are not concerned.
        self.assertEqual(upstream.send_many([("edge-2", pod_message("u1", "1"))]), [None])
        self.assertEqual(self.handle.budget.refusals["hub.limits.nodeMessages"], 2)

    def test_acknowledged_messages_free_room(self) -> None:
        upstream = self.hub(node_messages=2)
        connection = self.connect("edge-1")
        upstream.send_many(
            [("edge-1", pod_message(f"u{i}", "1", "insert", f"p{i}")) for i in (1, 2)]
        )
        refused = upstream.send_many([("edge-1", pod_message("u3", "1", "insert", "p3"))])
        self.assertIsInstance(refused[0], NodeOverLimit)
        self.ack_all(connection)
        self.assertEqual(self.handle.queues["edge-1"].owed_bytes, 0)
        self.assertEqual((self.handle.budget.messages, self.handle.budget.bytes), (0, 0))
        self.assertEqual(
            upstream.send_many([("edge-1", pod_message("u3", "1", "insert", "p3"))]), [None]
        )

    def test_bytes_per_node(self) -> None:
        first = pod_message("u1", "1", "insert", "p1")
        upstream = self.hub(node_bytes=2 * size(first) + 10)
        results = upstream.send_many(
            [("edge-1", pod_message(f"u{i}", "1", "insert", f"p{i}")) for i in (1, 2, 3)]
        )
        self.assertEqual(results[:2], [None, None])
        refused = results[2]
        assert isinstance(refused, NodeOverLimit)
        self.assertEqual(refused.limit, "hub.limits.nodeBytes")
        self.assertEqual(refused.value, 2 * size(first) + 10)
        self.assertIn("hub.limits.nodeBytes", refused.reason)
        self.assertEqual(self.handle.queues["edge-1"].owed_bytes, 2 * size(first))

    def test_a_newer_version_replaces_and_is_counted_once(self) -> None:
        upstream = self.hub(node_messages=2, node_bytes=3 * size(pod_message("u1", "1")))
        for rv in range(1, 20):
            self.assertEqual(upstream.send_many([("edge-1", pod_message("u1", str(rv)))]), [None])
        self.assertEqual(upstream.send_many([("edge-1", pod_message("u2", "1", name="b"))]), [None])
        queue = self.handle.queues["edge-1"]
        self.assertEqual(len(queue.pending), 2)
        expected = size(queue.pending["u1"].message) + size(queue.pending["u2"].message)
        self.assertEqual(queue.owed_bytes, expected)
        self.assertEqual((self.handle.budget.messages, self.handle.budget.bytes), (2, expected))
        # At the count limit, a newer version of an owed object is still taken; a delete too.
        self.assertEqual(upstream.send_many([("edge-1", pod_message("u2", "2", name="b"))]), [None])
        self.assertEqual(
            upstream.send_many([("edge-1", pod_message("u1", "30", "delete"))]), [None]
        )
        self.assertIsInstance(
            upstream.send_many([("edge-1", pod_message("u3", "1", name="c"))])[0], NodeOverLimit
        )
        # Stale is still stale (judged first).
        self.assertIsInstance(
            upstream.send_many([("edge-1", pod_message("u2", "1", name="b"))])[0], StaleMessage
        )

    def test_a_newer_version_that_grows_past_the_bytes_is_refused(self) -> None:
        small = pod_message("u1", "1")
        upstream = self.hub(node_bytes=size(small) + 20)
        self.assertEqual(upstream.send_many([("edge-1", small)]), [None])
        big = Message.new(
            "edgecontroller",
            "resource",
            "update",
            "default/pod/nginx",
            {**small.content, "spec": {"pad": "x" * 100}},
            resource_version="2",
        )
        [refused] = upstream.send_many([("edge-1", big)])
        self.assertIsInstance(refused, NodeOverLimit)
        # The owed version stays owed.
        self.assertEqual(self.handle.queues["edge-1"].pending["u1"].message.msg_id, small.msg_id)

    def test_no_ack_backlog_bytes_count(self) -> None:
        one = user_message("y" * 100)
        upstream = self.hub(node_bytes=3 * size(one))
        for _ in range(3):
            self.assertNoResult(upstream.send("edge-1", user_message("y" * 100)))
        queue = self.handle.queues["edge-1"]
        self.assertEqual(queue.owed_bytes, 3 * size(one))
        failure = self.failureResultOf(upstream.send("edge-1", user_message("y" * 100)))
        self.assertIsInstance(failure.value, NodeOverLimit)
        self.assertEqual(len(queue.no_ack), 3)
        # Taken by the session when the node connects: the bytes are free again.
        self.connect("edge-1")
        self.assertEqual((queue.owed_bytes, self.handle.budget.bytes), (0, 0))

    def test_no_ack_backlog_full_drops_the_oldest_and_its_bytes(self) -> None:
        queue = NodeQueue("edge-1", MemorySyncStore())
        for i in range(NO_ACK_BACKLOG + 5):
            queue.offer(user_message(str(i % 10)), want_result=False)
        self.assertEqual(len(queue.no_ack), NO_ACK_BACKLOG)
        self.assertEqual(queue.owed_bytes, sum(size(m) for m, _ in queue.no_ack))
        self.assertEqual(queue.budget.bytes, queue.owed_bytes)


class GlobalBudgetTests(LimitsTestCase):
    def test_messages_over_all_nodes(self) -> None:
        upstream = self.hub(total_messages=3)
        results = upstream.send_many([(f"edge-{i}", pod_message("u1", "1")) for i in range(4)])
        self.assertEqual(results[:3], [None, None, None])
        refused = results[3]
        assert isinstance(refused, HubOverLimit)
        self.assertEqual((refused.limit, refused.value), ("hub.limits.totalMessages", 3))
        # A newer version of what is owed is still taken.
        self.assertEqual(upstream.send_many([("edge-1", pod_message("u1", "2"))]), [None])
        failure = self.failureResultOf(upstream.send("edge-1", pod_message("u2", "1", name="b")))
        self.assertIsInstance(failure.value, HubOverLimit)

    def test_bytes_over_all_nodes(self) -> None:
        one = size(pod_message("u1", "1"))
        upstream = self.hub(total_bytes=2 * one + 5)
        results = upstream.send_many([(f"edge-{i}", pod_message("u1", "1")) for i in range(3)])
        self.assertEqual(results[:2], [None, None])
        assert isinstance(results[2], HubOverLimit)
        self.assertEqual(results[2].limit, "hub.limits.totalBytes")
        self.assertEqual(self.handle.budget.bytes, 2 * one)

    def test_counts_follow_supersede_and_rollback_free(self) -> None:
        """O(1) counters stay equal to what the queues hold, whatever happens."""
        upstream = self.hub()
        connection = self.connect("edge-1")
        for rv in range(1, 5):
            upstream.send_many([("edge-1", pod_message("u1", str(rv)))])
            upstream.send_many([("edge-2", pod_message("u1", str(rv)))])
        upstream.send_many([("edge-2", pod_message("u2", "1", name="b"))])
        self.check_counts()
        self.ack_all(connection)
        self.check_counts()
        self.assertEqual(self.handle.budget.messages, 2)

    def check_counts(self) -> None:
        budget = self.handle.budget
        queues = self.handle.queues.values()
        self.assertEqual(budget.messages, sum(len(q.pending) for q in queues))
        self.assertEqual(budget.bytes, sum(q.owed_bytes for q in queues))
        for queue in queues:
            self.assertEqual(
                queue.owed_bytes,
                sum(size(e.message) for e in queue.pending.values()) + sum(queue.no_ack_sizes),
            )


class UnknownNodeTests(LimitsTestCase):
    def test_node_ids_that_never_connected_are_bounded(self) -> None:
        upstream = self.hub(unknown_nodes=2)
        results = upstream.send_many([(f"edge-{i}", pod_message("u1", "1")) for i in range(3)])
        self.assertEqual(results[:2], [None, None])
        refused = results[2]
        assert isinstance(refused, HubOverLimit)
        self.assertEqual((refused.limit, refused.value), ("hub.limits.unknownNodes", 2))
        self.assertNotIn("edge-2", self.handle.queues)  # no queue left behind
        # Known ids still take messages: one owed already, one connected.
        self.assertEqual(upstream.send_many([("edge-0", pod_message("u2", "1"))]), [None])
        self.connect("edge-9")
        self.assertEqual(upstream.send_many([("edge-9", pod_message("u1", "1"))]), [None])
        failure = self.failureResultOf(upstream.send("edge-3", pod_message("u1", "1")))
        self.assertIsInstance(failure.value, HubOverLimit)
        # A node that connects is known: room for another id.
        self.connect("edge-0")
        self.assertEqual(upstream.send_many([("edge-3", pod_message("u1", "1"))]), [None])

    def test_refused_messages_leave_no_node_behind(self) -> None:
        """A refused first message (invalid, over a limit) creates no node id."""
        upstream = self.hub(node_bytes=10)
        for i in range(5):
            upstream.send_many([(f"edge-{i}", pod_message("u1", "1"))])
            upstream.send_many([(f"bad-{i}", pod_message("", "1"))])
        self.assertEqual(self.handle.queues, {})
        self.assertEqual(self.handle.unknown_nodes, set())


class RestartTests(LimitsTestCase):
    """Counts are rebuilt from the store: the limits hold after a restart, and what is owed
    above a limit is still delivered."""

    def open_store(self) -> ISyncStore:
        self.pool = ManualPool(run_at_once=True)
        self.path = getattr(self, "path", None) or os.path.join(self.mktemp(), "cloudhub.db")
        store = SQLiteSyncStore(self.path, self.clock, threadpool=self.pool)  # type: ignore[arg-type]
        self.addCleanup(self.close, store)
        return store

    def close(self, store: ISyncStore) -> None:
        closed = store.close()  # type: ignore[attr-defined]
        self.settle()
        self.successResultOf(closed)

    def restart(self) -> None:
        self.handle.detach()
        self.close(self.store)
        self.store = self.open_store()

    def test_limits_hold_after_a_restart(self) -> None:
        upstream = self.hub(node_messages=3, total_messages=5, unknown_nodes=10)
        upstream.send_many([("edge-1", pod_message(f"u{i}", "1", name=f"p{i}")) for i in range(3)])
        upstream.send_many([("edge-2", pod_message("u1", str(rv))) for rv in (1, 2, 3)])
        self.flush(upstream)
        expected_bytes = self.handle.budget.bytes
        self.restart()
        upstream = self.hub(node_messages=3, total_messages=5, unknown_nodes=1)
        budget = self.handle.budget
        self.assertEqual((budget.messages, budget.bytes), (4, expected_bytes))
        self.assertEqual(
            self.handle.queues["edge-1"].owed_bytes,
            expected_bytes - size(self.handle.queues["edge-2"].pending["u1"].message),
        )
        [refused] = upstream.send_many([("edge-1", pod_message("u9", "1", name="p9"))])
        assert isinstance(refused, NodeOverLimit)
        self.assertEqual(refused.limit, "hub.limits.nodeMessages")
        # Restored nodes are known; a new id fits once (unknown_nodes=1).
        self.assertEqual(upstream.send_many([("edge-2", pod_message("u2", "1", name="b"))]), [None])
        [refused] = upstream.send_many([("edge-3", pod_message("u1", "1"))])
        assert isinstance(refused, HubOverLimit)
        self.assertEqual(refused.limit, "hub.limits.totalMessages")

    def test_owed_above_a_lowered_limit_is_still_delivered(self) -> None:
        upstream = self.hub()
        upstream.send_many([("edge-1", pod_message(f"u{i}", "1", name=f"p{i}")) for i in range(5)])
        self.flush(upstream)
        self.restart()
        upstream = self.hub(node_messages=2)
        self.assertEqual(len(self.handle.queues["edge-1"].pending), 5)
        self.assertIsInstance(
            upstream.send_many([("edge-1", pod_message("u9", "1", name="p9"))])[0], OverLimit
        )
        connection = self.connect("edge-1")
        self.ack_all(connection)
        delivered = {m.content["metadata"]["uid"] for m in connection.sent if m.group == "resource"}
        self.assertEqual(delivered, {f"u{i}" for i in range(5)})
        self.assertEqual(self.handle.budget.messages, 0)
        self.assertEqual(
            upstream.send_many([("edge-1", pod_message("u9", "1", name="p9"))]), [None]
        )


class BudgetTests(SynchronousTestCase):
    def test_defaults_and_zero_is_no_limit(self) -> None:
        budget = Budget()
        self.assertEqual(
            (
                budget.node_messages,
                budget.node_bytes,
                budget.total_messages,
                budget.total_bytes,
                budget.unknown_nodes,
            ),
            (10_000, 64 * 1024 * 1024, 1_000_000, 1024**3, 100_000),
        )
        queue = NodeQueue("edge-1", MemorySyncStore(), budget=Budget(0, 0, 0, 0, 0))
        for i in range(50):
            queue.offer(pod_message(f"u{i}", "1"), want_result=False)
        self.assertEqual(len(queue.pending), 50)
        self.assertRaises(ValueError, Budget, node_messages=-1)


class _FakeUpstream:
    """send_many() records each entry; flush() returns Deferreds the test fires."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.flushes: list[Deferred[None]] = []

    def send_many(self, entries: Any) -> list[None]:
        entries = list(entries)
        self.sent.extend(message.msg_id for _, message in entries)
        return [None] * len(entries)

    def flush(self) -> Deferred[None]:
        flushed: Deferred[None] = Deferred()
        self.flushes.append(flushed)
        return flushed


def batch_request(msg_ids: list[str]) -> DummyRequest:
    entries = [
        {"node": "edge-1", "message": pod_body(f"uid-{msg_id}", "1", msg_id)} for msg_id in msg_ids
    ]
    request = DummyRequest([b"v1", b"messages"])
    request.method = b"POST"
    request.path = b"/v1/messages"
    request.uri = b"/v1/messages"
    request.content = io.BytesIO(json.dumps(entries).encode())
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    return request


def pod_body(uid: str, rv: str, msg_id: str) -> dict[str, Any]:
    message = pod_message(uid, rv, "insert")
    return json.loads(wire.encode(message).replace(message.msg_id.encode(), msg_id.encode()))


class BatchConcurrencyTests(SynchronousTestCase):
    """At most max_batches batches are judged at once; the others wait their turn, unread."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = _FakeUpstream()
        self.resource = ApiResource(
            self.upstream,  # type: ignore[arg-type]
            MemorySyncStore(),
            self.clock,
            max_batches=1,
        )

    def post(self, msg_ids: list[str]) -> DummyRequest:
        request = batch_request(msg_ids)
        self.assertEqual(self.resource.render(request), NOT_DONE_YET)
        return request

    def test_one_batch_at_a_time(self) -> None:
        first = self.post(["a1", "a2"])
        second = self.post(["b1"])
        third = self.post(["c1"])
        # The first is judged and waits for its flush; the others are not read yet.
        self.assertEqual(self.upstream.sent, ["a1", "a2"])
        self.assertEqual(second.content.tell(), 0)
        self.upstream.flushes[0].callback(None)
        self.assertEqual(first.finished, 1)
        self.assertEqual(json.loads(b"".join(first.written))["accepted"], 2)
        self.assertEqual(self.upstream.sent, ["a1", "a2", "b1"])
        self.assertEqual(third.content.tell(), 0)
        self.upstream.flushes[1].callback(None)
        self.upstream.flushes[2].callback(None)
        self.assertEqual(self.upstream.sent, ["a1", "a2", "b1", "c1"])
        for request in (second, third):
            self.assertEqual(request.responseCode, 200)
            self.assertEqual(json.loads(b"".join(request.written))["accepted"], 1)

    def test_a_client_gone_while_waiting_is_not_judged(self) -> None:
        self.post(["a1"])
        second = self.post(["b1"])
        second._disconnected = True
        self.upstream.flushes[0].callback(None)
        self.assertEqual(self.upstream.sent, ["a1"])
        self.assertEqual(second.written, [])
        third = self.post(["c1"])  # the slot was given back
        self.assertEqual(self.upstream.sent, ["a1", "c1"])
        self.upstream.flushes[1].callback(None)
        self.assertEqual(third.responseCode, 200)

    def test_max_batches_at_least_one(self) -> None:
        self.assertRaises(
            ValueError,
            ApiResource,
            self.upstream,  # type: ignore[arg-type]
            MemorySyncStore(),
            self.clock,
            max_batches=0,
        )


class ConfiguredBudgetTests(TestCase):
    """hub.limits as CloudHubService applies them, and what /metrics says of them."""

    timeout = 60

    async def test_node_limit_from_config_and_metrics(self) -> None:
        import os

        from twisted.internet import reactor
        from twisted.web.client import Agent, readBody

        from cloudhub.budget import NodeOverLimit
        from cloudhub.config import parse_config
        from cloudhub.service import CloudHubService

        from .fakes import pod_message
        from .test_hub_limits import samples
        from .test_integration_ws import hub_config

        data = hub_config(os.path.abspath(self.mktemp())).as_dict()
        data["hub"]["limits"] = {"nodeMessages": 2}
        hub = CloudHubService(parse_config(data), reactor=reactor)
        self.addCleanup(hub.stopService)
        await hub.startService()
        for uid in ("u1", "u2"):
            hub.upstream.send("edge-1", pod_message(uid, "1", name=uid)).addErrback(lambda f: None)
        refused = hub.upstream.send("edge-1", pod_message("u3", "1", name="u3"))
        failure = self.failureResultOf(refused, NodeOverLimit)
        self.assertIn("hub.limits.nodeMessages", failure.getErrorMessage())
        url = f"http://127.0.0.1:{hub.port('api')}/metrics".encode()
        metrics = await readBody(await Agent(reactor).request(b"GET", url))
        self.assertEqual(samples(metrics, "cloudhub_owed_messages"), {(): 2.0})
        self.assertEqual(samples(metrics, "cloudhub_unknown_nodes"), {(): 1.0})
        over = samples(metrics, "cloudhub_over_limit_total")
        self.assertEqual(over[(("limit", "hub.limits.nodeMessages"),)], 1.0)
