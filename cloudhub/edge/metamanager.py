"""What edgecore's metamanager does with a cloud message, in memory (protocol §7.5).

:class:`MetaStore` is the ``meta`` table: the wire resource as key, its type token, the content
and the resourceVersion it came with. :meth:`MetaStore.apply` applies one cloud message of
group ``resource`` without a ``parent_msg_id`` and says what to answer the cloud:

========== ==================================================================== ==============
operation  store                                                                reply
========== ==================================================================== ==============
insert     upsert                                                               ACK
update     upsert                                                               ACK, but only
                                                                                from the four
                                                                                controllers
delete     pod: delete the row if it holds the same pod UID, and                ACK
           ``<ns>/podpatch/<name>``; a pod delete without ``metadata.uid`` is
           a store failure; other types: delete the row
response   upsert (edgecore forwards it to edged or echoes it; neither here)    none
patch      upsert (edgecore echoes it to the cloud; not here)                   none
other      nothing                                                              none
========== ==================================================================== ==============

A store failure is answered with an ``error`` message (source ``metamanager``, no ACK), so the
cloud sends again. The ACK is :func:`cloudhub.model.new_ack`.

For tests the store also keeps what it received: every message applied (:attr:`history`,
optional) and every one that was older than a version of the same resource already
acknowledged (:attr:`stale`), the thing reliable delivery must never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudhub.errors import ResourceVersionError
from cloudhub.model import (
    OP_DELETE,
    OP_INSERT,
    OP_PATCH,
    OP_RESPONSE,
    OP_UPDATE,
    Message,
    new_ack,
    new_error_response,
    object_name,
    object_uid,
    parse_resource_version,
    resource_type,
)

__all__ = ["ACKED_UPDATE_SOURCES", "MetaRecord", "MetaStore", "Received"]

# §7.5: an update from any other source is stored but not acknowledged.
ACKED_UPDATE_SOURCES = frozenset(
    {"edgecontroller", "dynamiccontroller", "devicecontroller", "policycontroller"}
)
METAMANAGER = "metamanager"


@dataclass(frozen=True, slots=True)
class MetaRecord:
    """One row of the ``meta`` table (plus the resourceVersion it was stored with)."""

    type: str
    value: Any
    resource_version: str


@dataclass(frozen=True, slots=True)
class Received:
    """One cloud message as the store saw it."""

    msg_id: str
    resource: str
    operation: str
    resource_version: str
    acked: bool
    # Older than a version of the same resource acknowledged before it arrived.
    stale: bool


def _version(value: str) -> int | None:
    try:
        return parse_resource_version(value)
    except ResourceVersionError:
        return None


class MetaStore:
    """An edge node's ``meta`` table in a dict, with a record of what arrived.

    ``keep_history=False`` keeps only counters and stale messages (for simulators of many
    nodes); tests keep the whole :attr:`history`.
    """

    __slots__ = ("_rows", "_acked", "keep_history", "history", "stale", "received_count")

    def __init__(self, keep_history: bool = True) -> None:
        self._rows: dict[str, MetaRecord] = {}
        # Highest resourceVersion acknowledged per resource.
        self._acked: dict[str, int] = {}
        self.keep_history = keep_history
        self.history: list[Received] = []
        self.stale: list[Received] = []
        self.received_count = 0

    # -- the table --

    def get(self, resource: str) -> MetaRecord | None:
        return self._rows.get(resource)

    def items(self) -> list[tuple[str, MetaRecord]]:
        return list(self._rows.items())

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, resource: object) -> bool:
        return resource in self._rows

    def upsert(self, resource: str, content: Any, resource_version: str = "") -> None:
        """``INSERT OR REPLACE INTO meta``: the key is the whole wire resource."""
        self._rows[resource] = MetaRecord(resource_type(resource), content, resource_version)

    def delete(self, resource: str) -> bool:
        return self._rows.pop(resource, None) is not None

    # -- what arrived --

    def versions(self, resource: str) -> list[str]:
        """The resourceVersions received for ``resource``, in order (needs the history)."""
        return [r.resource_version for r in self.history if r.resource == resource]

    def acked_version(self, resource: str) -> int | None:
        """The highest resourceVersion acknowledged for ``resource``."""
        return self._acked.get(resource)

    def acked_ids(self) -> list[str]:
        return [r.msg_id for r in self.history if r.acked]

    # -- §7.5 --

    def apply(self, message: Message) -> Message | None:
        """Store a cloud message (group ``resource``, no parent id) as metamanager does and
        return the reply for the cloud: an ACK, an error, or None (table in the module doc)."""
        reply = self._store(message)
        acked = reply is not None and reply.operation == OP_RESPONSE
        self._record(message, acked)
        return reply

    def _store(self, message: Message) -> Message | None:
        operation = message.operation
        resource = message.resource
        if operation == OP_INSERT:
            self.upsert(resource, message.content, message.resource_version)
            return new_ack(message)
        if operation == OP_UPDATE:
            self.upsert(resource, message.content, message.resource_version)
            return new_ack(message) if message.source in ACKED_UPDATE_SOURCES else None
        if operation == OP_DELETE:
            problem = self._delete(message)
            if problem:
                return new_error_response(message, problem, METAMANAGER)
            return new_ack(message)
        if operation in (OP_RESPONSE, OP_PATCH):
            self.upsert(resource, message.content, message.resource_version)
        return None

    def _delete(self, message: Message) -> str | None:
        resource = message.resource
        if resource_type(resource) != "pod":
            self.delete(resource)
            return None
        uid = object_uid(message.content)
        if not uid:
            return f"delete of {resource}: content is not a pod with metadata.uid"
        row = self._rows.get(resource)
        if row is not None and object_uid(row.value) == uid:
            del self._rows[resource]
        tokens = resource.split("/")
        name = tokens[2] if len(tokens) > 2 else object_name(message.content)
        self.delete(f"{tokens[0]}/podpatch/{name}")
        return None

    def _record(self, message: Message, acked: bool) -> None:
        self.received_count += 1
        resource = message.resource
        version = _version(message.resource_version)
        acked_before = self._acked.get(resource)
        stale = version is not None and acked_before is not None and version < acked_before
        if acked and version is not None and (acked_before is None or version > acked_before):
            self._acked[resource] = version
        if stale or self.keep_history:
            entry = Received(
                message.msg_id, resource, message.operation, message.resource_version, acked, stale
            )
            if self.keep_history:
                self.history.append(entry)
            if stale:
                self.stale.append(entry)
