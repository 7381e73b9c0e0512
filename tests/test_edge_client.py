"""cloudhub.edge.client and cloudhub.edge.metamanager: the edge side, without sockets.

The node runs on a ``MemoryReactorClock``: its TLS connection attempts are recorded there, a
test accepts one onto a ``StringTransport``, answers the upgrade, pushes hub frames in and reads
the masked frames the node wrote. The real-socket tests of the node against the hub are in
test_transport_websocket.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from cloudhub.edge.client import DEFAULT_PROJECT_ID, CloseInfo, EdgeNode
from cloudhub.edge.metamanager import MetaStore
from cloudhub.model import Message, new_keepalive
from cloudhub.transport.websocket import text_frame
from cloudhub.wire import decode, encode
from tests.test_transport_websocket import EDGECORE_REQUEST, close_of, parse_frames

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
POD_UID = "6f1a5c2e-8a2b-4c59-9f00-000000000001"


def pod(version: str, uid: str = POD_UID, name: str = "nginx") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": version},
    }


def cloud(
    operation: str, resource: str, content: Any = None, version: str = "", **kw: Any
) -> Message:
    source = kw.pop("source", "edgecontroller")
    group = kw.pop("group", "resource")
    return Message.new(source, group, operation, resource, content, resource_version=version, **kw)


class Transport(StringTransport):
    def __init__(self) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 50000),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 10000),
        )
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def unregisterProducer(self) -> None:
        self.producer = None


class Harness:
    """One EdgeNode on a memory reactor, and the hub's end of its connections."""

    def __init__(self, randoms: list[float] | None = None, **kwargs: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.randoms = randoms
        self.seen: list[Message] = []
        kwargs.setdefault("on_message", lambda node, message: self.seen.append(message))
        self.node = EdgeNode(
            self.reactor,
            "edge-node-1",
            "127.0.0.1",
            10000,
            None,
            tls_options=object(),  # type: ignore[arg-type]
            random=self._random,
            **kwargs,
        )
        self.protocol: Any = None
        self.transport: Transport | None = None

    def _random(self) -> float:
        return self.randoms.pop(0) if self.randoms else 0.5

    @property
    def attempts(self) -> int:
        return len(self.reactor.sslClients)

    def accept(self) -> Transport:
        """The last connection attempt reaches the hub (TCP and TLS done)."""
        host, port, factory = self.reactor.sslClients[-1][:3]
        self.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.transport = Transport()
        self.protocol.makeConnection(self.transport)
        return self.transport

    def refuse(self) -> None:
        """The last connection attempt fails (connection refused)."""
        factory = self.reactor.sslClients[-1][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[-1], Failure(ConnectionRefusedError())
        )

    def upgrade(self) -> None:
        """Answer the upgrade request with 101, as gorilla's Upgrader does."""
        assert self.transport is not None
        key = re.search(rb"Sec-WebSocket-Key: (\S+)\r\n", self.transport.value()).group(1)  # type: ignore[union-attr]
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self.transport.clear()
        self.transport.writes.clear()
        self.protocol.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )

    def connect(self) -> None:
        self.accept()
        self.upgrade()
        assert self.node.connected

    def sent(self, clear: bool = True) -> list[Message]:
        """The messages the node wrote since the last call."""
        assert self.transport is not None
        frames, rest = parse_frames(self.transport.value())
        assert rest == b""
        if clear:
            self.transport.clear()
        assert all(masked for _, masked, _ in frames)
        return [decode(payload) for opcode, _, payload in frames if opcode == 1]

    def push(self, *messages: Message) -> None:
        """The hub sends these messages, in one TCP read."""
        self.protocol.dataReceived(b"".join(text_frame(encode(m)) for m in messages))

    def hub_closes(self, code: int, reason: str = "") -> None:
        self.protocol.dataReceived(
            bytes((0x88, 2 + len(reason))) + struct.pack("!H", code) + reason.encode()
        )
        self.tcp_lost()

    def tcp_lost(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class ConnectTests(SynchronousTestCase):
    def test_handshake_is_edgecore_s(self) -> None:
        """The upgrade request is edgecore's, byte for byte but for the random key."""
        harness = Harness()
        harness.node.start()
        host, port, _, _, timeout, _ = harness.reactor.sslClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 10000, 30.0))
        transport = harness.accept()
        request = re.sub(
            rb"Sec-WebSocket-Key: \S+",
            b"Sec-WebSocket-Key: aSdB5ohiXP4CRL8s6KpxYQ==",
            transport.value(),
        )
        self.assertEqual(request, EDGECORE_REQUEST)
        self.assertFalse(harness.node.connected)
        # The factory's options are read from the protocol class, not copied per connection.
        protocol = harness.node.protocol or harness.node._attempt
        self.assertNotIn("maxFramePayloadSize", vars(protocol))
        self.assertEqual((protocol.maxFramePayloadSize, protocol.failByDrop), (0, True))

    def test_project_id_and_ipv6(self) -> None:
        reactor = MemoryReactorClock()
        node = EdgeNode(reactor, "n1", "::1", 443, None, project_id="p", tls_options=object())  # type: ignore[arg-type]
        node.start()
        protocol = reactor.sslClients[0][2].buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        head = transport.value()
        self.assertTrue(head.startswith(b"GET /p/n1/events HTTP/1.1\r\nHost: [::1]:443\r\n"), head)
        self.assertIn(b"Node_id: n1\r\nProject_id: p\r\n", head)
        self.assertEqual(node.project_id, "p")
        self.assertEqual(DEFAULT_PROJECT_ID, "e632aba927ea4ac2b575ec1603d56f10")

    def test_keepalive_now_and_every_heartbeat(self) -> None:
        harness = Harness(heartbeat=15.0)
        opened = harness.node.start()
        harness.connect()
        self.assertEqual(self.successResultOf(opened), harness.node)
        [keepalive] = harness.sent()
        self.assertEqual(
            (
                keepalive.source,
                keepalive.group,
                keepalive.operation,
                keepalive.resource,
                keepalive.content,
            ),
            ("websocket", "resource", "keepalive", "node", "ping"),
        )
        harness.reactor.advance(14.9)
        self.assertEqual(harness.sent(), [])
        harness.reactor.advance(0.1)
        self.assertEqual([m.operation for m in harness.sent()], ["keepalive"])
        harness.reactor.advance(15)
        self.assertEqual([m.operation for m in harness.sent()], ["keepalive"])
        self.assertEqual(harness.node.stats.keepalives_sent, 3)
        harness.tcp_lost()
        harness.reactor.advance(15)
        self.assertEqual(harness.node.stats.keepalives_sent, 3)

    def test_send(self) -> None:
        harness = Harness()
        message = cloud(
            "update", "default/node/edge-node-1", {"x": 1}, source="edged", group="meta"
        )
        harness.node.send(message)
        self.assertEqual(harness.node.stats.sends_dropped, 1)
        harness.node.start()
        harness.connect()
        harness.sent()
        harness.node.send(message)
        self.assertEqual(harness.transport.writes[-1][:1], b"\x81")  # type: ignore[union-attr]
        self.assertEqual(harness.sent(), [message])
        self.assertEqual(harness.node.stats.messages_sent, 2)  # with the keepalive

    def test_when_connected_and_disconnected(self) -> None:
        harness = Harness(reconnect=False)
        node = harness.node
        self.assertIsNone(self.successResultOf(node.when_disconnected()))
        opened = node.start()
        closed = node.when_disconnected()
        self.assertNoResult(opened)
        harness.connect()
        self.assertIs(self.successResultOf(opened), node)
        self.assertIs(self.successResultOf(node.when_connected()), node)
        self.assertNoResult(closed)  # waits for the end of the attempt that is now open
        also_closed = node.when_disconnected()
        harness.hub_closes(1008, "keepalive timeout")
        info = self.successResultOf(closed)
        self.assertIs(self.successResultOf(also_closed), info)
        self.assertEqual(info, CloseInfo(1008, "keepalive timeout", True))
        self.assertEqual(
            (node.last_close_code, node.last_close_reason), (1008, "keepalive timeout")
        )
        self.assertEqual(self.successResultOf(node.when_disconnected()), info)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])  # reconnect=False

    def test_decode_error_closes(self) -> None:
        harness = Harness()
        harness.node.start()
        harness.connect()
        harness.sent()
        harness.protocol.dataReceived(text_frame(b"[1, 2"))
        frames, _ = parse_frames(harness.transport.value())  # type: ignore[union-attr]
        self.assertEqual(frames[-1][0], 8)
        self.assertEqual(close_of(frames[-1][2])[0], 1007)
        self.assertEqual(harness.node.stats.decode_errors, 1)

    def test_hub_does_not_drop_tcp(self) -> None:
        """After answering the hub's close frame the node waits 2 s for TCP to go, then drops it."""
        harness = Harness(reconnect=False)
        harness.node.start()
        harness.connect()
        harness.sent()
        harness.protocol.dataReceived(b"\x88\x02" + struct.pack("!H", 1000))
        frames, _ = parse_frames(harness.transport.value())  # type: ignore[union-attr]
        self.assertEqual([op for op, _, _ in frames], [8])
        self.assertFalse(harness.transport.disconnecting)  # type: ignore[union-attr]
        harness.reactor.advance(2)
        self.assertTrue(harness.transport.disconnecting)  # type: ignore[union-attr]
        harness.tcp_lost()
        self.assertEqual(harness.node.last_close_code, 1000)


class MessageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = Harness()
        self.node = self.harness.node
        self.node.start()
        self.harness.connect()
        self.harness.sent()
        self.harness.transport.writes.clear()  # type: ignore[union-attr]

    def test_control_operations(self) -> None:
        """ping/pong/config are answered with "ack" and go no further (§2.3)."""
        controls = [
            cloud(op, "node/edge-node-1", "x", source="cloudhub")
            for op in ("ping", "pong", "config")
        ]
        self.harness.push(*controls)
        replies = self.harness.sent()
        self.assertEqual([r.parent_msg_id for r in replies], [c.msg_id for c in controls])
        self.assertEqual(
            {(r.operation, r.content, r.source, r.resource) for r in replies},
            {("response", "ack", "cloudhub", "node/edge-node-1")},
        )
        self.assertEqual(self.harness.seen, [])
        self.assertEqual(len(self.node.store), 0)
        self.assertEqual(self.node.stats.control_acks_sent, 3)

    def test_metamanager_rules(self) -> None:
        """§7.5, for a burst of cloud messages in one read; every reply leaves in one write."""
        store = self.node.store
        store.upsert("default/configmap/old", {"data": {}}, "3")
        store.upsert("default/podpatch/nginx", {"patch": 1})
        store.upsert("default/pod/other", pod("1", uid="uid-other", name="other"))
        messages = {
            "insert": cloud("insert", "default/pod/nginx", pod("12345"), "12345"),
            "update": cloud("update", "default/pod/nginx", pod("12346"), "12346"),
            "update-other-source": cloud(
                "update", "default/secret/s", {"data": {}}, "5", source="someone"
            ),
            "delete-configmap": cloud("delete", "default/configmap/old", {}, "6"),
            "delete-pod": cloud("delete", "default/pod/nginx", pod("12347"), "12347"),
            "delete-pod-no-uid": cloud("delete", "default/pod/other", "not a pod", "8"),
            "response-no-parent": cloud("response", "default/configmap/c", {"data": {}}, "9"),
            "reply": cloud(
                "response", "default/node/edge-node-1", {"Object": {}}, parent_msg_id="m-1"
            ),
            "twin": cloud(
                "update",
                "device/d1/twin/cloud_updated",
                {},
                group="twin",
                source="devicecontroller",
            ),
        }
        self.harness.push(*messages.values())
        self.assertEqual(len(self.harness.transport.writes), 1)  # type: ignore[union-attr]
        replies = {r.parent_msg_id: r for r in self.harness.sent()}
        by_name = {name: replies.get(m.msg_id) for name, m in messages.items()}

        for name in ("insert", "update", "delete-configmap", "delete-pod"):
            ack = by_name[name]
            assert ack is not None, name
            original = messages[name]
            self.assertEqual(
                (ack.source, ack.group, ack.operation, ack.resource, ack.content),
                (original.source, "resource", "response", original.resource, "OK"),
            )
        error = by_name["delete-pod-no-uid"]
        assert error is not None
        self.assertEqual((error.operation, error.source, error.group), ("error", "metamanager", ""))
        self.assertIn("metadata.uid", error.content)
        for name in ("update-other-source", "response-no-parent", "reply", "twin"):
            self.assertIsNone(by_name[name], name)

        self.assertIsNone(store.get("default/pod/nginx"))  # inserted, updated, deleted
        self.assertIsNone(store.get("default/podpatch/nginx"))
        self.assertIsNone(store.get("default/configmap/old"))
        self.assertEqual(store.get("default/pod/other").value["metadata"]["uid"], "uid-other")  # type: ignore[union-attr]
        secret = store.get("default/secret/s")
        assert secret is not None
        self.assertEqual((secret.type, secret.resource_version), ("secret", "5"))
        self.assertEqual(store.get("default/configmap/c").resource_version, "9")  # type: ignore[union-attr]
        self.assertNotIn("default/node/edge-node-1", store)
        self.assertEqual(store.versions("default/pod/nginx"), ["12345", "12346", "12347"])
        self.assertEqual(
            store.acked_ids(),
            [messages[n].msg_id for n in ("insert", "update", "delete-configmap", "delete-pod")],
        )

        self.assertEqual(
            [m.msg_id for m in self.harness.seen], [m.msg_id for m in messages.values()]
        )
        stats = self.node.stats
        self.assertEqual((stats.messages_received, stats.acks_sent, stats.errors_sent), (9, 4, 1))

    def test_pod_delete_of_another_uid(self) -> None:
        """A delete for a pod of another UID deletes nothing (the row is a newer pod) but is
        acknowledged, as edgecore's ``DELETE ... WHERE value LIKE %uid%`` does."""
        self.harness.push(cloud("insert", "default/pod/nginx", pod("10", uid="new"), "10"))
        self.harness.push(cloud("delete", "default/pod/nginx", pod("9", uid="old"), "9"))
        self.assertEqual([r.content for r in self.harness.sent()], ["OK", "OK"])
        self.assertEqual(self.node.store.get("default/pod/nginx").value["metadata"]["uid"], "new")  # type: ignore[union-attr]

    def test_burst_of_acks_one_write(self) -> None:
        self.harness.push(
            *[cloud("insert", f"default/configmap/c{i}", {}, str(i)) for i in range(16)]
        )
        self.assertEqual(len(self.harness.transport.writes), 1)  # type: ignore[union-attr]
        self.assertEqual(len(self.harness.sent()), 16)

    def test_on_message_bug(self) -> None:
        def broken(node: EdgeNode, message: Message) -> None:
            raise RuntimeError("bug")

        self.node.on_message = broken
        self.harness.push(cloud("insert", "default/configmap/c", {}, "1"))
        self.assertEqual([r.content for r in self.harness.sent()], ["OK"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class MetaStoreTests(SynchronousTestCase):
    def test_stale_after_ack(self) -> None:
        """A version older than one already acknowledged is recorded as stale."""
        store = MetaStore()
        store.apply(cloud("insert", "default/pod/a", pod("10"), "10"))
        store.apply(cloud("update", "default/pod/a", pod("12"), "12", source="someone"))  # no ACK
        self.assertEqual(store.stale, [])
        store.apply(cloud("update", "default/pod/a", pod("11"), "11"))
        self.assertEqual(store.stale, [])  # 11 > 10, the highest acknowledged
        stale = cloud("update", "default/pod/a", pod("9"), "9")
        store.apply(stale)
        [entry] = store.stale
        self.assertEqual(
            (entry.msg_id, entry.resource_version, entry.acked, entry.stale),
            (stale.msg_id, "9", True, True),
        )
        self.assertEqual(store.acked_version("default/pod/a"), 11)
        self.assertEqual(store.versions("default/pod/a"), ["10", "12", "11", "9"])
        store.apply(cloud("update", "default/pod/b", pod("x"), "not a number"))
        self.assertEqual(len(store.stale), 1)
        self.assertEqual(store.received_count, 5)

    def test_without_history(self) -> None:
        store = MetaStore(keep_history=False)
        store.apply(cloud("insert", "default/pod/a", pod("10"), "10"))
        store.apply(cloud("insert", "default/pod/a", pod("3"), "3"))
        self.assertEqual(store.history, [])
        self.assertEqual(len(store.stale), 1)
        self.assertEqual(store.received_count, 2)
        self.assertEqual(store.items()[0][0], "default/pod/a")


class ReconnectTests(SynchronousTestCase):
    def delays(self, harness: Harness, failures: int) -> list[float]:
        """Fail ``failures`` attempts in a row; the delays the node waited between them."""
        delays = []
        for _ in range(failures):
            attempts = harness.attempts
            harness.refuse()
            delay = harness.node.last_retry_delay
            assert delay is not None
            delays.append(round(delay, 6))
            harness.reactor.advance(delay - 0.001)
            self.assertEqual(harness.attempts, attempts)
            harness.reactor.advance(0.002)
            self.assertEqual(harness.attempts, attempts + 1)
        return delays

    def test_exponential_backoff(self) -> None:
        harness = Harness()
        harness.node.start()
        self.assertEqual(self.delays(harness, 7), [1, 2, 4, 8, 16, 30, 30])
        self.assertEqual(harness.node.stats.connect_failures, 7)
        self.assertEqual(harness.node.last_close.was_open, False)  # type: ignore[union-attr]
        self.assertIn("refused", harness.node.last_close_reason)

    def test_jitter(self) -> None:
        harness = Harness(randoms=[0.0, 1.0, 0.25])
        harness.node.start()
        self.assertEqual(self.delays(harness, 3), [0.8, 2.4, 3.6])

    def test_backoff_reset_after_a_connection(self) -> None:
        """A connection that was open resets the backoff; one refused with 1013 does not."""
        harness = Harness()
        harness.node.start()
        self.assertEqual(self.delays(harness, 2), [1, 2])
        harness.connect()
        harness.hub_closes(1000)
        self.assertEqual(harness.node.last_retry_delay, 1)
        harness.reactor.advance(1)
        for expected in (2, 4, 8):
            harness.connect()
            harness.hub_closes(1013, "node limit 500 reached")
            self.assertEqual(harness.node.last_retry_delay, expected)
            self.assertEqual(
                harness.node.last_close, CloseInfo(1013, "node limit 500 reached", True)
            )
            harness.reactor.advance(expected)
        self.assertEqual(harness.node.stats.connects, 4)

    def test_tls_failure_retried(self) -> None:
        """A connection lost before the upgrade completes (TLS refused) counts as a failure."""
        harness = Harness()
        harness.node.start()
        harness.accept()
        harness.tcp_lost()
        self.assertEqual(harness.node.last_retry_delay, 1)
        harness.reactor.advance(1)
        harness.accept()
        harness.tcp_lost()
        self.assertEqual(harness.node.last_retry_delay, 2)
        self.assertEqual(harness.node.stats.connect_failures, 2)

    def test_stop_when_open(self) -> None:
        harness = Harness()
        harness.node.start()
        harness.connect()
        harness.sent()
        stopped = harness.node.stop()
        frames, _ = parse_frames(harness.transport.value())  # type: ignore[union-attr]
        self.assertEqual([(op, close_of(p)) for op, _, p in frames], [(8, (1000, ""))])
        self.assertNoResult(stopped)
        harness.hub_closes(1000)
        self.successResultOf(stopped)
        harness.reactor.advance(60)
        self.assertEqual(harness.attempts, 1)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_stop_while_waiting(self) -> None:
        harness = Harness()
        harness.node.start()
        harness.refuse()
        self.successResultOf(harness.node.stop())
        harness.reactor.advance(60)
        self.assertEqual(harness.attempts, 1)

    def test_stop_while_connecting(self) -> None:
        harness = Harness()
        harness.node.start()
        closed = harness.node.when_disconnected()
        self.successResultOf(harness.node.stop())
        self.assertEqual(self.successResultOf(closed), CloseInfo(None, "stopped", False))
        self.assertTrue(harness.reactor.connectors[0].stoppedConnecting)
        harness.reactor.advance(60)
        self.assertEqual(harness.attempts, 1)

    def test_stop_during_upgrade(self) -> None:
        harness = Harness()
        harness.node.start()
        transport = harness.accept()
        stopped = harness.node.stop()
        self.assertTrue(transport.disconnecting)
        harness.tcp_lost()
        self.successResultOf(stopped)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_restart(self) -> None:
        harness = Harness()
        harness.node.start()
        harness.connect()
        stopped = harness.node.stop()
        harness.hub_closes(1000)
        self.successResultOf(stopped)
        opened = harness.node.start()
        self.assertEqual(harness.attempts, 2)
        harness.connect()
        self.successResultOf(opened)


class KeepaliveShapeTests(SynchronousTestCase):
    def test_keepalive_is_edgecore_s(self) -> None:
        """What the node sends as keepalive has edgecore's shape (ws-frames.txt frame #1)."""
        payload = encode(
            new_keepalive().copy(
                msg_id="38093ac5-ce00-444e-aee8-875ca222eaef", timestamp=1795878356372
            )
        )
        self.assertEqual(
            payload,
            b'{"header":{"msg_id":"38093ac5-ce00-444e-aee8-875ca222eaef","timestamp":1795878356372},'
            b'"route":{"source":"websocket","group":"resource","operation":"keepalive",'
            b'"resource":"node"},"content":"ping"}\n',
        )


class MaskPoolTests(SynchronousTestCase):
    def test_masks_are_fresh_four_byte_slices(self) -> None:
        from cloudhub.edge.client import MaskPool

        pool = MaskPool()
        masks = [pool.take() for _ in range(3 * MaskPool.SIZE // 4 + 5)]  # refills 3 times
        self.assertTrue(all(len(mask) == 4 for mask in masks))
        self.assertGreater(len(set(masks)), len(masks) * 0.99)  # 32 random bits each
        pool.reset()
        self.assertNotIn(pool.take(), masks[-3:])


class HalfOpenTests(TestCase):
    """After a partition heals, a Python edge notices its dead connection within two
    heartbeats (TCP_USER_TIMEOUT) instead of TCP's retransmission backoff (make chaos)."""

    timeout = 60

    async def test_user_timeout_is_two_heartbeats(self) -> None:
        import os
        import socket

        from twisted.internet import reactor

        from cloudhub.edge.bootstrap import bootstrap
        from cloudhub.edge.client import EdgeNode
        from cloudhub.service import CloudHubService

        from .test_integration_ws import hub_config, wait_for

        if not hasattr(socket, "TCP_USER_TIMEOUT"):
            raise SkipTest("no TCP_USER_TIMEOUT on this platform")
        hub = CloudHubService(hub_config(os.path.abspath(self.mktemp())), reactor=reactor)
        self.addCleanup(hub.stopService)
        await hub.startService()
        assert hub.tokens is not None
        url = f"https://127.0.0.1:{hub.port('https')}"
        credentials = await bootstrap(reactor, url, hub.tokens.current, "edge-1")
        node = EdgeNode(
            reactor, "edge-1", "127.0.0.1", hub.port("websocket"), credentials, heartbeat=7
        )
        self.addCleanup(node.stop)
        await node.start()
        await wait_for(lambda: hub.upstream.is_connected("edge-1"))
        transport = node._link.transport  # type: ignore[union-attr]
        while not isinstance(transport.getHandle(), socket.socket):
            transport = transport.transport
        value = transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        self.assertEqual(value, 14_000)
