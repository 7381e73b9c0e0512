"""Test vectors: the worked examples of protocol §10 and the frames of a real edgecore v1.15.4.

The edgecore frames (shared/testdata/edgecore/ws-frames.txt) are ground truth for both
directions of the JSON lane: every data frame must decode to the fields the capture shows, and
re-encoding what edgecore sent must give back its exact bytes (Go's json.Marshal output).
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cloudhub.model import Message
from cloudhub.wire import decode, encode, encode_frame, message_from_protobuf, message_to_protobuf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDGECORE_DIR = os.path.join(REPO_ROOT, "..", "shared", "testdata", "edgecore")

MSG_ID = "f47ac10b-58cc-4372-a567-0e02b2c3d479"

# §10.1, the hex dump of the payload as printed in the spec.
SPEC_10_1_HEX = """
0000: 7b 22 68 65 61 64 65 72 22 3a 7b 22 6d 73 67 5f
0010: 69 64 22 3a 22 66 34 37 61 63 31 30 62 2d 35 38
0020: 63 63 2d 34 33 37 32 2d 61 35 36 37 2d 30 65 30
0030: 32 62 32 63 33 64 34 37 39 22 2c 22 74 69 6d 65
0040: 73 74 61 6d 70 22 3a 31 37 30 30 30 30 30 30 30
0050: 30 30 30 30 7d 2c 22 72 6f 75 74 65 22 3a 7b 22
0060: 73 6f 75 72 63 65 22 3a 22 77 65 62 73 6f 63 6b
0070: 65 74 22 2c 22 67 72 6f 75 70 22 3a 22 72 65 73
0080: 6f 75 72 63 65 22 2c 22 6f 70 65 72 61 74 69 6f
0090: 6e 22 3a 22 6b 65 65 70 61 6c 69 76 65 22 2c 22
00a0: 72 65 73 6f 75 72 63 65 22 3a 22 6e 6f 64 65 22
00b0: 7d 2c 22 63 6f 6e 74 65 6e 74 22 3a 22 70 69 6e
00c0: 67 22 7d 0a
"""
SPEC_10_1_JSON = (
    '{"header":{"msg_id":"f47ac10b-58cc-4372-a567-0e02b2c3d479","timestamp":1700000000000},'
    '"route":{"source":"websocket","group":"resource","operation":"keepalive","resource":"node"},'
    '"content":"ping"}'
)
# §10.2, the annotated protobuf listing, field by field.
SPEC_10_2_PROTOBUF = (
    bytes.fromhex("0a 2d")
    + bytes.fromhex("0a 24")
    + MSG_ID.encode("ascii")
    + bytes.fromhex("18 80 a0 ab fe f9 62")
    + bytes.fromhex("12 26")
    + bytes.fromhex("0a 09 77 65 62 73 6f 63 6b 65 74")
    + bytes.fromhex("12 08 72 65 73 6f 75 72 63 65")
    + bytes.fromhex("1a 09 6b 65 65 70 61 6c 69 76 65")
    + bytes.fromhex("22 04 6e 6f 64 65")
    + bytes.fromhex("1a 04 70 69 6e 67")
)
SPEC_10_2_PACKER_HEADER = bytes.fromhex("01 01 01 00 01 00 00 00 00 5d")


def spec_keepalive() -> Message:
    return Message(
        msg_id=MSG_ID,
        timestamp=1700000000000,
        source="websocket",
        group="resource",
        operation="keepalive",
        resource="node",
        content="ping",
    )


def parse_hexdump(text: str) -> bytes:
    return bytes.fromhex(" ".join(line.split(":", 1)[1] for line in text.strip().splitlines()))


@dataclass
class WsFrame:
    fin: bool
    opcode: int
    masked: bool
    key: bytes
    payload: bytes  # unmasked
    declared_length: int
    complete: bool  # False when the hex was cut short in the capture


def parse_ws_frame(raw: bytes, complete: bool = True) -> WsFrame:
    """One RFC 6455 frame; with ``complete=False`` the payload is whatever of it is present."""
    fin, opcode = bool(raw[0] & 0x80), raw[0] & 0x0F
    masked, length = bool(raw[1] & 0x80), raw[1] & 0x7F
    offset = 2
    if length == 126:
        length, offset = int.from_bytes(raw[2:4], "big"), 4
    elif length == 127:
        length, offset = int.from_bytes(raw[2:10], "big"), 10
    key = raw[offset : offset + 4] if masked else b""
    offset += len(key)
    body = raw[offset : offset + length]
    if complete and (len(body) != length or offset + length != len(raw)):
        raise AssertionError(f"frame of {len(raw)} bytes does not hold a {length}-byte payload")
    if masked:
        body = bytes(byte ^ key[index % 4] for index, byte in enumerate(body))
    return WsFrame(fin, opcode, masked, key, body, length, complete)


_PREFIX = re.compile(r"^\[[^\]]*\] \[wss#\d+\]\s+(.*)$")
_RECEIVED = re.compile(r"^<- frame #(\d+) fin=(\d) opcode=(\d+) masked=(\d) len=(\d+)")
_SENT = re.compile(r"^-> sending (.*?): (msg_id=.*)$")
_RAW = re.compile(r"^raw frame hex(?: \((\d+) bytes\))?: ([0-9a-f]+)(\.\.\.)?$")
_PAYLOAD = re.compile(r"^(?:unmasked )?payload: (b'.*')$")
_DECODED = re.compile(r"^decoded: (msg_id=.*)$")
_FIELDS = re.compile(
    r"^msg_id=(?P<msg_id>\S*) parent=(?P<parent>'[^']*') ts=(?P<ts>-?\d+) \([^)]*\)"
    r" rv=(?P<rv>'[^']*') sync=(?P<sync>True|False) type=(?P<type>'[^']*')"
    r" \| route source=(?P<source>'[^']*'|None) dest=(?P<dest>'[^']*'|None)"
    r" group=(?P<group>'[^']*'|None) op=(?P<op>'[^']*'|None) resource=(?P<resource>'[^']*'|None)"
    r" \| content=(?P<content>.*)$"
)


@dataclass
class Block:
    """One frame of the capture and everything logged about it."""

    line: int
    direction: str  # "edge->cloud" or "cloud->edge"
    opcode: int | None = None
    declared_length: int | None = None
    raw_hex: str = ""
    raw_byte_count: int | None = None
    raw_complete: bool = True
    payload: bytes | None = None
    fields: str = ""
    notes: list[str] = field(default_factory=list)


def parse_capture(text: str) -> list[Block]:
    blocks: list[Block] = []
    current: Block | None = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _PREFIX.match(line)
        if not match:
            current = None  # comments, blank lines, scenario titles end a frame
            continue
        body = match.group(1)
        if found := _RECEIVED.match(body):
            current = Block(
                number,
                "edge->cloud",
                opcode=int(found.group(3)),
                declared_length=int(found.group(5)),
            )
            blocks.append(current)
        elif found := _SENT.match(body):
            current = Block(number, "cloud->edge", fields=found.group(2))
            blocks.append(current)
        elif body.startswith("->"):
            current = None  # a control frame we sent (WS ping): nothing to decode
        elif current is None:
            continue
        elif found := _RAW.match(body):
            current.raw_byte_count = int(found.group(1)) if found.group(1) else None
            current.raw_hex = found.group(2)
            current.raw_complete = found.group(3) is None
        elif found := _PAYLOAD.match(body):
            current.payload = ast.literal_eval(found.group(1))
        elif found := _DECODED.match(body):
            current.fields = found.group(1)
        else:
            current.notes.append(body)
    return blocks


def expected_message(fields: str) -> tuple[Message, str]:
    """The message a ``decoded:`` line describes, and its content text as logged."""
    match = _FIELDS.match(fields)
    assert match, f"unparsed fields: {fields!r}"

    def text(name: str) -> str:
        return ast.literal_eval(match.group(name)) or ""

    msg = Message(
        msg_id=match.group("msg_id"),
        parent_msg_id=text("parent"),
        timestamp=int(match.group("ts")),
        resource_version=text("rv"),
        sync=match.group("sync") == "True",
        type=text("type"),
        source=text("source"),
        destination=text("dest"),
        group=text("group"),
        operation=text("op"),
        resource=text("resource"),
    )
    return msg, match.group("content")


class SpecExampleTests(SynchronousTestCase):
    """Protocol §10: one keepalive, byte by byte."""

    def test_10_1_websocket_json(self) -> None:
        payload = parse_hexdump(SPEC_10_1_HEX)
        self.assertEqual(len(payload), 196)
        self.assertEqual(payload, SPEC_10_1_JSON.encode() + b"\n")
        self.assertEqual(encode(spec_keepalive()), payload)
        self.assertEqual(decode(payload), spec_keepalive())

    def test_10_1_masked_frame_example(self) -> None:
        # The spec's client frame with masking key 37 fa 21 3d; checks the test's frame parser.
        key = bytes.fromhex("37fa213d")
        payload = encode(spec_keepalive())
        masked = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
        self.assertEqual(masked[:12], bytes.fromhex("4c d8 49 58 56 9e 44 4f 15 c0 5a 1f"))
        self.assertEqual(masked[-4:], bytes.fromhex("50 d8 5c 37"))
        frame = parse_ws_frame(bytes.fromhex("81 fe 00 c4") + key + masked)
        self.assertEqual((frame.fin, frame.opcode, frame.masked), (True, 1, True))
        self.assertEqual(decode(frame.payload), spec_keepalive())

    def test_10_2_packer_and_protobuf(self) -> None:
        self.assertEqual(len(SPEC_10_2_PROTOBUF), 93)
        self.assertEqual(message_to_protobuf(spec_keepalive()), SPEC_10_2_PROTOBUF)
        self.assertEqual(
            encode_frame(spec_keepalive()), SPEC_10_2_PACKER_HEADER + SPEC_10_2_PROTOBUF
        )
        self.assertEqual(message_from_protobuf(SPEC_10_2_PROTOBUF), spec_keepalive())

    def test_10_3_ack(self) -> None:
        ack = decode(
            b'{"header":{"msg_id":"B","parent_msg_id":"A","timestamp":1},"route":{"source":'
            b'"edgecontroller","group":"resource","operation":"response","resource":'
            b'"default/pod/nginx"},"content":"OK"}'
        )
        self.assertEqual((ack.parent_msg_id, ack.operation, ack.content), ("A", "response", "OK"))
        self.assertEqual(message_from_protobuf(message_to_protobuf(ack)).content, "OK")


class EdgecoreCaptureTests(SynchronousTestCase):
    """Every frame of shared/testdata/edgecore/ws-frames.txt."""

    def setUp(self) -> None:
        path = os.path.join(EDGECORE_DIR, "ws-frames.txt")
        if not os.path.exists(path):
            raise SkipTest(
                f"edgecore capture not found at {os.path.normpath(path)}: the shared/ folder"
                " must sit beside the checkout (CI always has it)"
            )
        with open(path, encoding="utf-8") as handle:
            self.blocks = parse_capture(handle.read())

    def check_block(self, block: Block) -> str:
        """Checks one frame; returns what was checked, for the tally."""
        where = f"ws-frames.txt line {block.line}"
        frame = None
        if block.raw_hex:
            raw = bytes.fromhex(block.raw_hex)
            if block.raw_byte_count is not None and block.raw_complete:
                self.assertEqual(len(raw), block.raw_byte_count, where)
            elif block.raw_byte_count is not None:
                self.assertLess(len(raw), block.raw_byte_count, where)
            frame = parse_ws_frame(raw, complete=block.raw_complete)
            self.assertTrue(frame.fin, where)
            self.assertEqual(frame.masked, block.direction == "edge->cloud", where)
            if block.opcode is not None:
                self.assertEqual(frame.opcode, block.opcode, where)
            block.opcode = frame.opcode
            if block.declared_length is not None:
                self.assertEqual(frame.declared_length, block.declared_length, where)
            if block.payload is not None:
                self.assertTrue(block.payload.startswith(frame.payload), where)
                if frame.complete:
                    self.assertEqual(frame.payload, block.payload, where)
        if block.direction == "cloud->edge" and block.opcode is None:
            block.opcode = 1
        if block.opcode not in (1, 2):
            self.assertFalse(block.fields, where)
            return "control"
        self.assertTrue(block.fields, f"{where}: data frame without decoded fields")
        expected, content_text = expected_message(block.fields)

        payload = block.payload
        if payload is None:
            # Only the start of the frame was logged: check what we have, byte for byte.
            assert frame is not None and not frame.complete, where
            self.assertTrue(content_text.endswith("..."), where)
            self.assertEqual(encode(expected)[: len(frame.payload)], frame.payload, where)
            return "partial"
        if block.declared_length is not None:
            self.assertEqual(len(payload), block.declared_length, where)

        for variant in (payload, payload.decode("utf-8")):
            msg = decode(variant)
            self.assertEqual(msg.copy(content=None), expected, where)
        if content_text.endswith("..."):
            shown = content_text[:-3]
            self.assertEqual(json.dumps(msg.content)[: len(shown)], shown, where)
        else:
            content: Any = json.loads(content_text)
            self.assertEqual(msg.content, content, where)
        # What edgecore (Go) wrote, our encoder writes back byte for byte.
        self.assertEqual(encode(msg), payload, where)
        # And the protobuf lane keeps every field it can carry.
        self.assertEqual(
            message_from_protobuf(message_to_protobuf(msg)),
            msg.copy(resource_version="", destination="", type=""),
            where,
        )
        return "decoded"

    def test_every_frame(self) -> None:
        tally: dict[str, int] = {}
        for block in self.blocks:
            kind = self.check_block(block)
            tally[kind] = tally.get(kind, 0) + 1
        # 11 data frames logged in full (7 keepalives, the pod insert, 2 ACKs, the blank
        # shutdown message), 1 logged only in part (the binary pod update), 2 control frames
        # (a pong and a close).
        self.assertEqual(tally, {"decoded": 11, "partial": 1, "control": 2})

    def test_capture_has_the_interesting_frames(self) -> None:
        decoded = [
            decode(block.payload)
            for block in self.blocks
            if block.payload is not None and block.fields
        ]
        operations = {msg.operation for msg in decoded}
        self.assertEqual(operations, {"keepalive", "insert", "response", ""})
        self.assertTrue(any(msg.is_empty for msg in decoded))
        self.assertTrue(any(msg.content == "OK" and msg.parent_msg_id for msg in decoded))
