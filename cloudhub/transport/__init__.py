"""Transports: bytes on a socket in, :class:`~cloudhub.model.Message` objects out, and back.

Each transport implements :class:`~cloudhub.interfaces.IConnection` for its connections and
reports their life to an :class:`~cloudhub.interfaces.IConnectionHandler`; it never decides
delivery policy (design.md, "How data moves").

``websocket``  the stock-edgecore lane: Autobahn over mutual TLS, one JSON message per
               WebSocket message (protocol §2, §4).

Nothing is imported here, so importing the package does not pull in Autobahn.
"""
