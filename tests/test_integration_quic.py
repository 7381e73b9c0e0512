"""Issue 7 end to end: the real core (MessageHandle) behind the QUIC listener on 127.0.0.1 port 0,
real TLS 1.3, and cloudhub.edge.quic.QuicEdgeNode as the edge; plus one node moving from the
WebSocket listener to the QUIC one with messages pending."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.edge.bootstrap import EdgeCredentials
from cloudhub.edge.client import EdgeNode
from cloudhub.edge.metamanager import MetaStore
from cloudhub.edge.quic import QuicEdgeNode, client_configuration
from cloudhub.errors import Superseded
from cloudhub.handler import EVENT_CONNECTED, EVENT_DISCONNECTED, MessageHandle, NodeEvent
from cloudhub.interfaces import CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN_LATER
from cloudhub.model import Message
from cloudhub.transport.quic import QuicListeningService, quic_listener
from cloudhub.transport.websocket import websocket_listener

from .fakes import pod_message
from .helpers_tls import make_config
from .test_integration_ws import wait_for
from .test_transport_quic import quiet
from .test_transport_websocket import edge_credentials

PROJECT_ID = "e632aba927ea4ac2b575ec1603d56f10"


class HubTestCase(TestCase):
    """Starts MessageHandle + the QUIC listener (and the WebSocket one) for each test."""

    timeout = 30

    async def start_hub(
        self, keepalive_interval: float = 30.0, node_limit: int = 500, websocket: bool = False
    ) -> MessageHandle:
        listen = {"address": "127.0.0.1", "port": 0}
        self.config = make_config(
            os.path.abspath(self.mktemp()), quic={"enable": True, **listen}, websocket=listen
        )
        self.authority = CertificateAuthority.load_or_create(self.config)
        self.handle = MessageHandle(
            reactor, keepalive_interval=keepalive_interval, node_limit=node_limit
        )
        self.events: list[NodeEvent] = []
        self.handle.subscribe_events(self.events.append)
        self.quic: QuicListeningService = quic_listener(
            self.config, self.authority, self.handle, reactor
        )
        services: list[Any] = [self.quic]
        if websocket:
            self.websocket = websocket_listener(self.config, self.authority, self.handle, reactor)
            services.append(self.websocket)

        async def stop() -> None:
            self.handle.close_all(CLOSE_GOING_AWAY, "hub shutting down")
            for service in services:
                stopped = service.stopService()
                if stopped is not None:
                    await stopped

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        for service in services:
            service.startService()
            await service.listening
        self.credentials = edge_credentials(self.authority)
        return self.handle

    def node(self, node_id: str, **kwargs: Any) -> QuicEdgeNode:
        kwargs.setdefault("credentials", self.credentials)
        node = QuicEdgeNode(
            reactor, node_id, "127.0.0.1", self.quic.bound_port, project_id=PROJECT_ID, **kwargs
        )
        self.addCleanup(node.stop)
        return node

    @property
    def table(self) -> Any:
        return self.quic.protocol


class QuicHubTests(HubTestCase):
    async def test_connect_keepalive_send_ack_upstream(self) -> None:
        handle = await self.start_hub()
        node = self.node("edge-node-1")
        await node.start()
        [info] = handle.nodes()
        self.assertEqual(
            (info.node_id, info.project_id, info.transport), ("edge-node-1", PROJECT_ID, "quic")
        )
        self.assertEqual([e.event for e in self.events], [EVENT_CONNECTED])
        await wait_for(lambda: handle.nodes()[0].last_keepalive is not None)

        message = pod_message("6f1a5c2e-0001", "12345", "insert")
        acked = await handle.send("edge-node-1", message)
        self.assertEqual(acked.msg_id, message.msg_id)
        record = node.store.get("default/pod/nginx")
        assert record is not None
        # No resourceVersion on the protobuf wire (§2.5): taken from the object's metadata.
        self.assertEqual(record.resource_version, "12345")
        self.assertEqual(record.value["metadata"]["uid"], "6f1a5c2e-0001")
        self.assertEqual(node.stats.acks_sent, 1)

        heard: list[tuple[str, Message]] = []
        handle.subscribe(lambda n, m: heard.append((n, m)), group="meta")
        status = Message.new(
            "edged", "meta", "update", "default/podstatus/nginx", {"phase": "Running"}
        )
        node.send(status)
        await wait_for(lambda: heard)
        self.assertEqual(heard[0][0], "edge-node-1")
        self.assertEqual(
            (heard[0][1].msg_id, heard[0][1].content), (status.msg_id, {"phase": "Running"})
        )

        await node.stop()
        await wait_for(lambda: not handle.nodes())
        self.assertEqual(self.events[-1].event, EVENT_DISCONNECTED)
        self.assertEqual(self.events[-1].reason, "closed by the edge (1000)")
        await wait_for(lambda: not self.table.connections)
        self.assertEqual(self.table.connections_by_cid, {})

    async def test_node_limit_refuses_the_second_with_a_reason(self) -> None:
        handle = await self.start_hub(node_limit=1)
        first = self.node("edge-0")
        await first.start()
        second = self.node("edge-1", reconnect=False)
        second.start().addErrback(lambda f: None)
        closed = await second.when_disconnected()
        assert closed is not None
        self.assertEqual(closed.code, CLOSE_TRY_AGAIN_LATER)
        self.assertIn("node limit 1", closed.reason)
        self.assertEqual(handle.stats.node_limit_refusals, 1)
        self.assertEqual([n.node_id for n in handle.nodes()], ["edge-0"])
        acked = await handle.send("edge-0", pod_message("uid-0", "1", "insert"))
        self.assertEqual(acked.resource, "default/pod/nginx")

    async def test_keepalive_timeout(self) -> None:
        handle = await self.start_hub(keepalive_interval=0.5)
        node = self.node("edge-quiet", heartbeat=1000, reconnect=False)
        await node.start()
        closed = await node.when_disconnected()
        assert closed is not None
        self.assertEqual(closed.code, CLOSE_POLICY)
        self.assertIn("no keepalive for 0.5 seconds", closed.reason)
        self.assertEqual(handle.stats.keepalive_timeouts, 1)
        self.assertEqual(handle.nodes(), [])

    async def test_client_without_certificate_refused(self) -> None:
        handle = await self.start_hub()
        configuration = client_configuration(None, "127.0.0.1")
        configuration.load_verify_locations(cadata=self.authority.ca_pem)
        node = self.node(
            "edge-anon", credentials=None, configuration=configuration, reconnect=False
        )
        node.start().addErrback(lambda f: None)
        closed = await node.when_disconnected()
        assert closed is not None
        self.assertEqual(
            (closed.code, closed.reason, closed.was_open),
            (CLOSE_POLICY, "a client certificate is required", False),
        )
        self.assertEqual((handle.nodes(), self.events), ([], []))
        self.assertEqual(self.table.stats.handshakes_refused, 1)

    async def test_certificate_of_another_ca_refused(self) -> None:
        handle = await self.start_hub()
        other = CertificateAuthority.load_or_create(make_config(os.path.abspath(self.mktemp())))
        foreign = edge_credentials(other)
        node = self.node(
            "edge-foreign",
            credentials=EdgeCredentials(self.authority.ca_pem, foreign.cert_pem, foreign.key_pem),
            reconnect=False,
        )
        node.start().addErrback(lambda f: None)
        closed = await node.when_disconnected()
        assert closed is not None
        self.assertEqual(closed.code, CLOSE_POLICY)
        self.assertIn("not signed by this hub's CA", closed.reason)
        self.assertFalse(closed.was_open)
        self.assertEqual((handle.nodes(), self.events), ([], []))

        # The edge checks the hub too: trusting another CA, it never gets a session.
        quiet(self)
        wrong_ca = EdgeCredentials(other.ca_pem, foreign.cert_pem, foreign.key_pem)
        doubtful = self.node("edge-doubtful", credentials=wrong_ca, reconnect=False)
        doubtful.start().addErrback(lambda f: None)
        closed = await doubtful.when_disconnected()
        assert closed is not None
        self.assertIsNone(closed.code)
        self.assertIn("QUIC error", closed.reason)
        self.assertEqual(handle.nodes(), [])

    async def test_flood_of_bogus_datagrams(self) -> None:
        """Random datagrams and bogus Initials (2,000 each) neither crash the hub nor disturb a
        connected node, and leave no connection state behind."""
        handle = await self.start_hub()
        node = self.node("edge-busy")
        await node.start()
        hub_address = ("127.0.0.1", self.quic.bound_port)
        sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)

        def bogus_initial() -> bytes:
            dcid, scid = os.urandom(8), os.urandom(8)
            head = b"\xc0\x00\x00\x00\x01\x08" + dcid + b"\x08" + scid + b"\x00"
            rest = 1200 - len(head) - 2
            return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)

        delivered: list[Deferred[Message]] = []
        for batch in range(40):
            for _ in range(50):
                for datagram in (os.urandom(1 + batch * 30), bogus_initial()):
                    try:
                        sender.write(datagram, hub_address)
                    except OSError:
                        pass  # the socket buffer is full: the flood is bounded anyway
            delivered.append(
                handle.send(
                    "edge-busy", pod_message(f"uid-{batch}", "1", "insert", name=f"p{batch}")
                )
            )
            pause: Deferred[None] = Deferred()
            reactor.callLater(0.005, pause.callback, None)
            await pause
        results = await DeferredList(delivered, consumeErrors=True)
        self.assertTrue(all(ok for ok, _ in results))
        self.assertEqual(node.stats.disconnects, 0)
        stats = self.table.stats
        self.assertGreater(stats.bogus_initials, 0)
        self.assertGreater(stats.datagrams_dropped, 0)
        self.assertEqual(len(self.table.connections), 1)
        [connection] = self.table.connections
        self.assertEqual(set(self.table.connections_by_cid.values()), {connection})
        # And after the flood, it goes on.
        acked = await handle.send(
            "edge-busy", pod_message("uid-after", "1", "insert", name="after")
        )
        self.assertEqual(acked.resource, "default/pod/after")

    async def test_reconnects_after_the_hub_closes_and_answers_control_ops(self) -> None:
        handle = await self.start_hub()
        node = self.node("edge-back", initial_backoff=0.05, jitter=0)
        await node.start()
        # A viaduct control message from the hub (§2.3) is answered "ack" by the edge.
        handle.sessions["edge-back"].send_now(Message.new("", "", "ping", "", None))
        await wait_for(lambda: node.stats.control_acks_sent == 1)
        handle.close_all(CLOSE_POLICY, "kicked out")
        closed = await node.when_disconnected()
        assert closed is not None
        self.assertEqual(
            (closed.code, closed.reason, closed.was_open), (CLOSE_POLICY, "kicked out", True)
        )
        await wait_for(lambda: node.last_retry_delay == 0.05)
        await node.when_connected()
        await wait_for(lambda: [n.node_id for n in handle.nodes()] == ["edge-back"])
        self.assertEqual((node.stats.connects, node.stats.disconnects), (2, 1))
        acked = await handle.send("edge-back", pod_message("uid-1", "1", "insert"))
        self.assertEqual(acked.resource, "default/pod/nginx")

    async def test_hub_stop_tells_the_edge(self) -> None:
        await self.start_hub()
        node = self.node("edge-left", reconnect=False)
        await node.start()
        self.handle.close_all(CLOSE_GOING_AWAY, "hub shutting down")
        await self.quic.stopService()
        closed = await node.when_disconnected()
        assert closed is not None
        self.assertEqual((closed.code, closed.reason), (CLOSE_GOING_AWAY, "hub shutting down"))
        self.assertEqual(self.table.connections, set())


class StallingStore(MetaStore):
    """Stores everything, but the ACKs after the first ``ack_limit`` are lost on the way."""

    def __init__(self, ack_limit: int) -> None:
        super().__init__()
        self.ack_limit = ack_limit
        self.acks = 0

    def apply(self, message: Message) -> Message | None:
        reply = super().apply(message)
        if reply is not None and reply.operation == "response":
            self.acks += 1
            if self.acks > self.ack_limit:
                return None
        return reply


def seeded_from(store: MetaStore) -> MetaStore:
    """A new store holding what ``store`` holds (edgecore keeps its sqlite DB across
    transports)."""
    seeded = MetaStore()
    seeded._rows.update(store._rows)
    seeded._acked.update(store._acked)
    return seeded


class TransportSwitchTests(HubTestCase):
    async def test_node_moves_from_websocket_to_quic_with_messages_pending(self) -> None:
        handle = await self.start_hub(websocket=True)
        ws_store = StallingStore(ack_limit=2)
        ws = EdgeNode(
            reactor,
            "edge-move",
            "127.0.0.1",
            self.websocket.bound_port,
            self.credentials,
            store=ws_store,
            heartbeat=15,
        )
        self.addCleanup(ws.stop)
        await ws.start()
        names = [f"pod-{i}" for i in range(5)]
        first = [
            handle.send("edge-move", pod_message(f"uid-{i}", "10", "insert", name=name))
            for i, name in enumerate(names)
        ]
        for d in first:
            d.addErrback(lambda f: f.trap(Superseded))
        # Two ACKed; the third stored at the edge but its ACK lost (in flight); two queued.
        await DeferredList(first[:2])
        await wait_for(lambda: len(ws_store.history) == 3)
        self.assertEqual(
            [r.resource for r in ws_store.history], [f"default/pod/{n}" for n in names[:3]]
        )
        # Newer versions of the one in flight and of a queued one: those must win.
        newer = [
            handle.send("edge-move", pod_message(f"uid-{i}", "11", "update", name=names[i]))
            for i in (2, 3)
        ]
        await ws.stop()
        await wait_for(lambda: not handle.nodes())

        quic_store = seeded_from(ws_store)
        node = self.node("edge-move", store=quic_store)
        await node.start()
        self.assertEqual(handle.nodes()[0].transport, "quic")
        acked = await DeferredList([*newer, first[4]], consumeErrors=True)
        self.assertTrue(all(ok for ok, _ in acked), acked)

        got = {r.resource: [] for r in quic_store.history}
        for record in quic_store.history:
            got[record.resource].append(record.resource_version)
        # Each pending object exactly once more, newest version; the acknowledged ones never.
        self.assertEqual(
            got,
            {
                "default/pod/pod-2": ["11"],
                "default/pod/pod-3": ["11"],
                "default/pod/pod-4": ["10"],
            },
        )
        self.assertEqual(quic_store.stale, [])
        for i, version in ((0, "10"), (1, "10"), (2, "11"), (3, "11"), (4, "10")):
            record = quic_store.get(f"default/pod/{names[i]}")
            assert record is not None
            self.assertEqual(record.value["metadata"]["resourceVersion"], version)
        self.assertTrue(first[2].called and first[3].called)
        self.assertEqual(handle.nodes()[0].pending, 0)


class NoHubTests(TestCase):
    timeout = 30

    async def test_nothing_listening_fails_fast(self) -> None:
        """Connected UDP: the ICMP "port unreachable" ends the attempt at once."""
        config = make_config(os.path.abspath(self.mktemp()))
        credentials = edge_credentials(CertificateAuthority.load_or_create(config))
        probe = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        port = probe.getHost().port
        await probe.stopListening()
        node = QuicEdgeNode(reactor, "edge-alone", "127.0.0.1", port, credentials, reconnect=False)
        self.addCleanup(node.stop)
        node.start().addErrback(lambda f: None)
        closed = await node.when_disconnected()
        assert closed is not None
        self.assertEqual((closed.code, closed.was_open), (None, False))
        self.assertIn("connection refused", closed.reason)
        self.assertEqual(node.stats.connect_failures, 1)
