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
        first = self.start(config)
        yield first.ready
        token = first.tokens.current
        ca_der = first.authority.ca_der
        yield first.stopService()
        hub = self.start(config)
        yield hub.ready
        self.assertEqual(hub.authority.ca_der, ca_der)
        self.assertEqual(token.split(".")[0], hashlib.sha256(ca_der).hexdigest())
        url = f"https://127.0.0.1:{hub.port('https')}"
        credentials = yield bootstrap(reactor, url, token, "edge-node-1")
        self.assertTrue(credentials.cert_pem.startswith(b"-----BEGIN CERTIFICATE"))


class InterpreterTuningTests(TestCase):
    """hub.gcThreshold, hub.switchIntervalMicroseconds: set while hubs run, put back after."""

    def setUp(self) -> None:
        import gc
        import sys

        self.before = (gc.get_threshold(), sys.getswitchinterval())
        self.addCleanup(gc.set_threshold, *self.before[0])
        self.addCleanup(sys.setswitchinterval, self.before[1])
        self.addCleanup(gc.unfreeze)

    def now(self) -> tuple[tuple[int, int, int], float]:
        import gc
        import sys

        return gc.get_threshold(), sys.getswitchinterval()

    def hub(self, **hub_settings: object) -> CloudHubService:
        from cloudhub.config import parse_config

        base = os.path.abspath(self.mktemp())
        data = hub_config(base).as_dict()
        data["hub"].update(hub_settings)
        return CloudHubService(parse_config(data), reactor=reactor, interpreter_tuning=True)

    @inlineCallbacks
    def test_set_while_running_then_restored(self):
        import gc

        hub = self.hub(gcThreshold=12345, switchIntervalMicroseconds=700)
        hub.startService()
        yield hub.ready
        self.assertEqual(gc.get_threshold()[0], 12345)
        self.assertAlmostEqual(self.now()[1], 0.0007)
        self.assertGreater(gc.get_freeze_count(), 0)
        yield hub.stopService()
        self.assertEqual(self.now(), self.before)
        self.assertEqual(gc.get_freeze_count(), 0)

    @inlineCallbacks
    def test_two_hubs_restored_when_the_last_stops(self):
        first = self.hub(gcThreshold=23456)
        second = self.hub(gcThreshold=34567)
        yield first.startService()
        yield second.startService()
        tuned = self.now()
        self.assertEqual(tuned[0][0], 23456)  # the first one's settings stand
        yield first.stopService()
        self.assertEqual(self.now(), tuned)  # the second hub still runs
        yield second.stopService()
        self.assertEqual(self.now(), self.before)

    @inlineCallbacks
    def test_embedded_hub_leaves_the_interpreter_alone_unless_asked(self):
        from cloudhub.config import parse_config

        base = os.path.abspath(self.mktemp())
        data = hub_config(base).as_dict()
        data["hub"].update(gcThreshold=12345, switchIntervalMicroseconds=700)
        hub = CloudHubService(parse_config(data), reactor=reactor)
        hub.startService()
        yield hub.ready
        self.assertIsNone(hub.tuning)
        self.assertEqual(self.now(), self.before)
        yield hub.stopService()

    @inlineCallbacks
    def test_zero_leaves_the_interpreter_alone(self):
        import gc

        hub = self.hub(gcThreshold=0, switchIntervalMicroseconds=0)
        self.assertIsNone(hub.tuning)
        hub.startService()
        yield hub.ready
        self.assertEqual(self.now(), self.before)
        self.assertEqual(gc.get_freeze_count(), 0)
        yield hub.stopService()
