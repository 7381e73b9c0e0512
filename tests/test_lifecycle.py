"""CloudHubService's lifecycle as an embedder meets it: build, start, stop, start again."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.edge.bootstrap import bootstrap
from cloudhub.edge.client import EdgeNode
from cloudhub.errors import DeliveryStopped, HubNotRunning
from cloudhub.service import CloudHubService
from cloudhub.store import MemorySyncStore, SQLiteSyncStore

from .fakes import pod_message
from .helpers_tls import make_config
from .test_integration_ws import hub_config, wait_for


class LifecycleTests(TestCase):
    timeout = 60

    def config(self, **cloudhub: object):
        self.base = os.path.abspath(self.mktemp())
        return hub_config(self.base, **cloudhub)

    def hub(self, config=None, **kwargs: object) -> CloudHubService:
        hub = CloudHubService(config or self.config(), reactor=reactor, **kwargs)
        self.addCleanup(hub.stopService)
        return hub

    @inlineCallbacks
    def join(self, hub: CloudHubService, node_id: str):
        url = f"https://127.0.0.1:{hub.port('https')}"
        credentials = yield bootstrap(reactor, url, hub.tokens.current, node_id)
        return credentials

    def edge(self, hub: CloudHubService, node_id: str, credentials) -> EdgeNode:
        node = EdgeNode(reactor, node_id, "127.0.0.1", hub.port("websocket"), credentials)
        self.addCleanup(node.stop)
        return node

    def test_constructor_touches_nothing(self):
        """Building the hub creates no directory, CA or store: that is startService's job."""
        hub = self.hub()
        self.assertFalse(os.path.exists(self.base))
        self.assertIsNone(hub.authority)
        self.assertIsNone(hub.store)
        self.assertFalse(hub.is_ready)

    @inlineCallbacks
    def test_stop_then_start_delivers_to_a_node(self):
        """Acceptance: stop and restart an embedded hub, then deliver a message after it."""
        config = self.config()
        hub = self.hub(config)
        first_ports = yield hub.startService()
        self.assertTrue(hub.is_ready)
        credentials = yield self.join(hub, "edge-1")
        owed = pod_message("u-owed", "1", "insert")
        hub.upstream.send("edge-1", owed).addErrback(lambda f: f.trap(DeliveryStopped))
        yield hub.upstream.flush()
        yield hub.stopService()
        self.assertFalse(hub.is_ready)
        self.assertIsNone(hub.store)  # the SQLite store it opened is closed
        self.assertFalse(hub.listeners())

        ports = yield hub.startService()
        self.assertTrue(hub.is_ready)
        self.assertEqual(set(ports), set(first_ports))
        node = self.edge(hub, "edge-1", credentials)  # certificate from before the restart
        yield node.start()
        after = pod_message("u-after", "2", "insert")
        acked = yield hub.upstream.send("edge-1", after)
        self.assertEqual(acked.msg_id, after.msg_id)
        yield wait_for(lambda: node.store.get("default/pod/nginx") is not None)
        # What was owed at the stop was kept in the store and delivered after the restart.
        records = yield hub.store.records("edge-1")
        self.assertEqual([r.pending for r in records], [None, None])
        self.assertEqual({r.uid for r in records}, {"u-owed", "u-after"})

    @inlineCallbacks
    def test_a_new_ready_per_start(self):
        hub = self.hub()
        early = hub.ready  # asked before the first start: fires at that start
        hub.startService()
        first = yield early
        yield hub.stopService()
        pending = hub.ready
        self.assertFalse(pending.called)  # stopped: waits for the next start
        hub.startService()
        second = yield pending
        self.assertEqual(set(first), set(second))
        self.assertEqual((yield hub.ready), second)

    @inlineCallbacks
    def test_send_refused_while_not_running(self):
        hub = self.hub()
        with self.assertRaises(HubNotRunning):
            hub.upstream.send("edge-1", pod_message("u", "1", "insert"))
        yield hub.startService()
        yield hub.stopService()
        with self.assertRaises(HubNotRunning):
            hub.upstream.send_many([("edge-1", pod_message("u", "1", "insert"))])

    @inlineCallbacks
    def test_waiting_sends_end_with_delivery_stopped(self):
        hub = self.hub()
        yield hub.startService()
        waiting = hub.upstream.send("offline", pod_message("u", "1", "insert"))
        yield hub.upstream.flush()
        yield hub.stopService()
        [failure] = yield waiting.addErrback(lambda f: [f])
        self.assertTrue(failure.check(DeliveryStopped), failure)
        yield hub.startService()
        records = yield hub.store.records("offline")
        self.assertEqual([r.uid for r in records if r.pending is not None], ["u"])

    @inlineCallbacks
    def test_embedder_store_and_authority_are_used_and_not_closed(self):
        config = self.config()
        authority = CertificateAuthority.load_or_create(config)
        store = MemorySyncStore()
        hub = self.hub(config, store=store, authority=authority)
        yield hub.startService()
        self.assertIs(hub.authority, authority)
        self.assertIs(hub.store, store)
        hub.upstream.send("n", pod_message("u", "1", "insert")).addErrback(lambda f: None)
        yield hub.stopService()
        # Still open and holding what was accepted: it is the embedder's to close.
        records = yield store.records("n")
        self.assertEqual([r.uid for r in records], ["u"])
        yield hub.startService()
        self.assertEqual(hub.handle.queues["n"].depth, 1)
        self.assertIs(hub.authority, authority)

    @inlineCallbacks
    def test_memory_store_survives_a_restart_in_the_process(self):
        hub = self.hub(hub_config(os.path.abspath(self.mktemp()), **{}))
        data = hub.config.as_dict()
        data["hub"]["store"] = {"type": "memory"}
        from cloudhub.config import parse_config

        hub = self.hub(parse_config(data))
        yield hub.startService()
        hub.upstream.send("n", pod_message("u", "1", "insert")).addErrback(lambda f: None)
        yield hub.stopService()
        yield hub.startService()
        self.assertEqual(hub.handle.queues["n"].depth, 1)

    @inlineCallbacks
    def test_start_failure_fails_ready_and_stop_releases(self):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        base = os.path.abspath(self.mktemp())
        listen = {"address": "127.0.0.1", "port": 0}
        config = make_config(base, https=listen, websocket={"address": "127.0.0.1", "port": port})
        hub = self.hub(config)
        [failure] = yield hub.startService().addErrback(lambda f: [f])
        self.assertIn("Address already in use", failure.getErrorMessage())
        self.flushLoggedErrors(CannotListenError)
        self.assertFalse(hub.is_ready)
        store = hub.store
        self.assertIsInstance(store, SQLiteSyncStore)
        yield hub.stopService()
        self.assertIsNone(hub.store)
        [failure] = yield store.flush().addErrback(lambda f: [f])
        self.assertIn("closed", failure.getErrorMessage())

    @inlineCallbacks
    def test_stop_while_starting(self):
        """A stop before the store is open waits for the opening, then closes what opened."""
        hub = self.hub()
        ready = hub.startService()
        stopped = hub.stopService()
        [failure] = yield ready.addErrback(lambda f: [f])
        self.assertTrue(failure.check(HubNotRunning), failure)
        yield stopped
        self.assertIsNone(hub.store)
        self.assertFalse(hub.listeners())
        self.assertFalse(hub.running)

    @inlineCallbacks
    def test_start_while_stopping_waits_for_the_stop(self):
        hub = self.hub()
        yield hub.startService()
        hub.upstream.send("n", pod_message("u", "1", "insert")).addErrback(lambda f: None)
        stopping = hub.stopService()
        again = hub.stopService()  # a second stop waits for the first
        ready = hub.startService()
        yield stopping
        yield again
        ports = yield ready
        self.assertTrue(hub.is_ready)
        self.assertEqual(len(hub.listeners()), len(ports))
        self.assertEqual(len([s for s in hub if s.name == "websocket"]), 1)
        self.assertEqual(hub.handle.queues["n"].depth, 1)  # committed by the stop, restored

    @inlineCallbacks
    def test_stop_start_stop_ends_stopped(self):
        """The last call wins: a start queued behind a stop is called off by a later stop."""
        hub = self.hub()
        yield hub.startService()
        first = hub.stopService()
        queued = hub.startService()
        last = hub.stopService()
        yield first
        yield last
        [failure] = yield queued.addErrback(lambda f: [f])
        self.assertTrue(failure.check(HubNotRunning), failure)
        self.assertFalse(hub.running)
        self.assertIsNone(hub.store)
        self.assertFalse(hub.listeners())

    @inlineCallbacks
    def test_batch_begun_before_a_stop_is_answered(self):
        """The API answers a batch it began before the stop closes its connection."""
        import json
        from io import BytesIO

        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        from .test_api import pod_body

        hub = self.hub()
        yield hub.startService()
        entries = [
            {"node": f"n{i % 7}", "message": pod_body(f"uid-{i}", "1", name=f"p{i}")}
            for i in range(1200)  # three slices of 500, one per reactor turn
        ]
        send_many = hub.upstream.send_many
        stopping: list[Deferred[None]] = []

        def send_and_stop(valid):
            outcome = send_many(valid)
            if not stopping:
                stopping.append(hub.stopService())  # the stop begins after the first slice
            return outcome

        hub.upstream.send_many = send_and_stop  # type: ignore[method-assign]
        response = yield Agent(reactor).request(
            b"POST",
            f"http://127.0.0.1:{hub.port('api')}/v1/messages".encode(),
            Headers({b"content-type": [b"application/json"]}),
            FileBodyProducer(BytesIO(json.dumps(entries).encode())),
        )
        answer = json.loads((yield readBody(response)))
        yield stopping[0]
        self.assertEqual(response.code, 200, answer)
        self.assertEqual((answer["accepted"], answer["refused"]), (1200, 0))
        # Accepted means durable: every entry is in the store after the stop.
        yield hub.startService()
        records = yield hub.store.records()
        self.assertEqual(len(records), 1200)

    @inlineCallbacks
    def test_embedder_children_start_and_stop_with_the_hub(self):
        from twisted.application.service import Service

        class Probe(Service):
            starts = stops = 0

            def startService(self) -> None:
                super().startService()
                self.starts += 1

            def stopService(self) -> None:
                super().stopService()
                self.stops += 1

        hub = self.hub()
        probe = Probe()
        probe.setServiceParent(hub)
        yield hub.startService()
        yield hub.stopService()
        yield hub.startService()
        self.assertEqual((probe.starts, probe.stops), (2, 1))
        self.assertIn(probe, list(hub))


class ReadinessTests(TestCase):
    @inlineCallbacks
    def test_readyz_follows_the_lifecycle(self):
        base = os.path.abspath(self.mktemp())
        hub = CloudHubService(hub_config(base), reactor=reactor)
        self.addCleanup(hub.stopService)
        yield hub.startService()
        agent = Agent(reactor)
        url = f"http://127.0.0.1:{hub.port('api')}/readyz".encode()
        response = yield agent.request(b"GET", url)
        self.assertEqual(response.code, 200, (yield readBody(response)))
        yield hub.stopService()
        yield hub.startService()
        url = f"http://127.0.0.1:{hub.port('api')}/readyz".encode()
        response = yield agent.request(b"GET", url)
        self.assertEqual(response.code, 200)
        done: Deferred[None] = hub.stopService()
        yield done


class EmptyStoreTests(TestCase):
    """Issue 18, finding 10: a store that vanished beside the hub's CA is refused."""

    timeout = 60

    def config(self, **store: object):
        from cloudhub.config import parse_config

        data = hub_config(os.path.abspath(self.mktemp())).as_dict()
        data["hub"]["store"].update(store)
        return parse_config(data)

    @inlineCallbacks
    def run_once(self, config) -> Any:
        hub = CloudHubService(config, reactor=reactor)
        self.addCleanup(hub.stopService)
        outcome = yield hub.startService().addCallbacks(lambda ports: [ports], lambda f: [f])
        yield hub.stopService()
        return outcome  # [ports] or [failure]

    @inlineCallbacks
    def owe_something(self, config) -> Any:
        hub = CloudHubService(config, reactor=reactor)
        yield hub.startService()
        hub.upstream.send("n", pod_message("u", "1", "insert")).addErrback(lambda f: None)
        yield hub.stopService()

    @inlineCallbacks
    def test_zero_length_store_beside_the_ca_is_refused(self):
        from cloudhub.store.guard import EmptyStoreRefused

        config = self.config()
        yield self.owe_something(config)
        open(config.store_path, "w").close()  # truncated: what was owed is gone
        [outcome] = yield self.run_once(config)
        self.assertIsInstance(outcome, Failure)
        self.assertTrue(outcome.check(EmptyStoreRefused), outcome)
        self.assertIn("is empty (0 bytes)", outcome.getErrorMessage())
        self.assertIn("hub.store.allowEmpty", outcome.getErrorMessage())
        self.assertEqual(os.path.getsize(config.store_path), 0)  # left as found

    @inlineCallbacks
    def test_missing_store_beside_the_ca_is_refused(self):
        from cloudhub.store.guard import EmptyStoreRefused

        config = self.config()
        yield self.owe_something(config)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(config.store_path + suffix):
                os.remove(config.store_path + suffix)
        [outcome] = yield self.run_once(config)
        self.assertTrue(outcome.check(EmptyStoreRefused), outcome)
        self.assertIn("is missing", outcome.getErrorMessage())

    @inlineCallbacks
    def test_operator_may_start_empty(self):
        from cloudhub.config import parse_config

        config = self.config()
        yield self.owe_something(config)
        open(config.store_path, "w").close()
        data = config.as_dict()
        data["hub"]["store"]["allowEmpty"] = True
        [outcome] = yield self.run_once(parse_config(data))
        self.assertIn("websocket", outcome)

    @inlineCallbacks
    def test_first_start_and_start_after_init(self):
        from cloudhub.cli import main

        config = self.config()
        [outcome] = yield self.run_once(config)  # a first start creates CA and store
        self.assertIn("websocket", outcome)
        [outcome] = yield self.run_once(config)  # and starts again on them
        self.assertIn("websocket", outcome)
        fresh = self.config()
        path = os.path.join(os.path.dirname(fresh.hub.data_dir), "hub.yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        import yaml

        with open(path, "w") as f:
            yaml.safe_dump(fresh.as_dict(), f)
        self.assertEqual(main(["init", "--config", path]), 0)
        [outcome] = yield self.run_once(fresh)  # init made the CA and the store: no refusal
        self.assertIn("websocket", outcome)
