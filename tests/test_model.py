"""The beehive message model and its helpers (protocol §1, §6.3, §7.5)."""

from __future__ import annotations

import uuid

from twisted.trial.unittest import SynchronousTestCase

from cloudhub import model
from cloudhub.errors import ResourceVersionError
from cloudhub.model import Message


def pod(uid: str = "u1", rv: str = "5", **metadata: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "nginx",
            "namespace": "default",
            "uid": uid,
            "resourceVersion": rv,
            **metadata,
        },
    }


class MessageTests(SynchronousTestCase):
    def test_new_message_has_uuid4_and_ms_timestamp(self) -> None:
        before = model.now_ms()
        msg = Message.new("edgecontroller", "resource", "insert", "default/pod/nginx", pod())
        self.assertEqual(uuid.UUID(msg.msg_id).version, 4)
        self.assertGreaterEqual(msg.timestamp, before)
        self.assertLess(msg.timestamp - before, 60_000)
        self.assertEqual(msg.parent_msg_id, "")

    def test_msg_ids_are_unique_canonical_uuid4s(self) -> None:
        import threading

        ids: list[str] = []

        def make() -> None:
            ids.extend(model.new_msg_id() for _ in range(2000))

        threads = [threading.Thread(target=make) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(len(set(ids)), 8000)
        for text in ids[::97]:
            parsed = uuid.UUID(text)
            self.assertEqual((parsed.version, parsed.variant), (4, uuid.RFC_4122))
            self.assertEqual(str(parsed), text)  # lower case, dashes where uuid puts them

    def test_msg_id_source_drawn_again_after_fork(self) -> None:
        """A forked child (twistd daemonizing, a worker) does not repeat its parent's ids."""
        before = model.new_msg_id()
        model._new_msg_id_source()  # what os.register_at_fork runs in the child
        after = model.new_msg_id()
        self.assertNotEqual(before[:18], after[:18])  # the random, per-process part

    def test_response_copies_route_and_points_at_original(self) -> None:
        original = Message.new("edged", "meta", "query", "default/configmap/c", None)
        original.type = "t"
        reply = model.new_response(original, {"x": 1})
        self.assertEqual(reply.parent_msg_id, original.msg_id)
        self.assertNotEqual(reply.msg_id, original.msg_id)
        self.assertEqual(
            (reply.source, reply.group, reply.resource, reply.operation, reply.type),
            ("edged", "meta", "default/configmap/c", "response", "t"),
        )

    def test_ack_as_metamanager_builds_it(self) -> None:
        """§7.5: same source and resource, group resource, op response, content OK."""
        original = Message.new("edgecontroller", "resource", "insert", "default/pod/nginx", pod())
        ack = model.new_ack(original)
        self.assertEqual(ack.parent_msg_id, original.msg_id)
        self.assertEqual(
            (ack.source, ack.group, ack.operation, ack.resource, ack.content),
            ("edgecontroller", "resource", "response", "default/pod/nginx", "OK"),
        )

    def test_error_response(self) -> None:
        original = Message.new("edgecontroller", "resource", "insert", "default/pod/nginx", pod())
        error = model.new_error_response(original, "disk full", source="metamanager")
        self.assertEqual((error.operation, error.group, error.content), ("error", "", "disk full"))
        self.assertEqual(error.parent_msg_id, original.msg_id)

    def test_control_ack(self) -> None:
        ping = Message.new("cloudhub", "resource", "ping", "node", None)
        ack = model.new_control_ack(ping)
        self.assertEqual(
            (ack.operation, ack.content, ack.parent_msg_id), ("response", "ack", ping.msg_id)
        )

    def test_empty_shutdown_message(self) -> None:
        self.assertTrue(Message(msg_id="", timestamp=0).is_empty)
        self.assertFalse(model.new_keepalive().is_empty)


class MsgIdTests(SynchronousTestCase):
    def test_length_bound(self) -> None:
        """One rule for edges and the API (issue 18): at most MAX_MSG_ID_LENGTH characters."""
        self.assertGreaterEqual(model.MAX_MSG_ID_LENGTH, 36)  # a KubeEdge UUID fits
        longest = "i" * model.MAX_MSG_ID_LENGTH
        self.assertIsNone(model.msg_id_problem(longest, longest))
        self.assertIsNone(model.msg_id_problem(Message.new("s", "g", "o", "r").msg_id))
        problem = model.msg_id_problem(longest + "i")
        assert problem is not None
        self.assertIn(f"header.msg_id is {model.MAX_MSG_ID_LENGTH + 1} characters long", problem)
        problem = model.msg_id_problem("", "p" * 100_000)
        assert problem is not None
        self.assertIn("header.parent_msg_id", problem)
        self.assertNotIn("ppp", problem)  # the id is not repeated


class ResourceTests(SynchronousTestCase):
    def test_target_node(self) -> None:
        self.assertEqual(model.target_node("node/edge-1/default/pod/nginx"), "edge-1")
        self.assertEqual(model.target_node("upgrade/abc/node/edge-2"), "edge-2")
        self.assertIsNone(model.target_node("default/pod/nginx"))
        self.assertIsNone(model.target_node("node/"))
        self.assertIsNone(model.target_node("node"))

    def test_trim_resource(self) -> None:
        self.assertEqual(model.trim_resource("node/edge-1/default/pod/nginx"), "default/pod/nginx")
        self.assertEqual(model.trim_resource("node/edge-1/membership"), "membership")
        self.assertEqual(model.trim_resource("upgrade/u/node/n"), "upgrade/u/node/n")

    def test_node_resource_round_trip(self) -> None:
        internal = model.node_resource("edge-1", "default/podstatus/p")
        self.assertEqual(internal, "node/edge-1/default/podstatus/p")
        self.assertEqual(model.trim_resource(internal), "default/podstatus/p")

    def test_resource_type(self) -> None:
        self.assertEqual(model.resource_type("default/pod/nginx"), "pod")
        self.assertEqual(model.resource_type("membership"), "")


class ContentTests(SynchronousTestCase):
    def test_object_fields(self) -> None:
        content = pod(uid="abc")
        self.assertEqual(model.object_uid(content), "abc")
        self.assertEqual(model.object_kind(content), "Pod")
        self.assertEqual(model.object_api_version(content), "v1")
        self.assertEqual(model.object_name(content), "nginx")
        self.assertEqual(model.object_namespace(content), "default")

    def test_cluster_scoped_namespace_is_null(self) -> None:
        node = {"kind": "Node", "metadata": {"name": "n", "uid": "x"}}
        self.assertEqual(model.object_namespace(node), "null")

    def test_non_object_content(self) -> None:
        for content in ("OK", None, 5, [1], {"metadata": "x"}):
            self.assertEqual(model.object_uid(content), "")
            self.assertEqual(model.object_kind(content), "")

    def test_delete_detection(self) -> None:
        delete = Message.new("edgecontroller", "resource", "delete", "default/pod/nginx", pod())
        self.assertTrue(model.is_delete(delete))
        terminating = Message.new(
            "edgecontroller",
            "resource",
            "update",
            "default/pod/nginx",
            pod(deletionTimestamp="2024-01-01T00:00:00Z"),
        )
        self.assertTrue(model.is_delete(terminating))
        update = Message.new("edgecontroller", "resource", "update", "default/pod/nginx", pod())
        self.assertFalse(model.is_delete(update))


class ResourceVersionTests(SynchronousTestCase):
    def test_numeric_not_lexical(self) -> None:
        self.assertEqual(model.compare_resource_versions("9", "10"), -1)
        self.assertEqual(model.compare_resource_versions("10", "9"), 1)
        self.assertEqual(model.compare_resource_versions("007", "7"), 0)

    def test_uint64_bounds(self) -> None:
        self.assertEqual(model.parse_resource_version("18446744073709551615"), 2**64 - 1)
        with self.assertRaises(ResourceVersionError) as caught:
            model.parse_resource_version("18446744073709551616")
        self.assertIn("64 bits", str(caught.exception))

    def test_non_numeric_is_a_clear_error(self) -> None:
        for bad in ("", "abc", "-1", "1.5", " 1", "１２", "0x10"):
            with self.assertRaises(ResourceVersionError) as caught:
                model.parse_resource_version(bad)
            self.assertIn(repr(bad), str(caught.exception))
