"""Fakes shared by the core's unit tests."""

from __future__ import annotations

from zope.interface import implementer

from cloudhub.interfaces import IConnection
from cloudhub.model import Message


@implementer(IConnection)
class FakeConnection:
    """An edge connection that records what the hub writes and whether it closed it."""

    transport = "websocket"

    def __init__(self, node_id: str, project_id: str = "p", peer: str = "127.0.0.1:1") -> None:
        self.node_id = node_id
        self.project_id = project_id
        self.peer = peer
        self.sent: list[Message] = []
        self.encoded: list[bytes | None] = []  # what send_message was given beside each
        self.closed: tuple[int, str] | None = None

    def send_message(self, message: Message, encoded: bytes | None = None) -> None:
        if self.closed is None:
            self.sent.append(message)
            self.encoded.append(encoded)

    def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)


def pod(uid: str, rv: str, name: str = "nginx", **metadata: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": uid,
            "resourceVersion": rv,
            **metadata,
        },
    }


def pod_message(uid: str, rv: str, operation: str = "update", name: str = "nginx") -> Message:
    return Message.new(
        "edgecontroller",
        "resource",
        operation,
        f"default/pod/{name}",
        pod(uid, rv, name),
        resource_version=rv,
    )
