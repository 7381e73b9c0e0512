"""Issue 4 end to end: the real hub (HTTPS + WSS on loopback, real TLS) and the Python edge."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from cloudhub.certs.token import issue_token
from cloudhub.edge.bootstrap import bootstrap
from cloudhub.edge.client import EdgeNode
from cloudhub.handler import EVENT_CONNECTED, EVENT_DISCONNECTED, NodeEvent
from cloudhub.interfaces import CLOSE_TRY_AGAIN_LATER
from cloudhub.model import Message
from cloudhub.service import CloudHubService

from .fakes import pod_message
from .helpers_tls import make_config


def hub_config(base: str, **cloudhub: object):
    listen = {"address": "127.0.0.1", "port": 0}
    return make_config(base, https=listen, websocket=listen, **cloudhub)


def wait_for(predicate, timeout: float = 10.0) -> Deferred[None]:
    """Poll ``predicate`` on the real reactor (integration tests only)."""
    result: Deferred[None] = Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if predicate():
            result.callback(None)
        elif reactor.seconds() > deadline:
            result.errback(AssertionError(f"timed out waiting for {predicate}"))
        else:
            reactor.callLater(0.01, check)

    check()
    return result


class WebSocketHubTests(TestCase):
    """The hub as an edge over WebSocket meets it; QuicHubTests runs the same over QUIC."""

    timeout = 60
    transport = "websocket"

    def edge_class(self) -> type:
        return EdgeNode

    @inlineCallbacks
    def start_hub(self, **cloudhub: object):
        base = os.path.abspath(self.mktemp())
        if self.transport == "quic":
            cloudhub = {"quic": {"enable": True, "address": "127.0.0.1", "port": 0}, **cloudhub}
        self.config = hub_config(base, **cloudhub)
        hub = CloudHubService(self.config, reactor=reactor)
        hub.startService()
        self.addCleanup(hub.stopService)
        yield hub.ready
        self.hub = hub
        self.events: list[NodeEvent] = []
        hub.upstream.subscribe_events(self.events.append)
        return hub

    @inlineCallbacks
    def join(self, node_id: str, token: str | None = None, **kwargs: object):
        url = f"https://127.0.0.1:{self.hub.port('https')}"
        credentials = yield bootstrap(reactor, url, token or self.hub.tokens.current, node_id)
        node = self.edge_class()(
            reactor, node_id, "127.0.0.1", self.hub.port(self.transport), credentials, **kwargs
        )
        self.addCleanup(node.stop)
        return node

    @inlineCallbacks
    def test_bootstrap_connect_send_ack_and_upstream(self):
        yield self.start_hub()
        token = issue_token(self.config)  # what `cloudhub token` prints
        node = yield self.join("edge-node-1", token=token)
        yield node.start()
        yield wait_for(lambda: self.hub.upstream.is_connected("edge-node-1"))
        [info] = self.hub.upstream.nodes()
        self.assertEqual((info.node_id, info.transport), ("edge-node-1", self.transport))
        self.assertEqual(self.events[0].event, EVENT_CONNECTED)
        yield wait_for(lambda: self.hub.upstream.nodes()[0].last_keepalive is not None)

        message = pod_message("6f1a5c2e-0001", "12345", "insert")
        acked = yield self.hub.upstream.send("edge-node-1", message)
        self.assertEqual(acked.msg_id, message.msg_id)
        record = node.store.get("default/pod/nginx")
        self.assertEqual(record.resource_version, "12345")

        heard: list[tuple[str, Message]] = []
        self.hub.upstream.subscribe(lambda n, m: heard.append((n, m)), group="meta")
        status = Message.new(
            "edged", "meta", "update", "default/podstatus/nginx", {"phase": "Running"}
        )
        node.send(status)
        yield wait_for(lambda: heard)
        self.assertEqual(heard[0][0], "edge-node-1")
        self.assertEqual(heard[0][1].msg_id, status.msg_id)
        self.assertEqual(heard[0][1].content, {"phase": "Running"})

        yield node.stop()
        yield wait_for(lambda: not self.hub.upstream.is_connected("edge-node-1"))
        self.assertEqual(self.events[-1].event, EVENT_DISCONNECTED)

    @inlineCallbacks
    def test_message_for_offline_node_delivered_on_connect(self):
        yield self.start_hub()
        message = pod_message("u-offline", "7", "insert")
        delivered = self.hub.upstream.send("edge-late", message)
        node = yield self.join("edge-late")
        yield node.start()
        acked = yield delivered
        self.assertEqual(acked.msg_id, message.msg_id)
        self.assertEqual(node.store.get("default/pod/nginx").resource_version, "7")

    @inlineCallbacks
    def test_node_limit_refuses_the_fourth_with_a_reason(self):
        yield self.start_hub(nodeLimit=3)
        nodes = []
        for i in range(3):
            node = yield self.join(f"edge-{i}")
            yield node.start()
            nodes.append(node)
        yield wait_for(lambda: len(self.hub.upstream.nodes()) == 3)
        fourth = yield self.join("edge-3", reconnect=False)
        fourth.start().addErrback(lambda f: None)
        closed = yield fourth.when_disconnected()
        self.assertEqual(closed.code, CLOSE_TRY_AGAIN_LATER)
        self.assertIn("node limit 3", closed.reason)
        self.assertEqual(self.hub.handle.stats.node_limit_refusals, 1)
        for i in range(len(nodes)):
            message = pod_message(f"uid-{i}", "1", "insert")
            acked = yield self.hub.upstream.send(f"edge-{i}", message)
            self.assertEqual(acked.msg_id, message.msg_id)
        self.assertEqual(len(self.hub.upstream.nodes()), 3)


class QuicHubTests(WebSocketHubTests):
    transport = "quic"

    def edge_class(self) -> type:
        from cloudhub.edge.quic import QuicEdgeNode

        return QuicEdgeNode
