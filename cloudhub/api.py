"""The HTTP API: :class:`cloudhub.upstream.Upstream` as JSON for applications in any language.

Served with twisted.web on ``hub.api`` (127.0.0.1:10350 by default):

=================================== ================================================================
``POST /v1/nodes/{node}/messages``  queue a message (the wire JSON of protocol §1.1) for a node,
                                    connected or not; 202 once durable, or with ``?wait=ack``
                                    200 once the edge acknowledges (504 after ``timeout``)
``GET  /v1/nodes``                  the connected nodes
``GET  /v1/nodes/{node}/objects``   what the sync store keeps for a node, per object
``GET  /v1/events``                 Server-Sent Events: what edges send up, nodes coming and going
``GET  /openapi.json``              this API as an OpenAPI 3 document
``GET  /metrics``                   Prometheus metrics (:mod:`cloudhub.metrics`), when given
=================================== ================================================================

Every answer but the event stream and the metrics is JSON; errors are ``{"error": "..."}``
with the status that says what went wrong: 400 bad message or parameter, 401 no or wrong
bearer token (when one is configured; every path needs it), 404, 405, 409 a stale version (or
a message superseded while waiting for its ACK), 410 a no-ACK message dropped while waiting,
413 a body over ``hub.maxMessageSize`` (refused before it is read), 429 the node is owed as
much as one node may be (``hub.limits.nodeMessages`` / ``nodeBytes``: retry once it caught
up), 503 the sync store failed or the hub is shutting down, 504 no ACK in time (the message
stays queued), 507 the hub's budget over all nodes is spent (``hub.limits.totalMessages`` /
``totalBytes`` / ``unknownNodes``; :mod:`cloudhub.budget`). An unexpected exception is logged
and answered with a bare 500, never a traceback.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

from twisted.internet.defer import Deferred, DeferredSemaphore, fail, gatherResults, succeed
from twisted.internet.interfaces import IProtocolFactory, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from cloudhub import model, wire
from cloudhub.budget import HubOverLimit, OverLimit
from cloudhub.certs.web import BoundedRequest, HttpLimits, bound_http
from cloudhub.config import HubConfig
from cloudhub.endpoints import server_endpoint
from cloudhub.errors import (
    DecodeError,
    DeliveryStopped,
    HubNotRunning,
    InvalidMessage,
    MessageRefused,
    StaleMessage,
    Superseded,
)
from cloudhub.handler import NodeEvent
from cloudhub.limits import ConnectionLimiter, DescriptorBudget, ThrottledLog
from cloudhub.listening import ListeningService
from cloudhub.logs import AccessLog
from cloudhub.model import Message
from cloudhub.queue import is_ack_mode
from cloudhub.store.interfaces import ISyncStore, StoreError, SyncRecord
from cloudhub.upstream import Upstream

__all__ = [
    "DEFAULT_ACK_TIMEOUT",
    "HEARTBEAT_INTERVAL",
    "MAX_ACK_TIMEOUT",
    "STREAM_BUFFER",
    "ApiService",
    "ApiSite",
    "api_listener",
    "api_site",
    "openapi_document",
]

log = Logger()

MIB = 1024 * 1024
DEFAULT_ACK_TIMEOUT = 30.0  # seconds ?wait=ack waits when no timeout is given
MAX_ACK_TIMEOUT = 3600.0
HEARTBEAT_INTERVAL = 15.0  # SSE comment line so proxies keep an idle stream open
# Most bytes of events held for one event-stream client whose connection does not keep up
# (on top of the transport's own 64 KiB); past it the client is dropped.
STREAM_BUFFER = 16 * MIB
CLOSE_TIMEOUT = 5.0  # seconds open API connections get to close at shutdown before abort

JSON_TYPE = b"application/json"
# Batch entries judged per reactor turn (POST /v1/messages): ~10-20 ms of work each.
BATCH_SLICE = 500
# Batches judged at once (hub.limits.api.batches); more wait their turn, holding their body
# only (entries are parsed a slice at a time while judged).
MAX_CONCURRENT_BATCHES = 2
TOO_MANY_REQUESTS = 429
INSUFFICIENT_STORAGE = 507
# Reason phrases twisted.web does not know (it would say "Unknown Status").
_PHRASES = {TOO_MANY_REQUESTS: b"Too Many Requests", INSUFFICIENT_STORAGE: b"Insufficient Storage"}
# Answered without the bearer token: probes (Kubernetes, load balancers) carry none.
PROBE_PATHS = frozenset({b"/readyz", b"/healthz"})
NDJSON_TYPES = frozenset({b"application/x-ndjson", b"application/ndjson", b"application/jsonl"})
EVENT_STREAM_TYPE = b"text/event-stream; charset=utf-8"
HEARTBEAT = b": keepalive\n\n"  # an SSE comment: clients ignore it


# --- replies and errors ----------------------------------------------------------------------


@dataclass
class _Reply:
    code: int
    body: dict[str, Any]
    headers: dict[bytes, bytes] = field(default_factory=dict)


class ApiError(Exception):
    """An answer other than success: ``{"error": message, **extra}`` with ``code``."""

    def __init__(
        self,
        code: int,
        message: str,
        headers: dict[bytes, bytes] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def reply(self) -> _Reply:
        return _Reply(self.code, {"error": self.message, **self.extra}, self.headers)


class _ClientGone(Exception):
    """The client went away before the answer was ready; nothing is written."""


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _refusal(error: MessageRefused) -> ApiError:
    """The answer to a message the hub did not take (protocol §6.3 rules, cloudhub.queue;
    limits, cloudhub.budget: 429 for a node's, 507 for the hub's)."""
    if isinstance(error, OverLimit):
        return ApiError(
            INSUFFICIENT_STORAGE if isinstance(error, HubOverLimit) else TOO_MANY_REQUESTS,
            str(error),
            reason="over_limit",
            limit=error.limit,
            value=error.value,
        )
    if isinstance(error, StaleMessage):
        return ApiError(
            http.CONFLICT,
            str(error),
            reason="stale",
            uid=error.uid,
            resource_version=error.resource_version,
            acked=error.acked,
            pending=error.pending,
        )
    return ApiError(http.BAD_REQUEST, str(error), reason="invalid")


# --- the message in a request body -----------------------------------------------------------

_ROUTE_REQUIRED = ("group", "operation", "resource")
_ROUTE_OPTIONAL = ("source", "destination")


def _string(part: dict[str, Any], where: str, key: str, required: bool = False) -> str:
    value = part.get(key)
    if value is None or value == "":
        if required:
            raise ApiError(http.BAD_REQUEST, f"{where}.{key} is required (a non-empty string)")
        return ""
    if not isinstance(value, str):
        raise ApiError(http.BAD_REQUEST, f"{where}.{key} must be a string")
    return value


def _body_text(body: bytes) -> str:
    if not body.strip():
        raise ApiError(http.BAD_REQUEST, "request body is empty: expected JSON")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(http.BAD_REQUEST, f"request body is not UTF-8 (byte {e.start})") from None


def parse_document(body: bytes) -> Any:
    """One JSON value from a request body; :class:`ApiError` (400) when it is not one, or when
    it holds a value the hub refuses to carry (:class:`cloudhub.wire.InvalidValue`: a number
    outside float64, NaN, Infinity, a lone surrogate escape), as the edges' codec does."""
    text = _body_text(body)
    try:
        return wire.unmarshal_value(text, float64_ints=True)
    except wire.InvalidValue as e:
        raise ApiError(http.BAD_REQUEST, f"request body {e}") from None
    except DecodeError as e:
        raise ApiError(http.BAD_REQUEST, f"request body is {e}") from None


def parse_message(body: bytes) -> Message:
    """A :class:`Message` from a request body in the wire JSON of protocol §1.1.

    ``route.group``, ``route.operation``, ``route.resource`` and ``content`` (which may be
    ``null``) are required; ``header`` is optional and its ``msg_id`` and ``timestamp`` are
    filled in when missing. Raises :class:`ApiError` (400) naming the problem.
    """
    return message_from_document(parse_document(body))


def message_from_document(document: Any, where: str = "request body") -> Message:
    """A :class:`Message` from an already-parsed wire JSON document (see :func:`parse_message`)."""
    if not isinstance(document, dict):
        raise ApiError(http.BAD_REQUEST, f"{where} must be a JSON object (a message)")
    header = document.get("header")
    if header is None:
        header = {}
    elif not isinstance(header, dict):
        raise ApiError(http.BAD_REQUEST, "header must be an object")
    route = document.get("route")
    if route is None:
        raise ApiError(http.BAD_REQUEST, "route is required (an object)")
    if not isinstance(route, dict):
        raise ApiError(http.BAD_REQUEST, "route must be an object")
    if "content" not in document:
        raise ApiError(http.BAD_REQUEST, "content is required (any JSON value, null included)")

    timestamp = header.get("timestamp")
    if timestamp is None:
        timestamp = model.now_ms()
    elif isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise ApiError(http.BAD_REQUEST, "header.timestamp must be an integer (milliseconds)")
    elif not -(2**63) <= timestamp < 2**63:
        raise ApiError(http.BAD_REQUEST, "header.timestamp does not fit in int64")
    sync = header.get("sync")
    if sync is not None and not isinstance(sync, bool):
        raise ApiError(http.BAD_REQUEST, "header.sync must be a boolean")
    values = {key: _string(route, "route", key, required=True) for key in _ROUTE_REQUIRED}
    values.update({key: _string(route, "route", key) for key in _ROUTE_OPTIONAL})
    msg_id = _string(header, "header", "msg_id")
    parent_msg_id = _string(header, "header", "parent_msg_id")
    problem = model.msg_id_problem(msg_id, parent_msg_id)
    if problem is not None:
        raise ApiError(http.BAD_REQUEST, problem)
    return Message(
        msg_id=msg_id or model.new_msg_id(),
        timestamp=timestamp,
        parent_msg_id=parent_msg_id,
        resource_version=_string(header, "header", "resourceversion"),
        sync=False,  # every transport write clears it (§2.4)
        type=_string(header, "header", "type"),
        content=document["content"],
        **values,
    )


def parse_batch(body: bytes, ndjson: bool) -> list[Any]:
    """The entries of a batch body: a JSON array, or NDJSON (one entry per line).

    A body that is neither is a 400 for the whole batch; a bad *entry* is judged on its own,
    including one holding a value :func:`parse_document` refuses (a number outside float64, a
    lone surrogate): that entry is ``invalid``, the others are judged as usual.
    """
    if not ndjson:
        text = _body_text(body)
        try:
            document, suspect = wire.unmarshal_unchecked(text)
        except DecodeError as e:
            raise ApiError(http.BAD_REQUEST, f"request body is {e}") from None
        if not isinstance(document, list):
            raise ApiError(http.BAD_REQUEST, "request body must be a JSON array of entries")
        if suspect:  # rare: only then is every entry walked
            for index, entry in enumerate(document):
                try:
                    problem = wire.value_problem(entry)
                except RecursionError:
                    problem = "the entry is nested too deeply"
                if problem is not None:
                    document[index] = _BadEntry(problem)
        return document  # type: ignore[no-any-return]
    return [parse_batch_line(number, line) for number, line in batch_lines(body)]


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _after_space(text: str, at: int) -> int:
    match = _JSON_SPACE.match(text, at)  # always matches (possibly nothing)
    return match.end() if match is not None else at


def _ignored(_: str) -> None:
    return None


# Checks a JSON value's syntax and finds its end, building as little as it can (numbers are
# not converted); what it returns is thrown away.
_skim_value = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_float=_ignored, parse_int=_ignored, parse_constant=_ignored
).scan_once


def _skim(text: str, start: int) -> int:
    """The end of the JSON value at ``start``; 400 as :func:`parse_document` when none."""
    try:
        _, end = _skim_value(text, start)
    except StopIteration as stop:
        raise ApiError(
            http.BAD_REQUEST,
            f"request body is not valid JSON: expecting a value at char {stop.value}",
        ) from None
    except ValueError as error:
        raise ApiError(http.BAD_REQUEST, f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(
            http.BAD_REQUEST, "request body is not valid JSON: nested too deeply"
        ) from None
    return end  # type: ignore[no-any-return]


def _array_spans(text: str) -> array[int]:
    """Where each entry of a JSON array body is: ``[start0, end0, start1, end1, ...]``.

    The whole body is checked (400 as :func:`parse_batch` when it is not one JSON array) but
    no entry is kept: they are parsed again, a slice at a time, as they are judged.
    """
    at = _after_space(text, 0)
    if text[at : at + 1] != "[":
        _skim(text, at)  # not JSON at all: say where
        raise ApiError(http.BAD_REQUEST, "request body must be a JSON array of entries")
    spans = array("q")
    at = _after_space(text, at + 1)
    if text[at : at + 1] == "]":
        end = at + 1
    else:
        while True:
            end = _skim(text, at)
            spans.append(at)
            spans.append(end)
            at = _after_space(text, end)
            delimiter = text[at : at + 1]
            if delimiter == ",":
                at = _after_space(text, at + 1)
            elif delimiter == "]":
                end = at + 1
                break
            else:
                raise ApiError(
                    http.BAD_REQUEST,
                    f"request body is not valid JSON: expecting ',' delimiter at char {at}",
                )
    if _after_space(text, end) != len(text):
        raise ApiError(
            http.BAD_REQUEST, f"request body is not valid JSON: extra data at char {end}"
        )
    return spans


def _array_entry(text: str) -> Any:
    """One entry of a JSON array body (its text), as :func:`parse_batch` would have it."""
    try:
        value, suspect = wire.unmarshal_unchecked(text)
        if suspect:
            problem = wire.value_problem(value)
            if problem is not None:
                return _BadEntry(problem)
    except RecursionError:
        return _BadEntry("the entry is nested too deeply")
    except DecodeError as e:  # not expected: _array_spans checked it
        return _BadEntry(f"the entry is {e}")
    return value


def _ndjson_spans(body: bytes) -> array[int]:
    """The non-blank lines of an NDJSON body: ``[number, start, end, ...]`` (numbers from 1);
    400 if none. (:func:`batch_lines` with offsets instead of copies.)"""
    spans = array("q")
    size = len(body)
    at = 0
    number = 0
    while at <= size:
        end = body.find(b"\n", at)
        if end < 0:
            end = size
        number += 1
        if body[at:end].strip():
            spans.extend((number, at, end))
        at = end + 1
    if not spans:
        raise ApiError(http.BAD_REQUEST, "request body is empty: expected NDJSON entries")
    return spans


def batch_lines(body: bytes) -> list[tuple[int, bytes]]:
    """The non-blank lines of an NDJSON body with their (1-based) numbers; 400 if none."""
    lines = [(number, line) for number, line in enumerate(body.split(b"\n"), 1) if line.strip()]
    if not lines:
        raise ApiError(http.BAD_REQUEST, "request body is empty: expected NDJSON entries")
    return lines


def parse_batch_line(number: int, line: bytes) -> Any:
    """One NDJSON entry; a line that is not JSON becomes that entry's error, not the batch's."""
    try:
        return parse_document(line)
    except ApiError as e:
        return _BadEntry(f"line {number}: {e.reply().body['error']}")


class _BadEntry:
    """An NDJSON line that is not JSON: reported as that entry's result."""

    def __init__(self, error: str) -> None:
        self.error = error


def batch_message(entry: Any, index: int) -> tuple[str, Message]:
    """``(node, message)`` of one batch entry ``{"node": …, "message": {…}}``."""
    if isinstance(entry, _BadEntry):
        raise ApiError(http.BAD_REQUEST, entry.error)
    if not isinstance(entry, dict):
        raise ApiError(http.BAD_REQUEST, "an entry must be an object {node, message}")
    node = entry.get("node")
    if not isinstance(node, str) or not node:
        raise ApiError(http.BAD_REQUEST, "node is required (a non-empty string)")
    if "message" not in entry:
        raise ApiError(http.BAD_REQUEST, "message is required (a message object)")
    return node, message_from_document(entry["message"], "message")


# --- watching a send() without cancelling it -------------------------------------------------

_PENDING: Any = object()


class _Delivery:
    """The outcome of one ``upstream.send()``, for any number of waiters.

    Cancelling a waiter stops that waiting only; the send Deferred is never cancelled (the
    message stays queued). A failure nobody waits for (after a 202) is logged, not lost.
    """

    def __init__(self, sent: Deferred[Message], node_id: str, msg_id: str) -> None:
        self.node_id = node_id
        self.msg_id = msg_id
        self.result: Any = _PENDING
        self._waiters: list[Deferred[Message]] = []
        self._watching = False  # refusals at once are answered, not logged
        sent.addBoth(self._done)
        self._watching = True

    @property
    def refused_at_once(self) -> Failure | None:
        result = self.result
        return result if isinstance(result, Failure) else None

    def _done(self, result: Any) -> None:
        self.result = result
        waiters, self._waiters = self._waiters, []
        if (
            isinstance(result, Failure)
            and not waiters
            and self._watching
            and not result.check(StoreError)  # not accepted (503): the store logs it
        ):
            log.info(
                "message {msg_id} for node {node} not delivered: {why}",
                msg_id=self.msg_id,
                node=self.node_id,
                why=result.getErrorMessage(),
            )
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def wait(self) -> Deferred[Message]:
        if self.result is not _PENDING:
            return fail(self.result) if isinstance(self.result, Failure) else succeed(self.result)
        waiter: Deferred[Message] = Deferred(lambda d: self._forget(d))
        self._waiters.append(waiter)
        return waiter

    def _forget(self, waiter: Deferred[Message]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)


# --- the event stream ------------------------------------------------------------------------


def _message_event(node_id: str, message: Message) -> bytes:
    # wire.encode is the message's JSON as edgecore sees it: one line, "\n" at the end.
    data = b'{"node_id":%s,"message":%s}' % (_json_bytes(node_id), wire.encode(message).rstrip())
    return b"event: message\ndata: " + data + b"\n\n"


def _node_event(event: NodeEvent) -> bytes:
    data = _json_bytes(
        {
            "node_id": event.node_id,
            "event": event.event,
            "transport": event.transport,
            "timestamp": event.timestamp,
            "reason": event.reason,
        }
    )
    return b"event: node\ndata: " + data + b"\n\n"


@implementer(IPushProducer)
class _EventStream:
    """One ``GET /v1/events`` client: subscribed while connected, bounded when slow.

    Registered as the request's push producer, so the HTTP channel tells it when the
    connection's send buffer is full (pause) and drained (resume). While paused, events wait
    here, up to ``limit`` bytes; a client that falls further behind is dropped, so one slow
    reader never grows the hub's memory without bound.
    """

    def __init__(
        self,
        request: Request,
        reactor: IReactorTime,
        limit: int,
        heartbeat: float,
        nodes: frozenset[str],
        groups: frozenset[str],
        on_end: Callable[[_EventStream], object],
    ) -> None:
        self.request = request
        self.reactor = reactor
        self.limit = limit
        self.heartbeat = heartbeat
        self.nodes = nodes
        self.groups = groups
        self.on_end = on_end
        self.peer = _peer(request)
        self.ended = False
        self._paused = False
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._unsubscribe: list[Callable[[], object]] = []
        self._loop: LoopingCall | None = None

    def start(self, upstream: Upstream) -> None:
        group = next(iter(self.groups)) if len(self.groups) == 1 else None
        self._unsubscribe = [
            upstream.subscribe(self._on_message, group),
            upstream.subscribe_events(self._on_node_event),
        ]
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addBoth(self._finished)
        self._write(b": cloudhub events\n\n")  # the headers go out now, not at the first event
        loop = LoopingCall(self._write, HEARTBEAT)
        loop.clock = self.reactor
        loop.start(self.heartbeat, now=False).addErrback(
            lambda f: log.failure("event stream heartbeat to {peer} failed", f, peer=self.peer)
        )
        self._loop = loop
        log.info(
            "event stream opened for {peer} (nodes {nodes}, groups {groups})",
            peer=self.peer,
            nodes=sorted(self.nodes) or "all",
            groups=sorted(self.groups) or "all",
        )

    # -- what is published --

    def _on_message(self, node_id: str, message: Message) -> None:
        if self.nodes and node_id not in self.nodes:
            return
        if self.groups and message.group not in self.groups:
            return
        try:
            data = _message_event(node_id, message)
        except (TypeError, ValueError):
            log.failure(
                "message {msg_id} from node {node} cannot be encoded for the event stream",
                msg_id=message.msg_id,
                node=node_id,
            )
            return
        self._write(data)

    def _on_node_event(self, event: NodeEvent) -> None:
        if self.nodes and event.node_id not in self.nodes:
            return
        self._write(_node_event(event))

    def _write(self, data: bytes) -> None:
        if self.ended:
            return
        if self._paused or self._queue:
            self._queue.append(data)
            self._queued += len(data)
            if self._queued > self.limit:
                self._drop()
            return
        self.request.write(data)

    # -- IPushProducer (called by the HTTP channel) --

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        queue = self._queue
        # Each write may pause us again (the channel calls pauseProducing synchronously).
        while queue and not self._paused and not self.ended:
            data = queue.popleft()
            self._queued -= len(data)
            self.request.write(data)

    def stopProducing(self) -> None:
        self._end()

    # -- the end --

    def _drop(self) -> None:
        log.warn(
            "event stream client {peer} dropped: more than {limit} bytes of events waiting "
            "for a connection that does not keep up",
            peer=self.peer,
            limit=self.limit,
        )
        self._end()
        transport = self.request.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()

    def _finished(self, result: object) -> None:
        """The response finished, or the connection was lost (the client went away)."""
        if not self.ended:
            log.info("event stream client {peer} went away", peer=self.peer)
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._queue.clear()
        self._queued = 0
        self.on_end(self)

    def close(self) -> None:
        """End the stream cleanly (hub shutdown): the client sees the response end."""
        if self.ended:
            return
        self._end()
        request = self.request
        request.unregisterProducer()
        request.finish()


# --- the resource tree -----------------------------------------------------------------------

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Route:
    """One path template (``{name}`` segments are parameters) and its handlers by method."""

    template: str
    methods: dict[str, Handler]

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template.strip("/").split("/"))

    def match(self, segments: list[str]) -> dict[str, str] | None:
        mine = self.segments
        if len(mine) != len(segments):
            return None
        params: dict[str, str] = {}
        for pattern, segment in zip(mine, segments, strict=True):
            if pattern.startswith("{"):
                if not segment:
                    return None
                params[pattern[1:-1]] = segment
            elif pattern != segment:
                return None
        return params


def _peer(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", address))


def _path_segments(request: Request) -> list[str]:
    try:
        return [unquote_to_bytes(part).decode("utf-8") for part in request.path.split(b"/")[1:]]
    except UnicodeDecodeError:
        raise ApiError(http.NOT_FOUND, "no such path (not UTF-8)") from None


def _query(request: Request, name: str) -> list[str]:
    # From the URI only: twisted.web also puts form-encoded POST bodies in request.args.
    _, _, query = request.uri.partition(b"?")
    values = parse_qs(query, keep_blank_values=True).get(name.encode("ascii"), [])
    try:
        return [value.decode("utf-8") for value in values]
    except UnicodeDecodeError:
        raise ApiError(http.BAD_REQUEST, f"query parameter {name} is not UTF-8") from None


def _query_one(request: Request, name: str) -> str | None:
    values = _query(request, name)
    if len(values) > 1:
        raise ApiError(http.BAD_REQUEST, f"query parameter {name} given more than once")
    return values[0] if values else None


def _seconds(value: float | None) -> float | None:
    return None if value is None else float(value)


def _record_json(record: SyncRecord) -> dict[str, Any]:
    pending = record.pending
    resource = record.resource or (pending.resource if pending is not None else "")
    return {
        "resource": resource,
        "uid": record.uid,
        "kind": record.kind,
        "namespace": None if record.namespace == model.NULL_NAMESPACE else record.namespace,
        "name": record.name,
        "acked_version": None if record.acked_version is None else str(record.acked_version),
        "pending_version": (pending.resource_version or None) if pending is not None else None,
        "pending_operation": pending.operation if pending is not None else None,
        "pending_msg_id": pending.msg_id if pending is not None else None,
        "attempts": record.attempts,
        "last_error": record.last_error or None,
        # A tombstone (an acknowledged delete, remembered for hub.store.tombstoneRetention).
        "deleted_at": record.deleted_at,
    }


class ApiResource(Resource):
    """The whole API as one leaf: routing, auth and error answers in one place."""

    isLeaf = True

    def __init__(
        self,
        upstream: Upstream,
        store: ISyncStore,
        reactor: IReactorTime,
        *,
        token: str = "",
        metrics_resource: IResource | None = None,
        accepting: Callable[[], bool] = lambda: True,
        ready: Callable[[], bool] = lambda: True,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        stream_buffer: int = STREAM_BUFFER,
        max_batches: int = MAX_CONCURRENT_BATCHES,
    ) -> None:
        super().__init__()
        if max_batches < 1:
            raise ValueError(f"max_batches must be 1 or more, not {max_batches}")
        self.ready = ready
        # POST /v1/messages judged at once (the others wait, their bodies unread).
        self._batches = DeferredSemaphore(max_batches)
        self.upstream = upstream
        self.store = store
        self.reactor = reactor
        self._token = token.encode("utf-8")
        self.metrics_resource = metrics_resource
        self.accepting = accepting
        self.heartbeat_interval = heartbeat_interval
        self.stream_buffer = stream_buffer
        self.streams: set[_EventStream] = set()
        # Requests waiting for an ACK: called with the answer to give at shutdown.
        self._waiting: set[Callable[[ApiError], None]] = set()
        # Requests not yet answered (a batch judged over several turns, a durable accept):
        # the hub's stop lets their answers be written before it closes the connections.
        self._answering: set[Request] = set()
        self._answered_waiters: list[Deferred[None]] = []
        # A failing store fails every write: one line per minute, not one per request.
        self._store_failures = ThrottledLog(log, 60.0)
        self.routes = [
            Route("/v1/nodes/{node}/messages", {"POST": self._post_message}),
            Route("/v1/messages", {"POST": self._post_batch}),
            Route("/v1/nodes", {"GET": self._get_nodes}),
            Route("/v1/nodes/{node}/objects", {"GET": self._get_objects}),
            Route("/v1/events", {"GET": self._get_events}),
            Route("/openapi.json", {"GET": self._get_openapi}),
            Route("/readyz", {"GET": self._get_readyz}),
            Route("/healthz", {"GET": self._get_healthz}),
        ]
        if metrics_resource is not None:
            self.routes.append(Route("/metrics", {"GET": self._get_metrics}))
        self._openapi = _json_bytes(
            openapi_document(token_required=bool(token), metrics=metrics_resource is not None)
        )

    # -- dispatch --

    def render(self, request: Request) -> bytes | int:
        finished: list[bool] = []
        self._answering.add(request)
        request.notifyFinish().addBoth(self._answer_written, request)
        try:
            self._authorize(request)
            outcome = self._dispatch(request)
        except ApiError as e:
            return self._render_reply(request, e.reply())
        except Exception:
            log.failure(
                "unexpected error serving {method} {uri} for {peer}",
                method=request.method.decode("ascii", "replace"),
                uri=request.uri.decode("ascii", "replace"),
                peer=_peer(request),
            )
            return self._render_reply(request, _internal_error())
        if isinstance(outcome, _Reply):
            return self._render_reply(request, outcome)
        if isinstance(outcome, Deferred):
            request.notifyFinish().addBoth(lambda _: finished.append(True))
            outcome.addErrback(self._failed, request)
            outcome.addCallback(self._write_later, request, finished)
            outcome.addErrback(
                lambda f: log.failure("writing the answer to {uri} failed", f, uri=request.uri)
            )
            return NOT_DONE_YET
        return outcome  # type: ignore[no-any-return]  # bytes or NOT_DONE_YET: done by the handler

    def _authorize(self, request: Request) -> None:
        if not self._token or request.path in PROBE_PATHS:
            return
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        presented = b""
        if len(values) == 1:
            scheme, _, credentials = values[0].partition(b" ")
            if scheme.lower() == b"bearer":
                presented = credentials.strip()
        if presented and hmac.compare_digest(presented, self._token):
            return
        challenge = b'Bearer realm="cloudhub"'
        if values:
            challenge += b', error="invalid_token"'
            log.warn(
                "API request from {peer} refused: wrong or malformed bearer token",
                peer=_peer(request),
            )
        raise ApiError(
            http.UNAUTHORIZED,
            "a valid bearer token is required (Authorization: Bearer <hub.api.token>)",
            headers={b"WWW-Authenticate": challenge},
        )

    def _dispatch(self, request: Request) -> Any:
        segments = _path_segments(request)
        method = request.method.decode("ascii", "replace")
        for route in self.routes:
            params = route.match(segments)
            if params is None:
                continue
            handler = route.methods.get(method)
            if handler is None:
                allowed = ", ".join(sorted(route.methods)).encode("ascii")
                raise ApiError(
                    http.NOT_ALLOWED,
                    f"method {method} not allowed on {route.template}",
                    headers={b"Allow": allowed},
                )
            return handler(request, **params)
        raise ApiError(http.NOT_FOUND, "no such path (see /openapi.json)")

    # -- answering --

    def _render_reply(self, request: Request, reply: _Reply) -> bytes:
        body = _json_bytes(reply.body)
        request.setResponseCode(reply.code, _PHRASES.get(reply.code))
        request.setHeader(b"Content-Type", JSON_TYPE)
        request.setHeader(b"Cache-Control", b"no-store")
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        return body

    def _write_later(self, reply: _Reply | None, request: Request, finished: list[bool]) -> None:
        if reply is None or finished:
            return  # the client went away
        body = self._render_reply(request, reply)
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: Request) -> _Reply | None:
        if failure.check(ApiError):
            return failure.value.reply()  # type: ignore[union-attr,no-any-return]
        if failure.check(_ClientGone):
            return None
        log.failure(
            "unexpected error serving {method} {uri} for {peer}",
            failure,
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
            peer=_peer(request),
        )
        return _internal_error()

    def _answer_written(self, result: object, request: Request) -> None:
        # Finished, or the client went away (a failure here is that, and is no error).
        self._answering.discard(request)
        if not self._answering:
            waiters, self._answered_waiters = self._answered_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def answered(self) -> Deferred[None]:
        """Fires once every request begun so far is answered (at once when none is)."""
        if not self._answering:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._answered_waiters.append(waiter)
        return waiter

    def close_all(self) -> None:
        """Hub shutdown: end every event stream, answer every ACK wait 503."""
        for stream in list(self.streams):
            stream.close()
        for answer in list(self._waiting):
            answer(ApiError(http.SERVICE_UNAVAILABLE, "hub shutting down"))

    # -- POST /v1/nodes/{node}/messages --

    def _post_message(self, request: Request, node: str) -> _Reply | Deferred[_Reply]:
        if not self.accepting():
            raise ApiError(http.SERVICE_UNAVAILABLE, "hub shutting down")
        wait = _query_one(request, "wait")
        timeout_text = _query_one(request, "timeout")
        if wait not in (None, "ack"):
            raise ApiError(http.BAD_REQUEST, f"wait must be ack, not {wait!r}")
        timeout = DEFAULT_ACK_TIMEOUT
        if timeout_text is not None:
            if wait is None:
                raise ApiError(http.BAD_REQUEST, "timeout is only meaningful with wait=ack")
            try:
                timeout = float(timeout_text)
            except ValueError:
                timeout = math.nan
            if not 0 < timeout <= MAX_ACK_TIMEOUT:
                raise ApiError(
                    http.BAD_REQUEST,
                    f"timeout must be a number of seconds above 0 and at most "
                    f"{MAX_ACK_TIMEOUT:g}, not {timeout_text!r}",
                )
        content = request.content
        message = parse_message(content.read() if content is not None else b"")
        ack_mode = is_ack_mode(message.copy(resource=model.trim_resource(message.resource)))
        try:
            sent = self.upstream.send(node, message)
        except MessageRefused as e:
            raise _refusal(e) from None
        except StoreError as e:
            raise ApiError(http.SERVICE_UNAVAILABLE, f"sync store unavailable: {e}") from None
        except HubNotRunning as e:
            raise ApiError(http.SERVICE_UNAVAILABLE, str(e)) from None
        delivery = _Delivery(sent, node, message.msg_id)
        refused = delivery.refused_at_once
        if refused is not None:
            if refused.check(MessageRefused):
                raise _refusal(refused.value)  # type: ignore[arg-type]
            if refused.check(StoreError):
                raise ApiError(http.SERVICE_UNAVAILABLE, f"sync store unavailable: {refused.value}")
            refused.raiseException()
        accepted = {"msg_id": message.msg_id, "ack_mode": ack_mode}
        # A no-ACK message is not stored (best effort, kept in memory only): a commit that
        # fails meanwhile (others' messages) says nothing about it, and a 503 would be wrong,
        # since it is queued and will be sent.
        flushed = self.upstream.flush() if ack_mode else succeed(None)
        if wait is None:
            return flushed.addCallbacks(
                lambda _: self._accepted(node, message, _Reply(http.ACCEPTED, accepted)),
                self._flush_failed,
            )
        return self._await_delivery(request, delivery, flushed, timeout, ack_mode)

    # -- POST /v1/messages --

    def _post_batch(self, request: Request) -> Deferred[_Reply]:
        """Many messages in one request, one result per entry, durable before the answer.

        At most ``max_batches`` batches are judged at once (``hub.limits.api.batches``); the
        others wait their turn with their body where the HTTP layer put it (a temporary file
        past 100 KB), so what many large batches cost in memory is bounded (issue 18).
        """
        if not self.accepting():
            raise ApiError(http.SERVICE_UNAVAILABLE, "hub shutting down")
        return self._batches.run(self._judge_batch, request)

    def _judge_batch(self, request: Request) -> Deferred[_Reply]:
        """The batch's turn: judge its entries.

        The body is checked whole first (a body that is not a JSON array or NDJSON is a 400,
        nothing accepted) but kept as text, with where each entry is; entries are parsed
        :data:`BATCH_SLICE` at a time, one slice per reactor turn, so memory follows the body
        (not ten times it, as the whole parsed document would) and a large batch does not
        hold up the nodes' traffic (or another client's batch); entries are judged in order
        whatever the slicing.
        """
        if getattr(request, "_disconnected", False):  # gone while waiting: nothing to judge
            raise _ClientGone()
        if not self.accepting():
            raise ApiError(http.SERVICE_UNAVAILABLE, "hub shutting down")
        content_type = request.getHeader(b"content-type") or b""
        ndjson = content_type.split(b";")[0].strip().lower() in NDJSON_TYPES
        content = request.content
        body = content.read() if content is not None else b""
        if ndjson:
            spans = _ndjson_spans(body)
            count = len(spans) // 3
            text = ""
        else:
            text = _body_text(body)
            del body
            body = b""
            spans = _array_spans(text)
            count = len(spans) // 2
        results: list[dict[str, Any] | None] = [None] * count
        accepted = 0
        unavailable: str | None = None  # once the store or the hub fails: the rest's error
        logged = False
        # Entries accepted and stored, per slice, with the flush of that slice: all of one
        # slice's writes go to one commit, and a commit that fails refuses (rolls back) all it
        # carried, so each slice's fate is its flush's (issue 18: a 503 or an "error" is never
        # accepted after all).
        stored: list[int] = []
        flushes: list[tuple[list[int], Deferred[None]]] = []

        def take(start: int) -> None:
            end = min(start + BATCH_SLICE, count)
            if ndjson:
                chunk = [
                    parse_batch_line(spans[3 * i], body[spans[3 * i + 1] : spans[3 * i + 2]])
                    for i in range(start, end)
                ]
            else:
                chunk = [
                    _array_entry(text[spans[2 * i] : spans[2 * i + 1]]) for i in range(start, end)
                ]
            for index, entry in enumerate(chunk, start):
                try:
                    node, message = batch_message(entry, index)
                except ApiError as e:
                    results[index] = {"status": "invalid", "error": e.reply().body["error"]}
                except Exception:
                    results[index] = internal_error(None, "")
                else:
                    results[index] = judge(node, message, index)
            if stored:
                flushes.append((stored[:], self.upstream.flush()))
                stored.clear()

        def judge(node: str, message: Message, index: int) -> dict[str, Any]:
            # One entry per send_many() call: whatever it raises, the entries before it have
            # their results, so the answer reports every entry's fate (never a 5xx after some
            # were accepted). The call costs ~0.3 us of the ~50 us an entry takes.
            nonlocal accepted, unavailable
            if unavailable is not None:
                return {"msg_id": message.msg_id, "status": "error", "error": unavailable}
            try:
                [refused] = self.upstream.send_many([(node, message)])
            except (StoreError, HubNotRunning) as e:
                reason = f"sync store unavailable: {e}" if isinstance(e, StoreError) else str(e)
                if not accepted:
                    raise ApiError(http.SERVICE_UNAVAILABLE, reason) from None
                unavailable = f"not accepted: {reason}; send it again"
                return {"msg_id": message.msg_id, "status": "error", "error": unavailable}
            except Exception:
                return internal_error(message, node)
            if refused is None:
                accepted += 1
                if is_ack_mode(message.copy(resource=model.trim_resource(message.resource))):
                    stored.append(index)
                return {"msg_id": message.msg_id, "status": "accepted"}
            if isinstance(refused, OverLimit):
                return {
                    "msg_id": message.msg_id,
                    "status": "over_limit",
                    "error": refused.reason,
                    "limit": refused.limit,
                    "value": refused.value,
                }
            status = "stale" if isinstance(refused, StaleMessage) else "invalid"
            return {"msg_id": message.msg_id, "status": status, "error": refused.reason}

        def internal_error(message: Message | None, node: str) -> dict[str, Any]:
            nonlocal logged
            if not logged:  # once a batch: the same bug would log for every entry
                logged = True
                log.failure(
                    "unexpected error judging a batch entry ({msg_id}) for node {node}",
                    msg_id=message.msg_id if message is not None else "-",
                    node=node or "-",
                )
            result = {
                "status": "error",
                "error": "internal error judging this entry (logged by the hub); "
                "treat it as not accepted and send it again",
            }
            if message is not None:
                result["msg_id"] = message.msg_id
            return result

        async def run() -> _Reply:
            # Once begun, a batch is judged to its end (a few reactor turns) even if the hub
            # starts stopping meanwhile: a 503 after part of it was accepted would leave the
            # client without the results of what was accepted.
            nonlocal accepted
            for start in range(0, count, BATCH_SLICE):
                if start:
                    await deferLater(self.reactor, 0, lambda: None)
                take(start)
            failed: Failure | None = None
            for indices, flushed in flushes:
                try:
                    await flushed
                except Exception:
                    failed = Failure()
                    error = (
                        "not accepted: the sync store could not store it "
                        f"({failed.getErrorMessage()}); send it again"
                    )
                    for index in indices:
                        entry = results[index]
                        assert entry is not None
                        results[index] = {
                            "msg_id": entry["msg_id"],
                            "status": "error",
                            "error": error,
                        }
                    accepted -= len(indices)
            if failed is not None and not accepted:
                return self._flush_failed(failed)  # 503: no entry was accepted
            if failed is not None:
                self._store_failures.emit(
                    "sync store flush failed: entries of a batch not accepted: {why}",
                    why=failed.getErrorMessage(),
                )
            answer = {"accepted": accepted, "refused": count - accepted, "results": results}
            return _Reply(http.OK, answer)

        return Deferred.fromCoroutine(run())

    def _accepted(self, node: str, message: Message, reply: _Reply) -> _Reply:
        log.debug(
            "API: message {msg_id} ({operation} {resource}) accepted for node {node}",
            msg_id=message.msg_id,
            operation=message.operation,
            resource=message.resource,
            node=node,
        )
        return reply

    def _flush_failed(self, failure: Failure) -> _Reply:
        """503: what the request carried was not accepted (the store rolled it back)."""
        self._store_failures.emit("sync store flush failed: {why}", why=failure.getErrorMessage())
        raise ApiError(
            http.SERVICE_UNAVAILABLE,
            f"the sync store could not store the message: {failure.getErrorMessage()}",
        )

    def _await_delivery(
        self,
        request: Request,
        delivery: _Delivery,
        flushed: Deferred[None],
        timeout: float,
        ack_mode: bool,
    ) -> Deferred[_Reply]:
        """Race: durable, then acknowledged (or written, for no-ACK) vs. the timer vs. the
        client going away vs. shutdown. Whatever loses only stops waiting; the message stays
        queued."""
        result: Deferred[_Reply] = Deferred()
        waiter: Deferred[Message] | None = None
        msg_id = delivery.msg_id

        def settle(outcome: _Reply | Exception | Failure) -> None:
            if result.called:
                return
            if isinstance(outcome, _Reply):
                result.callback(outcome)
            else:
                result.errback(outcome if isinstance(outcome, Failure) else Failure(outcome))
            # Only the waiting stops: the send Deferred is never cancelled.
            if timer.active():
                timer.cancel()
            self._waiting.discard(settle)
            if waiter is not None and not waiter.called:
                waiter.cancel()

        def durable(_: object) -> None:
            nonlocal waiter
            if result.called:
                return
            waiter = delivery.wait()
            waiter.addCallbacks(delivered, undelivered)

        def delivered(_: Message) -> None:
            body = {"msg_id": msg_id, "acked": ack_mode}
            if not ack_mode:
                body["written"] = True
            settle(_Reply(http.OK, body))

        def undelivered(failure: Failure) -> None:
            if not result.called:  # else: our own cancel
                settle(_late_failure(failure, msg_id))

        def not_durable(failure: Failure) -> None:
            try:
                self._flush_failed(failure)
            except ApiError as e:
                settle(e)

        def timed_out() -> None:
            settle(
                ApiError(
                    http.GATEWAY_TIMEOUT,
                    f"no acknowledgement within {timeout:g} s; the message stays queued",
                    msg_id=msg_id,
                )
            )

        timer = self.reactor.callLater(timeout, timed_out)  # type: ignore[attr-defined]
        self._waiting.add(settle)
        flushed.addCallbacks(durable, not_durable)
        request.notifyFinish().addErrback(lambda _: settle(_ClientGone()))
        return result

    # -- GET --

    def _get_nodes(self, request: Request) -> _Reply:
        nodes = sorted(self.upstream.nodes(), key=lambda info: info.node_id)
        return _Reply(
            http.OK,
            {
                "nodes": [
                    {
                        "node_id": info.node_id,
                        "project_id": info.project_id,
                        "transport": info.transport,
                        "peer": info.peer,
                        "connected_at": _seconds(info.connected_at),
                        "last_keepalive": _seconds(info.last_keepalive),
                        "pending": info.pending,
                    }
                    for info in nodes
                ]
            },
        )

    def _get_objects(self, request: Request, node: str) -> Deferred[_Reply]:
        def listed(records: list[SyncRecord]) -> _Reply:
            return _Reply(http.OK, {"objects": [_record_json(r) for r in records]})

        def failed(failure: Failure) -> _Reply:
            failure.trap(StoreError)
            raise ApiError(
                http.SERVICE_UNAVAILABLE, f"sync store unavailable: {failure.getErrorMessage()}"
            )

        return self.store.records(node).addCallbacks(listed, failed)

    def _get_events(self, request: Request) -> int:
        stream = _EventStream(
            request,
            self.reactor,
            self.stream_buffer,
            self.heartbeat_interval,
            frozenset(_query(request, "node")),
            frozenset(_query(request, "group")),
            self.streams.discard,
        )
        request.setResponseCode(http.OK)
        request.setHeader(b"Content-Type", EVENT_STREAM_TYPE)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")  # nginx: do not buffer the stream
        self.streams.add(stream)
        stream.start(self.upstream)
        return NOT_DONE_YET

    def _get_readyz(self, request: Request) -> _Reply:
        if not self.ready():
            return _Reply(http.SERVICE_UNAVAILABLE, {"status": "not ready"})
        failing = self._store_failing()
        if failing is not None:
            # Every write would be refused (503): send no traffic here until a commit succeeds.
            return _Reply(
                http.SERVICE_UNAVAILABLE,
                {"status": "not ready", "reason": f"sync store failing ({failing})"},
            )
        return _Reply(http.OK, {"status": "ok"})

    def _get_healthz(self, request: Request) -> _Reply:
        # Liveness stays ok while the store fails: a restart frees no disk space, and the hub
        # still serves what it holds (deliveries, ACKs, reads); it says it is degraded.
        failing = self._store_failing()
        if failing is not None:
            return _Reply(http.OK, {"status": "ok", "degraded": f"sync store failing ({failing})"})
        return _Reply(http.OK, {"status": "ok"})

    def _store_failing(self) -> str | None:
        failing = getattr(self.store, "failing", None)
        return failing if isinstance(failing, str) else None

    def _get_openapi(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", JSON_TYPE)
        return self._openapi

    def _get_metrics(self, request: Request) -> bytes | int:
        assert self.metrics_resource is not None
        return self.metrics_resource.render(request)  # type: ignore[no-any-return]


def _internal_error() -> _Reply:
    return _Reply(http.INTERNAL_SERVER_ERROR, {"error": "internal server error"})


def _late_failure(failure: Failure, msg_id: str) -> Exception | Failure:
    """The answer when the message was accepted but will not be acknowledged."""
    if failure.check(Superseded):
        error: Superseded = failure.value  # type: ignore[assignment]
        return ApiError(
            http.CONFLICT,
            str(error),
            reason="superseded",
            msg_id=msg_id,
            superseded_by=error.by_msg_id,
        )
    if failure.check(DeliveryStopped):
        return ApiError(http.SERVICE_UNAVAILABLE, "hub shutting down", msg_id=msg_id)
    if failure.check(InvalidMessage):
        # Accepted, then given up: a no-ACK message dropped from a full offline backlog.
        return ApiError(http.GONE, str(failure.value), reason="dropped", msg_id=msg_id)
    return failure  # unexpected: logged, 500


# --- the site and the listener ---------------------------------------------------------------


class ApiRequest(BoundedRequest):
    """The certificate server's bounded request, limited to the API site's ``max_body``."""

    def _body_limit(self) -> int:
        site = getattr(self.channel, "site", None)
        path = getattr(self.channel, "_path", b"") or b""
        if path.split(b"?", 1)[0] == b"/v1/messages":
            return int(getattr(site, "max_batch", 0)) or int(getattr(site, "max_body", 0))
        return int(getattr(site, "max_body", 0)) or super()._body_limit()

    def _too_large_answer(self) -> tuple[bytes, bytes]:
        # The hook BoundedRequest._reject takes its 413 answer from (content type, body).
        message = f"request body too large (limit {self._limit} bytes)"
        return JSON_TYPE, _json_bytes({"error": message})

    def processingFailed(self, reason: Failure) -> Failure:
        """A failure that escaped the resource: logged, a bare JSON 500."""
        log.failure("unexpected error serving {uri}", reason, uri=self.uri)
        body = _json_bytes({"error": "internal server error"})
        self.setResponseCode(http.INTERNAL_SERVER_ERROR)
        self.setHeader(b"Content-Type", JSON_TYPE)
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        self.write(body)
        self.finish()
        return reason


class ApiSite(AccessLog, Site):
    """The API's ``Site``; :attr:`resource` is the :class:`ApiResource`."""

    resource: ApiResource
    max_body: int
    max_batch: int

    def close_all(self) -> None:
        self.resource.close_all()


def api_site(
    upstream: Upstream,
    store: ISyncStore,
    reactor: IReactorTime,
    *,
    max_body: int,
    max_batch: int = 0,
    token: str = "",
    metrics_resource: IResource | None = None,
    accepting: Callable[[], bool] = lambda: True,
    ready: Callable[[], bool] = lambda: True,
    heartbeat_interval: float = HEARTBEAT_INTERVAL,
    stream_buffer: int = STREAM_BUFFER,
    max_batches: int = MAX_CONCURRENT_BATCHES,
) -> ApiSite:
    """The HTTP API as a ``Site`` to listen with (plain TCP; keep it on loopback or set a token).

    ``max_body`` bounds request bodies (``hub.maxMessageSize``), ``max_batch`` those of
    ``POST /v1/messages`` (``hub.api.maxBatchSize``); ``token`` (``hub.api.token``)
    when non-empty is required as a bearer token on every path, ``/metrics`` included;
    ``metrics_resource`` is served at ``/metrics``; ``accepting()`` False makes writes answer
    503 (shutdown); ``ready()`` answers ``/readyz`` (``/healthz``: the process serves; both
    without the token, for probes); ``reactor`` runs the ACK timeouts and stream heartbeats;
    ``max_batches`` (``hub.limits.api.batches``) batches are judged at once, others wait.
    """
    resource = ApiResource(
        upstream,
        store,
        reactor,
        token=token,
        metrics_resource=metrics_resource,
        accepting=accepting,
        ready=ready,
        heartbeat_interval=heartbeat_interval,
        stream_buffer=stream_buffer,
        max_batches=max_batches,
    )
    site = ApiSite(resource, requestFactory=ApiRequest, reactor=reactor)
    site.displayTracebacks = False
    site.max_body = max_body
    site.max_batch = max_batch or 64 * max_body
    return site


class _Connections(WrappingFactory):
    """The site, plus a record of its open connections so shutdown can close them."""

    def __init__(self, site: ApiSite, reactor: IReactorTime) -> None:
        super().__init__(site)
        self.reactor = reactor
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def close(self, timeout: float) -> Deferred[None]:
        """Close every connection; those still open after ``timeout`` seconds are aborted."""
        if not self.protocols:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._idle.append(closed)
        for protocol in list(self.protocols):
            protocol.transport.loseConnection()

        def abort() -> None:
            for protocol in list(self.protocols):
                protocol.transport.abortConnection()

        call = self.reactor.callLater(timeout, abort)  # type: ignore[attr-defined]

        def done(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        return closed.addBoth(done)


class ApiService(ListeningService):
    """The API listener. On stop: stop listening, end event streams, answer ACK waits 503,
    close the open connections (aborting after a few seconds)."""

    def __init__(
        self,
        endpoint: Any,
        site: ApiSite,
        reactor: IReactorTime,
        limiter: Callable[[IProtocolFactory], ConnectionLimiter] | None = None,
    ) -> None:
        self.site = site
        self.connections = _Connections(site, reactor)
        # The connection caps wrap the connection record from outside: shutdown still sees
        # every connection the API admitted.
        self.limiter = limiter(self.connections) if limiter is not None else None
        super().__init__("api", endpoint, self.limiter or self.connections)

    def stopService(self) -> Deferred[None] | None:
        stopping = super().stopService()
        self.site.close_all()
        # What was begun is answered (a batch judged to its end, a durable 202) before the
        # connections close, for CLOSE_TIMEOUT at most.
        answered = self.site.resource.answered()
        answered.addTimeout(CLOSE_TIMEOUT, self.connections.reactor)  # type: ignore[arg-type]
        answered.addErrback(
            lambda f: log.warn(
                "API stopping: answers not written within {timeout} s", timeout=CLOSE_TIMEOUT
            )
        )
        closing = answered.addCallback(lambda _: self.connections.close(CLOSE_TIMEOUT))
        waits: list[Deferred[Any]] = [closing] if stopping is None else [stopping, closing]
        return gatherResults(waits).addCallback(lambda _: None)


def api_listener(
    config: HubConfig, site: ApiSite, reactor: IReactorTime, budget: DescriptorBudget | None = None
) -> ApiService:
    """The API (``hub.api.endpoint``, or ``address``/``port``) serving ``site``, as a service,
    within ``hub.limits``: request heads bounded (408/414/431), connections capped."""
    settings, limits = config.hub.api, config.hub.limits
    endpoint = server_endpoint(reactor, settings.endpoint, settings.address, settings.port)
    bound_http(
        site,
        HttpLimits(
            head_timeout=limits.header_timeout,
            request_timeout=None,  # a batch body may take long to send; its size is bounded
            request_line=limits.max_request_line,
            header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
        ),
        json_errors=True,
    )

    def limiter(factory: IProtocolFactory) -> ConnectionLimiter:
        return ConnectionLimiter(
            factory,
            reactor,
            max_connections=limits.api.max_connections,
            per_address=limits.api.max_per_address,
            reserve=limits.api.descriptor_reserve,
            budget=budget,
            name="api",
        )

    return ApiService(endpoint, site, reactor, limiter)


# --- OpenAPI ---------------------------------------------------------------------------------


def _error_response(description: str, schema: str = "Error") -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NODE_PARAMETER = {
    "name": "node",
    "in": "path",
    "required": True,
    "description": "The node id (edgecore's node name, the node_id header of its connection).",
    "schema": {"type": "string", "minLength": 1},
}
_NULLABLE_STRING = {"type": "string", "nullable": True}


def openapi_document(*, token_required: bool = False, metrics: bool = True) -> dict[str, Any]:
    """This API as an OpenAPI 3.0 document (served at ``/openapi.json``)."""
    common_errors = {
        "404": _error_response("No such path."),
        "405": _error_response("Method not allowed (the Allow header lists the allowed ones)."),
        "500": _error_response("Unexpected error (logged by the hub)."),
    }
    if token_required:
        common_errors["401"] = _error_response(
            "No or wrong bearer token (WWW-Authenticate: Bearer)."
        )
    paths: dict[str, Any] = {
        "/v1/messages": {
            "post": {
                "operationId": "sendMessages",
                "summary": "Queue many messages for many nodes in one request",
                "description": (
                    "A JSON array (Content-Type application/json) or NDJSON (Content-Type "
                    "application/x-ndjson, one entry per line) of entries "
                    '`{"node": <node id>, "message": <message as for sendMessage>}`. '
                    "Each entry is judged on its own, in order: accepted, stale (version not "
                    "newer than what the node acknowledged or is owed), invalid (malformed "
                    "entry or message, including a number outside float64, NaN, Infinity, a "
                    "lone surrogate escape or an over-long msg_id), over_limit (the node, or "
                    "the hub over all nodes, is owed as much as it may be: `limit` names the "
                    "config key, `value` its value; send it again later, as a single message "
                    "would get 429 or 507) or error (not accepted: the "
                    "sync store failed or the hub stopped after earlier entries were accepted, "
                    "or an internal error; send it again). 200 once every accepted message is "
                    "durably stored; their delivery shows in /v1/nodes/{node}/objects. A 503 "
                    "means that no entry was accepted. At most hub.limits.api.batches batches "
                    "are judged at once; others wait their turn."
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/BatchEntry"},
                            }
                        },
                        "application/x-ndjson": {"schema": {"type": "string"}},
                    },
                },
                "responses": {
                    "200": _json_response(
                        "One result per entry, in order.",
                        {"$ref": "#/components/schemas/BatchResult"},
                    ),
                    "400": _error_response("The body is not a JSON array or NDJSON."),
                    "413": {"description": "The body is larger than hub.api.maxBatchSize."},
                    "503": _error_response(
                        "The sync store failed to store the messages, or the hub is shutting down."
                    ),
                    **common_errors,
                },
            }
        },
        "/v1/nodes/{node}/messages": {
            "post": {
                "operationId": "sendMessage",
                "summary": "Queue a message for a node, connected now or not",
                "description": (
                    "The body is a message in the WebSocket wire JSON of the KubeEdge "
                    "protocol (§1.1). `header` is optional; `msg_id` and `timestamp` are "
                    "filled in when missing. `route.resource` is the wire form "
                    "`<namespace>/<type>/<name>` (or `node/<node>/...`). Messages carrying a "
                    "Kubernetes object (`content.metadata.uid` and `header.resourceversion`) "
                    "are delivered with acknowledgement, newest version per object; the others "
                    "are sent once (protocol §6.3). edgecore acknowledges an `update` only "
                    "from `route.source` edgecontroller, dynamiccontroller, devicecontroller "
                    "or policycontroller.\n\n"
                    "Without `wait`: 202 once the message is durably stored (it survives a "
                    "hub crash). With `wait=ack`: 200 when the edge acknowledges it (or, for a "
                    "message without acknowledgement, when it is written to the node), 504 "
                    "after `timeout` seconds, the message staying queued."
                ),
                "parameters": [
                    _NODE_PARAMETER,
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "description": "`ack`: answer once the edge has the message.",
                        "schema": {"type": "string", "enum": ["ack"]},
                    },
                    {
                        "name": "timeout",
                        "in": "query",
                        "required": False,
                        "description": (
                            f"Seconds to wait with `wait=ack` (default {DEFAULT_ACK_TIMEOUT:g})."
                        ),
                        "schema": {
                            "type": "number",
                            "exclusiveMinimum": True,
                            "minimum": 0,
                            "maximum": MAX_ACK_TIMEOUT,
                        },
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Message"}}
                    },
                },
                "responses": {
                    "202": _json_response(
                        "Accepted and durably stored.",
                        {"$ref": "#/components/schemas/Accepted"},
                    ),
                    "200": _json_response(
                        "With wait=ack: acknowledged by the edge (acked true) or, for a message "
                        "delivered without acknowledgement, written to it (acked false, "
                        "written true).",
                        {"$ref": "#/components/schemas/Delivered"},
                    ),
                    "400": _error_response(
                        "Malformed JSON, a missing or mistyped field, a bad parameter, a value "
                        "the hub does not carry (a number outside float64, NaN, Infinity, a "
                        "lone surrogate escape, a msg_id or parent_msg_id over "
                        f"{model.MAX_MSG_ID_LENGTH} characters), or a message the hub cannot "
                        "deliver (no metadata.uid or resourceversion where needed; reason "
                        "invalid)."
                    ),
                    "409": _error_response(
                        "reason stale: the resourceVersion is not newer than what the node "
                        "acknowledged or is owed (acked, pending). reason superseded (with "
                        "wait=ack): a newer version or a delete replaced it before the ACK.",
                        "Conflict",
                    ),
                    "410": _error_response(
                        "With wait=ack: a message without acknowledgement was dropped from a "
                        "full offline backlog (reason dropped)."
                    ),
                    "413": {"description": "The body is larger than hub.maxMessageSize."},
                    "429": _error_response(
                        "reason over_limit: the node is owed as many messages or bytes as one "
                        "node may be (limit hub.limits.nodeMessages or hub.limits.nodeBytes, "
                        "value): nothing was accepted; send it again once the node has caught "
                        "up. A newer version of an object already owed is still accepted.",
                        "OverLimit",
                    ),
                    "507": _error_response(
                        "reason over_limit: the hub's budget over all nodes is spent (limit "
                        "hub.limits.totalMessages or hub.limits.totalBytes), or too many node "
                        "ids that have not connected are owed messages "
                        "(hub.limits.unknownNodes): nothing was accepted.",
                        "OverLimit",
                    ),
                    "503": _error_response(
                        "The sync store failed to store the message, or the hub is shutting down."
                    ),
                    "504": _error_response(
                        "With wait=ack: no acknowledgement within timeout; the message stays "
                        "queued."
                    ),
                    **common_errors,
                },
            }
        },
        "/v1/nodes": {
            "get": {
                "operationId": "listNodes",
                "summary": "The nodes connected now",
                "responses": {
                    "200": _json_response(
                        "Connected nodes.",
                        {
                            "type": "object",
                            "required": ["nodes"],
                            "properties": {
                                "nodes": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Node"},
                                }
                            },
                        },
                    ),
                    **common_errors,
                },
            }
        },
        "/v1/nodes/{node}/objects": {
            "get": {
                "operationId": "listObjects",
                "summary": "What the hub keeps for a node, per object (its sync records)",
                "parameters": [_NODE_PARAMETER],
                "responses": {
                    "200": _json_response(
                        "Sync records in delivery order (empty for an unknown node).",
                        {
                            "type": "object",
                            "required": ["objects"],
                            "properties": {
                                "objects": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Object"},
                                }
                            },
                        },
                    ),
                    "503": _error_response("The sync store cannot be read."),
                    **common_errors,
                },
            }
        },
        "/v1/events": {
            "get": {
                "operationId": "events",
                "summary": "Server-Sent Events: messages from edges, nodes connecting",
                "description": (
                    '`event: message` with data `{"node_id", "message"}` (the message in '
                    "wire JSON) for everything edges send except keepalives, ACKs and control "
                    'messages; `event: node` with data `{"node_id", "event", "transport", '
                    '"timestamp", "reason"}` (event `connected` or `disconnected`). A '
                    f"comment line every {HEARTBEAT_INTERVAL:g} s keeps proxies from closing "
                    "an idle stream. A client that reads too slowly is disconnected."
                ),
                "parameters": [
                    {
                        "name": "node",
                        "in": "query",
                        "required": False,
                        "description": "Only these nodes (repeatable).",
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "style": "form",
                        "explode": True,
                    },
                    {
                        "name": "group",
                        "in": "query",
                        "required": False,
                        "description": (
                            "Only messages of these route groups (repeatable: meta, resource, "
                            "twin, user ...); node events are not filtered by group."
                        ),
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "style": "form",
                        "explode": True,
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The event stream (until the client disconnects).",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **common_errors,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": _json_response("The OpenAPI document.", {"type": "object"}),
                    **common_errors,
                },
            }
        },
    }
    for path, summary, unready in (
        (
            "/readyz",
            "Readiness: every listener up, the store open and its commits succeeding",
            True,
        ),
        (
            "/healthz",
            "Liveness: the hub process answers (200 also while the store fails: `degraded`)",
            False,
        ),
    ):
        responses: dict[str, Any] = {
            "200": _json_response("ok", {"$ref": "#/components/schemas/Probe"}),
        }
        if unready:
            responses["503"] = _json_response(
                "Starting or stopping, or the sync store's commits fail (`reason`).",
                {"$ref": "#/components/schemas/Probe"},
            )
        paths[path] = {
            "get": {
                "operationId": path.strip("/"),
                "summary": summary + " (no token needed)",
                "security": [],
                "responses": responses,
            }
        }
    if metrics:
        paths["/metrics"] = {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of the hub",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format (or OpenMetrics).",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **common_errors,
                },
            }
        }
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "cloudhub API",
            "version": "1",
            "description": (
                "Send messages to KubeEdge edge nodes and hear from them. Errors are "
                '`{"error": "..."}` with the status named in each operation.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    if token_required:
        document["security"] = [{"bearer": []}]
    return document


_SCHEMAS: dict[str, Any] = {
    "Probe": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ok", "not ready"]},
            "reason": {
                "type": "string",
                "description": "Why not ready: sync store failing (the error).",
            },
            "degraded": {
                "type": "string",
                "description": "/healthz: alive, but the sync store's commits fail (the error).",
            },
        },
        "required": ["status"],
    },
    "Message": {
        "type": "object",
        "description": "A beehive message in the WebSocket wire JSON (protocol §1.1).",
        "required": ["route", "content"],
        "properties": {
            "header": {
                "type": "object",
                "properties": {
                    "msg_id": {
                        "type": "string",
                        "maxLength": model.MAX_MSG_ID_LENGTH,
                        "description": "Filled in (UUID) if missing.",
                    },
                    "parent_msg_id": {
                        "type": "string",
                        "maxLength": model.MAX_MSG_ID_LENGTH,
                        "description": "The msg_id of the edge request this one answers.",
                    },
                    "timestamp": {
                        "type": "integer",
                        "format": "int64",
                        "description": "Milliseconds since the epoch; filled in if missing.",
                    },
                    "resourceversion": {
                        "type": "string",
                        "description": "The object's resourceVersion (decimal integer).",
                    },
                    "sync": {"type": "boolean", "description": "Ignored (cleared on the wire)."},
                    "type": {"type": "string"},
                },
            },
            "route": {
                "type": "object",
                "required": ["group", "operation", "resource"],
                "properties": {
                    "source": {"type": "string", "example": "edgecontroller"},
                    "destination": {"type": "string"},
                    "group": {"type": "string", "minLength": 1, "example": "resource"},
                    "operation": {"type": "string", "minLength": 1, "example": "insert"},
                    "resource": {
                        "type": "string",
                        "minLength": 1,
                        "example": "default/configmap/app",
                    },
                },
            },
            "content": {
                "nullable": True,
                "description": "Any JSON value; objects for k8s. Numbers must be finite and "
                "fit in a float64 (what a Go edge reads); strings must be Unicode text (no "
                "lone surrogate escape).",
            },
        },
    },
    "BatchEntry": {
        "type": "object",
        "required": ["node", "message"],
        "properties": {
            "node": {"type": "string", "minLength": 1},
            "message": {"$ref": "#/components/schemas/Message"},
        },
    },
    "BatchResult": {
        "type": "object",
        "required": ["accepted", "refused", "results"],
        "properties": {
            "accepted": {"type": "integer"},
            "refused": {"type": "integer"},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "msg_id": {"type": "string"},
                        "status": {
                            "type": "string",
                            "enum": ["accepted", "stale", "invalid", "over_limit", "error"],
                        },
                        "error": {"type": "string"},
                        "limit": {
                            "type": "string",
                            "description": "over_limit: the config key of the limit reached.",
                        },
                        "value": {
                            "type": "integer",
                            "description": "over_limit: the value of that limit.",
                        },
                    },
                },
            },
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["msg_id", "ack_mode"],
        "properties": {
            "msg_id": {"type": "string"},
            "ack_mode": {
                "type": "boolean",
                "description": "Delivered with acknowledgement (protocol §6.3).",
            },
        },
    },
    "Delivered": {
        "type": "object",
        "required": ["msg_id", "acked"],
        "properties": {
            "msg_id": {"type": "string"},
            "acked": {"type": "boolean"},
            "written": {"type": "boolean"},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "reason": {"type": "string", "enum": ["invalid", "dropped"]},
            "msg_id": {"type": "string"},
        },
    },
    "OverLimit": {
        "type": "object",
        "required": ["error", "reason", "limit", "value"],
        "properties": {
            "error": {"type": "string"},
            "reason": {"type": "string", "enum": ["over_limit"]},
            "limit": {
                "type": "string",
                "description": "The config key of the limit reached.",
                "enum": [
                    "hub.limits.nodeMessages",
                    "hub.limits.nodeBytes",
                    "hub.limits.totalMessages",
                    "hub.limits.totalBytes",
                    "hub.limits.unknownNodes",
                ],
            },
            "value": {"type": "integer", "description": "Its value (messages, bytes, nodes)."},
        },
    },
    "Conflict": {
        "type": "object",
        "required": ["error", "reason"],
        "properties": {
            "error": {"type": "string"},
            "reason": {"type": "string", "enum": ["stale", "superseded"]},
            "uid": {"type": "string"},
            "resource_version": {"type": "string"},
            "acked": {
                **_NULLABLE_STRING,
                "description": "The version the node acknowledged last.",
            },
            "pending": {
                **_NULLABLE_STRING,
                "description": "The version owed to the node, or delete.",
            },
            "msg_id": {"type": "string"},
            "superseded_by": {"type": "string"},
        },
    },
    "Node": {
        "type": "object",
        "required": [
            "node_id",
            "project_id",
            "transport",
            "connected_at",
            "last_keepalive",
            "pending",
        ],
        "properties": {
            "node_id": {"type": "string"},
            "project_id": {"type": "string"},
            "transport": {"type": "string", "enum": ["websocket", "quic"]},
            "peer": {"type": "string"},
            "connected_at": {"type": "number", "description": "Unix time, seconds."},
            "last_keepalive": {
                "type": "number",
                "nullable": True,
                "description": "Unix time, seconds; null before the first keepalive.",
            },
            "pending": {"type": "integer", "description": "Messages owed to the node."},
        },
    },
    "Object": {
        "type": "object",
        "required": [
            "resource",
            "uid",
            "kind",
            "namespace",
            "name",
            "acked_version",
            "pending_version",
            "pending_msg_id",
            "attempts",
            "last_error",
        ],
        "properties": {
            "resource": {"type": "string"},
            "uid": {"type": "string"},
            "kind": {"type": "string"},
            "namespace": {**_NULLABLE_STRING, "description": "null when cluster-scoped."},
            "name": {"type": "string"},
            "acked_version": {
                **_NULLABLE_STRING,
                "description": "The resourceVersion the node acknowledged last.",
            },
            "pending_version": {
                **_NULLABLE_STRING,
                "description": "The resourceVersion owed to the node (null: none owed).",
            },
            "pending_operation": _NULLABLE_STRING,
            "pending_msg_id": _NULLABLE_STRING,
            "attempts": {"type": "integer"},
            "last_error": _NULLABLE_STRING,
            "deleted_at": {
                "type": "number",
                "nullable": True,
                "description": "Unix time the node acknowledged the object's delete: a "
                "tombstone, kept hub.store.tombstoneRetention seconds, during which versions "
                "not newer than acked_version are refused as stale. null: not deleted.",
            },
        },
    },
}
