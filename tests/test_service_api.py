"""The API and metrics as the running hub serves them, and the hub stopping with clients open."""

import json
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from cloudhub.service import CloudHubService

from .helpers_tls import make_config


def server_certificate_expiry(exposition: bytes) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name == "cloudhub_certificate_expiry_timestamp_seconds":
                if sample.labels == {"certificate": "server"}:
                    return float(sample.value)
    return None


class ServiceApiTests(TestCase):
    async def test_api_and_metrics_served(self):
        listen = {"address": "127.0.0.1", "port": 0}
        hub = CloudHubService(
            make_config(os.path.abspath(self.mktemp()), https=listen, websocket=listen),
            reactor=reactor,
        )
        hub.startService()
        self.addCleanup(hub.stopService)
        ports = await hub.ready
        self.assertIn("api", ports)
        agent = Agent(reactor)
        r = await agent.request(b"GET", f"http://127.0.0.1:{hub.port('api')}/v1/nodes".encode())
        self.assertEqual(json.loads(await readBody(r)), {"nodes": []})
        r = await agent.request(b"GET", f"http://127.0.0.1:{hub.port('api')}/metrics".encode())
        metrics = await readBody(r)
        self.assertIn(b"connected_nodes 0.0", metrics)
        expiry = hub.authority.server_certificate.not_valid_after_utc.timestamp()
        self.assertEqual(server_certificate_expiry(metrics), expiry)
        # After a restart the metrics are the new start's, on the new port.
        await hub.stopService()
        await hub.startService()
        r = await agent.request(b"GET", f"http://127.0.0.1:{hub.port('api')}/metrics".encode())
        self.assertEqual(server_certificate_expiry(await readBody(r)), expiry)

    async def test_stop_with_stream_and_wait_open(self):
        from twisted.web.client import HTTPConnectionPool
        from twisted.web.http_headers import Headers

        from .helpers_tls import BytesProducer
        from .test_api import EventCollector, pod_body, wait_for

        listen = {"address": "127.0.0.1", "port": 0}
        hub = CloudHubService(
            make_config(os.path.abspath(self.mktemp()), https=listen, websocket=listen),
            reactor=reactor,
        )
        hub.startService()
        await hub.ready
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        base = f"http://127.0.0.1:{hub.port('api')}"
        r = await agent.request(b"GET", f"{base}/v1/events".encode())
        events = EventCollector()
        r.deliverBody(events)
        body = json.dumps(pod_body("u", "1")).encode()
        waiting = agent.request(
            b"POST",
            f"{base}/v1/nodes/n/messages?wait=ack&timeout=30".encode(),
            Headers(),
            BytesProducer(body),
        )
        await wait_for(lambda: hub.api.site.resource._waiting)
        await hub.stopService()
        resp = await waiting
        self.assertEqual(resp.code, 503)
        await events.ended
