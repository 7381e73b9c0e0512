"""Listeners where operators say: endpoint descriptions, IPv6, a UNIX socket for the API,
systemd socket activation (issue 15), and the parts that ``enable: false`` turns off."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from cloudhub.config import parse_config
from cloudhub.edge.bootstrap import bootstrap
from cloudhub.edge.client import EdgeNode
from cloudhub.endpoints import endpoint_problem
from cloudhub.errors import ConfigError
from cloudhub.service import CloudHubService

from .helpers_tls import BytesProducer, make_config
from .test_api import pod_body
from .test_integration_ws import wait_for
from .test_tap import TWISTD, twistd_env


@implementer(IAgentEndpointFactory)
class _UNIXEndpoints:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(reactor, self.path)


def config_with(base: str, cloudhub: dict[str, Any], hub: dict[str, Any]):
    data = make_config(base).as_dict()
    for key, value in cloudhub.items():
        data["cloudHub"][key] = {**data["cloudHub"].get(key, {}), **value}
    for key, value in hub.items():
        data["hub"][key] = {**data["hub"][key], **value} if isinstance(value, dict) else value
    return parse_config(data)


LOOPBACK = {"address": "127.0.0.1", "port": 0}


class EndpointConfigTests(SynchronousTestCase):
    def parse(self, data: dict[str, Any]) -> Any:
        return parse_config(data, "hub.yaml")

    def test_descriptions_checked_with_the_key_named(self) -> None:
        cases = [
            ({"cloudHub": {"websocket": {"endpoint": "ssl:10000"}}}, "cloudHub.websocket.endpoint"),
            ({"cloudHub": {"https": {"endpoint": "tcp:port=x"}}}, "cloudHub.https.endpoint"),
            ({"hub": {"api": {"endpoint": "carrier-pigeon:1"}}}, "hub.api.endpoint"),
            ({"hub": {"api": {"endpoint": "systemd:domain=INET"}}}, "hub.api.endpoint"),
        ]
        for data, key in cases:
            with self.assertRaises(ConfigError) as caught:
                self.parse(data)
            self.assertIn(key, str(caught.exception))
            self.assertIn("hub.yaml", str(caught.exception))

    def test_ssl_refused_because_tls_is_the_hubs(self) -> None:
        problem = endpoint_problem("ssl:443:privateKey=k.pem")
        self.assertIsNotNone(problem)
        self.assertIn("wraps TLS itself", problem or "")

    def test_accepted_descriptions(self) -> None:
        for description in (
            "tcp:10000:interface=0.0.0.0:backlog=2048",
            "tcp6:port=10000:interface=\\:\\:",
            "unix:/run/cloudhub/api.sock:mode=660",
            "systemd:domain=INET:index=0",
            "systemd:domain=INET6:name=websocket",
        ):
            self.assertIsNone(endpoint_problem(description), description)
        # systemd descriptions are checked without the sockets (check-config, outside systemd)
        config = self.parse({"hub": {"api": {"endpoint": "systemd:domain=INET:index=7"}}})
        self.assertEqual(config.hub.api.endpoint, "systemd:domain=INET:index=7")

    def test_enable_false_refused_or_honoured(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.parse({"cloudHub": {"enable": False}})
        self.assertIn("cloudHub.enable", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.parse({"modules": {"cloudHub": {"enable": False}}})
        self.assertIn("modules.cloudHub.enable", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.parse({"cloudHub": {"websocket": {"enable": False}}})
        self.assertIn("no edge could connect", str(caught.exception))
        # QUIC alone is a working hub.
        self.parse({"cloudHub": {"websocket": {"enable": False}, "quic": {"enable": True}}})


class EndpointServiceTests(TestCase):
    timeout = 60

    def start(self, config: Any) -> Deferred[Any]:
        hub = CloudHubService(config, reactor=reactor)
        self.addCleanup(hub.stopService)
        self.hub = hub
        return hub.startService()

    @inlineCallbacks
    def test_api_on_a_unix_socket(self):
        base = os.path.abspath(self.mktemp())
        # AF_UNIX paths are limited to ~107 bytes: trial's temp paths are longer.
        short = tempfile.mkdtemp(prefix="cloudhub-", dir="/tmp")
        self.addCleanup(shutil.rmtree, short, True)
        path = os.path.join(short, "api.sock")
        config = config_with(
            base,
            {"websocket": LOOPBACK, "https": LOOPBACK},
            {"api": {"endpoint": f"unix:{path}:mode=600"}},
        )
        ports = yield self.start(config)
        self.assertEqual(ports["api"], f"unix:{path}")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        agent = Agent.usingEndpointFactory(reactor, _UNIXEndpoints(path))
        response = yield agent.request(b"GET", b"http://hub/v1/nodes")
        self.assertEqual(json.loads((yield readBody(response))), {"nodes": []})
        response = yield agent.request(
            b"POST",
            b"http://hub/v1/nodes/edge-1/messages",
            Headers({b"content-type": [b"application/json"]}),
            BytesProducer(json.dumps(pod_body("u", "1")).encode()),
        )
        self.assertEqual(response.code, 202, (yield readBody(response)))

    @inlineCallbacks
    def test_websocket_on_ipv6_loopback(self):
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            probe.close()
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback here: {e}") from None
        base = os.path.abspath(self.mktemp())
        config = config_with(
            base,
            {"websocket": {"endpoint": "tcp6:0:interface=\\:\\:1"}, "https": {"address": "::1"}},
            {},
        )
        yield self.start(config)
        self.assertTrue(self.hub.websocket.address.startswith("[::1]:"))
        self.assertTrue(self.hub.https.address.startswith("[::1]:"))
        connected = yield TCP6ClientEndpoint(reactor, "::1", self.hub.port("websocket")).connect(
            Factory.forProtocol(Protocol)
        )
        connected.transport.loseConnection()

    @inlineCallbacks
    def test_https_disabled_serves_edges_without_the_certificate_server(self):
        base = os.path.abspath(self.mktemp())
        config = config_with(
            base, {"websocket": LOOPBACK, "https": {**LOOPBACK, "enable": False}}, {}
        )
        ports = yield self.start(config)
        self.assertNotIn("https", ports)
        self.assertIsNone(self.hub.https)
        self.assertIn("websocket", ports)

    @inlineCallbacks
    def test_access_log_off_by_default_and_json_fields_when_on(self):
        events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "cloudhub.access":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for access_log in (False, True):
            base = os.path.abspath(self.mktemp())
            config = config_with(
                base, {"websocket": LOOPBACK, "https": LOOPBACK}, {"accessLog": access_log}
            )
            yield self.start(config)
            url = f"http://127.0.0.1:{self.hub.port('api')}/v1/nodes".encode()
            response = yield Agent(reactor).request(b"GET", url)
            yield readBody(response)
            yield self.hub.stopService()
            if not access_log:
                self.assertEqual(events, [])
        [event] = events
        self.assertEqual((event["method"], event["uri"], event["code"]), ("GET", "/v1/nodes", 200))


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class SocketActivationTests(TestCase):
    """Acceptance: ``twistd -n cloudhub`` under systemd-socket-activate serves a node."""

    timeout = 120

    def setUp(self) -> None:
        self.activate = shutil.which("systemd-socket-activate")
        if self.activate is None:
            raise SkipTest("systemd-socket-activate not found (Debian package systemd)")

    @inlineCallbacks
    def test_websocket_certificates_and_api_from_systemd(self):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        ws_port, https_port, api_port = _free_ports(3)
        config_path = os.path.join(workdir, "hub.yaml")
        with open(config_path, "w") as f:
            f.write(
                "cloudHub:\n"
                "  tlsCAFile: ca/missing.crt\n  tlsCAKeyFile: ca/missing.key\n"
                "  tlsCertFile: certs/missing.crt\n  tlsPrivateKeyFile: certs/missing.key\n"
                "  websocket: {endpoint: 'systemd:domain=INET:index=0'}\n"
                "  https: {endpoint: 'systemd:domain=INET:index=1'}\n"
                "hub:\n  dataDir: data\n"
                "  api: {endpoint: 'systemd:domain=INET:index=2'}\n"
            )
        command = [
            self.activate,
            *(f"--listen=127.0.0.1:{port}" for port in (ws_port, https_port, api_port)),
            # systemd itself always names the sockets (LISTEN_FDNAMES); Twisted ignores
            # inherited sockets that have no names.
            "--fdname=websocket:https:api",
            *TWISTD,
            "-n",
            "--pidfile=",
            "--logger",
            "cloudhub.logs.observer",
            "cloudhub",
            "--config",
            config_path,
        ]
        log_path = os.path.join(workdir, "hub.log")
        log_file = open(log_path, "wb")
        self.addCleanup(log_file.close)
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=twistd_env(), cwd=workdir
        )
        self.addCleanup(self._stop, process)

        def hub_log() -> str:
            with open(log_path, "rb") as f:
                return f.read().decode(errors="replace")

        # systemd-socket-activate starts the hub at the first connection: this probe.
        agent = Agent(reactor)
        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                response = yield agent.request(b"GET", f"{api}/readyz".encode())
                body = yield readBody(response)
                if response.code == 200:
                    break
            except Exception as e:  # the hub may still be starting
                body = repr(e).encode()
            if time.monotonic() > deadline or process.poll() is not None:
                self.fail(f"hub not ready: {body!r}\n{hub_log()}")
            yield _sleep(0.2)

        from cloudhub.certs.token import issue_token
        from cloudhub.config import load_config

        previous = os.getcwd()
        os.chdir(workdir)  # the config's relative dataDir, as the hub sees it
        try:
            token = issue_token(load_config(config_path))
        finally:
            os.chdir(previous)
        credentials = yield bootstrap(
            reactor, f"https://127.0.0.1:{https_port}", token, "edge-activated"
        )
        node = EdgeNode(reactor, "edge-activated", "127.0.0.1", ws_port, credentials)
        self.addCleanup(node.stop)
        yield node.start()
        response = yield agent.request(
            b"POST",
            f"{api}/v1/nodes/edge-activated/messages?wait=ack&timeout=20".encode(),
            Headers({b"content-type": [b"application/json"]}),
            BytesProducer(json.dumps(pod_body("u-activated", "3")).encode()),
        )
        answer = yield readBody(response)
        self.assertEqual(response.code, 200, answer)
        yield wait_for(lambda: node.store.get("default/pod/nginx") is not None)
        self.assertEqual(node.store.get("default/pod/nginx").resource_version, "3")
        yield node.stop()
        process.send_signal(signal.SIGTERM)
        self.assertEqual((yield _wait_exit(process, 30)), 0, hub_log())

    def _stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
            process.wait()


def _sleep(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def _wait_exit(process: subprocess.Popen[bytes], timeout: float):
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        yield _sleep(0.1)
    return process.poll()


class SystemdEndpointTests(TestCase):
    """Sockets handed over by systemd, adopted again at each start of the hub."""

    def inherited(self) -> tuple[socket.socket, Any]:
        from twisted.python.systemd import ListenFDs

        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        self.addCleanup(listening.close)
        return listening, ListenFDs([listening.fileno()], ("api",))

    @inlineCallbacks
    def test_adopted_again_after_a_stop(self):
        from cloudhub.endpoints import server_endpoint

        listening, inherited = self.inherited()
        port_number = listening.getsockname()[1]
        for description in ("systemd:domain=INET:index=0", "systemd:domain=INET:name=api"):
            for _ in range(2):  # start, stop, start again: the inherited socket stays usable
                endpoint = server_endpoint(reactor, description, "", 0, inherited=inherited)
                port = yield endpoint.listen(Factory.forProtocol(Protocol))
                self.assertEqual(port.getHost().port, port_number)
                client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port_number).connect(
                    Factory.forProtocol(Protocol)
                )
                client.transport.loseConnection()
                yield port.stopListening()
        self.assertEqual(listening.getsockname()[1], port_number)  # still open, still ours

    def test_missing_socket_named_clearly(self):
        from cloudhub.endpoints import server_endpoint

        _, inherited = self.inherited()
        with self.assertRaises(ValueError) as caught:
            server_endpoint(reactor, "systemd:domain=INET:index=3", "", 0, inherited=inherited)
        self.assertIn("systemd passed this process no socket index 3", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            server_endpoint(reactor, "systemd:domain=INET:name=ws", "", 0, inherited=inherited)
        self.assertIn("no socket named 'ws'", str(caught.exception))

    def test_descriptions_refused_before_start(self):
        for description, why in (
            ("tcp:70000", "port number from 0 to 65535"),
            ("tcp:-1", "port number from 0 to 65535"),
            ("unix:", "needs the socket's path"),
            ("systemd:domain=INET:index=0:index=1", "index= is given twice"),
        ):
            self.assertIn(why, endpoint_problem(description) or "", description)

    @inlineCallbacks
    def test_backlog_of_the_hub_unless_the_description_sets_one(self):
        from cloudhub.endpoints import server_endpoint

        endpoint = server_endpoint(reactor, "tcp:0:interface=127.0.0.1", "", 0, backlog=77)
        self.assertEqual(endpoint._backlog, 77)
        endpoint = server_endpoint(reactor, "tcp:0:backlog=5", "", 0, backlog=77)
        self.assertEqual(endpoint._backlog, 5)
        yield None
