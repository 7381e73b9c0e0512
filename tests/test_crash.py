"""Nothing accepted is lost: a real hub process SIGKILLed in the middle of delivery (issue 5)."""

from __future__ import annotations

import json
import os
import signal
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cloudhub import wire
from cloudhub.edge.bootstrap import bootstrap
from cloudhub.edge.client import EdgeNode
from cloudhub.edge.metamanager import MetaStore

from .fakes import pod_message
from .helpers_tls import make_config
from .test_integration_ws import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = 10
OBJECTS = 20
DELETED = 5


class HubProcess(ProcessProtocol):
    """A ``tests.crash_hub`` child; its stdout lines arrive as Deferreds."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.waiting: list[tuple[str, Deferred[str]]] = []
        self.ended: Deferred[None] = Deferred()
        self.output = b""
        self.errors = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        *lines, self.output = self.output.split(b"\n")
        for raw in lines:
            line = raw.decode()
            self.lines.append(line)
            for prefix, waiter in list(self.waiting):
                if line.startswith(prefix):
                    self.waiting.remove((prefix, waiter))
                    waiter.callback(line)

    def errReceived(self, data: bytes) -> None:
        self.errors = (self.errors + data)[-20000:]

    def line(self, prefix: str) -> Deferred[str]:
        for line in self.lines:
            if line.startswith(prefix):
                return Deferred.fromCoroutine(_value(line))
        waiter: Deferred[str] = Deferred()
        self.waiting.append((prefix, waiter))
        return waiter

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        for _, waiter in self.waiting:
            waiter.errback(AssertionError(f"hub exited: {self.errors.decode()[-3000:]}"))
        self.waiting.clear()
        self.ended.callback(None)


async def _value(line: str) -> str:
    return line


class CrashTests(TestCase):
    timeout = 120

    def spawn(self, config_path: str, plan: str) -> HubProcess:
        process = HubProcess()
        transport = reactor.spawnProcess(
            process,
            sys.executable,
            [sys.executable, "-m", "tests.crash_hub", config_path, plan],
            env={**os.environ, "PYTHONPATH": REPO},
            path=REPO,
        )
        self.addCleanup(self.kill, transport, process)
        return process

    def kill(self, transport, process: HubProcess):
        if not process.ended.called:
            transport.signalProcess("KILL")
        return process.ended

    def test_sigkill_mid_delivery_loses_nothing(self):
        return self.interrupt_delivery(signal.SIGKILL)

    def test_sigterm_mid_delivery_loses_nothing(self):
        """A graceful stop during delivery: what is pending is delivered after the restart."""
        return self.interrupt_delivery(signal.SIGTERM)

    @inlineCallbacks
    def interrupt_delivery(self, signum: int):
        base = os.path.abspath(self.mktemp())
        listen = {"address": "127.0.0.1", "port": 0}
        config = make_config(base, https=listen, websocket=listen)
        os.makedirs(base, exist_ok=True)
        config_path = os.path.join(base, "hub.yaml")
        with open(config_path, "w") as f:
            json.dump(config.as_dict(), f)  # JSON is YAML
        # 10 nodes × 20 objects × 3 versions, the first 5 objects of each then deleted,
        # all submitted while every node is offline.
        plan = []
        for n in range(NODES):
            for version in (1, 2, 3):
                for j in range(OBJECTS):
                    message = pod_message(
                        f"n{n}-o{j}",
                        str(version),
                        "insert" if version == 1 else "update",
                        name=f"p{j}",
                    )
                    plan.append([f"edge-{n}", wire.encode(message).decode()])
            for j in range(DELETED):
                plan.append(
                    [
                        f"edge-{n}",
                        wire.encode(
                            pod_message(f"n{n}-o{j}", "4", "delete", name=f"p{j}")
                        ).decode(),
                    ]
                )
        plan_path = os.path.join(base, "plan.json")
        with open(plan_path, "w") as f:
            json.dump(plan, f)

        hub = self.spawn(config_path, plan_path)
        https, ws = map(int, (yield hub.line("PORTS")).split()[1:])
        yield hub.line("ACCEPTED")

        # Credentials for every node, then half of them connect.
        from cloudhub.certs.token import issue_token

        token = issue_token(config)
        credentials = {}
        for n in range(NODES):
            credentials[n] = yield bootstrap(
                reactor, f"https://127.0.0.1:{https}", token, f"edge-{n}"
            )
        stores = {n: MetaStore() for n in range(NODES)}
        received = {"count": 0}

        def counting(node, message):
            received["count"] += 1

        def start_node(n: int, port: int, **kwargs: object) -> EdgeNode:
            node = EdgeNode(
                reactor,
                f"edge-{n}",
                "127.0.0.1",
                port,
                credentials[n],
                store=stores[n],
                initial_backoff=0.2,
                max_backoff=0.5,
                **kwargs,
            )
            node.start().addErrback(lambda f: None)
            return node

        nodes = [start_node(n, ws, on_message=counting) for n in range(NODES // 2)]
        # Kill the hub in the middle of delivery.
        yield wait_for(lambda: received["count"] >= 20, timeout=60)
        os.kill(hub.transport.pid, signum)
        yield hub.ended
        if signum == signal.SIGTERM:
            # A clean stop, not a death by signal.
            self.assertIsInstance(hub.reason.value, ProcessDone, hub.errors.decode()[-2000:])
        delivered_before = received["count"]
        for node in nodes:
            yield node.stop()

        # Restart on the same dataDir; every node connects.
        hub = self.spawn(config_path, "-")
        https, ws = map(int, (yield hub.line("PORTS")).split()[1:])
        for n in range(NODES):
            self.addCleanup(start_node(n, ws).stop)

        live = {f"default/pod/p{j}" for j in range(DELETED, OBJECTS)}

        def complete() -> bool:
            return all(
                {resource for resource, _ in stores[n].items()} == live
                and all(stores[n].get(r).resource_version == "3" for r in live)
                for n in range(NODES)
            )

        yield wait_for(complete, timeout=60)
        # The kill came in the middle: some, not all, of what the first five were owed.
        self.assertGreater(delivered_before, 0)
        self.assertLess(delivered_before, (NODES // 2) * OBJECTS)
        for n in range(NODES):
            self.assertEqual(stores[n].stale, [], f"edge-{n} received an older version")
