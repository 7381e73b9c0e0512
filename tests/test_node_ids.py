"""Node ids are Kubernetes node names, read from the handshake as Go reads them (issue 18, 9).

The validator itself (:mod:`cloudhub.nodeid`), then the WebSocket upgrade (raw request bytes
into the hub protocol on a fake transport) and the QUIC header exchange (an aioquic client
through memory): a bad id is refused before the handler hears of the connection.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub.interfaces import CLOSE_POLICY
from cloudhub.nodeid import MAX_NODE_ID_LENGTH, check_node_id, validate_node_id
from tests.test_transport_quic import PROJECT_ID, Base, Link
from tests.test_transport_websocket import RecordingHandler, Unit, upgrade_request

from .test_api import ApiHarness, pod_body

VALID = [
    "edge-node-1",
    "a",
    "0",
    "node.example.com",
    "1-2.3-4",
    "a" * 63,
    ".".join(["a" * 63] * 3) + "." + "b" * 61,  # 253
]

INVALID = [
    "",
    "nöde",
    "Edge-1",
    "edge_1",
    "a/b",
    "..",
    ".a",
    "a.",
    "a..b",
    "-a",
    "a-",
    "a.-b",
    "a b",
    "a\x00b",
    "a" * 64,
    "a" * 100_000,
    ".".join(["a" * 63] * 3) + "." + "b" * 62,  # 254
    "edge-1\n",
    "ｅdge",  # fullwidth: not ASCII
]


class ValidatorTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for value in VALID:
            self.assertIsNone(validate_node_id(value), value)
            self.assertEqual(check_node_id(value), value)
        self.assertEqual(len(VALID[-1]), MAX_NODE_ID_LENGTH)

    def test_invalid(self) -> None:
        for value in INVALID:
            problem = validate_node_id(value)
            self.assertIsNotNone(problem, repr(value))
            assert problem is not None
            self.assertNotIn("\n", problem)
            self.assertLess(len(problem), 120)  # fits a close frame; never echoes the id
            self.assertRaises(ValueError, check_node_id, value)

    def test_messages(self) -> None:
        self.assertEqual(validate_node_id(""), "node id is empty")
        self.assertIn("longer than 253", validate_node_id("a" * 254) or "")
        self.assertIn("label longer than 63", validate_node_id("a" * 64) or "")
        self.assertIn("lower case alphanumeric", validate_node_id("a/b") or "")
        self.assertIn("'..'", validate_node_id("a..b") or "")
        self.assertIn("start and end", validate_node_id("a.-b") or "")


def raw_request(*node_id_lines: bytes) -> bytes:
    """An upgrade request with exactly the given ``Node_id`` header lines (raw bytes)."""
    extra = b"".join(b"Node_id: " + line + b"\r\n" for line in node_id_lines)
    return upgrade_request(None, extra)


class WebSocketNodeIdTests(SynchronousTestCase):
    def connect(self, request: bytes) -> tuple[RecordingHandler, bytes]:
        handler = RecordingHandler()
        protocol, transport = Unit(handler).connect(request)
        if not transport.value().startswith(b"HTTP/1.1 101 "):
            self.assertTrue(transport.disconnecting)
            Unit.lose(protocol)
        return handler, transport.value()

    def assertRefused(self, request: bytes, reason: bytes) -> None:
        handler, response = self.connect(request)
        status = response.split(b"\r\n", 1)[0]
        self.assertTrue(status.startswith(b"HTTP/1.1 400 "), response)
        self.assertIn(reason, status)
        self.assertEqual(handler.events, [])

    def test_utf8_is_decoded_as_sent_then_refused(self) -> None:
        """``nöde`` in UTF-8 is not mis-decoded as Latin-1 (``nÃ¶de``): it is decoded as UTF-8
        and refused as a node name."""
        self.assertRefused(raw_request("nöde".encode()), b"lower case alphanumeric")

    def test_bytes_that_are_not_utf8(self) -> None:
        self.assertRefused(raw_request(b"n\xf6de"), b"not valid UTF-8")

    def test_first_value_wins(self) -> None:
        """Two ``Node_id`` headers: the first one, as Go's ``Header.Get`` (not "a, b")."""
        handler, response = self.connect(raw_request(b"edge-a", b"edge-b"))
        self.assertTrue(response.startswith(b"HTTP/1.1 101 "), response)
        [(kind, connection)] = handler.events
        self.assertEqual(connection.node_id, "edge-a")

    def test_first_value_is_the_one_judged(self) -> None:
        self.assertRefused(raw_request(b"a/b", b"edge-b"), b"lower case alphanumeric")

    def test_invalid_ids_refused_with_400(self) -> None:
        for value in ("a/b", "..", "Edge-1", "a" * 64, "-a"):
            self.assertRefused(raw_request(value.encode()), b"invalid node_id header: node id")

    def test_huge_id_refused(self) -> None:
        handler, response = self.connect(raw_request(b"a" * 12_000))
        self.assertIn(b" 400 ", response.split(b"\r\n", 1)[0])
        self.assertNotIn(b"a" * 300, response)  # the reason does not echo the id
        self.assertEqual(handler.events, [])

    def test_surrounding_whitespace_is_not_part_of_the_id(self) -> None:
        handler, response = self.connect(upgrade_request(None, b"Node_id: \t edge-7 \t\r\n"))
        self.assertTrue(response.startswith(b"HTTP/1.1 101 "), response)
        self.assertEqual(handler.events[0][1].node_id, "edge-7")

    def test_project_id_first_value(self) -> None:
        request = upgrade_request("edge-1", b"Project_id: p1\r\nProject_id: p2\r\n")
        handler, response = self.connect(request)
        self.assertEqual(handler.events[0][1].project_id, "p1")


class QuicNodeIdTests(Base):
    def refused_with(self, node_id: str) -> str:
        hub = self.hub()
        link = Link(hub, self.credentials)
        link.pump()
        link.header(content={"Node_id": [node_id, "edge-2"], "Project_id": [PROJECT_ID]})
        link.run(1)
        closed = link.closed()
        assert closed is not None
        self.assertEqual(closed.error_code, CLOSE_POLICY)
        self.assertEqual(hub.handler.events, [])
        self.assertEqual(hub.protocol.stats.headers_refused, 1)
        return closed.reason_phrase

    def test_invalid_ids_refused_with_1008(self) -> None:
        for value in ("nöde", "a/b", "..", "a" * 300):
            reason = self.refused_with(value)
            self.assertTrue(reason.startswith("invalid node_id header: node id"), reason)

    def test_first_value_wins(self) -> None:
        hub = self.hub()
        link = Link(hub, self.credentials)
        link.pump()
        link.header(content={"Node_id": ["edge-a", "edge-b"]})
        [(kind, connection)] = hub.handler.events
        self.assertEqual((kind, connection.node_id), ("made", "edge-a"))


class ApiNodeIdTests(ApiHarness, TestCase):
    """Messages for a node id no edge could ever connect with are refused (400 / invalid)."""

    timeout = 60

    async def test_single_and_batch(self) -> None:
        await self.start_hub()
        for bad in ("Edge_1", "a" * 300, "n..x"):
            reply = await self.post(bad, pod_body("u", "1"))
            self.assertEqual(reply.code, 400, bad[:20])
            self.assertIn("node id", reply.json["error"])
            self.assertLess(len(reply.json["error"]), 300)  # the id is not echoed whole
        entries = [
            {"node": "Bad_Node", "message": pod_body("u1", "1")},
            {"node": "good-node", "message": pod_body("u2", "1")},
        ]
        reply = await self.call(b"POST", "/v1/messages", entries)
        self.assertEqual(reply.code, 200, reply.json)
        statuses = [entry["status"] for entry in reply.json["results"]]
        self.assertEqual(statuses, ["invalid", "accepted"])
        self.assertEqual(self.hub.handle.queues.keys(), {"good-node"})
