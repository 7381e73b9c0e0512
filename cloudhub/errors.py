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
