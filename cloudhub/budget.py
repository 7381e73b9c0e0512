"""How much the hub may owe: per node, in all, and to how many node ids (issue 18, finding 5).

Every message the hub accepts is kept, in memory and in the sync store, until its node
acknowledges it; a node that never comes back would otherwise be owed without limit. A
:class:`Budget` is shared by all the :class:`~cloudhub.queue.NodeQueue` of one
:class:`~cloudhub.handler.MessageHandle` and holds plain counters, updated in O(1) as messages
are accepted, superseded, acknowledged or rolled back (never a scan):

- per node: at most ``node_messages`` ACK-mode messages and ``node_bytes`` bytes owed (a
  message's size is its encoded wire JSON, what the store keeps and the transport sends;
  queued no-ACK messages of an offline node count in the bytes too). Beyond either, a *new*
  message for that node is refused with :class:`NodeOverLimit` (the API answers 429: the node
  is behind, retry later). A newer version of an object already owed replaces the old one and
  is counted once: it is refused only when it would grow the node's bytes past the limit.
- in all: ``total_messages`` and ``total_bytes`` over every node; beyond, refused with
  :class:`HubOverLimit` (507).
- node ids: at most ``unknown_nodes`` nodes may be owed something without having connected
  since the hub started (nodes restored from the store count as known); beyond, a message
  for yet another such node id is refused with :class:`HubOverLimit` (507), so whoever may
  post cannot create node ids without limit.

What the store holds at a restart is restored and delivered even above a limit (never
dropped); only new messages are refused until the backlog shrinks. A limit of 0 is no limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloudhub.errors import MessageRefused

if TYPE_CHECKING:
    from cloudhub.queue import NodeQueue

__all__ = [
    "DEFAULT_NODE_BYTES",
    "DEFAULT_NODE_MESSAGES",
    "DEFAULT_TOTAL_BYTES",
    "DEFAULT_TOTAL_MESSAGES",
    "DEFAULT_UNKNOWN_NODES",
    "Budget",
    "HubOverLimit",
    "NodeOverLimit",
    "OverLimit",
]

MIB = 1024 * 1024
DEFAULT_NODE_MESSAGES = 10_000  # hub.limits.nodeMessages
DEFAULT_NODE_BYTES = 64 * MIB  # hub.limits.nodeBytes
DEFAULT_TOTAL_MESSAGES = 1_000_000  # hub.limits.totalMessages
DEFAULT_TOTAL_BYTES = 1024 * MIB  # hub.limits.totalBytes
DEFAULT_UNKNOWN_NODES = 100_000  # hub.limits.unknownNodes

NODE_MESSAGES = "hub.limits.nodeMessages"
NODE_BYTES = "hub.limits.nodeBytes"
TOTAL_MESSAGES = "hub.limits.totalMessages"
TOTAL_BYTES = "hub.limits.totalBytes"
UNKNOWN_NODES = "hub.limits.unknownNodes"


class OverLimit(MessageRefused):
    """The message would take the hub past one of its limits (:class:`Budget`).

    ``limit`` is the config key of the limit reached, ``value`` its value. Nothing was
    accepted; what is owed already is still delivered.
    """

    def __init__(self, node_id: str, limit: str, value: int, reason: str) -> None:
        self.limit = limit
        self.value = value
        super().__init__(node_id, reason)


class NodeOverLimit(OverLimit):
    """The node is owed as much as one node may be: send again once it has caught up (429)."""


class HubOverLimit(OverLimit):
    """The hub's budget over all nodes (messages, bytes, unconnected node ids) is spent (507)."""


def _size(value: int) -> str:
    if value >= MIB and value % MIB == 0:
        return f"{value // MIB} MiB"
    return f"{value} bytes"


class Budget:
    """The limits, and what is owed against them now (see the module docstring)."""

    __slots__ = (
        "node_messages",
        "node_bytes",
        "total_messages",
        "total_bytes",
        "unknown_nodes",
        "messages",
        "bytes",
        "refusals",
    )

    def __init__(
        self,
        node_messages: int = DEFAULT_NODE_MESSAGES,
        node_bytes: int = DEFAULT_NODE_BYTES,
        total_messages: int = DEFAULT_TOTAL_MESSAGES,
        total_bytes: int = DEFAULT_TOTAL_BYTES,
        unknown_nodes: int = DEFAULT_UNKNOWN_NODES,
    ) -> None:
        for name, value in (
            ("node_messages", node_messages),
            ("node_bytes", node_bytes),
            ("total_messages", total_messages),
            ("total_bytes", total_bytes),
            ("unknown_nodes", unknown_nodes),
        ):
            if value < 0:
                raise ValueError(f"{name} must be 0 (no limit) or more, not {value}")
        self.node_messages = node_messages
        self.node_bytes = node_bytes
        self.total_messages = total_messages
        self.total_bytes = total_bytes
        self.unknown_nodes = unknown_nodes
        # ACK-mode messages owed, and bytes owed (ACK-mode plus offline no-ACK backlogs).
        self.messages = 0
        self.bytes = 0
        # Refusals per limit (config key), for the metrics.
        self.refusals: dict[str, int] = {}

    def reset(self) -> None:
        """Nothing owed (the queues were let go; :meth:`MessageHandle.attach` rebuilds)."""
        self.messages = 0
        self.bytes = 0

    def check(self, queue: NodeQueue, new: bool, grow: int) -> None:
        """Raise :class:`OverLimit` if ``queue`` may not take a message that adds one owed
        message (``new``) and ``grow`` bytes (negative when it replaces a larger one)."""
        if new:
            limit = self.node_messages
            if limit and len(queue.pending) >= limit:
                raise self._refuse(
                    NodeOverLimit,
                    queue.node_id,
                    NODE_MESSAGES,
                    limit,
                    f"node is owed {len(queue.pending)} messages, the most one node may be "
                    f"owed ({NODE_MESSAGES} {limit}); send it again once the node has caught up",
                )
        if grow > 0:
            limit = self.node_bytes
            if limit and queue.owed_bytes + grow > limit:
                raise self._refuse(
                    NodeOverLimit,
                    queue.node_id,
                    NODE_BYTES,
                    limit,
                    f"node is owed {queue.owed_bytes} bytes; {grow} more would exceed "
                    f"{NODE_BYTES} ({_size(limit)}); send it again once the node has caught up",
                )
        if new:
            limit = self.total_messages
            if limit and self.messages >= limit:
                raise self._refuse(
                    HubOverLimit,
                    queue.node_id,
                    TOTAL_MESSAGES,
                    limit,
                    f"the hub is owed {self.messages} messages over all nodes, its budget "
                    f"({TOTAL_MESSAGES} {limit})",
                )
        if grow > 0:
            limit = self.total_bytes
            if limit and self.bytes + grow > limit:
                raise self._refuse(
                    HubOverLimit,
                    queue.node_id,
                    TOTAL_BYTES,
                    limit,
                    f"the hub is owed {self.bytes} bytes over all nodes; {grow} more would "
                    f"exceed its budget ({TOTAL_BYTES} {_size(limit)})",
                )

    def check_unknown(self, node_id: str, unknown: int) -> None:
        """Raise :class:`HubOverLimit` if yet another node id that never connected may not be
        owed something (``unknown`` such ids are owed something now)."""
        limit = self.unknown_nodes
        if limit and unknown >= limit:
            raise self._refuse(
                HubOverLimit,
                node_id,
                UNKNOWN_NODES,
                limit,
                f"{unknown} node ids that have not connected are owed messages, the most "
                f"allowed ({UNKNOWN_NODES} {limit}); a node that connects is known",
            )

    def _refuse(
        self, kind: type[OverLimit], node_id: str, limit: str, value: int, reason: str
    ) -> OverLimit:
        self.refusals[limit] = self.refusals.get(limit, 0) + 1
        return kind(node_id, limit, value, reason)
