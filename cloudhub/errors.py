"""The one exception hierarchy of the package.

Every error says what was wrong and with which node, key or field, so an operator can act on
the message alone.
"""

from __future__ import annotations


class CloudHubError(Exception):
    """Base of every error cloudhub raises on purpose."""


class ConfigError(CloudHubError):
    """A configuration file is missing, unreadable or holds a bad key or value.

    ``str()`` is one line naming the file, the key and the problem.
    """

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")


class DecodeError(CloudHubError):
    """Bytes from the network are not a valid message for the codec that read them.

    The only exception the codecs in :mod:`cloudhub.wire` raise for bad input.
    """


class ResourceVersionError(CloudHubError, ValueError):
    """A resourceVersion is not an unsigned 64-bit decimal integer (KubeEdge panics here)."""


class CertificateError(CloudHubError):
    """A certificate, key or CSR could not be loaded, created or signed."""


class TokenError(CloudHubError):
    """A join token is malformed, forged or expired."""


class NodeNotConnected(CloudHubError):
    """A message was addressed to a node that has no session on this hub."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        super().__init__(f"node {node_id!r} is not connected")


class NodeRefused(CloudHubError):
    """A node's connection was refused (node limit, missing node id, ...)."""

    def __init__(self, node_id: str, reason: str) -> None:
        self.node_id = node_id
        self.reason = reason
        super().__init__(f"node {node_id!r} refused: {reason}")


class MessageRefused(CloudHubError):
    """The hub will not take a message for delivery; ``reason`` says why."""

    def __init__(self, node_id: str, reason: str) -> None:
        self.node_id = node_id
        self.reason = reason
        super().__init__(f"message for node {node_id!r} refused: {reason}")


class InvalidMessage(MessageRefused):
    """The message cannot be delivered as given (no uid, no resourceVersion, bad value)."""


class StaleMessage(MessageRefused):
    """The message's resourceVersion is not newer than what the node has or is owed.

    KubeEdge drops such a message silently; we tell the caller (the HTTP API answers 409).
    """

    def __init__(
        self, node_id: str, uid: str, resource_version: str, acked: str | None, pending: str | None
    ) -> None:
        self.uid = uid
        self.resource_version = resource_version
        self.acked = acked
        self.pending = pending
        super().__init__(
            node_id,
            f"object {uid} resourceVersion {resource_version} is stale "
            f"(acknowledged: {acked or 'none'}, pending: {pending or 'none'})",
        )


class Superseded(CloudHubError):
    """A pending message was replaced by a newer version (or a delete) before its ACK."""

    def __init__(self, node_id: str, uid: str, msg_id: str, by_msg_id: str) -> None:
        self.node_id = node_id
        self.uid = uid
        self.msg_id = msg_id
        self.by_msg_id = by_msg_id
        super().__init__(
            f"message {msg_id} for node {node_id!r} (object {uid}) superseded by {by_msg_id}"
        )


class DeliveryStopped(CloudHubError):
    """The hub stopped before the message was delivered; it stays owed if it was stored."""


class HubNotRunning(CloudHubError):
    """The hub is starting or has stopped: the message was not accepted (send it again)."""
