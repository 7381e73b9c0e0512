"""End-to-end reliable delivery on loopback: messages/s accepted (durable) and acknowledged.

    python benchmarks/delivery_bench.py [--nodes 100] [--messages 20000] [--store sqlite]

The hub (CloudHubService, SQLite store in a temporary dataDir) runs in this process; the edge
nodes (cloudhub.edge.EdgeNode: real TLS, real WebSocket, metamanager-like ACKs) run in a child
process, so the two do not share a core. Every message is an ACK-mode pod update for its own
object; "accepted" is when ``upstream.flush()`` fired for all of them (durable), "acknowledged"
when every ``send()`` Deferred fired (the edge's ACK came back and was recorded).
Bounded: it stops after --timeout seconds whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run_edges(args: argparse.Namespace) -> None:
    """Child: bootstrap and connect ``--nodes`` edges, print READY, run until stdin closes."""
    from twisted.internet import reactor, stdio
    from twisted.internet.defer import gatherResults, inlineCallbacks
    from twisted.protocols.basic import LineReceiver

    from cloudhub.edge.bootstrap import bootstrap
    from cloudhub.edge.client import EdgeNode
    from cloudhub.edge.metamanager import MetaStore

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionLost(self, reason: object) -> None:
            reactor.stop()

    @inlineCallbacks
    def start():
        url = f"https://127.0.0.1:{args.https}"
        credentials = yield bootstrap(reactor, url, args.token, "bench-edge")
        nodes = [
            EdgeNode(
                reactor,
                f"bench-{i}",
                "127.0.0.1",
                args.ws,
                credentials,
                heartbeat=15,
                store=MetaStore(keep_history=False),
            )
            for i in range(args.nodes)
        ]
        yield gatherResults([node.start() for node in nodes])
        print("READY", flush=True)

    stdio.StandardIO(Control())
    reactor.callWhenRunning(start)
    reactor.callLater(args.timeout, reactor.stop)
    reactor.run()


def run_hub(args: argparse.Namespace) -> dict[str, float]:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
    from twisted.internet.protocol import ProcessProtocol

    from cloudhub.config import parse_config
    from cloudhub.model import Message
    from cloudhub.service import CloudHubService

    base = tempfile.mkdtemp(prefix="cloudhub-bench-")
    listen = {"address": "127.0.0.1", "port": 0}
    config = parse_config(
        {
            "cloudHub": {
                "https": listen,
                "websocket": listen,
                "nodeLimit": max(args.nodes, 1),
                "tlsCAFile": f"{base}/none",
                "tlsCAKeyFile": f"{base}/none.key",
                "tlsCertFile": f"{base}/none.crt",
                "tlsPrivateKeyFile": f"{base}/none.key2",
            },
            "hub": {"dataDir": base, "store": {"type": args.store}, "api": {"enable": False}},
        }
    )
    hub = CloudHubService(config, reactor=reactor, interpreter_tuning=True)
    figures: dict[str, float] = {}

    class Edges(ProcessProtocol):
        def __init__(self) -> None:
            self.ready: Deferred[None] = Deferred()
            self.buffer = b""

        def outReceived(self, data: bytes) -> None:
            self.buffer += data
            if b"READY" in self.buffer and not self.ready.called:
                self.ready.callback(None)

        def errReceived(self, data: bytes) -> None:
            sys.stderr.write(data.decode(errors="replace"))

    @inlineCallbacks
    def bench():
        try:
            hub.startService()
            yield hub.ready
            edges = Edges()
            child = reactor.spawnProcess(
                edges,
                sys.executable,
                [
                    sys.executable,
                    __file__,
                    "--edges",
                    "--nodes",
                    str(args.nodes),
                    "--https",
                    str(hub.port("https")),
                    "--ws",
                    str(hub.port("websocket")),
                    "--token",
                    hub.tokens.current,
                    "--timeout",
                    str(args.timeout),
                ],
                env={**os.environ, "PYTHONPATH": REPO},
            )
            yield edges.ready
            while len(hub.upstream.nodes()) < args.nodes:
                yield _sleep(reactor, 0.05)
            started = time.perf_counter()
            cpu_started = time.process_time()
            acks = []
            for i in range(args.messages):
                node = f"bench-{i % args.nodes}"
                uid = f"obj-{i}"
                content = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": f"p{i}",
                        "namespace": "default",
                        "uid": uid,
                        "resourceVersion": "1",
                    },
                }
                message = Message.new(
                    "edgecontroller",
                    "resource",
                    "insert",
                    f"default/pod/p{i}",
                    content,
                    resource_version="1",
                )
                acks.append(hub.upstream.send(node, message))
            yield hub.upstream.flush()
            figures["accepted_per_s"] = args.messages / (time.perf_counter() - started)
            yield DeferredList(acks, consumeErrors=True)
            elapsed = time.perf_counter() - started
            figures["acknowledged_per_s"] = args.messages / elapsed
            figures["hub_cpu_ms_per_1000"] = (
                (time.process_time() - cpu_started) * 1e6 / args.messages
            )
            child.closeStdin()
        finally:
            yield hub.stopService()
            reactor.stop()

    reactor.callWhenRunning(bench)
    reactor.callLater(args.timeout, lambda: reactor.running and reactor.stop())
    reactor.run()
    return figures


def _sleep(reactor, seconds: float):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--edges", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--https", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ws", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.edges:
        run_edges(args)
        return
    figures = run_hub(args)
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "messages": args.messages,
                "store": args.store,
                **{k: round(v, 1) for k, v in figures.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
