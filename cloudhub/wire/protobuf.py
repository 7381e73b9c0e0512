"""The QUIC lane: beehive messages as viaduct protobuf, in packer frames (protocol §2.5, §3).

``message.proto`` beside this module is the source of truth; ``message_pb2.py`` is generated
from it and committed. Regenerate it from the repository root with:

    python -m pip install grpcio-tools==1.85.1
    python -m grpc_tools.protoc -I. --python_out=. cloudhub/wire/message.proto

grpcio-tools 1.85.1 bundles protoc 35.1, whose output requires the protobuf runtime >= 7.35.1
(the generated module checks this when imported). tests/test_wire_protobuf.py checks that the
generated descriptor matches message.proto.

Mapping, as KubeEdge's ``viaduct/pkg/translator/message.go`` does it:

* header ``ID``/``ParentID``/``Timestamp`` (sint64)/``Sync`` and router ``Source``/``Group``/
  ``Operaion``/``Resouce`` carry the fields of the same meaning;
* ``resource_version``, ``destination`` and ``type`` are not representable: they are dropped
  on encode and empty on decode (``MessageType`` exists in the .proto but KubeEdge never
  copies it, so neither do we);
* content travels as bytes (``GetContentData``, §1.2): a ``str`` as its UTF-8 bytes,
  ``bytes`` as they are, ``None`` as nothing, anything else as Go-style compact JSON text.
  KubeEdge's receiver just keeps the bytes; our hub wants a JSON value, so decoding gives:
  no bytes or ``null`` → ``None``; bytes starting with ``{`` or ``[`` that parse as JSON → that
  object or array; other valid UTF-8 → ``str`` (so an ACK's ``OK`` comes back as ``"OK"``);
  anything else → the raw ``bytes``. A ``str`` that is itself a JSON object/array text, or
  is ``"null"``, therefore does not survive a round trip unchanged. JSON content holding a
  value the WebSocket lane refuses (a number outside float64, a lone surrogate escape) is
  refused here too (:class:`~cloudhub.wire.jsonlane.InvalidValue`, 1007), and so is an id
  over :data:`~cloudhub.model.MAX_MSG_ID_LENGTH` characters. (Go writes nil content as
  ``null``; we write nothing, which a Go receiver also reads as nil.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.internal import api_implementation
from google.protobuf.message import DecodeError as _ProtobufDecodeError

from cloudhub.errors import DecodeError
from cloudhub.model import MAX_MSG_ID_LENGTH, Message, msg_id_problem
from cloudhub.wire import message_pb2
from cloudhub.wire.jsonlane import InvalidValue, marshal_value, unmarshal_value
from cloudhub.wire.packer import DEFAULT_MAX_PAYLOAD_SIZE, PackerDecoder, pack

__all__ = [
    "FrameDecoder",
    "encode_frame",
    "message_from_protobuf",
    "message_to_protobuf",
    "protobuf_backend",
]

_ProtoMessage: Any = message_pb2.Message  # type: ignore[attr-defined]


def protobuf_backend() -> str:
    """The protobuf runtime in use: ``"upb"`` is the fast one (the pure-Python one is ~27x
    slower, performance-notes.md); a service can refuse or warn at startup on anything else."""
    return str(api_implementation.Type())


def _content_bytes(content: Any) -> bytes:
    if content is None:
        return b""
    if content.__class__ is str:
        try:
            return content.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: U+FFFD, as Go writes invalid UTF-8
            return "".join(
                "\ufffd" if "\ud800" <= char <= "\udfff" else char for char in content
            ).encode("utf-8")
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    return marshal_value(content)


def _content_value(raw: bytes) -> Any:
    if not raw or raw == b"null":
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    if raw[0] in b"{[":
        try:
            return unmarshal_value(text)
        except InvalidValue as error:
            raise InvalidValue(f"content {error}") from None
        except DecodeError:
            return text
    return text


def message_to_protobuf(msg: Message) -> bytes:
    """The protobuf bytes KubeEdge's translator would produce for ``msg``.

    Header and router are always present, even when empty, as Go's encoder sets them.
    Raises ``TypeError``/``ValueError`` for a message protobuf cannot carry (a timestamp
    outside int64, content JSON cannot serialise): programming errors, not wire errors.
    """
    proto = _ProtoMessage()
    header = proto.header
    header.SetInParent()
    header.ID = msg.msg_id
    header.ParentID = msg.parent_msg_id
    header.Timestamp = msg.timestamp
    header.Sync = msg.sync
    router = proto.router
    router.SetInParent()
    router.Source = msg.source
    router.Group = msg.group
    router.Operaion = msg.operation
    router.Resouce = msg.resource
    if msg.content is not None:
        proto.Content = _content_bytes(msg.content)
    return proto.SerializeToString()  # type: ignore[no-any-return]


def message_from_protobuf(data: bytes | bytearray | memoryview) -> Message:
    """A :class:`Message` from protobuf bytes; :class:`DecodeError` if they are not a valid
    viaduct ``Message`` (bad wire format, or a string field that is not UTF-8), an id is over
    :data:`~cloudhub.model.MAX_MSG_ID_LENGTH` characters, or JSON content holds a value the
    hub refuses (:class:`~cloudhub.wire.jsonlane.InvalidValue`)."""
    proto = _ProtoMessage()
    try:
        proto.ParseFromString(data if data.__class__ is bytes else bytes(data))
    except _ProtobufDecodeError as error:
        raise DecodeError(f"payload is not a valid protobuf Message: {error}") from None
    header = proto.header
    router = proto.router
    msg_id = header.ID
    parent = header.ParentID
    if len(msg_id) > MAX_MSG_ID_LENGTH or len(parent) > MAX_MSG_ID_LENGTH:
        raise DecodeError(msg_id_problem(msg_id, parent) or "")
    return Message(
        msg_id=msg_id,
        timestamp=header.Timestamp,
        parent_msg_id=parent,
        sync=header.Sync,
        source=router.Source,
        group=router.Group,
        operation=router.Operaion,
        resource=router.Resouce,
        content=_content_value(proto.Content),
    )


def encode_frame(msg: Message) -> bytes:
    """One packer frame holding ``msg``: what KubeEdge writes on a QUIC stream."""
    return pack(message_to_protobuf(msg))


class FrameDecoder:
    """Messages from a stream of packer frames (a QUIC stream after its 3-byte prefix, §3).

    Framing as :class:`~cloudhub.wire.packer.PackerDecoder` (an oversized length is a sticky
    :class:`DecodeError`); a frame whose payload is not a valid message raises
    :class:`DecodeError` when it is reached, after the messages before it were yielded.
    """

    __slots__ = ("_packer",)

    def __init__(self, max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE) -> None:
        self._packer = PackerDecoder(max_payload_size)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Message]:
        """Add ``data`` to the stream; yields each message completed so far, in order."""
        return map(message_from_protobuf, self._packer.feed(data))

    @property
    def buffered(self) -> int:
        """Bytes held that have not been yielded as messages yet."""
        return self._packer.buffered

    def finish(self) -> None:
        """Call at the end of the stream: :class:`DecodeError` if it ended inside a frame."""
        self._packer.finish()
