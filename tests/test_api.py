"""The HTTP API (issue 6) against the real hub on loopback, with Python edges connected.

The hub (HTTPS + WSS, real TLS) and the API listener run on ports 0; the API site is built
here from the hub's upstream and store, as ``CloudHubService`` wires it. The event stream's
flow control is also driven through an in-memory channel, with a ``Clock``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, readBody
from twisted.web.http_headers import Headers

from cloudhub import wire
from cloudhub.api import ApiService, api_site, openapi_document, parse_message
from cloudhub.certs.web import BoundedRequest
from cloudhub.edge.bootstrap import bootstrap
from cloudhub.edge.client import DEFAULT_PROJECT_ID, EdgeNode
from cloudhub.handler import EVENT_CONNECTED, EVENT_DISCONNECTED, NodeEvent
from cloudhub.metrics import HubMetrics
from cloudhub.model import Message
from cloudhub.service import CloudHubService
from cloudhub.store import MemorySyncStore, StoreError

from .fakes import pod
from .helpers_tls import BytesProducer, RawClient, make_config

MAX_BODY = 64 * 1024


def wait_for(predicate: Any, timeout: float = 10.0) -> Deferred[None]:
    """Poll ``predicate`` on the real reactor (integration tests only)."""
    result: Deferred[None] = Deferred()
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]

    def check() -> None:
        if predicate():
            result.callback(None)
        elif reactor.seconds() > deadline:  # type: ignore[attr-defined]
            result.errback(AssertionError(f"timed out waiting for {predicate}"))
        else:
            reactor.callLater(0.01, check)  # type: ignore[attr-defined]

    check()
    return result


def pod_body(
    uid: str,
    rv: str,
    operation: str = "insert",
    name: str = "nginx",
    header: bool = True,
    **route: Any,
) -> dict[str, Any]:
    """A message in the wire JSON of §1.1; without ``header`` the hub fills it in."""
    body: dict[str, Any] = {
        "route": {
            "source": "edgecontroller",
            "group": "resource",
            "operation": operation,
            "resource": f"default/pod/{name}",
            **route,
        },
        "content": pod(uid, rv, name),
    }
    if header:
        body["header"] = {"resourceversion": rv}
    return body


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class EventCollector(Protocol):
    """Reads a text/event-stream body: events as (event, data-dict), comments as text."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.comments: list[str] = []
        self._buffer = b""
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            name, data_lines = "message", []
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    data_lines.append(line[len("data: ") :])
            if data_lines:
                self.events.append((name, json.loads("\n".join(data_lines))))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.ended.callback(None)

    def of(self, kind: str) -> list[Any]:
        return [data for name, data in self.events if name == kind]


def complete_response(received: bytes) -> bool:
    """Whether ``received`` holds a whole HTTP response with a Content-Length."""
    head, separator, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if separator and name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


class ApiHarness:
    """For trial TestCases: the real hub, its API on 127.0.0.1:0, edges that join it."""

    hub: CloudHubService
    api: ApiService
    metrics: HubMetrics | None

    async def start_hub(
        self,
        *,
        token: str = "",
        max_body: int = MAX_BODY,
        stream_buffer: int | None = None,
        metrics: bool = True,
        **cloudhub: Any,
    ) -> CloudHubService:
        test: TestCase = self  # type: ignore[assignment]
        base = os.path.abspath(test.mktemp())
        listen = {"address": "127.0.0.1", "port": 0}
        config = make_config(base, https=listen, websocket=listen, **cloudhub)
        hub = CloudHubService(config, reactor=reactor)
        hub.startService()
        test.addCleanup(hub.stopService)
        await hub.ready
        self.hub = hub
        self.hub_events: list[NodeEvent] = []
        hub.upstream.subscribe_events(self.hub_events.append)
        self.metrics = HubMetrics(hub.handle, hub.certificate_site.counters) if metrics else None
        if self.metrics is not None:
            test.addCleanup(self.metrics.close)
        self.accepting = True
        extra = {} if stream_buffer is None else {"stream_buffer": stream_buffer}
        site = api_site(
            hub.upstream,
            hub.store,
            reactor,
            max_body=max_body,
            token=token,
            metrics_resource=self.metrics.resource() if self.metrics is not None else None,
            accepting=lambda: self.accepting,
            **extra,
        )
        self.api = ApiService(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), site, reactor)
        self.api.startService()
        test.addCleanup(self.stop_api)
        await self.api.listening
        self.token = token
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        return hub

    def stop_api(self) -> Deferred[None] | None:
        return self.api.stopService() if self.api.running else None

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.api.bound_port}{path}".encode()

    async def call(
        self,
        method: bytes,
        path: str,
        body: Any = None,
        *,
        headers: dict[bytes, bytes] | None = None,
        auth: bool = True,
    ) -> Reply:
        raw = Headers()
        if auth and self.token:
            raw.addRawHeader(b"authorization", b"Bearer " + self.token.encode())
        for name, value in (headers or {}).items():
            raw.addRawHeader(name, value)
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            raw.addRawHeader(b"content-type", b"application/json")
        producer = BytesProducer(body) if body is not None else None
        response = await self.agent.request(method, self.url(path), raw, producer)
        data = await readBody(response)
        return Reply(response.code, response.headers, data)

    async def post(self, node: str, body: Any, query: str = "") -> Reply:
        return await self.call(b"POST", f"/v1/nodes/{node}/messages{query}", body)

    async def open_events(self, query: str = "") -> tuple[Reply, EventCollector]:
        test: TestCase = self  # type: ignore[assignment]
        headers = Headers()
        if self.token:
            headers.addRawHeader(b"authorization", b"Bearer " + self.token.encode())
        response = await self.agent.request(b"GET", self.url(f"/v1/events{query}"), headers)
        collector = EventCollector()
        response.deliverBody(collector)

        async def close() -> None:
            if not collector.ended.called:
                collector.transport.stopProducing()  # type: ignore[union-attr]
                await collector.ended

        test.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return Reply(response.code, response.headers, b""), collector

    async def join(self, node_id: str, start: bool = True, **kwargs: Any) -> EdgeNode:
        test: TestCase = self  # type: ignore[assignment]
        url = f"https://127.0.0.1:{self.hub.port('https')}"
        credentials = await bootstrap(reactor, url, self.hub.tokens.current, node_id)
        node = EdgeNode(
            reactor, node_id, "127.0.0.1", self.hub.port("websocket"), credentials, **kwargs
        )
        test.addCleanup(node.stop)
        if start:
            await node.start()
            await wait_for(lambda: self.hub.upstream.is_connected(node_id))
        return node

    async def objects(self, node: str) -> list[dict[str, Any]]:
        reply = await self.call(b"GET", f"/v1/nodes/{node}/objects")
        assert reply.code == 200, reply
        return reply.json["objects"]  # type: ignore[no-any-return]


class ApiTestCase(ApiHarness, TestCase):
    timeout = 60


class SendTests(ApiTestCase):
    async def test_202_for_a_connected_node_then_delivered(self) -> None:
        await self.start_hub()
        node = await self.join("edge-1")
        reply = await self.post("edge-1", pod_body("uid-1", "3"))
        self.assertEqual(reply.code, 202, reply.body)
        self.assertEqual(reply.header(b"content-type"), b"application/json")
        msg_id = reply.json["msg_id"]
        self.assertEqual(reply.json, {"msg_id": msg_id, "ack_mode": True})
        self.assertEqual(len(msg_id), 36)  # filled in: a UUID
        await wait_for(lambda: node.store.get("default/pod/nginx") is not None)
        self.assertEqual(node.store.get("default/pod/nginx").resource_version, "3")
        self.assertEqual(node.store.history[-1].msg_id, msg_id)

    async def test_202_for_an_offline_node_then_delivered_on_connect(self) -> None:
        await self.start_hub()
        body = pod_body("uid-off", "7")
        body["header"]["msg_id"] = "m-offline-1"
        reply = await self.post("edge-late", body)
        self.assertEqual((reply.code, reply.json["msg_id"]), (202, "m-offline-1"))
        [record] = await self.objects("edge-late")
        self.assertEqual(
            record,
            {
                "resource": "default/pod/nginx",
                "uid": "uid-off",
                "kind": "Pod",
                "namespace": "default",
                "name": "nginx",
                "acked_version": None,
                "pending_version": "7",
                "pending_operation": "insert",
                "pending_msg_id": "m-offline-1",
                "attempts": 0,
                "last_error": None,
                "deleted_at": None,
            },
        )
        node = await self.join("edge-late")
        await wait_for(lambda: node.store.get("default/pod/nginx") is not None)
        await wait_for(lambda: not self.hub.handle.queues["edge-late"].pending)
        [record] = await self.objects("edge-late")
        self.assertEqual((record["acked_version"], record["pending_version"]), ("7", None))
        self.assertIsNone(record["pending_msg_id"])

    async def test_wait_ack_200(self) -> None:
        await self.start_hub()
        node = await self.join("edge-1")
        reply = await self.post("edge-1", pod_body("uid-1", "5"), "?wait=ack&timeout=20")
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.json, {"msg_id": reply.json["msg_id"], "acked": True})
        # The 200 comes after the edge's ACK, so the edge has it now.
        self.assertEqual(node.store.acked_version("default/pod/nginx"), 5)

    async def test_wait_ack_for_a_no_ack_message_answers_when_written(self) -> None:
        await self.start_hub()
        node = await self.join("edge-1")
        heard: list[Message] = []
        node.on_message = lambda n, m: heard.append(m)
        body = {
            "route": {"source": "router_eventbus", "group": "user", "operation": "upload",
                      "resource": "node/edge-1/default/topic/t1"},
            "content": {"hello": "edge"},
        }  # fmt: skip
        reply = await self.post("edge-1", body, "?wait=ack&timeout=20")
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(
            reply.json, {"msg_id": reply.json["msg_id"], "acked": False, "written": True}
        )
        await wait_for(lambda: heard)
        self.assertEqual(
            (heard[0].resource, heard[0].content), ("default/topic/t1", body["content"])
        )

    async def test_wait_ack_timeout_504_and_the_message_stays_queued(self) -> None:
        await self.start_hub()
        reply = await self.post("edge-away", pod_body("uid-w", "4"), "?wait=ack&timeout=0.2")
        self.assertEqual(reply.code, 504, reply.body)
        self.assertIn("stays queued", reply.json["error"])
        msg_id = reply.json["msg_id"]
        [record] = await self.objects("edge-away")
        self.assertEqual((record["pending_version"], record["pending_msg_id"]), ("4", msg_id))
        node = await self.join("edge-away")
        await wait_for(lambda: node.store.acked_version("default/pod/nginx") == 4)

    async def test_stale_409_with_versions(self) -> None:
        await self.start_hub()
        await self.join("edge-1")
        reply = await self.post("edge-1", pod_body("uid-s", "5"), "?wait=ack&timeout=20")
        self.assertEqual(reply.code, 200)
        reply = await self.post("edge-1", pod_body("uid-s", "5", operation="update"))
        self.assertEqual(reply.code, 409, reply.body)
        self.assertEqual(
            {k: v for k, v in reply.json.items() if k != "error"},
            {"reason": "stale", "uid": "uid-s", "resource_version": "5", "acked": "5",
             "pending": None},
        )  # fmt: skip
        self.assertIn("stale", reply.json["error"])
        # Owed but not acknowledged: the pending version is the one to beat.
        reply = await self.post("edge-off", pod_body("uid-p", "9"))
        self.assertEqual(reply.code, 202)
        reply = await self.post("edge-off", pod_body("uid-p", "8", operation="update"))
        self.assertEqual(reply.code, 409)
        self.assertEqual((reply.json["acked"], reply.json["pending"]), (None, "9"))
        self.assertEqual(self.hub.handle.stats.refused_stale, 2)

    async def test_superseded_while_waiting_409(self) -> None:
        await self.start_hub()
        waiting = Deferred.fromCoroutine(
            self.post("edge-off", pod_body("uid-x", "1"), "?wait=ack&timeout=30")
        )
        await wait_for(lambda: self.hub.handle.queues.get("edge-off") is not None)
        newer = await self.post("edge-off", pod_body("uid-x", "2", operation="update"))
        self.assertEqual(newer.code, 202)
        reply = await waiting
        self.assertEqual(reply.code, 409, reply.body)
        self.assertEqual(reply.json["reason"], "superseded")
        self.assertEqual(reply.json["superseded_by"], newer.json["msg_id"])
        self.assertIn("superseded", reply.json["error"])

    async def test_invalid_message_400(self) -> None:
        await self.start_hub()
        body = pod_body("uid-1", "1")
        del body["content"]["metadata"]["uid"]
        reply = await self.post("edge-1", body)
        self.assertEqual(reply.code, 400)
        self.assertEqual(reply.json["reason"], "invalid")
        self.assertIn("metadata.uid", reply.json["error"])
        body = pod_body("uid-1", "1", resource="node/edge-2/default/pod/nginx")
        reply = await self.post("edge-1", body)
        self.assertEqual(reply.code, 400)
        self.assertIn("edge-2", reply.json["error"])
        body = pod_body("uid-1", "not-a-number")
        reply = await self.post("edge-1", body)
        self.assertEqual(reply.code, 400)
        self.assertIn("resourceVersion", reply.json["error"])

    async def test_malformed_bodies_and_parameters_400(self) -> None:
        await self.start_hub()
        good = pod_body("uid-1", "1")
        no_route = {"content": good["content"]}
        no_content = {"route": good["route"]}
        no_operation = {"route": {"group": "resource", "resource": "default/pod/a"},
                        "content": None}  # fmt: skip
        bad_timestamp = {**good, "header": {"timestamp": "yesterday"}}
        cases: list[tuple[Any, str, str]] = [
            (b"", "", "empty"),
            (b"{not json", "", "not valid JSON"),
            (b"\xff\xfe", "", "not UTF-8"),
            ([1, 2], "", "JSON object"),
            (no_route, "", "route is required"),
            (no_content, "", "content is required"),
            (no_operation, "", "route.operation is required"),
            ({**good, "route": "x"}, "", "route must be an object"),
            (bad_timestamp, "", "header.timestamp"),
            ({**good, "header": {"msg_id": 7}}, "", "header.msg_id must be a string"),
            (good, "?wait=forever", "wait must be ack"),
            (good, "?wait=ack&timeout=-1", "timeout must be"),
            (good, "?wait=ack&timeout=soon", "timeout must be"),
            (good, "?timeout=3", "only meaningful with wait=ack"),
        ]
        for body, query, expected in cases:
            reply = await self.post("edge-1", body, query)
            self.assertEqual(reply.code, 400, (body, query, reply.body))
            self.assertIn(expected, reply.json["error"], (body, query))
        self.assertEqual(await self.objects("edge-1"), [])

    async def test_oversized_body_413_before_it_is_read(self) -> None:
        await self.start_hub()
        head = (
            b"POST /v1/nodes/edge-1/messages HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % (4 * MAX_BODY,)
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.api.bound_port)
        client = RawClient([head, b"x" * 1024], complete_response)
        await connectProtocol(endpoint, client)
        answer = await client.done
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"limit %d bytes" % (MAX_BODY,), answer)
        if hasattr(BoundedRequest, "_too_large_answer"):  # the 413 hook of cloudhub.certs.web
            self.assertIn(b"Content-Type: application/json", answer)
        # A body at the limit is read (and judged as a message).
        reply = await self.post("edge-1", b" " * MAX_BODY)
        self.assertEqual(reply.code, 400)
        self.assertIn("empty", reply.json["error"])

    async def test_store_flush_failure_503(self) -> None:
        await self.start_hub()
        self.patch(self.hub.upstream, "flush", lambda: fail(StoreError("disk full")))
        reply = await self.post("edge-1", pod_body("uid-1", "1"))
        self.assertEqual(reply.code, 503)
        self.assertIn("disk full", reply.json["error"])
        reply = await self.post("edge-1", pod_body("uid-2", "1", name="b"), "?wait=ack&timeout=5")
        self.assertEqual(reply.code, 503)

    async def test_shutting_down_503_for_writes(self) -> None:
        await self.start_hub()
        self.accepting = False
        reply = await self.post("edge-1", pod_body("uid-1", "1"))
        self.assertEqual((reply.code, reply.json), (503, {"error": "hub shutting down"}))
        reply = await self.call(b"GET", "/v1/nodes")
        self.assertEqual(reply.code, 200)

    async def test_stopping_the_api_answers_waits_and_ends_streams(self) -> None:
        await self.start_hub()
        _, events = await self.open_events()
        waiting = Deferred.fromCoroutine(
            self.post("edge-off", pod_body("uid-1", "1"), "?wait=ack&timeout=30")
        )
        await wait_for(lambda: self.api.site.resource._waiting)
        await self.api.stopService()
        reply = await waiting
        self.assertEqual((reply.code, reply.json["error"]), (503, "hub shutting down"))
        await events.ended
        self.assertTrue(events.reason.check(ResponseDone), events.reason)  # ended cleanly
        self.assertEqual(self.hub.handle._subscribers, [])


class ReadTests(ApiTestCase):
    async def test_nodes(self) -> None:
        await self.start_hub()
        reply = await self.call(b"GET", "/v1/nodes")
        self.assertEqual((reply.code, reply.json), (200, {"nodes": []}))
        before = reactor.seconds()  # type: ignore[attr-defined]
        await self.join("edge-b")
        await self.join("edge-a")
        await wait_for(lambda: all(i.last_keepalive for i in self.hub.upstream.nodes()))
        await self.post("edge-a", pod_body("uid-1", "1"), "?wait=ack&timeout=10")
        reply = await self.call(b"GET", "/v1/nodes")
        self.assertEqual(reply.code, 200)
        nodes = reply.json["nodes"]
        self.assertEqual([n["node_id"] for n in nodes], ["edge-a", "edge-b"])
        for node in nodes:
            self.assertEqual(node["transport"], "websocket")
            self.assertEqual(node["project_id"], DEFAULT_PROJECT_ID)
            self.assertTrue(node["peer"].startswith("127.0.0.1"))
            self.assertGreaterEqual(node["connected_at"], before - 1)
            self.assertGreaterEqual(node["last_keepalive"], node["connected_at"])
            self.assertIsInstance(node["pending"], int)
        self.assertEqual(set(nodes[0]), {"node_id", "project_id", "transport", "peer",
                                          "connected_at", "last_keepalive", "pending"})  # fmt: skip

    async def test_objects(self) -> None:
        await self.start_hub()
        await self.join("edge-1")
        reply = await self.post("edge-1", pod_body("uid-1", "5"), "?wait=ack&timeout=20")
        self.assertEqual(reply.code, 200)
        namespace = {
            "route": {"source": "edgecontroller", "group": "resource", "operation": "insert",
                      "resource": "null/namespace/team-a"},
            "header": {"resourceversion": "2"},
            "content": {"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": "team-a", "uid": "uid-ns", "resourceVersion": "2"}},
        }  # fmt: skip
        await self.post("edge-2", namespace)
        [acked] = await self.objects("edge-1")
        self.assertEqual(
            (acked["uid"], acked["acked_version"], acked["pending_version"], acked["attempts"]),
            ("uid-1", "5", None, 0),
        )
        [owed] = await self.objects("edge-2")
        self.assertEqual(
            (owed["namespace"], owed["kind"], owed["name"]), (None, "Namespace", "team-a")
        )
        self.assertEqual(owed["resource"], "null/namespace/team-a")
        self.assertEqual(await self.objects("nobody"), [])

    async def test_openapi_lists_every_route(self) -> None:
        await self.start_hub()
        reply = await self.call(b"GET", "/openapi.json")
        self.assertEqual(reply.code, 200)
        document = reply.json
        self.assertEqual(document["openapi"], "3.0.3")
        routes = self.api.site.resource.routes
        self.assertEqual(set(document["paths"]), {route.template for route in routes})
        for route in routes:
            self.assertEqual(
                {m.upper() for m in document["paths"][route.template]},
                set(route.methods),
                route.template,
            )
        self.assertIn("/metrics", document["paths"])
        post = document["paths"]["/v1/nodes/{node}/messages"]["post"]
        for code in ("200", "202", "400", "409", "413", "503", "504"):
            self.assertIn(code, post["responses"])
        # Every $ref resolves.
        text = json.dumps(document)
        for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
            self.assertIn(name, document["components"]["schemas"])
        self.assertNotIn("security", document)
        self.assertEqual(openapi_document(token_required=True)["security"], [{"bearer": []}])

    async def test_404_405(self) -> None:
        await self.start_hub()
        for path in ("/", "/v1", "/v1/nodes/edge-1", "/v2/nodes", "/v1/nodes//messages"):
            reply = await self.call(b"GET", path)
            self.assertEqual(reply.code, 404, path)
            self.assertIn("no such path", reply.json["error"])
        for method, path, allowed in [
            (b"GET", "/v1/nodes/edge-1/messages", b"POST"),
            (b"POST", "/v1/nodes", b"GET"),
            (b"DELETE", "/v1/nodes/edge-1/objects", b"GET"),
            (b"PUT", "/openapi.json", b"GET"),
        ]:
            reply = await self.call(method, path, b"" if method != b"GET" else None)
            self.assertEqual(reply.code, 405, (method, path))
            self.assertEqual(reply.header(b"allow"), allowed)
            self.assertIn("not allowed", reply.json["error"])

    async def test_unexpected_error_500_without_traceback(self) -> None:
        await self.start_hub()

        def broken() -> list[Any]:
            raise RuntimeError("secret internals")

        self.patch(self.hub.upstream, "nodes", broken)
        reply = await self.call(b"GET", "/v1/nodes")
        self.assertEqual((reply.code, reply.json), (500, {"error": "internal server error"}))
        self.assertNotIn(b"secret", reply.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class AuthTests(ApiTestCase):
    async def test_token_required_everywhere(self) -> None:
        await self.start_hub(token="s3cret-token")
        for method, path in [
            (b"GET", "/v1/nodes"),
            (b"POST", "/v1/nodes/edge-1/messages"),
            (b"GET", "/v1/nodes/edge-1/objects"),
            (b"GET", "/v1/events"),
            (b"GET", "/openapi.json"),
            (b"GET", "/metrics"),
            (b"GET", "/no/such/path"),
        ]:
            reply = await self.call(method, path, auth=False)
            self.assertEqual(reply.code, 401, path)
            self.assertEqual(reply.header(b"www-authenticate"), b'Bearer realm="cloudhub"')
            self.assertIn("bearer token", reply.json["error"])
        for value in (b"Bearer wrong", b"Basic czNjcmV0LXRva2Vu", b"Bearer", b"s3cret-token"):
            reply = await self.call(
                b"GET", "/v1/nodes", headers={b"authorization": value}, auth=False
            )
            self.assertEqual(reply.code, 401, value)
            self.assertIn(b'error="invalid_token"', reply.header(b"www-authenticate") or b"")
        reply = await self.call(b"GET", "/v1/nodes")
        self.assertEqual(reply.code, 200)
        reply = await self.call(b"GET", "/metrics")
        self.assertEqual(reply.code, 200)
        self.assertIn(b"cloudhub_connected_nodes", reply.body)
        reply = await self.post("edge-1", pod_body("uid-1", "1"))
        self.assertEqual(reply.code, 202)
        reply, events = await self.open_events()
        self.assertEqual(reply.code, 200)
        self.assertTrue(self.hub.handle._event_subscribers)


class EventTests(ApiTestCase):
    async def test_node_filter_messages_and_connect_disconnect(self) -> None:
        await self.start_hub()
        reply, events = await self.open_events("?node=edge-a")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header(b"content-type"), b"text/event-stream; charset=utf-8")
        self.assertEqual(reply.header(b"cache-control"), b"no-cache")
        other = await self.join("edge-b")
        node = await self.join("edge-a")
        other.send(Message.new("edged", "meta", "update", "default/podstatus/b", {"n": "b"}))
        status = Message.new("edged", "meta", "update", "default/podstatus/a", {"phase": "Up"})
        node.send(status)
        await wait_for(lambda: events.of("message"))
        [connected] = events.of("node")
        self.assertEqual(connected["node_id"], "edge-a")
        self.assertEqual(connected["event"], EVENT_CONNECTED)
        self.assertEqual(connected["transport"], "websocket")
        self.assertEqual(connected["reason"], "")
        self.assertIsInstance(connected["timestamp"], float)
        [received] = events.of("message")
        self.assertEqual(received["node_id"], "edge-a")
        self.assertEqual(received["message"], json.loads(wire.encode(status)))
        self.assertEqual(received["message"]["header"]["msg_id"], status.msg_id)
        await node.stop()
        await wait_for(lambda: len(events.of("node")) == 2)
        disconnected = events.of("node")[1]
        self.assertEqual((disconnected["node_id"], disconnected["event"]),
                         ("edge-a", EVENT_DISCONNECTED))  # fmt: skip
        self.assertTrue(disconnected["reason"])
        self.assertEqual([e["node_id"] for e in events.of("message")], ["edge-a"])
        self.assertIn("cloudhub events", events.comments)

    async def test_group_filter_and_unsubscribe_when_the_client_goes(self) -> None:
        await self.start_hub()
        _, events = await self.open_events("?group=user")
        _, everything = await self.open_events()
        node = await self.join("edge-1")
        node.send(Message.new("edged", "meta", "update", "default/podstatus/a", {"x": 1}))
        node.send(Message.new("eventbus", "user", "publish", "default/topic/t", {"x": 2}))
        await wait_for(lambda: len(everything.of("message")) == 2)
        await wait_for(lambda: events.of("message"))
        self.assertEqual([m["message"]["route"]["group"] for m in events.of("message")], ["user"])
        # Node events are not filtered by group.
        self.assertEqual([e["event"] for e in events.of("node")], [EVENT_CONNECTED])
        subscribers = len(self.hub.handle._subscribers)
        everything.transport.stopProducing()  # type: ignore[union-attr]
        await everything.ended
        await wait_for(lambda: len(self.hub.handle._subscribers) == subscribers - 1)
        await wait_for(lambda: len(self.api.site.resource.streams) == 1)


# --- flow control of the event stream, in memory ------------------------------------------------


class FakeUpstream:
    """What the event stream uses of :class:`cloudhub.upstream.Upstream`."""

    def __init__(self) -> None:
        self.subscribers: list[tuple[Any, str | None]] = []
        self.event_subscribers: list[Any] = []

    def subscribe(self, callback: Any, group: str | None = None) -> Any:
        entry = (callback, group)
        self.subscribers.append(entry)
        return lambda: self.subscribers.remove(entry)

    def subscribe_events(self, callback: Any) -> Any:
        self.event_subscribers.append(callback)
        return lambda: self.event_subscribers.remove(callback)

    def publish(self, node_id: str, message: Message) -> None:
        for callback, group in list(self.subscribers):
            if group is None or group == message.group:
                callback(node_id, message)

    def node_event(self, node_id: str, event: str = EVENT_CONNECTED) -> None:
        for callback in list(self.event_subscribers):
            callback(NodeEvent(node_id, event, 12.5, "websocket"))


class EventStreamFlowTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = FakeUpstream()
        self.site = api_site(
            self.upstream,  # type: ignore[arg-type]
            MemorySyncStore(),
            self.clock,
            max_body=4096,
            stream_buffer=2000,
        )
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(b"GET /v1/events?node=n1 HTTP/1.1\r\nHost: x\r\n\r\n")
        # The HTTP channel, as the transport sees it: paused when the send buffer is full.
        self.network = self.transport.producer

    def timers(self) -> list[Any]:
        """Delayed calls of the event stream (not the site's log clock or idle timeout)."""
        return [c for c in self.clock.getDelayedCalls() if "LoopingCall" in repr(c.func)]

    def message(self, size: int = 10) -> Message:
        return Message.new("edged", "meta", "update", "default/podstatus/a", "x" * size)

    def test_headers_filters_and_heartbeat(self) -> None:
        head = self.transport.value()
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"), head)
        self.assertIn(b"text/event-stream", head)
        self.assertIn(b": cloudhub events", head)
        self.transport.clear()
        self.upstream.node_event("n2")
        self.upstream.publish("n2", self.message())
        self.assertEqual(self.transport.value(), b"")
        self.upstream.node_event("n1")
        self.assertIn(b"event: node\ndata: {", self.transport.value())
        self.transport.clear()
        self.clock.advance(15)
        self.assertIn(b": keepalive\n\n", self.transport.value())

    def test_paused_buffers_in_order_then_resumes(self) -> None:
        self.transport.clear()
        self.network.pauseProducing()  # what the TCP transport does when its buffer is full
        sent = [self.message() for _ in range(5)]
        for message in sent:
            self.upstream.publish("n1", message)
        self.assertEqual(self.transport.value(), b"")
        self.network.resumeProducing()
        written = self.transport.value()
        positions = [written.index(m.msg_id.encode()) for m in sent]
        self.assertEqual(positions, sorted(positions))
        self.assertFalse(self.transport.disconnecting)

    def test_a_client_too_far_behind_is_dropped(self) -> None:
        self.network.pauseProducing()
        for _ in range(10):
            self.upstream.publish("n1", self.message(300))
        self.assertTrue(self.transport.disconnected)  # aborted
        self.assertEqual(self.upstream.subscribers, [])
        self.assertEqual(self.upstream.event_subscribers, [])
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.timers(), [])
        self.assertEqual(self.site.resource.streams, set())

    def test_client_going_away_unsubscribes(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.upstream.subscribers, [])
        self.assertEqual(self.upstream.event_subscribers, [])
        self.assertEqual(self.timers(), [])

    def test_close_all_ends_the_response(self) -> None:
        self.site.close_all()
        self.assertTrue(self.transport.value().endswith(b"0\r\n\r\n"))
        self.assertEqual(self.upstream.subscribers, [])
        self.assertEqual(self.timers(), [])


class ParseMessageTests(SynchronousTestCase):
    def test_defaults_and_fields(self) -> None:
        body = json.dumps(pod_body("u", "3", header=False)).encode()
        message = parse_message(body)
        self.assertEqual(len(message.msg_id), 36)
        self.assertGreater(message.timestamp, 0)
        self.assertEqual(
            (message.source, message.group, message.operation, message.resource),
            ("edgecontroller", "resource", "insert", "default/pod/nginx"),
        )
        self.assertEqual(message.resource_version, "")

    def test_round_trip_of_the_wire_form(self) -> None:
        original = Message.new(
            "edgecontroller", "resource", "update", "default/configmap/c", {"a": [1, "é"]},
            resource_version="12", parent_msg_id="p-1",
        )  # fmt: skip
        original.type = "t"
        self.assertEqual(parse_message(wire.encode(original)), original)


class BatchTests(ApiTestCase):
    """POST /v1/messages (issue 9): many entries, one result each, in order."""

    async def test_mixed_entries_in_order_then_delivered(self) -> None:
        await self.start_hub()
        node = await self.join("edge-1")
        first = await self.post("edge-1", pod_body("uid-old", "5", name="old"))
        self.assertEqual(first.code, 202)
        entries = [
            {"node": "edge-1", "message": pod_body("uid-a", "1", name="a")},
            {"node": "edge-1", "message": pod_body("uid-old", "4", "update", name="old")},
            {"node": "edge-1", "message": {"route": {"group": "resource"}}},
            {"node": "", "message": pod_body("uid-b", "1", name="b")},
            {"node": "edge-2", "message": pod_body("uid-c", "1", name="c")},
            {"node": "edge-1", "message": pod_body("uid-d", "", name="d")},
            "not an entry",
        ]
        reply = await self.call(b"POST", "/v1/messages", entries)
        self.assertEqual(reply.code, 200, reply.body)
        results = reply.json["results"]
        self.assertEqual(
            [r["status"] for r in results],
            ["accepted", "stale", "invalid", "invalid", "accepted", "invalid", "invalid"],
        )
        self.assertEqual((reply.json["accepted"], reply.json["refused"]), (2, 5))
        self.assertIn("content is required", results[2]["error"])
        self.assertIn("node", results[3]["error"])
        self.assertIn("resourceversion", results[5]["error"])
        await wait_for(lambda: node.store.get("default/pod/a") is not None)
        self.assertEqual(node.store.get("default/pod/a").resource_version, "1")
        objects = await self.objects("edge-2")
        self.assertEqual([o["uid"] for o in objects], ["uid-c"])
        self.assertEqual(objects[0]["pending_msg_id"], results[4]["msg_id"])

    async def test_ndjson(self) -> None:
        await self.start_hub()
        lines = [
            json.dumps({"node": "edge-9", "message": pod_body(f"uid-{i}", "1", name=f"p{i}")})
            for i in range(3)
        ]
        body = ("\n".join(lines[:2]) + "\n{broken\n" + lines[2] + "\n").encode()
        reply = await self.call(
            b"POST", "/v1/messages", body, headers={b"content-type": b"application/x-ndjson"}
        )
        self.assertEqual(reply.code, 200, reply.body)
        statuses = [r["status"] for r in reply.json["results"]]
        self.assertEqual(statuses, ["accepted", "accepted", "invalid", "accepted"])
        self.assertIn("line 3", reply.json["results"][2]["error"])
        self.assertEqual(len(await self.objects("edge-9")), 3)

    async def test_sliced_across_reactor_turns_in_order(self) -> None:
        """A batch bigger than a slice: results in entry order, versions of one object judged
        in order across slices, other work served between slices."""
        from cloudhub import api as api_module

        self.patch(api_module, "BATCH_SLICE", 2)
        await self.start_hub()
        turns = []
        ticker = LoopingCall(lambda: turns.append(1))
        ticker.start(0, now=False)
        self.addCleanup(ticker.stop)
        upstream = self.hub.upstream
        send_many = upstream.send_many
        slices_at: list[int] = []  # reactor turns seen when each slice was handed in

        def recording_send_many(entries: Any) -> Any:
            slices_at.append(len(turns))
            return send_many(entries)

        self.patch(upstream, "send_many", recording_send_many)
        entries = [
            {"node": "edge-3", "message": pod_body("uid-x", str(rv), "update", name="x")}
            for rv in (1, 3, 2, 4, 4)
        ] + ["bad", {"node": "edge-3", "message": pod_body("uid-y", "1", name="y")}]
        for body, ndjson in ((entries, False), (_ndjson(entries), True)):
            turns.clear()
            slices_at.clear()
            headers = {b"content-type": b"application/x-ndjson"} if ndjson else None
            if ndjson:  # same versions again: stale now, except what is newer
                body = _ndjson(
                    [{"node": "edge-3", "message": pod_body("uid-x", "5", "update", name="x")}]
                    + entries[1:]
                )
            reply = await self.call(b"POST", "/v1/messages", body, headers=headers)
            self.assertEqual(reply.code, 200, reply.body)
            statuses = [r["status"] for r in reply.json["results"]]
            if ndjson:
                expected = ["accepted", "stale", "stale", "stale", "stale", "invalid", "stale"]
            else:
                expected = [
                    "accepted",
                    "accepted",
                    "stale",
                    "accepted",
                    "stale",
                    "invalid",
                    "accepted",
                ]
            self.assertEqual(statuses, expected)
            # 7 entries, 2 a slice: 4 slices, each in a reactor turn of its own (send_many
            # is called once per entry, so that each entry's fate is known whatever happens).
            self.assertEqual(len(set(slices_at)), 4)
            self.assertEqual(slices_at, sorted(slices_at))

    async def test_hub_stopping_mid_batch_still_answers_every_entry(self) -> None:
        """Once a batch is begun it is judged to its end: no 503 after some were accepted."""
        from cloudhub import api as api_module

        self.patch(api_module, "BATCH_SLICE", 2)
        await self.start_hub()
        upstream = self.hub.upstream
        send_many = upstream.send_many

        def stopping_after_the_first_slice(entries: Any) -> Any:
            self.accepting = False
            return send_many(entries)

        self.patch(upstream, "send_many", stopping_after_the_first_slice)
        entries = [
            {"node": "edge-3", "message": pod_body(f"uid-{i}", "1", name=f"p{i}")} for i in range(5)
        ]
        reply = await self.call(b"POST", "/v1/messages", entries)
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.json["accepted"], 5)
        self.assertEqual(len(await self.objects("edge-3")), 5)
        # A new batch is refused while the hub stops.
        reply = await self.call(b"POST", "/v1/messages", entries)
        self.assertEqual(reply.code, 503)

    async def test_not_an_array_is_400(self) -> None:
        await self.start_hub()
        reply = await self.call(b"POST", "/v1/messages", {"node": "x"})
        self.assertEqual(reply.code, 400)
        self.assertIn("array", reply.json["error"])

    async def test_oversized_batch_is_413(self) -> None:
        await self.start_hub()
        entry = {"node": "edge-1", "message": pod_body("uid-1", "1")}
        entries = [entry] * (64 * MAX_BODY // len(json.dumps(entry)) + 100)
        reply = await self.call(b"POST", "/v1/messages", entries)
        self.assertEqual(reply.code, 413)
        self.assertEqual(await self.objects("edge-1"), [])
        # The hub goes on serving.
        reply = await self.call(b"POST", "/v1/messages", [entry])
        self.assertEqual(reply.json["accepted"], 1)


def _ndjson(entries: list[Any]) -> bytes:
    return "\n".join(json.dumps(entry) for entry in entries).encode()


class OwedLimitTests(ApiTestCase):
    """Issue 18, finding 5: what a node and the hub may be owed; 429 / 507 naming the limit."""

    async def test_node_limit_429_hub_budget_507(self) -> None:
        await self.start_hub()
        budget = self.hub.handle.budget
        budget.node_messages = 2
        for i in range(2):
            reply = await self.post("edge-1", pod_body(f"uid-{i}", "1", name=f"p{i}"))
            self.assertEqual(reply.code, 202, reply.body)
        reply = await self.post("edge-1", pod_body("uid-9", "1", name="p9"))
        self.assertEqual(reply.code, 429, reply.body)
        self.assertEqual(reply.json["reason"], "over_limit")
        self.assertEqual((reply.json["limit"], reply.json["value"]), ("hub.limits.nodeMessages", 2))
        self.assertIn("hub.limits.nodeMessages 2", reply.json["error"])
        # A newer version of an owed object is not a new message.
        reply = await self.post("edge-1", pod_body("uid-0", "2", "update", name="p0"))
        self.assertEqual(reply.code, 202, reply.body)
        budget.total_bytes = budget.bytes + 10
        reply = await self.post("edge-2", pod_body("uid-1", "1"))
        self.assertEqual(reply.code, 507, reply.body)
        self.assertEqual(reply.json["limit"], "hub.limits.totalBytes")
        self.assertEqual(reply.json["value"], budget.bytes + 10)
        self.assertEqual(await self.objects("edge-2"), [])
        budget.total_bytes = 0
        budget.unknown_nodes = 1  # edge-1 owes: one unknown id already
        reply = await self.post("edge-3", pod_body("uid-1", "1"))
        self.assertEqual(reply.code, 507, reply.body)
        self.assertEqual(reply.json["limit"], "hub.limits.unknownNodes")
        self.assertNotIn("edge-3", self.hub.handle.queues)

    async def test_batch_entries_report_the_limit(self) -> None:
        await self.start_hub()
        self.hub.handle.budget.node_messages = 2
        self.hub.handle.budget.total_messages = 3
        entries = [
            {"node": "edge-1", "message": pod_body(f"uid-{i}", "1", name=f"p{i}")} for i in range(3)
        ] + [
            {"node": "edge-2", "message": pod_body("uid-a", "1", name="a")},
            {"node": "edge-3", "message": pod_body("uid-b", "1", name="b")},
            {"node": "edge-1", "message": pod_body("uid-1", "2", "update", name="p1")},
        ]
        reply = await self.call(b"POST", "/v1/messages", entries)
        self.assertEqual(reply.code, 200, reply.body)
        results = reply.json["results"]
        self.assertEqual(
            [r["status"] for r in results],
            ["accepted", "accepted", "over_limit", "accepted", "over_limit", "accepted"],
        )
        self.assertEqual((reply.json["accepted"], reply.json["refused"]), (4, 2))
        self.assertEqual((results[2]["limit"], results[2]["value"]), ("hub.limits.nodeMessages", 2))
        self.assertEqual(
            (results[4]["limit"], results[4]["value"]), ("hub.limits.totalMessages", 3)
        )
        self.assertIn("hub.limits.totalMessages", results[4]["error"])
        self.assertEqual(len(await self.objects("edge-1")), 2)

    def test_openapi_documents_the_limits(self) -> None:
        document = openapi_document()
        send = document["paths"]["/v1/nodes/{node}/messages"]["post"]["responses"]
        self.assertIn("hub.limits.nodeMessages", send["429"]["description"])
        self.assertIn("hub.limits.totalBytes", send["507"]["description"])
        result = document["components"]["schemas"]["BatchResult"]["properties"]["results"]
        self.assertIn("over_limit", result["items"]["properties"]["status"]["enum"])
        self.assertIn("over_limit", document["paths"]["/v1/messages"]["post"]["description"])
