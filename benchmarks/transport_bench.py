"""WebSocket vs QUIC, end to end on loopback: messages/s acknowledged and ACK latency.

    python benchmarks/transport_bench.py [--nodes 100] [--seconds 8] [--rounds 2]

The hub (MessageHandle, memory state, the WebSocket and the QUIC listener with real mutual TLS)
runs in this process; the edges (``--nodes`` EdgeNode over WebSocket and as many QuicEdgeNode,
metamanager-like ACKs) run in a child process, so the two do not share a core. For each
transport in turn (interleaved ``--rounds`` times, the machine is noisy): every node of that
transport has one ACK-mode pod insert in flight at a time (the hub's own stop-and-wait, §6.4);
each ACK (``send()``'s Deferred firing) sends the next. Printed per transport: ACKed messages/s,
the send → ACK latency p50/p99, and the hub's CPU time per message.
Bounded: everything stops after ``--timeout`` seconds (default 110).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run_edges(args: argparse.Namespace) -> None:
    """Child: connect ``--nodes`` edges per transport, print READY, run until stdin closes."""
    from twisted.internet import reactor, stdio
    from twisted.internet.defer import gatherResults
    from twisted.protocols.basic import LineReceiver

    from cloudhub.edge.bootstrap import EdgeCredentials
    from cloudhub.edge.client import EdgeNode
    from cloudhub.edge.metamanager import MetaStore
    from cloudhub.edge.quic import QuicEdgeNode

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionLost(self, reason: object) -> None:
            if reactor.running:
                reactor.stop()

    credentials = EdgeCredentials.load(args.credentials)
    nodes: list[Any] = []
    for i in range(args.nodes):
        nodes.append(
            EdgeNode(
                reactor,
                f"ws-{i}",
                "127.0.0.1",
                args.ws,
                credentials,
                store=MetaStore(keep_history=False),
            )
        )
        nodes.append(
            QuicEdgeNode(
                reactor,
                f"quic-{i}",
                "127.0.0.1",
                args.quic,
                credentials,
                store=MetaStore(keep_history=False),
            )
        )

    def ready(_: object) -> None:
        print("READY", flush=True)

    def start() -> None:
        gatherResults([node.start() for node in nodes]).addCallback(ready)

    stdio.StandardIO(Control())
    reactor.callWhenRunning(start)
    reactor.callLater(args.timeout, lambda: reactor.running and reactor.stop())
    reactor.run()


def pod(transport: str, node: int, seq: int) -> Any:
    from cloudhub.model import Message

    name = f"{transport}-{node}-{seq}"
    content = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": f"uid-{name}",
            "resourceVersion": "1",
            "labels": {"app": "web", "tier": "frontend"},
        },
        "spec": {"containers": [{"name": "web", "image": "nginx:1.25", "ports": [80]}]},
    }
    return Message.new(
        "edgecontroller", "resource", "insert", f"default/pod/{name}", content, resource_version="1"
    )


def run_hub(args: argparse.Namespace) -> list[dict[str, Any]]:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, inlineCallbacks
    from twisted.internet.protocol import ProcessProtocol
    from twisted.internet.task import deferLater

    from cloudhub.certs.authority import CertificateAuthority
    from cloudhub.config import parse_config
    from cloudhub.edge.bootstrap import EdgeCredentials, make_csr, new_key
    from cloudhub.handler import MessageHandle
    from cloudhub.interfaces import CLOSE_GOING_AWAY
    from cloudhub.transport.quic import quic_listener
    from cloudhub.transport.websocket import websocket_listener

    base = tempfile.mkdtemp(prefix="cloudhub-transport-bench-")
    listen = {"address": "127.0.0.1", "port": 0}
    config = parse_config(
        {
            "cloudHub": {
                "websocket": listen,
                "quic": {"enable": True, **listen},
                "nodeLimit": 2 * args.nodes + 10,
                "tlsCAFile": f"{base}/none",
                "tlsCAKeyFile": f"{base}/none.key",
                "tlsCertFile": f"{base}/none.crt",
                "tlsPrivateKeyFile": f"{base}/none.key2",
            },
            "hub": {"dataDir": base},
        }
    )
    authority = CertificateAuthority.load_or_create(config)
    key = new_key()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(authority.sign_csr(make_csr(key)))
    credentials_dir = os.path.join(base, "edge")
    os.makedirs(credentials_dir)
    EdgeCredentials(
        authority.ca_pem,
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    ).save(credentials_dir)

    handle = MessageHandle(reactor, keepalive_interval=60, node_limit=2 * args.nodes + 10)
    listeners = [
        websocket_listener(config, authority, handle, reactor),
        quic_listener(config, authority, handle, reactor),
    ]
    results: list[dict[str, Any]] = []
    sequence = itertools.count()

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

    def closed_loop(transport: str, seconds: float) -> Deferred[dict[str, Any]]:
        """One ACK-mode message in flight per node for ``seconds``; latencies of each ACK."""
        latencies: list[float] = []
        done: Deferred[dict[str, Any]] = Deferred()
        state: dict[str, Any] = {"running": True, "in_flight": 0, "failed": 0}
        started = time.perf_counter()
        cpu_started = time.process_time()

        def send(node: int) -> None:
            state["in_flight"] += 1
            sent_at = time.perf_counter()
            acked = handle.send(f"{transport}-{node}", pod(transport, node, next(sequence)))

            def ok(_: object) -> None:
                latencies.append(time.perf_counter() - sent_at)
                again()

            def failed(failure: Any) -> None:
                state["failed"] += 1
                print("send failed:", failure.getErrorMessage(), file=sys.stderr)
                again()

            def again() -> None:
                state["in_flight"] -= 1
                if state["running"]:
                    send(node)
                elif state["in_flight"] == 0 and not done.called:
                    finish()

            acked.addCallbacks(ok, failed)

        def stop() -> None:
            state["running"] = False
            state["elapsed"] = time.perf_counter() - started
            state["cpu"] = time.process_time() - cpu_started
            state["count"] = len(latencies)

        def finish() -> None:
            ordered = sorted(latencies[: state["count"]])
            count = state["count"]
            done.callback(
                {
                    "transport": transport,
                    "nodes": args.nodes,
                    "acked_per_s": round(count / state["elapsed"]),
                    "p50_ms": round(1000 * ordered[len(ordered) // 2], 2) if ordered else None,
                    "p99_ms": round(1000 * ordered[int(len(ordered) * 0.99)], 2)
                    if ordered
                    else None,
                    "hub_cpu_us_per_msg": round(1e6 * state["cpu"] / max(count, 1), 1),
                    "failed": state["failed"],
                }
            )

        for node in range(args.nodes):
            send(node)
        reactor.callLater(seconds, stop)
        return done

    @inlineCallbacks
    def bench() -> Any:
        child = None
        try:
            for listener in listeners:
                listener.startService()
                yield listener.listening
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
                    "--ws",
                    str(listeners[0].bound_port),
                    "--quic",
                    str(listeners[1].bound_port),
                    "--credentials",
                    credentials_dir,
                    "--timeout",
                    str(args.timeout),
                ],
                env={**os.environ, "PYTHONPATH": REPO},
            )
            yield edges.ready
            while len(handle.nodes()) < 2 * args.nodes:
                yield deferLater(reactor, 0.05, lambda: None)
            for _ in range(args.rounds):
                for transport in args.transports:
                    yield closed_loop(transport, 1.0)  # warm-up
                    figures = yield closed_loop(transport, args.seconds)
                    figures["transport"] = {"ws": "websocket", "quic": "quic"}[transport]
                    results.append(figures)
                    print(json.dumps(figures), flush=True)
        finally:
            handle.close_all(CLOSE_GOING_AWAY, "benchmark over")
            if child is not None:
                child.closeStdin()
            for listener in listeners:
                yield listener.stopService()
            if reactor.running:
                reactor.stop()

    reactor.callWhenRunning(bench)
    reactor.callLater(args.timeout, lambda: reactor.running and reactor.stop())
    reactor.run()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100, help="edge nodes per transport")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--transports", nargs="+", choices=("ws", "quic"), default=["ws", "quic"])
    parser.add_argument("--timeout", type=float, default=110.0)
    parser.add_argument("--edges", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ws", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quic", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--credentials", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.edges:
        run_edges(args)
        return
    results = run_hub(args)
    print()
    columns = ("transport", "nodes", "acked/s", "p50 ms", "p99 ms", "hub µs/msg")
    print("{:<10} {:>5} {:>9} {:>8} {:>8} {:>11}".format(*columns))
    for transport in ("websocket", "quic"):
        runs = [r for r in results if r["transport"] == transport]
        if not runs:
            continue
        print(
            f"{transport:<10} {args.nodes:>5} "
            f"{statistics.median(r['acked_per_s'] for r in runs):>9.0f} "
            f"{statistics.median(r['p50_ms'] for r in runs):>8.2f} "
            f"{statistics.median(r['p99_ms'] for r in runs):>8.2f} "
            f"{statistics.median(r['hub_cpu_us_per_msg'] for r in runs):>11.1f}"
        )


if __name__ == "__main__":
    main()
