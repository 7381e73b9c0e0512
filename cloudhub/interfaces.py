"""The boundary between the delivery core and the transports (design.md, "How data moves").

The core never imports Autobahn or aioquic; the transports never decide delivery policy. A
transport turns bytes into :class:`~cloudhub.model.Message` objects and back, and reports the
life of each edge connection to an :class:`IConnectionHandler` (the hub's ``MessageHandle``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from cloudhub.model import Message

# WebSocket close codes the hub uses (RFC 6455 §7.4); QUIC maps them to application errors.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # hub shutting down
CLOSE_INVALID_PAYLOAD = 1007  # a frame that does not decode
CLOSE_POLICY = 1008  # replaced by a newer connection for the same node, keepalive timeout
CLOSE_TOO_BIG = 1009  # message over hub.maxMessageSize
CLOSE_TRY_AGAIN_LATER = 1013  # node limit reached


class IConnection(Interface):
    """One edge node's live connection, as a transport exposes it to the core."""

    node_id = Attribute("The node id from the handshake (header node_id / Node_id).")
    project_id = Attribute("The project id from the handshake, or ''.")
    transport = Attribute("'websocket' or 'quic'.")
    peer = Attribute("The remote address as 'host:port'.")

    def send_message(message: Message, encoded: bytes | None = None) -> None:
        """Encode ``message`` and queue it for writing.

        ``encoded``, when given, is ``cloudhub.wire.encode(message)`` made earlier (the sync
        store keeps the same bytes): a transport writing the JSON lane uses it instead of
        encoding the message again; others ignore it.

        Never blocks and never raises for a closed connection: the message is then dropped
        (the core learns of the loss through ``connection_lost`` and keeps what it owes).
        """

    def close(code: int, reason: str) -> None:
        """Close the connection, telling the edge ``code`` and ``reason`` where it can."""


class IConnectionHandler(Interface):
    """What the core offers a transport: the three events of a connection's life."""

    def connection_made(connection: IConnection) -> None:
        """A handshake completed. Raises :class:`~cloudhub.errors.NodeRefused` when the node
        may not connect (node limit); the transport then closes the connection with the reason.
        """

    def message_received(connection: IConnection, message: Message) -> None:
        """A decoded message arrived from the edge."""

    def connection_lost(connection: IConnection, reason: str) -> None:
        """The connection is gone (closed by either side, or failed)."""
