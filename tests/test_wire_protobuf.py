"""Viaduct protobuf translator and packer+protobuf frames (§2.5, §3)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from google.protobuf import descriptor_pb2, runtime_version
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cloudhub.errors import DecodeError
from cloudhub.model import Message
from cloudhub.wire import (
    FrameDecoder,
    encode_frame,
    message_from_protobuf,
    message_pb2,
    message_to_protobuf,
    pack,
    protobuf,
    protobuf_backend,
)

ProtoMessage: Any = message_pb2.Message  # type: ignore[attr-defined]
WIRE_DIR = os.path.dirname(os.path.abspath(protobuf.__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(WIRE_DIR))

_SCALARS = {
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "sint64": descriptor_pb2.FieldDescriptorProto.TYPE_SINT64,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "sint32": descriptor_pb2.FieldDescriptorProto.TYPE_SINT32,
}
_FIELD = re.compile(r"^(?:(repeated|optional)\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;$")


def parse_proto(text: str) -> tuple[str, str, dict[str, dict[str, tuple[str, str, int]]]]:
    """(syntax, package, {message: {field: (label, type, number)}}) of a flat proto3 file."""
    text = re.sub(r"//[^\n]*", "", text)
    syntax = re.search(r'syntax\s*=\s*"(\w+)"\s*;', text)
    package = re.search(r"package\s+([\w.]+)\s*;", text)
    assert syntax and package, "syntax or package missing in message.proto"
    messages: dict[str, dict[str, tuple[str, str, int]]] = {}
    for name, body in re.findall(r"message\s+(\w+)\s*\{([^{}]*)\}", text):
        fields = {}
        for line in filter(None, (line.strip() for line in body.splitlines())):
            match = _FIELD.match(line)
            assert match, f"unparsed line in message {name}: {line!r}"
            label, kind, field, number = match.groups()
            fields[field] = (label or "", kind, int(number))
        messages[name] = fields
    rest = re.sub(r"message\s+(\w+)\s*\{([^{}]*)\}", "", text)
    rest = re.sub(r'syntax\s*=\s*"\w+"\s*;|package\s+[\w.]+\s*;', "", rest)
    assert not rest.strip(), f"unparsed text in message.proto: {rest.strip()!r}"
    return syntax.group(1), package.group(1), messages


def keepalive() -> Message:
    return Message(
        msg_id="f47ac10b-58cc-4372-a567-0e02b2c3d479",
        timestamp=1700000000000,
        source="websocket",
        group="resource",
        operation="keepalive",
        resource="node",
        content="ping",
    )


class GeneratedCodeTests(SynchronousTestCase):
    def test_descriptor_matches_message_proto(self) -> None:
        with open(os.path.join(WIRE_DIR, "message.proto"), encoding="utf-8") as handle:
            syntax, package, messages = parse_proto(handle.read())
        generated = descriptor_pb2.FileDescriptorProto.FromString(
            message_pb2.DESCRIPTOR.serialized_pb
        )
        self.assertEqual(generated.syntax, syntax)
        self.assertEqual(generated.package, package)
        self.assertEqual(generated.name, "cloudhub/wire/message.proto")
        self.assertEqual({m.name for m in generated.message_type}, set(messages))
        for message in generated.message_type:
            expected = messages[message.name]
            self.assertEqual({f.name for f in message.field}, set(expected), message.name)
            for field in message.field:
                label, kind, number = expected[field.name]
                where = f"{message.name}.{field.name}"
                self.assertEqual(field.number, number, where)
                self.assertEqual(field.label == field.LABEL_REPEATED, label == "repeated", where)
                if kind in _SCALARS:
                    self.assertEqual(field.type, _SCALARS[kind], where)
                else:
                    self.assertEqual(field.type, field.TYPE_MESSAGE, where)
                    self.assertEqual(field.type_name, f".{package}.{kind}", where)

    def test_kubeedge_field_table(self) -> None:
        # §2.5, including KubeEdge's typos: they are part of the contract.
        with open(os.path.join(WIRE_DIR, "message.proto"), encoding="utf-8") as handle:
            _, package, messages = parse_proto(handle.read())
        self.assertEqual(package, "message")
        self.assertEqual(
            messages["Message"],
            {
                "header": ("", "MessageHeader", 1),
                "router": ("", "MessageRouter", 2),
                "Content": ("", "bytes", 3),
            },
        )
        self.assertEqual(
            messages["MessageHeader"],
            {
                "ID": ("", "string", 1),
                "ParentID": ("", "string", 2),
                "Timestamp": ("", "sint64", 3),
                "Sync": ("", "bool", 4),
                "MessageType": ("", "string", 5),
            },
        )
        self.assertEqual(
            messages["MessageRouter"],
            {
                "Source": ("", "string", 1),
                "Group": ("", "string", 2),
                "Operaion": ("", "string", 3),
                "Resouce": ("", "string", 4),
            },
        )

    def test_runtime_lower_bound_is_documented_and_pinned(self) -> None:
        with open(os.path.join(WIRE_DIR, "message_pb2.py"), encoding="utf-8") as handle:
            found = re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", handle.read())
        assert found
        gencode = tuple(int(part) for part in found.groups())
        bound = ".".join(found.groups())
        self.assertIn(f"runtime >= {bound}", protobuf.__doc__ or "")
        self.assertLessEqual(
            gencode, (runtime_version.MAJOR, runtime_version.MINOR, runtime_version.PATCH)
        )
        setup_py = os.path.join(REPO_ROOT, "setup.py")
        if not os.path.exists(setup_py):
            raise SkipTest("no setup.py beside the package")
        with open(setup_py, encoding="utf-8") as handle:
            pin = re.search(r'"protobuf>=(\d+)\.(\d+)(?:\.(\d+))?', handle.read())
        assert pin, "setup.py has no protobuf>= requirement"
        pinned = tuple(int(part or 0) for part in pin.groups())
        self.assertGreaterEqual(
            pinned,
            gencode,
            f"setup.py allows protobuf {pinned}, older than the generated code needs ({bound})",
        )

    def test_backend_is_reported(self) -> None:
        self.assertIn(protobuf_backend(), {"upb", "python", "cpp"})


class TranslatorTests(SynchronousTestCase):
    def test_keepalive_fields(self) -> None:
        proto = ProtoMessage.FromString(message_to_protobuf(keepalive()))
        self.assertEqual(
            (
                proto.header.ID,
                proto.header.Timestamp,
                proto.router.Source,
                proto.router.Group,
                proto.router.Operaion,
                proto.router.Resouce,
                proto.Content,
            ),
            (
                "f47ac10b-58cc-4372-a567-0e02b2c3d479",
                1700000000000,
                "websocket",
                "resource",
                "keepalive",
                "node",
                b"ping",
            ),
        )

    def test_header_and_router_always_present_like_go(self) -> None:
        self.assertEqual(message_to_protobuf(Message()), bytes.fromhex("0a00 1200"))

    def test_unrepresentable_fields_are_dropped(self) -> None:
        msg = keepalive().copy(
            resource_version="5", destination="d", type="t", parent_msg_id="p", sync=True
        )
        back = message_from_protobuf(message_to_protobuf(msg))
        self.assertEqual(back, msg.copy(resource_version="", destination="", type=""))

    def test_timestamp_is_zigzag(self) -> None:
        data = message_to_protobuf(Message(timestamp=-1))
        self.assertEqual(data, bytes.fromhex("0a02 1801 1200"))
        self.assertEqual(message_from_protobuf(data).timestamp, -1)

    def test_content_encoding(self) -> None:
        def content_of(value: object) -> bytes:
            data = message_to_protobuf(Message(content=value))
            return ProtoMessage.FromString(data).Content

        self.assertEqual(content_of("OK"), b"OK")
        self.assertEqual(content_of("é"), "é".encode())
        self.assertEqual(content_of(None), b"")
        self.assertEqual(content_of(b"\xff\x00"), b"\xff\x00")
        self.assertEqual(content_of({"a": [1, "<"]}), b'{"a":[1,"\\u003c"]}')
        self.assertEqual(content_of(5), b"5")
        self.assertEqual(content_of(True), b"true")
        self.assertEqual(content_of("a\ud800"), "a\ufffd".encode())

    def test_content_decoding(self) -> None:
        def decoded(raw: bytes) -> object:
            proto = ProtoMessage(Content=raw)
            return message_from_protobuf(proto.SerializeToString()).content

        self.assertEqual(decoded(b"OK"), "OK")
        self.assertEqual(decoded(b"ack"), "ack")
        self.assertIsNone(decoded(b""))
        self.assertIsNone(decoded(b"null"))  # what Go writes for nil content
        self.assertEqual(decoded(b'{"kind":"Pod","n":[1,2.5]}'), {"kind": "Pod", "n": [1, 2.5]})
        self.assertEqual(decoded(b"[1]"), [1])
        self.assertEqual(decoded(b"{not json"), "{not json")
        self.assertEqual(decoded(b"[" * 5000), "[" * 5000)
        self.assertEqual(decoded(b"5"), "5")
        self.assertEqual(decoded(b'"q"'), '"q"')
        self.assertEqual(decoded(b"\xff\xfe"), b"\xff\xfe")
        self.assertEqual(decoded(b"{\xff}"), b"{\xff}")
        self.assertEqual(
            decoded(b'{"HeaderKey":["x"],"Node_id":["edge1"]}'),
            {"HeaderKey": ["x"], "Node_id": ["edge1"]},
        )

    def test_bad_protobuf_raises_decode_error(self) -> None:
        good = message_to_protobuf(keepalive())
        for data in (
            b"\xff",  # field 31, wire type 7: invalid
            good[:-1],  # truncated content
            good[:5],  # truncated header
            b"\x0a\x03\x0a\x01\xff",  # header.ID not UTF-8
            b"\x12\x02\x0a\xc0",  # router.Source truncated / not UTF-8
            b"\x0a\x01\x18",  # header.Timestamp varint cut short
            b"\x0c",  # end-group with no group open
            b"\x0b",  # group never closed
            b"\x1a\x85\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # overlong length varint
        ):
            error = self.assertRaises(DecodeError, message_from_protobuf, data)
            self.assertIn("protobuf", str(error))

    def test_unknown_fields_are_ignored(self) -> None:
        data = message_to_protobuf(keepalive()) + b"\x20\x01" + b"\x2a\x01z"
        self.assertEqual(message_from_protobuf(data), keepalive())
        # A known field with an unexpected wire type is an unknown field too (as in Go).
        self.assertEqual(message_from_protobuf(b"\x08\x01\x0b\x0c"), Message())

    def test_accepts_bytes_like(self) -> None:
        data = message_to_protobuf(keepalive())
        self.assertEqual(message_from_protobuf(bytearray(data)), keepalive())
        self.assertEqual(message_from_protobuf(memoryview(data)), keepalive())


class FrameTests(SynchronousTestCase):
    def test_encode_frame_is_packed_protobuf(self) -> None:
        self.assertEqual(encode_frame(keepalive()), pack(message_to_protobuf(keepalive())))

    def test_frame_decoder(self) -> None:
        ack = Message(msg_id="b", parent_msg_id="a", operation="response", content="OK")
        stream = encode_frame(keepalive()) + encode_frame(ack)
        decoder = FrameDecoder()
        got = [m for byte in range(len(stream)) for m in decoder.feed(stream[byte : byte + 1])]
        self.assertEqual(got, [keepalive(), ack])
        self.assertEqual(decoder.buffered, 0)
        decoder.finish()

    def test_bad_payload_after_good_ones(self) -> None:
        decoder = FrameDecoder()
        got: list[Message] = []

        def consume() -> None:
            for msg in decoder.feed(encode_frame(keepalive()) + pack(b"\xff")):
                got.append(msg)

        self.assertRaises(DecodeError, consume)
        self.assertEqual(got, [keepalive()])

    def test_oversized_frame(self) -> None:
        decoder = FrameDecoder(max_payload_size=50)
        self.assertRaises(DecodeError, list, decoder.feed(encode_frame(keepalive())[:10]))
        self.assertRaises(DecodeError, decoder.finish)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
json_objects = st.lists(json_values, max_size=4) | st.dictionaries(
    st.text(max_size=8), json_values, max_size=4
)
# A str survives unless it is empty, "null", or itself JSON object/array text.
plain_strings = st.text(min_size=1, max_size=40).filter(
    lambda text: text != "null" and not (text[0] in "{[" and _is_json(text))
)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


representable = st.builds(
    Message,
    msg_id=st.text(max_size=40),
    timestamp=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    parent_msg_id=st.text(max_size=40),
    sync=st.booleans(),
    source=st.text(max_size=20),
    group=st.text(max_size=20),
    operation=st.text(max_size=20),
    resource=st.text(max_size=40),
    content=st.none() | plain_strings | json_objects,
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(representable)
    def test_round_trip(self, msg: Message) -> None:
        self.assertEqual(message_from_protobuf(message_to_protobuf(msg)), msg)

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(representable, max_size=6),
        st.lists(st.integers(min_value=0, max_value=100_000), max_size=12),
    )
    def test_frames_split_anywhere(self, msgs: list[Message], cuts: list[int]) -> None:
        stream = b"".join(encode_frame(msg) for msg in msgs)
        points = sorted({cut % (len(stream) + 1) for cut in cuts})
        chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
        decoder = FrameDecoder()
        self.assertEqual([m for chunk in chunks for m in decoder.feed(chunk)], msgs)
        decoder.finish()
