"""The edges of ``make chaos``: N :class:`cloudhub.edge.client.EdgeNode` in one process.

Run by ``tests/chaos/chaos.py`` inside the edge network namespace (``ip netns exec``). Each
node bootstraps its own certificate with the join token, connects to the hub over WebSocket
with mutual TLS, heartbeats every ``--heartbeat`` seconds, stores and ACKs what the hub sends
(metamanager's rules) and reconnects with the library's backoff: nothing here changes how the
Python edge behaves.

What it reports: every 0.25 s it writes ``--state`` (JSON, written to a temporary file and
renamed): per node whether it is connected, its counters, the last close, and its store
(resource -> resourceVersion), plus any message the store saw older than a version it had
already acknowledged (``stale``: reliable delivery must never do that).

What it is told: ``--control`` (JSON, polled every 0.2 s). ``{"path": "relay", "delay": 0.3}``
moves every node onto a delaying TCP relay in this process (listening on 127.0.0.1 of the
edge namespace, forwarding to the hub): each node's connection is closed (1000) and it
reconnects through the relay; ``{"path": "direct"}`` moves them back the same way. The relay
is the stand-in for ``tc netem delay`` where the kernel has no sch_netem: it delays every
chunk of the byte stream by ``delay`` seconds in each direction, in order. It sees a stream,
not packets: TCP's handshakes, ACKs and retransmissions on the wire are not delayed, only the
bytes the applications exchange.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogBeginner, textFileLogObserver

from cloudhub.certs.tls import client_tls_options
from cloudhub.edge.bootstrap import bootstrap
from cloudhub.edge.client import EdgeNode, edge_client_factory

reactor: Any = _reactor


class _Half(Protocol):
    """One side of a relayed connection; ``peer`` is the other side once connected."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.peer: _Half | None = None
        self.pending: list[bytes] = []  # data for the peer before it is connected
        self.closed = False
        self.last_due = 0.0  # chunks leave in order even when the delay changes

    def _later(self, f: Any, *args: Any) -> None:
        now = reactor.seconds()
        due = max(now + self.relay.delay, self.last_due)
        self.last_due = due
        reactor.callLater(max(0.0, due - now), f, *args)

    def dataReceived(self, data: bytes) -> None:
        self._later(self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.pending.append(data)
        elif not peer.closed and peer.transport is not None:
            peer.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.closed = True
        self.relay.open.discard(self)
        # The close travels with the same delay as the data, after it.
        self._later(self._close_peer)

    def _close_peer(self) -> None:
        if self.peer is not None and not self.peer.closed and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Inbound(_Half):
    """An edge's connection to the relay: opens the relay's connection to the hub."""

    def connectionMade(self) -> None:
        self.relay.open.add(self)
        self.relay.accepted += 1
        self.transport.pauseProducing()  # type: ignore[union-attr]
        outbound = _Half(self.relay)
        endpoint = TCP4ClientEndpoint(reactor, self.relay.hub_host, self.relay.hub_port, 10)

        def connected(_: object) -> None:
            outbound.peer, self.peer = self, outbound
            self.relay.open.add(outbound)
            for data in outbound.pending:
                self.transport.write(data)  # type: ignore[union-attr]
            for data in self.pending:
                outbound.transport.write(data)  # type: ignore[union-attr]
            outbound.pending = self.pending = []
            if self.closed:
                outbound.transport.loseConnection()  # type: ignore[union-attr]
            else:
                self.transport.resumeProducing()  # type: ignore[union-attr]

        def failed(_: object) -> None:
            self.transport.loseConnection()  # type: ignore[union-attr]

        endpoint.connect(_OneProtocol(outbound)).addCallbacks(connected, failed)


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self.protocol_instance


class Relay(Factory):
    """A TCP relay that delays each direction of the byte stream by ``delay`` seconds."""

    noisy = False

    def __init__(self, hub_host: str, hub_port: int) -> None:
        self.hub_host = hub_host
        self.hub_port = hub_port
        self.delay = 0.0
        self.accepted = 0
        self.open: set[_Half] = set()

    def buildProtocol(self, addr: object) -> Protocol:
        return _Inbound(self)


class Edges:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.nodes: list[EdgeNode] = []
        self.relay = Relay(options.hub, options.ws_port)
        self.relay_port = 0
        self.path = "direct"
        self.control_mtime = 0.0
        self.ready = False

    @inlineCallbacks
    def start(self):
        options = self.options
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.relay)
        self.relay_port = listening.getHost().port
        with open(options.token_file) as stream:
            token = stream.read().strip()
        url = f"https://{options.hub}:{options.https_port}"
        names = [f"{options.prefix}{i}" for i in range(options.nodes)]
        credentials = yield DeferredList(
            [bootstrap(reactor, url, token, name) for name in names], fireOnOneErrback=True
        )
        factory = edge_client_factory(reactor)
        for name, (_, creds) in zip(names, credentials, strict=True):
            tls = client_tls_options(
                creds.ca_pem, creds.cert_pem, creds.key_pem, hostname=options.hub
            )
            node = EdgeNode(
                reactor,
                name,
                options.hub,
                options.ws_port,
                None,
                heartbeat=options.heartbeat,
                tls_options=tls,
                ws_factory=factory,
            )
            self.nodes.append(node)
            node.start()
        self.ready = True
        LoopingCall(self.write_state).start(0.25)
        LoopingCall(self.read_control).start(0.2)

    def read_control(self) -> None:
        try:
            mtime = os.stat(self.options.control).st_mtime
        except FileNotFoundError:
            return
        if mtime == self.control_mtime:
            return
        self.control_mtime = mtime
        with open(self.options.control) as stream:
            control = json.load(stream)
        self.relay.delay = float(control.get("delay", 0.0))
        path = control.get("path", "direct")
        if path == self.path:
            return
        self.path = path
        if path == "relay":
            host, port = "127.0.0.1", self.relay_port
        else:
            host, port = self.options.hub, self.options.ws_port
        print(f"edges: path {path} ({host}:{port}), relay delay {self.relay.delay}s", flush=True)
        for node in self.nodes:
            node.hub_host, node.port = host, port
            node.close()  # 1000; the node reconnects (with its backoff) on the new path

    def write_state(self) -> None:
        nodes = {}
        for node in self.nodes:
            store = {resource: record.resource_version for resource, record in node.store.items()}
            nodes[node.node_id] = {
                "connected": node.connected,
                "connects": node.stats.connects,
                "disconnects": node.stats.disconnects,
                "connect_failures": node.stats.connect_failures,
                "keepalives_sent": node.stats.keepalives_sent,
                "acks_sent": node.stats.acks_sent,
                "last_close": node.last_close_reason,
                "store": store,
                "stale": [f"{r.resource}@{r.resource_version}" for r in node.store.stale],
            }
        state = {
            "time": reactor.seconds(),
            "path": self.path,
            "relay": {
                "port": self.relay_port,
                "delay": self.relay.delay,
                "accepted": self.relay.accepted,
            },
            "nodes": nodes,
        }
        tmp = self.options.state + ".tmp"
        with open(tmp, "w") as stream:
            json.dump(state, stream)
        os.replace(tmp, self.options.state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", required=True)
    parser.add_argument("--ws-port", type=int, required=True)
    parser.add_argument("--https-port", type=int, required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--prefix", default="chaos-edge-")
    parser.add_argument("--heartbeat", type=float, default=3.0)
    parser.add_argument("--state", required=True)
    parser.add_argument("--control", required=True)
    options = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    edges = Edges(options)

    def failed(failure: Any) -> None:
        print(f"edges: cannot start: {failure.getErrorMessage()}", flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: edges.start().addErrback(failed))
    reactor.run()


if __name__ == "__main__":
    main()
