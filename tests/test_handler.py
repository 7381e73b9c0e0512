"""MessageHandle and NodeSession driven with a fake connection and task.Clock (no sockets)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cloudhub import model
from cloudhub.errors import InvalidMessage, NodeRefused, StaleMessage, Superseded
from cloudhub.handler import EVENT_CONNECTED, EVENT_DISCONNECTED, MessageHandle, NodeEvent
from cloudhub.interfaces import CLOSE_POLICY
from cloudhub.model import Message
from cloudhub.upstream import Upstream

from .fakes import FakeConnection, pod_message


class HubTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.handle = MessageHandle(self.clock, keepalive_interval=30, node_limit=3)
        self.upstream = Upstream(self.handle)
        self.events: list[NodeEvent] = []
        self.received: list[tuple[str, Message]] = []
        self.upstream.subscribe_events(self.events.append)
        self.upstream.subscribe(lambda node, msg: self.received.append((node, msg)))

    def connect(self, node_id: str) -> FakeConnection:
        connection = FakeConnection(node_id)
        self.handle.connection_made(connection)
        return connection

    def ack(self, connection: FakeConnection, message: Message) -> None:
        self.handle.message_received(connection, model.new_ack(message))

    def data(self, connection: FakeConnection) -> list[Message]:
        return [m for m in connection.sent if m.operation != "response" or m.parent_msg_id == ""]


class ConnectionTests(HubTestCase):
    def test_connect_publishes_event_and_lists_node(self) -> None:
        self.connect("edge-1")
        self.assertEqual([(e.node_id, e.event) for e in self.events], [("edge-1", EVENT_CONNECTED)])
        [info] = self.upstream.nodes()
        self.assertEqual(
            (info.node_id, info.project_id, info.transport), ("edge-1", "p", "websocket")
        )
        self.assertTrue(self.upstream.is_connected("edge-1"))

    def test_silent_node_is_disconnected(self) -> None:
        connection = self.connect("edge-1")
        self.clock.advance(29.9)
        self.assertIsNone(connection.closed)
        self.clock.advance(0.2)
        self.assertEqual(connection.closed[0], CLOSE_POLICY)
        self.assertIn("keepalive", connection.closed[1])
        self.assertEqual(self.events[-1].event, EVENT_DISCONNECTED)
        self.assertEqual(self.events[-1].reason, "keepalive timeout")
        self.assertEqual(self.upstream.nodes(), [])

    def test_heartbeating_node_stays_an_hour(self) -> None:
        connection = self.connect("edge-1")
        for _ in range(4 * 60):
            self.handle.message_received(connection, model.new_keepalive())
            self.clock.advance(15)
        self.assertIsNone(connection.closed)
        self.assertEqual(len(self.upstream.nodes()), 1)
        self.assertEqual(self.upstream.nodes()[0].last_keepalive, self.clock.seconds() - 15)

    def test_data_messages_do_not_count_as_keepalive(self) -> None:
        """§6.1: only keepalives re-arm the watchdog."""
        connection = self.connect("edge-1")
        for _ in range(4):
            self.clock.advance(10)
            self.handle.message_received(
                connection, Message.new("edged", "meta", "update", "default/podstatus/p", {})
            )
        self.assertIsNotNone(connection.closed)

    def test_node_limit_refuses_fourth_node_only(self) -> None:
        connections = [self.connect(f"edge-{i}") for i in range(3)]
        with self.assertRaises(NodeRefused) as caught:
            self.connect("edge-3")
        self.assertIn("node limit 3", str(caught.exception))
        self.assertEqual(self.handle.stats.node_limit_refusals, 1)
        for connection in connections:
            self.assertIsNone(connection.closed)
            message = pod_message(f"uid-{connection.node_id}", "1", "insert")
            delivered = self.upstream.send(connection.node_id, message)
            self.ack(connection, connection.sent[-1])
            self.assertEqual(self.successResultOf(delivered).msg_id, message.msg_id)

    def test_reconnect_of_connected_node_does_not_count_against_limit(self) -> None:
        for i in range(3):
            self.connect(f"edge-{i}")
        self.connect("edge-0")
        self.assertEqual(len(self.upstream.nodes()), 3)

    def test_second_connection_replaces_first_and_keeps_what_is_owed(self) -> None:
        first = self.connect("edge-1")
        delivered = self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        self.assertEqual(len(self.data(first)), 1)
        second = self.connect("edge-1")
        self.assertEqual(first.closed[0], CLOSE_POLICY)
        self.assertEqual(
            [e.event for e in self.events], [EVENT_CONNECTED, EVENT_DISCONNECTED, EVENT_CONNECTED]
        )
        # The unacknowledged message goes again, with the same msg_id, on the new connection.
        [resent] = self.data(second)
        self.assertEqual(resent.msg_id, self.data(first)[0].msg_id)
        # Messages from the replaced connection are ignored.
        self.handle.message_received(first, Message.new("edged", "meta", "update", "a/b/c", 1))
        self.assertEqual(self.received, [])
        self.ack(second, resent)
        self.successResultOf(delivered)

    def test_connection_lost_of_replaced_connection_is_ignored(self) -> None:
        first = self.connect("edge-1")
        self.connect("edge-1")
        self.handle.connection_lost(first, "closed")
        self.assertTrue(self.upstream.is_connected("edge-1"))


class RoutingTests(HubTestCase):
    def test_control_operations_answered_not_published(self) -> None:
        connection = self.connect("edge-1")
        for operation in ("ping", "pong", "config"):
            probe = Message.new("websocket", "resource", operation, "node", None)
            self.handle.message_received(connection, probe)
            reply = connection.sent[-1]
            self.assertEqual(
                (reply.operation, reply.content, reply.parent_msg_id),
                ("response", "ack", probe.msg_id),
            )
        self.assertEqual(self.received, [])

    def test_empty_shutdown_message_ignored(self) -> None:
        connection = self.connect("edge-1")
        self.handle.message_received(connection, Message(msg_id="", timestamp=0))
        self.assertEqual(self.received, [])
        self.assertEqual(connection.sent, [])

    def test_keepalive_and_error_not_published(self) -> None:
        connection = self.connect("edge-1")
        self.handle.message_received(connection, model.new_keepalive())
        self.handle.message_received(
            connection, Message.new("metamanager", "", "error", "default/pod/x", "boom")
        )
        self.assertEqual(self.received, [])

    def test_other_messages_published_with_node_id_and_group_filter(self) -> None:
        metas: list[Message] = []
        self.upstream.subscribe(lambda node, msg: metas.append(msg), group="meta")
        connection = self.connect("edge-1")
        status = Message.new("edged", "meta", "update", "default/podstatus/p", {"a": 1})
        upload = Message.new("eventbus", "user", "upload", "topic/x", "data")
        self.handle.message_received(connection, status)
        self.handle.message_received(connection, upload)
        self.assertEqual(self.received, [("edge-1", status), ("edge-1", upload)])
        self.assertEqual(metas, [status])

    def test_failing_subscriber_does_not_stop_others(self) -> None:
        def broken(node: str, msg: Message) -> None:
            raise RuntimeError("subscriber bug")

        self.upstream.subscribe(broken)
        later: list[Message] = []
        self.upstream.subscribe(lambda node, msg: later.append(msg))
        connection = self.connect("edge-1")
        self.handle.message_received(connection, Message.new("edged", "meta", "update", "a/b/c", 1))
        self.assertEqual(len(later), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unsubscribe(self) -> None:
        got: list[Message] = []
        unsubscribe = self.upstream.subscribe(lambda node, msg: got.append(msg))
        unsubscribe()
        connection = self.connect("edge-1")
        self.handle.message_received(connection, Message.new("edged", "meta", "update", "a/b/c", 1))
        self.assertEqual(got, [])


class DeliveryTests(HubTestCase):
    def test_ack_fires_deferred(self) -> None:
        connection = self.connect("edge-1")
        message = pod_message("u1", "5", "insert")
        delivered = self.upstream.send("edge-1", message)
        self.assertNoResult(delivered)
        [sent] = connection.sent
        self.assertEqual(sent.msg_id, message.msg_id)
        self.ack(connection, sent)
        self.assertIs(self.successResultOf(delivered), sent)

    def test_prefixed_resource_is_trimmed(self) -> None:
        connection = self.connect("edge-1")
        message = pod_message("u1", "5", "insert")
        message.resource = "node/edge-1/default/pod/nginx"
        self.upstream.send("edge-1", message)
        self.assertEqual(connection.sent[0].resource, "default/pod/nginx")

    def test_prefix_naming_another_node_refused(self) -> None:
        message = pod_message("u1", "5", "insert")
        message.resource = "node/edge-2/default/pod/nginx"
        self.assertRaises(InvalidMessage, self.upstream.send, "edge-1", message)

    def test_no_ack_message_fires_when_written_in_order(self) -> None:
        connection = self.connect("edge-1")
        results = []
        for i in range(5):
            message = Message.new(
                "edgecontroller", "resource", "update", f"default/podstatus/p{i}", {"i": i}
            )
            results.append(self.upstream.send("edge-1", message))
        self.assertEqual([m.content["i"] for m in connection.sent], list(range(5)))
        for result in results:
            self.successResultOf(result)

    def test_offline_node_gets_messages_on_connect(self) -> None:
        delivered = self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        status = Message.new("edgecontroller", "resource", "update", "default/podstatus/p", {})
        written = self.upstream.send("edge-1", status)
        connection = self.connect("edge-1")
        self.assertEqual(
            {m.resource for m in connection.sent}, {"default/pod/nginx", "default/podstatus/p"}
        )
        self.successResultOf(written)
        self.ack(connection, [m for m in connection.sent if m.resource == "default/pod/nginx"][0])
        self.successResultOf(delivered)

    def test_stale_version_refused(self) -> None:
        connection = self.connect("edge-1")
        self.upstream.send("edge-1", pod_message("u1", "10", "insert"))
        self.ack(connection, connection.sent[-1])
        for rv in ("10", "9"):
            failure = self.failureResultOf(
                self.upstream.send("edge-1", pod_message("u1", rv)), StaleMessage
            )
            self.assertEqual(failure.value.acked, "10")
        self.assertEqual(len(connection.sent), 1)

    def test_stale_against_pending_refused(self) -> None:
        self.upstream.send("edge-1", pod_message("u1", "10", "insert"))
        failure = self.failureResultOf(
            self.upstream.send("edge-1", pod_message("u1", "10")), StaleMessage
        )
        self.assertEqual(failure.value.pending, "10")

    def test_resource_versions_compare_as_numbers(self) -> None:
        self.upstream.send("edge-1", pod_message("u1", "9", "insert")).addErrback(
            lambda f: f.trap(Superseded)
        )
        newer = self.upstream.send("edge-1", pod_message("u1", "10"))
        connection = self.connect("edge-1")
        [sent] = connection.sent
        self.assertEqual(sent.resource_version, "10")
        self.ack(connection, sent)
        self.successResultOf(newer)

    def test_update_supersedes_pending_edge_gets_newest_only(self) -> None:
        first = self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        self.upstream.send("edge-1", pod_message("u1", "2")).addErrback(
            lambda f: f.trap(Superseded)
        )
        third = self.upstream.send("edge-1", pod_message("u1", "3"))
        self.failureResultOf(first, Superseded)
        connection = self.connect("edge-1")
        self.assertEqual([m.resource_version for m in connection.sent], ["3"])
        self.ack(connection, connection.sent[0])
        self.successResultOf(third)

    def test_insert_then_delete_sends_only_delete(self) -> None:
        inserted = self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        deleted = self.upstream.send("edge-1", pod_message("u1", "2", "delete"))
        self.failureResultOf(inserted, Superseded)
        connection = self.connect("edge-1")
        self.assertEqual([m.operation for m in connection.sent], ["delete"])
        self.ack(connection, connection.sent[0])
        self.successResultOf(deleted)
        self.assertNotIn("u1", self.handle.queues["edge-1"].acked)

    def test_update_after_pending_delete_is_stale(self) -> None:
        self.upstream.send("edge-1", pod_message("u1", "2", "delete"))
        self.failureResultOf(self.upstream.send("edge-1", pod_message("u1", "3")), StaleMessage)

    def test_missing_uid_or_version_is_invalid(self) -> None:
        no_uid = pod_message("", "1", "insert")
        failure = self.failureResultOf(self.upstream.send("edge-1", no_uid), InvalidMessage)
        self.assertIn("uid", str(failure.value))
        no_rv = pod_message("u1", "", "insert")
        failure = self.failureResultOf(self.upstream.send("edge-1", no_rv), InvalidMessage)
        self.assertIn("resourceversion", str(failure.value))
        bad_rv = pod_message("u1", "x1", "insert")
        self.failureResultOf(self.upstream.send("edge-1", bad_rv), InvalidMessage)

    def test_delete_without_version_accepted(self) -> None:
        connection = self.connect("edge-1")
        self.upstream.send("edge-1", pod_message("u1", "", "delete"))
        self.assertEqual(len(connection.sent), 1)

    def test_stop_and_wait_one_in_flight(self) -> None:
        connection = self.connect("edge-1")
        for i in range(3):
            self.upstream.send("edge-1", pod_message(f"u{i}", "1", "insert"))
        self.assertEqual(len(connection.sent), 1)
        self.ack(connection, connection.sent[-1])
        self.assertEqual(len(connection.sent), 2)
        self.ack(connection, connection.sent[-1])
        self.ack(connection, connection.sent[-1])
        self.assertEqual(
            [m.content["metadata"]["uid"] for m in connection.sent], ["u0", "u1", "u2"]
        )

    def test_no_ack_five_transmissions_5s_apart_then_backoff(self) -> None:
        connection = self.connect("edge-1")
        message = pod_message("u1", "1", "insert")
        self.upstream.send("edge-1", message)
        counts = []
        for _ in range(5):
            counts.append(len(connection.sent))
            self.clock.advance(4.5)
            self.assertEqual(len(connection.sent), counts[-1])  # nothing early
            self.clock.advance(0.5)
            self.handle.message_received(connection, model.new_keepalive())
        # Sent at 0, 5, 10, 15, 20; the 5th went unanswered until 25: no 6th at once ...
        self.assertEqual(counts, [1, 2, 3, 4, 5])
        self.assertEqual(len(connection.sent), 5)
        # ... but after the 5 ms backoff, the same message again.
        self.clock.advance(0.004)
        self.assertEqual(len(connection.sent), 5)
        self.clock.advance(0.001)
        self.assertEqual(len(connection.sent), 6)
        self.assertTrue(all(m.msg_id == message.msg_id for m in connection.sent))

    def test_next_message_gets_its_own_five_seconds(self) -> None:
        """A message sent 3 s after the first one's timer started is resent 5 s after *its*
        transmission; ACKs do not create or cancel timers (one per session)."""
        connection = self.connect("edge-1")
        self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        self.upstream.send("edge-1", pod_message("u2", "1", "insert", name="other"))
        timers = len(self.clock.getDelayedCalls())
        self.clock.advance(3)
        self.ack(connection, connection.sent[-1])
        self.assertEqual(len(connection.sent), 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)
        self.clock.advance(2)  # the first message's 5 s are over: nothing for the second
        self.assertEqual(len(connection.sent), 2)
        self.clock.advance(2.9)
        self.assertEqual(len(connection.sent), 2)
        self.clock.advance(0.1)  # 5 s after the second message went
        self.assertEqual(len(connection.sent), 3)
        self.assertEqual(connection.sent[2].msg_id, connection.sent[1].msg_id)

    def test_clock_stepping_back_does_not_delay_retransmission(self) -> None:
        """Twisted's clock is the wall clock: after it steps back an hour, the next message is
        still resent 5 s after it went."""
        connection = self.connect("edge-1")
        self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        self.upstream.send("edge-1", pod_message("u2", "1", "insert", name="other"))
        self.clock.advance(1)
        self.ack(connection, connection.sent[-1])  # u1; u2 goes now
        self.clock.rightNow -= 3600
        self.upstream.send("edge-1", pod_message("u3", "1", "insert", name="third"))
        self.ack(connection, connection.sent[-1])  # u2 ACKed; u3 goes after the step
        self.assertEqual(len(connection.sent), 3)
        self.clock.advance(5)
        self.assertEqual(len(connection.sent), 4)
        self.assertEqual(connection.sent[3].msg_id, connection.sent[2].msg_id)

    def test_backoff_lets_other_objects_through(self) -> None:
        connection = self.connect("edge-1")
        self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        self.upstream.send("edge-1", pod_message("u2", "1", "insert", name="other"))
        for _ in range(5):
            self.clock.advance(5)
        # u1 went 5 times unanswered; u2 is next while u1 backs off.
        self.assertEqual(connection.sent[-1].content["metadata"]["uid"], "u2")
        self.ack(connection, connection.sent[-1])
        self.clock.advance(0.005)
        self.assertEqual(connection.sent[-1].content["metadata"]["uid"], "u1")

    def test_backoff_doubles(self) -> None:
        from cloudhub.session import backoff_delay

        self.assertEqual([backoff_delay(n) for n in (1, 2, 3)], [0.005, 0.01, 0.02])
        self.assertEqual(backoff_delay(40), 1000.0)

    def test_late_ack_counts_once(self) -> None:
        connection = self.connect("edge-1")
        message = pod_message("u1", "1", "insert")
        delivered = self.upstream.send("edge-1", message)
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(len(connection.sent), 3)
        self.ack(connection, message)
        self.ack(connection, message)
        self.assertEqual(self.successResultOf(delivered).msg_id, message.msg_id)
        self.assertEqual(self.handle.queues["edge-1"].acked, {"u1": 1})
        self.clock.advance(20)
        self.assertEqual(len(connection.sent), 3)

    def test_newer_version_while_in_flight_goes_after_ack(self) -> None:
        connection = self.connect("edge-1")
        first = self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        newer = self.upstream.send("edge-1", pod_message("u1", "2"))
        self.failureResultOf(first, Superseded)
        self.assertEqual(len(connection.sent), 1)
        self.ack(connection, connection.sent[0])
        self.assertEqual([m.resource_version for m in connection.sent], ["1", "2"])
        self.ack(connection, connection.sent[1])
        self.successResultOf(newer)
        self.assertEqual(self.handle.queues["edge-1"].acked, {"u1": 2})

    def test_newer_version_replaces_unanswered_in_flight_on_retransmit(self) -> None:
        connection = self.connect("edge-1")
        first = self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        self.upstream.send("edge-1", pod_message("u1", "2"))
        self.failureResultOf(first, Superseded)
        self.clock.advance(5)
        self.assertEqual([m.resource_version for m in connection.sent], ["1", "2"])

    def test_disconnect_keeps_in_flight_message_owed(self) -> None:
        connection = self.connect("edge-1")
        delivered = self.upstream.send("edge-1", pod_message("u1", "1", "insert"))
        self.handle.connection_lost(connection, "closed")
        self.clock.advance(60)
        again = self.connect("edge-1")
        self.assertEqual(len(again.sent), 1)
        self.ack(again, again.sent[0])
        self.successResultOf(delivered)

    def test_reply_to_edge_request(self) -> None:
        connection = self.connect("edge-1")
        request = Message.new("edged", "meta", "query", "default/configmap/c", None)
        cm = {"kind": "ConfigMap", "metadata": {"uid": "c1", "resourceVersion": "4"}}
        replied = self.upstream.reply("edge-1", request, cm, resource_version="4")
        [sent] = connection.sent
        self.assertEqual(
            (sent.parent_msg_id, sent.source, sent.group, sent.operation),
            (request.msg_id, "edgecontroller", "resource", "response"),
        )
        self.ack(connection, sent)
        self.successResultOf(replied)


class CapturedTrafficTests(HubTestCase):
    """Scenario H of shared/testdata/edgecore/ws-frames.txt through the real MessageHandle."""

    def setUp(self) -> None:
        super().setUp()
        import ast
        import os

        from cloudhub import wire

        path = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "..",
            "shared",
            "testdata",
            "edgecore",
            "ws-frames.txt",
        )
        if not os.path.exists(path):
            raise __import__("twisted.trial.unittest").trial.unittest.SkipTest(
                f"edgecore capture not found at {path}"
            )
        self.frames: list[tuple[str, Message]] = []
        with open(path, encoding="utf-8") as f:
            text = f.read().split("## Scenario C")[0]
        for line in text.splitlines():
            for marker, direction in (("unmasked payload: ", "up"), ("   payload: ", "down")):
                if marker in line:
                    payload = ast.literal_eval(line.split(marker, 1)[1])
                    self.frames.append((direction, wire.decode(payload)))

    def test_keepalives_rearm_and_ack_matches(self) -> None:
        connection = self.connect("edge-node-1")
        delivered = None
        for direction, message in self.frames:
            if direction == "down":
                # The cloud's pod insert, sent through the hub with its captured msg_id.
                delivered = self.upstream.send("edge-node-1", message)
                self.assertEqual(connection.sent[-1].msg_id, message.msg_id)
            else:
                self.handle.message_received(connection, message)
                if message.operation == "keepalive":
                    self.clock.advance(15)
        self.assertIsNotNone(delivered)
        self.assertEqual(
            self.successResultOf(delivered).msg_id, "83f9679b-c4ba-4142-853c-0a46a002bc18"
        )
        # Five keepalives 15 s apart kept the node; the final blank frame was ignored.
        self.assertIsNone(connection.closed)
        self.assertEqual(self.received, [])
        self.clock.advance(30)
        self.assertIsNotNone(connection.closed)


class DurableDeliveryTests(SynchronousTestCase):
    """The handle with a sync store: what is owed survives a new MessageHandle (a restart)."""

    def setUp(self) -> None:
        from cloudhub.store import MemorySyncStore

        self.clock = Clock()
        self.store = MemorySyncStore()

    def hub(self) -> Upstream:
        self.handle = MessageHandle(self.clock, store=self.store)
        return Upstream(self.handle)

    def connect(self, node_id: str) -> FakeConnection:
        connection = FakeConnection(node_id)
        self.handle.connection_made(connection)
        return connection

    def test_pending_survives_restart_in_order_same_msg_id(self) -> None:
        upstream = self.hub()
        sent = [pod_message(f"u{i}", "1", "insert", name=f"p{i}") for i in range(3)]
        for message in sent:
            upstream.send("edge-1", message)
        self.successResultOf(upstream.flush())
        self.hub()  # restart
        connection = self.connect("edge-1")
        for message in sent:
            self.assertEqual(connection.sent[-1].msg_id, message.msg_id)
            self.handle.message_received(connection, model.new_ack(connection.sent[-1]))
        self.assertEqual(len(connection.sent), 3)
        records = self.successResultOf(self.store.records("edge-1"))
        self.assertEqual(
            {r.uid: (r.acked_version, r.pending) for r in records},
            {f"u{i}": (1, None) for i in range(3)},
        )

    def test_acked_version_survives_restart_stale_refused(self) -> None:
        upstream = self.hub()
        connection = self.connect("edge-1")
        upstream.send("edge-1", pod_message("u1", "5", "insert"))
        self.handle.message_received(connection, model.new_ack(connection.sent[-1]))
        upstream = self.hub()
        self.failureResultOf(upstream.send("edge-1", pod_message("u1", "5")), StaleMessage)
        newer = upstream.send("edge-1", pod_message("u1", "6"))
        connection = self.connect("edge-1")
        self.assertEqual(connection.sent[-1].resource_version, "6")
        self.handle.message_received(connection, model.new_ack(connection.sent[-1]))
        self.successResultOf(newer)

    def test_acknowledged_delete_leaves_a_tombstone(self) -> None:
        """Not removed as KubeEdge's ObjectSync is: remembered (tests/test_tombstones.py)."""
        upstream = self.hub()
        connection = self.connect("edge-1")
        upstream.send("edge-1", pod_message("u1", "5", "insert"))
        self.handle.message_received(connection, model.new_ack(connection.sent[-1]))
        upstream.send("edge-1", pod_message("u1", "6", "delete"))
        self.handle.message_received(connection, model.new_ack(connection.sent[-1]))
        [record] = self.successResultOf(self.store.records("edge-1"))
        self.assertEqual((record.pending, record.acked_version), (None, 6))
        self.assertIsNotNone(record.deleted_at)

    def test_encoded_once_for_store_and_wire(self) -> None:
        """The bytes the store keeps are the bytes handed to the transport, every time."""
        from cloudhub import wire

        upstream = self.hub()
        upstream.send("edge-1", pod_message("u1", "5", "insert"))
        connection = self.connect("edge-1")
        self.clock.advance(5)  # one retransmission
        [record] = self.successResultOf(self.store.records("edge-1"))
        assert record.pending is not None
        self.assertEqual(len(connection.encoded), 2)
        first, again = connection.encoded
        self.assertIs(first, again)
        self.assertEqual(first, wire.encode(connection.sent[0]))
        self.assertEqual(first, wire.encode(record.pending))

    def test_backoff_records_attempts(self) -> None:
        upstream = self.hub()
        self.connect("edge-1")
        upstream.send("edge-1", pod_message("u1", "5", "insert"))
        for _ in range(5):
            self.clock.advance(5)
        [record] = self.successResultOf(self.store.records("edge-1"))
        self.assertEqual(record.attempts, 5)
        self.assertIn("no ACK", record.last_error)


class QueueBookkeepingTests(SynchronousTestCase):
    def test_superseded_unsent_messages_leave_no_ack_index(self) -> None:
        from cloudhub.queue import NodeQueue

        queue = NodeQueue("edge-1")
        for rv in range(1, 50):
            queue.offer(pod_message("u1", str(rv)), want_result=False)
        self.assertEqual(len(queue.by_msg_id), 1)
        self.assertEqual(len(queue.pending), 1)


class SendManyTests(HubTestCase):
    def test_results_in_order_without_deferreds(self) -> None:
        connection = self.connect("edge-1")
        self.upstream.send("edge-1", pod_message("u1", "5", "insert"))
        self.ack(connection, connection.sent[-1])
        results = self.upstream.send_many(
            [
                ("edge-1", pod_message("u2", "1", "insert", name="b")),
                ("edge-1", pod_message("u1", "5")),
                ("edge-1", pod_message("", "1", "insert")),
                ("", pod_message("u3", "1", "insert")),
                ("edge-2", pod_message("u4", "1", "insert")),
            ]
        )
        self.assertIsNone(results[0])
        self.assertIsInstance(results[1], StaleMessage)
        self.assertIsInstance(results[2], InvalidMessage)
        self.assertIsInstance(results[3], InvalidMessage)
        self.assertIsNone(results[4])
        self.assertEqual(connection.sent[-1].content["metadata"]["uid"], "u2")
        self.assertEqual(self.handle.stats.refused_stale, 1)
        self.assertEqual(self.handle.stats.refused_invalid, 2)


class AttachDetachTests(SynchronousTestCase):
    """MessageHandle as CloudHubService starts and stops it (issue 15)."""

    def setUp(self) -> None:
        from cloudhub.store import MemorySyncStore

        self.clock = Clock()
        self.store = MemorySyncStore()
        self.handle = MessageHandle(self.clock, running=False)

    def test_nothing_accepted_before_attach(self) -> None:
        from cloudhub.errors import HubNotRunning

        with self.assertRaises(HubNotRunning):
            self.handle.send("n", pod_message("u", "1", "insert"))
        self.handle.attach(self.store, [])
        self.handle.send("n", pod_message("u", "1", "insert")).addErrback(lambda f: None)
        self.assertEqual(self.handle.queues["n"].depth, 1)

    def test_no_new_session_once_stopping(self) -> None:
        from cloudhub.errors import NodeRefused

        self.handle.attach(self.store, [])
        early = FakeConnection("edge-1")
        self.handle.connection_made(early)
        self.handle.stop_serving()
        self.assertEqual(early.closed, (1001, "hub shutting down"))
        late = FakeConnection("edge-2")  # its handshake completed during the stop
        with self.assertRaises(NodeRefused):
            self.handle.connection_made(late)
        self.assertEqual(self.handle.sessions, {})
        self.handle.attach(self.store, [])  # the next start serves nodes again
        self.handle.connection_made(FakeConnection("edge-2"))
        self.assertIn("edge-2", self.handle.sessions)

    def test_flush_waits_for_the_store_let_go(self) -> None:
        self.handle.attach(self.store, [])
        released: Deferred[None] = Deferred()
        self.handle.detach(released)
        flushed = self.handle.flush()
        self.assertFalse(flushed.called)  # the store's last commit is not done yet
        released.callback(None)
        self.assertIsNone(self.successResultOf(flushed))
        self.assertIsNone(self.successResultOf(self.handle.flush()))

    def test_flush_fails_when_the_last_commit_failed(self) -> None:
        from cloudhub.store import StoreError

        self.handle.attach(self.store, [])
        released: Deferred[None] = Deferred()
        self.handle.detach(released)
        flushed = self.handle.flush()
        released.errback(StoreError("database or disk is full"))
        self.failureResultOf(flushed, StoreError)
        # Not durable, and says so until the next start.
        self.failureResultOf(self.handle.flush(), StoreError)
        released.addErrback(lambda _: None)
        self.handle.attach(self.store, [])
        self.assertIsNone(self.successResultOf(self.handle.flush()))

    def test_detach_ends_waiting_sends_and_sessions(self) -> None:
        from cloudhub.errors import DeliveryStopped

        self.handle.attach(self.store, [])
        connection = FakeConnection("edge-1")
        self.handle.connection_made(connection)
        waiting = self.handle.send("edge-1", pod_message("u", "1", "insert"))
        self.handle.detach()
        self.failureResultOf(waiting, DeliveryStopped)
        self.assertEqual(self.handle.sessions, {})
        self.assertIsNotNone(connection.closed)
