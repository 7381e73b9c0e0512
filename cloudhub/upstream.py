"""The API cloud applications use: send to nodes, hear what nodes send, watch nodes come and go.

``CloudHubService.upstream`` is an :class:`Upstream`. Every method is safe to call from the
reactor thread only, as is all Twisted code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred

from cloudhub import model
from cloudhub.errors import MessageRefused
from cloudhub.handler import EventCallback, MessageCallback, MessageHandle, NodeEvent, NodeInfo
from cloudhub.model import Message

__all__ = ["Upstream", "NodeEvent", "NodeInfo", "Message"]


class Upstream:
    """A thin, stable face over the hub's :class:`~cloudhub.handler.MessageHandle`."""

    def __init__(self, handle: MessageHandle) -> None:
        self._handle = handle

    def send(self, node_id: str, message: Message) -> Deferred[Message]:
        """Deliver ``message`` to ``node_id``, connected now or not.

        ``message.resource`` is the wire form (``<namespace>/<type>/<name>``) or the
        cloud-internal ``node/<node_id>/...`` form. A message is delivered with
        acknowledgement or without according to KubeEdge's rules (protocol §6.3).

        Returns a Deferred that fires with the message when the edge acknowledges it
        (ACK mode) or when it is written to the node's connection (no-ACK mode). It fails
        with :class:`~cloudhub.errors.StaleMessage` (a version not newer than what the node
        has or is owed), :class:`~cloudhub.errors.InvalidMessage` (no uid or resourceVersion
        where one is needed), :class:`~cloudhub.budget.NodeOverLimit` (the node is owed as
        many messages or bytes as one node may be: send again once it caught up),
        :class:`~cloudhub.budget.HubOverLimit` (the hub's budget over all nodes, or of node
        ids that never connected, is spent; both :class:`~cloudhub.budget.OverLimit`, whose
        ``limit`` names the config key), or :class:`~cloudhub.errors.Superseded` (a newer
        version or a delete of the same object replaced it before the ACK). Cancelling the
        Deferred stops the waiting, not the delivery.
        """
        return self._handle.send(node_id, message)

    def send_many(self, entries: Iterable[tuple[str, Message]]) -> list[MessageRefused | None]:
        """Deliver many messages: ``entries`` are ``(node_id, message)`` pairs.

        The fast path for bulk submission: no Deferred per message. Returns one result per
        entry, in order: ``None`` for accepted, else the :class:`MessageRefused` (stale,
        invalid, over a limit) that :meth:`send` would have failed with. Wait on
        :meth:`flush` to know the accepted ones are durable; their delivery shows in
        ``/v1/nodes/{node}/objects``.
        """
        return self._handle.send_many(entries)

    def flush(self) -> Deferred[None]:
        """Fires once every message sent before the call is durably stored (survives a crash).

        ``send()``'s Deferred fires on the edge's ACK; wait on this one to know that what you
        handed in will be delivered even if the hub is killed now.
        """
        return self._handle.flush()

    def subscribe(self, callback: MessageCallback, group: str | None = None) -> Callable[[], None]:
        """Call ``callback(node_id, message)`` for every message an edge sends.

        Keepalives, ACKs and control messages are the hub's business and are not passed on.
        ``group`` limits it to one route group (``meta``, ``resource``, ``twin``, ``user`` ...).
        Returns a function that unsubscribes.
        """
        return self._handle.subscribe(callback, group)

    def subscribe_events(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback(NodeEvent)`` when a node connects or disconnects."""
        return self._handle.subscribe_events(callback)

    def nodes(self) -> list[NodeInfo]:
        """The nodes connected now: id, project, transport, peer, times, messages owed."""
        return self._handle.nodes()

    def is_connected(self, node_id: str) -> bool:
        return node_id in self._handle.sessions

    def reply(
        self, node_id: str, request: Message, content: Any, resource_version: str = ""
    ) -> Deferred[Message]:
        """Answer an edge request as edgecontroller does (§6.8).

        ``parent_msg_id`` is the request's id, so edgehub hands the reply to the waiting
        module. Replies carrying an object (configmap, secret ... queries) are acknowledged and
        need its ``resource_version``; node, lease and pod-status replies are not.
        """
        response = Message.new(
            model.SOURCE_EDGECONTROLLER,
            model.GROUP_RESOURCE,
            model.OP_RESPONSE,
            request.resource,
            content,
            resource_version=resource_version,
            parent_msg_id=request.msg_id,
        )
        return self.send(node_id, response)
