"""The beehive message that travels between cloud and edge (protocol §1).

A :class:`Message` is flat (header and route fields side by side) because every part of the
hub reads a few fields of many messages; the nesting of the wire format is the codecs' business
(:mod:`cloudhub.wire`).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, replace
from typing import Any

from cloudhub.errors import ResourceVersionError

# Operations (§1.4).
OP_INSERT = "insert"
OP_UPDATE = "update"
OP_DELETE = "delete"
OP_PATCH = "patch"
OP_QUERY = "query"
OP_RESPONSE = "response"
OP_ERROR = "error"
OP_UPLOAD = "upload"
OP_KEEPALIVE = "keepalive"
OP_CONNECTED = "connected"
OP_DISCONNECTED = "disconnected"
OP_GET = "get"
OP_UPGRADE = "upgrade"
OP_APPLICATION_RESPONSE = "applicationResponse"
OP_HEADER = "header"
CSI_OPERATIONS = frozenset(
    {"createvolume", "deletevolume", "controllerpublishvolume", "controllerunpublishvolume"}
)
# Reserved by viaduct: intercepted by the transport and answered with "ack" (§2.3).
CONTROL_OPERATIONS = frozenset({"ping", "pong", "config"})

GROUP_RESOURCE = "resource"
GROUP_TWIN = "twin"
GROUP_FUNC = "func"
GROUP_USER = "user"

SOURCE_CLOUDHUB = "cloudhub"
SOURCE_EDGECONTROLLER = "edgecontroller"

# Namespace of cluster-scoped objects in resource paths (§1.6, metav2 NullNamespace).
NULL_NAMESPACE = "null"

_UINT64_MAX = 2**64 - 1

# Longest ``msg_id`` / ``parent_msg_id`` accepted from an edge or the API, in characters.
# KubeEdge writes UUIDs (36 characters); the rest of the room is for other clients' schemes.
MAX_MSG_ID_LENGTH = 128


def msg_id_problem(msg_id: str, parent_msg_id: str = "") -> str | None:
    """Why ``msg_id`` / ``parent_msg_id`` cannot be taken (too long), or None.

    The one rule for every way in (WebSocket and QUIC edges, the HTTP API): at most
    :data:`MAX_MSG_ID_LENGTH` characters. The id itself is not repeated in the answer.
    """
    for field, value in (("header.msg_id", msg_id), ("header.parent_msg_id", parent_msg_id)):
        if len(value) > MAX_MSG_ID_LENGTH:
            return (
                f"{field} is {len(value)} characters long; at most {MAX_MSG_ID_LENGTH} are "
                "accepted (KubeEdge writes 36-character UUIDs)"
            )
    return None


def now_ms() -> int:
    """Milliseconds since the Unix epoch, the unit of ``timestamp`` (§1.1)."""
    return time.time_ns() // 1_000_000


def new_msg_id() -> str:
    """A unique id in the text form of a version 4 UUID, as KubeEdge's ``uuid.New().String()``.

    The first 60 bits are random per process (drawn again in a forked child), the last 62
    count up: unique within the process without a question, and across processes and
    restarts as unlikely to collide as random UUIDs of that many bits. One ``os.urandom``
    per message (what ``uuid.uuid4()`` does) is a system call, ~4 µs in a VM, on every
    message a hub sends and every ACK an edge writes.
    """
    value = _msg_id_prefix | (next(_msg_id_counter) & _COUNTER_MASK)
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


# uuid.UUID's layout: version 4 in bits 76-79, the RFC 4122 variant (0b10) in bits 62-63.
_UUID_V4_RFC4122 = (0x4000 << 64) | (0x8000 << 48)
_COUNTER_MASK = (1 << 62) - 1
_RANDOM_MASK = ((1 << 128) - 1) ^ (0xF000 << 64) ^ (0xFFFFFFFFFFFFFFFF)


def _new_msg_id_source() -> None:
    global _msg_id_prefix, _msg_id_counter
    _msg_id_prefix = (int.from_bytes(os.urandom(16), "big") & _RANDOM_MASK) | _UUID_V4_RFC4122
    # itertools.count: next() is atomic under the GIL, so threads never share a value.
    _msg_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


_msg_id_prefix = 0
_msg_id_counter = itertools.count()
_new_msg_id_source()
os.register_at_fork(after_in_child=_new_msg_id_source)


@dataclass(slots=True)
class Message:
    """One beehive ``model.Message``; field names follow the JSON keys of §1.1."""

    msg_id: str = ""
    timestamp: int = 0
    parent_msg_id: str = ""
    resource_version: str = ""
    sync: bool = False
    type: str = ""
    source: str = ""
    destination: str = ""
    group: str = ""
    operation: str = ""
    resource: str = ""
    content: Any = None

    @classmethod
    def new(
        cls,
        source: str,
        group: str,
        operation: str,
        resource: str,
        content: Any = None,
        resource_version: str = "",
        parent_msg_id: str = "",
    ) -> Message:
        """A fresh message: new UUID v4 ``msg_id`` and the current time."""
        return cls(
            msg_id=new_msg_id(),
            timestamp=now_ms(),
            parent_msg_id=parent_msg_id,
            resource_version=resource_version,
            source=source,
            group=group,
            operation=operation,
            resource=resource,
            content=content,
        )

    def copy(self, **changes: Any) -> Message:
        return replace(self, **changes)

    @property
    def is_empty(self) -> bool:
        """True for the blank message edgecore writes as it shuts down (ws-frames.txt #7)."""
        return not (self.msg_id or self.operation or self.resource or self.source or self.group)


def new_response(original: Message, content: Any) -> Message:
    """A reply as beehive's ``NewRespByMessage`` builds it (§1.3).

    Copies source, group, resource and type; ``parent_msg_id`` is the original's id.
    """
    reply = Message.new(
        original.source,
        original.group,
        OP_RESPONSE,
        original.resource,
        content,
        parent_msg_id=original.msg_id,
    )
    reply.type = original.type
    return reply


def new_error_response(original: Message, error_text: str, source: str = "") -> Message:
    """An error reply as beehive's ``NewErrorMessage`` builds it (§1.3): empty group."""
    return Message.new(
        source, "", OP_ERROR, original.resource, error_text, parent_msg_id=original.msg_id
    )


def new_ack(original: Message) -> Message:
    """The ACK edgecore's metamanager sends for a cloud message it stored (§7.5)."""
    ack = Message.new(
        original.source,
        GROUP_RESOURCE,
        OP_RESPONSE,
        original.resource,
        "OK",
        parent_msg_id=original.msg_id,
    )
    ack.type = original.type
    return ack


def new_control_ack(original: Message) -> Message:
    """Viaduct's answer to a ``ping``/``pong``/``config`` control message (§2.3)."""
    return new_response(original, "ack")


def new_keepalive(source: str = "websocket") -> Message:
    """The heartbeat edgecore's edgehub sends every ``heartbeat`` seconds (§2.2)."""
    return Message.new(source, GROUP_RESOURCE, OP_KEEPALIVE, "node", "ping")


# --- resource paths (§1.6) -----------------------------------------------------------------


def target_node(resource: str) -> str | None:
    """The node id of a cloud-internal resource: the token after the first ``node`` token.

    Returns ``None`` when there is no ``node/<id>`` pair, as cloudhub's dispatcher does.
    """
    tokens = resource.split("/")
    for index, token in enumerate(tokens[:-1]):
        if token == "node" and tokens[index + 1]:
            return tokens[index + 1]
    return None


def trim_resource(resource: str) -> str:
    """The wire form of a resource: ``node/<id>/`` is stripped when the path starts with it."""
    if resource.startswith("node/"):
        return "/".join(resource.split("/")[2:])
    return resource


def node_resource(node_id: str, wire_resource: str) -> str:
    """The cloud-internal form of an edge resource: ``node/<id>/`` prefixed (§6.7)."""
    return f"node/{node_id}/{wire_resource}"


def resource_type(wire_resource: str) -> str:
    """The type token of a wire resource ``<ns>/<type>[/<name>]`` ("" when absent)."""
    tokens = wire_resource.split("/")
    return tokens[1] if len(tokens) > 1 else ""


# --- content helpers -------------------------------------------------------------------------


def _metadata(content: Any) -> dict[str, Any]:
    if isinstance(content, dict):
        metadata = content.get("metadata")
        if isinstance(metadata, dict):
            return metadata
    return {}


def object_uid(content: Any) -> str:
    """``metadata.uid`` of a k8s object in content, or ""."""
    uid = _metadata(content).get("uid")
    return uid if isinstance(uid, str) else ""


def object_kind(content: Any) -> str:
    kind = content.get("kind") if isinstance(content, dict) else None
    return kind if isinstance(kind, str) else ""


def object_api_version(content: Any) -> str:
    value = content.get("apiVersion") if isinstance(content, dict) else None
    return value if isinstance(value, str) else ""


def object_name(content: Any) -> str:
    name = _metadata(content).get("name")
    return name if isinstance(name, str) else ""


def object_namespace(content: Any) -> str:
    """``metadata.namespace``, or :data:`NULL_NAMESPACE` for a cluster-scoped object."""
    namespace = _metadata(content).get("namespace")
    return namespace if isinstance(namespace, str) and namespace else NULL_NAMESPACE


def is_delete(message: Message) -> bool:
    """A delete: operation ``delete`` or content with ``metadata.deletionTimestamp`` (§6.3)."""
    if message.operation == OP_DELETE:
        return True
    return bool(_metadata(message.content).get("deletionTimestamp"))


# --- resourceVersion (§6.3) ------------------------------------------------------------------


def parse_resource_version(value: str) -> int:
    """A resourceVersion as an unsigned 64-bit integer.

    Raises :class:`ResourceVersionError` for anything else (KubeEdge panics on it).
    """
    if not isinstance(value, str) or not value.isascii() or not value.isdigit():
        raise ResourceVersionError(f"resourceVersion {value!r} is not an unsigned decimal integer")
    number = int(value)
    if number > _UINT64_MAX:
        raise ResourceVersionError(f"resourceVersion {value!r} does not fit in 64 bits")
    return number


def compare_resource_versions(left: str, right: str) -> int:
    """-1, 0 or 1 as ``left`` is older than, equal to or newer than ``right``."""
    a = parse_resource_version(left)
    b = parse_resource_version(right)
    return (a > b) - (a < b)
