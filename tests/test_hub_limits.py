"""hub.limits on the running hub: the certificate port under a slowloris and a connection flood
(issue 18, finding 1), as operators configure and observe it."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from cloudhub.config import parse_config
from cloudhub.edge.bootstrap import TrustCAPolicy
from cloudhub.service import CloudHubService

from .test_integration_ws import hub_config, wait_for


class Held(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


def samples(exposition: bytes, name: str) -> dict[tuple[str, ...], float]:
    found: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value  # type: ignore[arg-type]
    return found


class CertificatePortLimitsTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_per_address_cap_and_head_deadline_on_the_running_hub(self):
        data = hub_config(os.path.abspath(self.mktemp())).as_dict()
        data["hub"]["limits"] = {"headerTimeout": 1, "https": {"maxConnectionsPerAddress": 3}}
        hub = CloudHubService(parse_config(data), reactor=reactor)
        self.addCleanup(hub.stopService)
        yield hub.startService()
        https = hub.port("https")
        held = []
        for _ in range(4):  # three are held (TLS never started), the fourth closed at accept
            protocol = Held()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", https), protocol)
            held.append(protocol)
        yield wait_for(lambda: held[3].lost.called)
        self.assertFalse(any(p.lost.called for p in held[:3]))
        # The head deadline cuts the silent ones (1 s here), however long they would wait.
        yield wait_for(lambda: all(p.lost.called for p in held), timeout=10)
        # Meanwhile and after, a real request is served.
        agent = Agent(reactor, TrustCAPolicy(hub.authority.ca_pem))
        response = yield agent.request(b"GET", f"https://127.0.0.1:{https}/readyz".encode())
        self.assertEqual((response.code, (yield readBody(response))), (200, b"ok"))
        metrics = yield readBody(
            (
                yield Agent(reactor).request(
                    b"GET", f"http://127.0.0.1:{hub.port('api')}/metrics".encode()
                )
            )
        )
        refused = samples(metrics, "cloudhub_connections_refused_total")
        self.assertEqual(refused[(("listener", "https"), ("reason", "address"))], 1)
        timeouts = samples(metrics, "cloudhub_http_refused_total")
        self.assertGreaterEqual(timeouts[(("listener", "https"), ("reason", "head_timeout"))], 3)


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class ApiLimitsTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_api_answers_414_431_and_counts_them(self):
        data = hub_config(os.path.abspath(self.mktemp())).as_dict()
        data["hub"]["limits"] = {"maxRequestLine": 1024, "maxHeaderBytes": 2048}
        hub = CloudHubService(parse_config(data), reactor=reactor)
        self.addCleanup(hub.stopService)
        yield hub.startService()
        api = hub.port("api")
        answers = []
        for request in (
            b"GET /v1/nodes?" + b"x" * 2000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /v1/nodes HTTP/1.1\r\nHost: h\r\nX-Big: " + b"y" * 3000 + b"\r\n\r\n",
        ):
            client = Collect()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", api), client)
            client.transport.write(request)
            yield client.lost  # answered, then closed by the hub
            answers.append(client.data.split(b"\r\n", 1)[0])
        self.assertEqual(
            answers,
            [b"HTTP/1.1 414 Request-URI Too Long", b"HTTP/1.1 431 Request Header Fields Too Large"],
        )
        metrics = yield readBody(
            (yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{api}/metrics".encode()))
        )
        refused = samples(metrics, "cloudhub_http_refused_total")
        self.assertEqual(refused[(("listener", "api"), ("reason", "uri_too_long"))], 1)
        self.assertEqual(refused[(("listener", "api"), ("reason", "headers_too_large"))], 1)


class HandshakeAdmissionMetricsTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_admitted_edges_counted_on_the_running_hub(self):
        from cloudhub.edge.bootstrap import bootstrap
        from cloudhub.edge.client import EdgeNode

        hub = CloudHubService(
            parse_config(hub_config(os.path.abspath(self.mktemp())).as_dict()), reactor=reactor
        )
        self.addCleanup(hub.stopService)
        yield hub.startService()
        url = f"https://127.0.0.1:{hub.port('https')}"
        credentials = yield bootstrap(reactor, url, hub.tokens.current, "edge-1")
        node = EdgeNode(reactor, "edge-1", "127.0.0.1", hub.port("websocket"), credentials)
        self.addCleanup(node.stop)
        yield node.start()
        yield wait_for(lambda: hub.upstream.is_connected("edge-1"))
        metrics = yield readBody(
            (
                yield Agent(reactor).request(
                    b"GET", f"http://127.0.0.1:{hub.port('api')}/metrics".encode()
                )
            )
        )
        admissions = samples(metrics, "cloudhub_handshake_admissions_total")
        self.assertEqual(admissions[(("outcome", "admitted"), ("transport", "websocket"))], 1)
        waiting = samples(metrics, "cloudhub_handshakes_waiting")
        self.assertEqual(waiting[(("transport", "websocket"),)], 0)
