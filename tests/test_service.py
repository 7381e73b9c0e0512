"""CloudHubService as a whole: the real listeners on loopback, real TLS."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from cloudhub.edge.bootstrap import TrustCAPolicy, bootstrap
from cloudhub.service import CloudHubService

from .helpers_tls import make_config


def hub_config(base: str, **cloudhub: object):
    listen = {"address": "127.0.0.1", "port": 0}
    settings = {"https": listen, "websocket": listen, **cloudhub}
    return make_config(base, **settings)


class ServiceTests(TestCase):
    def start(self, config) -> CloudHubService:
        hub = CloudHubService(config, reactor=reactor)
        hub.startService()
        self.addCleanup(hub.stopService)
        return hub

    @inlineCallbacks
    def test_ready_and_bootstrap_with_current_token(self):
        base = os.path.abspath(self.mktemp())
        hub = self.start(hub_config(base))
        ports = yield hub.ready
        self.assertIn("https", ports)
        url = f"https://127.0.0.1:{hub.port('https')}"
        credentials = yield bootstrap(reactor, url, hub.tokens.current, "edge-node-1")
        self.assertEqual(credentials.ca_pem, hub.authority.ca_pem)
        agent = Agent(reactor, TrustCAPolicy(hub.authority.ca_pem))
        response = yield agent.request(b"GET", f"{url}/readyz".encode())
        self.assertEqual((response.code, (yield readBody(response))), (200, b"ok"))

    @inlineCallbacks
    def test_restart_keeps_ca_and_accepts_earlier_token(self):
        base = os.path.abspath(self.mktemp())
        config = hub_config(base)
        first = CloudHubService(config, reactor=reactor)
        token = first.tokens.current
        ca_der = first.authority.ca_der
        hub = self.start(config)
        yield hub.ready
        self.assertEqual(hub.authority.ca_der, ca_der)
        self.assertEqual(token.split(".")[0], hashlib.sha256(ca_der).hexdigest())
        url = f"https://127.0.0.1:{hub.port('https')}"
        credentials = yield bootstrap(reactor, url, token, "edge-node-1")
        self.assertTrue(credentials.cert_pem.startswith(b"-----BEGIN CERTIFICATE"))


class GarbageCollectorTuningTests(TestCase):
    """hub.gcThreshold: the collector is set while the hub runs, and put back after."""

    def setUp(self) -> None:
        import gc

        self.before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *self.before)
        self.addCleanup(gc.unfreeze)

    def hub(self, **hub_settings: object) -> CloudHubService:
        from cloudhub.config import parse_config

        base = os.path.abspath(self.mktemp())
        data = hub_config(base).as_dict()
        data["hub"].update(hub_settings)
        return CloudHubService(parse_config(data), reactor=reactor)

    @inlineCallbacks
    def test_threshold_while_running_then_restored(self):
        import gc

        hub = self.hub(gcThreshold=12345)
        hub.startService()
        yield hub.ready
        self.assertEqual(gc.get_threshold()[0], 12345)
        self.assertGreater(gc.get_freeze_count(), 0)
        yield hub.stopService()
        self.assertEqual(gc.get_threshold(), self.before)
        self.assertEqual(gc.get_freeze_count(), 0)

    @inlineCallbacks
    def test_zero_leaves_the_collector_alone(self):
        import gc

        hub = self.hub(gcThreshold=0)
        self.assertIsNone(hub.gc_tuning)
        hub.startService()
        yield hub.ready
        self.assertEqual(gc.get_threshold(), self.before)
        self.assertEqual(gc.get_freeze_count(), 0)
        yield hub.stopService()
