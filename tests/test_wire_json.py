"""The WebSocket JSON lane: Go's json.Marshal byte for byte, Go's lenient reading (§1.1, §2.1)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cloudhub.errors import DecodeError
from cloudhub.model import Message
from cloudhub.wire import InvalidValue, decode, encode, marshal_value, unmarshal_value

ID = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
KEEPALIVE = (
    b'{"header":{"msg_id":"f47ac10b-58cc-4372-a567-0e02b2c3d479","timestamp":1700000000000},'
    b'"route":{"source":"websocket","group":"resource","operation":"keepalive","resource":"node"},'
    b'"content":"ping"}\n'
)
BLANK = b'{"header":{"msg_id":"","timestamp":0},"route":{},"content":null}\n'


def keepalive() -> Message:
    return Message(
        msg_id=ID,
        timestamp=1700000000000,
        source="websocket",
        group="resource",
        operation="keepalive",
        resource="node",
        content="ping",
    )


def go_marshal(msg: Message) -> bytes:
    """An independent model of Go's json.Marshal of model.Message, for the property test."""
    header: dict[str, Any] = {"msg_id": msg.msg_id}
    if msg.parent_msg_id:
        header["parent_msg_id"] = msg.parent_msg_id
    header["timestamp"] = msg.timestamp
    if msg.resource_version:
        header["resourceversion"] = msg.resource_version
    if msg.sync:
        header["sync"] = True
    if msg.type:
        header["type"] = msg.type
    route = {
        key: value
        for key, value in (
            ("source", msg.source),
            ("destination", msg.destination),
            ("group", msg.group),
            ("operation", msg.operation),
            ("resource", msg.resource),
        )
        if value
    }
    text = json.dumps(
        {"header": header, "route": route, "content": msg.content},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return (text + "\n").encode("utf-8")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
texts = st.text(max_size=40) | st.sampled_from(
    ["", "a<b>&c", "\u2028\u2029", "é漢字😀", '\x00\x1f"\\']
)
messages = st.builds(
    Message,
    msg_id=texts,
    timestamp=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    parent_msg_id=texts,
    resource_version=texts,
    sync=st.booleans(),
    type=texts,
    source=texts,
    destination=texts,
    group=texts,
    operation=texts,
    resource=texts,
    content=json_values,
)


class EncodeTests(SynchronousTestCase):
    def test_keepalive_is_byte_exact(self) -> None:
        self.assertEqual(encode(keepalive()), KEEPALIVE)
        self.assertEqual(len(encode(keepalive())), 196)

    def test_blank_message_matches_edgecore_shutdown_frame(self) -> None:
        self.assertEqual(encode(Message()), BLANK)

    def test_key_order_and_omitempty(self) -> None:
        msg = Message(
            msg_id="i",
            timestamp=5,
            parent_msg_id="p",
            resource_version="7",
            sync=True,
            type="t",
            source="s",
            destination="d",
            group="g",
            operation="o",
            resource="r",
            content={"z": 1, "a": [True, None, 1.5]},
        )
        self.assertEqual(
            encode(msg),
            b'{"header":{"msg_id":"i","parent_msg_id":"p","timestamp":5,"resourceversion":"7",'
            b'"sync":true,"type":"t"},"route":{"source":"s","destination":"d","group":"g",'
            b'"operation":"o","resource":"r"},"content":{"z":1,"a":[true,null,1.5]}}\n',
        )

    def test_route_keeps_commas_right_whichever_fields_are_set(self) -> None:
        self.assertIn(b'"route":{"group":"g"}', encode(Message(group="g")))
        self.assertIn(
            b'"route":{"operation":"o","resource":"r"}',
            encode(Message(operation="o", resource="r")),
        )
        self.assertIn(b'"route":{"destination":"d"}', encode(Message(destination="d")))

    def test_msg_id_and_timestamp_are_never_omitted(self) -> None:
        self.assertTrue(
            encode(Message(content=1)).startswith(
                b'{"header":{"msg_id":"","timestamp":0},"route":{}'
            )
        )

    def test_html_characters_are_escaped_like_go(self) -> None:
        data = encode(Message(resource="a<b>&c", content={"<k>": "x&y\u2028\u2029"}))
        self.assertIn(b'"resource":"a\\u003cb\\u003e\\u0026c"', data)
        self.assertIn(b'"content":{"\\u003ck\\u003e":"x\\u0026y\\u2028\\u2029"}', data)

    def test_non_ascii_is_utf8_not_escaped(self) -> None:
        data = encode(Message(source="é", content="漢字😀"))
        self.assertIn('"source":"é"'.encode(), data)
        self.assertIn('"content":"漢字😀"'.encode(), data)

    def test_control_characters(self) -> None:
        data = encode(Message(content='\x00\x1f\n\r\t"\\\x7f'))
        self.assertIn(b'"content":"\\u0000\\u001f\\n\\r\\t\\"\\\\\x7f"', data)

    def test_lone_surrogates_become_replacement_characters(self) -> None:
        data = encode(Message(msg_id="a\ud800", content=["\udfff"]))
        self.assertIn('"msg_id":"a\ufffd"'.encode(), data)
        self.assertIn('"content":["\ufffd"]'.encode(), data)

    def test_bytes_content_is_base64_like_go(self) -> None:
        self.assertIn(b'"content":"aGk="', encode(Message(content=b"hi")))

    def test_unencodable_messages_raise_type_or_value_error(self) -> None:
        self.assertRaises(ValueError, encode, Message(content=float("nan")))
        self.assertRaises(TypeError, encode, Message(content={1, 2}))
        self.assertRaises(TypeError, encode, Message(timestamp=1.5))  # type: ignore[arg-type]
        self.assertRaises(TypeError, encode, Message(timestamp=True))
        self.assertRaises(ValueError, encode, Message(timestamp=2**63))

    def test_marshal_value(self) -> None:
        self.assertEqual(marshal_value({"a": "<"}), b'{"a":"\\u003c"}')
        self.assertEqual(marshal_value("ok"), b'"ok"')
        self.assertEqual(marshal_value(None), b"null")

    @settings(max_examples=300, deadline=None)
    @given(messages)
    def test_encode_matches_model_of_go(self, msg: Message) -> None:
        self.assertEqual(encode(msg), go_marshal(msg))


class DecodeTests(SynchronousTestCase):
    def test_keepalive(self) -> None:
        self.assertEqual(decode(KEEPALIVE), keepalive())

    def test_text_binary_with_or_without_newline(self) -> None:
        for data in (
            KEEPALIVE,
            KEEPALIVE[:-1],
            KEEPALIVE.decode(),
            KEEPALIVE[:-1].decode(),
            bytearray(KEEPALIVE),
            memoryview(KEEPALIVE),
            b"  \r\n" + KEEPALIVE + b"\t ",
        ):
            self.assertEqual(decode(data), keepalive())

    def test_blank_shutdown_message(self) -> None:
        msg = decode(BLANK)
        self.assertEqual(msg, Message())
        self.assertTrue(msg.is_empty)

    def test_missing_parts_and_nulls_are_defaults(self) -> None:
        self.assertEqual(decode(b"{}"), Message())
        self.assertEqual(decode(b'{"header":null,"route":null,"content":null}'), Message())
        self.assertEqual(
            decode(
                b'{"header":{"msg_id":null,"timestamp":null,"sync":null,"type":null},'
                b'"route":{"source":null}}'
            ),
            Message(),
        )

    def test_all_fields(self) -> None:
        msg = decode(
            '{"header":{"msg_id":"i","parent_msg_id":"p","timestamp":-5,"resourceversion":"7",'
            '"sync":true,"type":"t"},"route":{"source":"s","destination":"d","group":"g",'
            '"operation":"o","resource":"r"},"content":{"a":[1,2.5,"\\u003c"]}}'
        )
        self.assertEqual(
            msg,
            Message(
                msg_id="i",
                timestamp=-5,
                parent_msg_id="p",
                resource_version="7",
                sync=True,
                type="t",
                source="s",
                destination="d",
                group="g",
                operation="o",
                resource="r",
                content={"a": [1, 2.5, "<"]},
            ),
        )

    def test_unknown_keys_are_ignored(self) -> None:
        msg = decode(
            b'{"header":{"msg_id":"x","timestamp":1,"extra":[1]},"route":{"what":{}},'
            b'"more":true,"content":"c"}'
        )
        self.assertEqual(msg, Message(msg_id="x", timestamp=1, content="c"))

    def test_int64_bounds(self) -> None:
        self.assertEqual(
            decode(b'{"header":{"timestamp":9223372036854775807}}').timestamp, 2**63 - 1
        )
        self.assertEqual(
            decode(b'{"header":{"timestamp":-9223372036854775808}}').timestamp, -(2**63)
        )
        for value in (b"9223372036854775808", b"-9223372036854775809"):
            error = self.assertRaises(DecodeError, decode, b'{"header":{"timestamp":%s}}' % value)
            self.assertIn("header.timestamp", str(error))

    def test_wrong_field_types_name_the_field(self) -> None:
        cases = {
            b'{"header":{"timestamp":"1"}}': "header.timestamp",
            b'{"header":{"timestamp":1.5}}': "header.timestamp",
            b'{"header":{"timestamp":1.0}}': "header.timestamp",  # Go's ParseInt rejects it too
            b'{"header":{"timestamp":1e3}}': "header.timestamp",
            b'{"header":{"timestamp":true}}': "header.timestamp",
            b'{"header":{"msg_id":5}}': "header.msg_id",
            b'{"header":{"parent_msg_id":[]}}': "header.parent_msg_id",
            b'{"header":{"resourceversion":12345}}': "header.resourceversion",
            b'{"header":{"sync":1}}': "header.sync",
            b'{"header":{"sync":"true"}}': "header.sync",
            b'{"header":{"type":false}}': "header.type",
            b'{"header":[]}': "header",
            b'{"header":"x"}': "header",
            b'{"route":[]}': "route",
            b'{"route":{"source":1}}': "route.source",
            b'{"route":{"destination":{}}}': "route.destination",
            b'{"route":{"group":true}}': "route.group",
            b'{"route":{"operation":0}}': "route.operation",
            b'{"route":{"resource":["a"]}}': "route.resource",
        }
        for data, field in cases.items():
            error = self.assertRaises(DecodeError, decode, data)
            self.assertTrue(str(error).startswith(field + " "), (data, str(error)))

    def test_not_an_object(self) -> None:
        for data in (b"[]", b'"x"', b"1", b"null", b"true"):
            error = self.assertRaises(DecodeError, decode, data)
            self.assertIn("JSON object", str(error))

    def test_not_json(self) -> None:
        for data in (
            b"",
            b"   ",
            b"{",
            b'{"a":}',
            b"{'a':1}",
            b"{} {}",
            b'{"a":1}x',
            b'{"content":NaN}',
            b'{"content":-Infinity}',
            b"\xef\xbb\xbf{}",
            b'{"content":"\x01"}',
            b"[" * 50_000,
            b'{"content":1' + b"0" * 5000 + b"}",
        ):
            error = self.assertRaises(DecodeError, decode, data)
            self.assertIn("not valid JSON", str(error))

    def test_numbers_outside_float64(self) -> None:
        """Valid JSON that Go cannot read into a float64 (nor Python write back): refused."""
        for data in (b'{"content":[1e999]}', b'{"content":{"a":-2.5E+308}}'):
            error = self.assertRaises(InvalidValue, decode, data)
            self.assertIn("message holds a number out of range", str(error))

    def test_invalid_utf8(self) -> None:
        for data in (b'{"content":"\xff"}', b'{"content":"\xed\xa0\x80"}', b"\xc0\xaf{}"):
            error = self.assertRaises(DecodeError, decode, data)
            self.assertIn("UTF-8", str(error))

    def test_escaped_lone_surrogates_are_refused(self) -> None:
        """Go would read U+FFFD; a lone surrogate is no Unicode text, so we refuse it (1007)."""
        for data in (
            b'{"header":{"msg_id":"\\ud800"}}',
            b'{"content":{"\\uDC00":1}}',
            b'{"content":["\\ud83d\\ude00x","\\udbff"]}',
        ):
            error = self.assertRaises(InvalidValue, decode, data)
            self.assertIn("message holds a string with a lone UTF-16 surrogate", str(error))
        # A pair is one character.
        msg = decode(b'{"content":{"\\ud83d\\ude00":["\\ud83d\\ude00x"]}}')
        self.assertEqual(msg.content, {"\U0001f600": ["\U0001f600x"]})

    def test_unmarshal_value(self) -> None:
        self.assertEqual(unmarshal_value(' [1,{"a":null}] '), [1, {"a": None}])
        self.assertRaises(DecodeError, unmarshal_value, "[1,")


class RoundTripTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(messages)
    def test_decode_inverts_encode(self, msg: Message) -> None:
        data = encode(msg)
        self.assertEqual(decode(data), msg)
        self.assertEqual(decode(data.decode("utf-8")), msg)
