"""Fuzzing: malformed input makes every decoder raise DecodeError and nothing else.

Seeded mutations of valid encodings (truncation, bit flips, inserted, deleted and repeated
bytes, splices, fields of the wrong JSON type, hostile protobuf fields), at least 10,000 inputs
per decoder. Reproducible: a failure names the seed and the input.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cloudhub.errors import DecodeError
from cloudhub.model import Message
from cloudhub.wire import (
    FrameDecoder,
    PackerDecoder,
    decode,
    encode,
    encode_frame,
    message_from_protobuf,
    message_to_protobuf,
    pack,
)

SEED = 0x5EED_C10D
INPUTS_PER_DECODER = 10_000

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "nginx",
        "namespace": "default",
        "uid": "6f1a5c2e",
        "resourceVersion": "12345",
        "labels": {"app": "nginx"},
    },
    "spec": {"nodeName": "edge-node-1", "containers": [{"name": "nginx", "image": "nginx:1.25"}]},
}
CORPUS = [
    Message(
        msg_id="38093ac5-ce00-444e-aee8-875ca222eaef",
        timestamp=1795878356372,
        source="websocket",
        group="resource",
        operation="keepalive",
        resource="node",
        content="ping",
    ),
    Message(
        msg_id="93d202e2",
        parent_msg_id="83f9679b",
        timestamp=1795878376381,
        source="edgecontroller",
        group="resource",
        operation="response",
        resource="default/pod/nginx",
        content="OK",
    ),
    Message(
        msg_id="83f9679b",
        timestamp=1795878376375,
        resource_version="12345",
        source="edgecontroller",
        group="resource",
        operation="insert",
        resource="default/pod/nginx",
        content=POD,
    ),
    Message(),
    Message(
        msg_id="é<&>\u2028",
        timestamp=-(2**63),
        parent_msg_id="p",
        resource_version="1",
        sync=True,
        type="t",
        source="s",
        destination="d",
        group="g",
        operation="o",
        resource="r",
        content=[1, -2.5e-300, None, True, {"漢": "😀"}, []],
    ),
]
JSON_PALETTE = b'{}[]":,\\ \n0123456789.eE+-tfnrulsa\x00\x7f\x80\xbf\xc0\xe2\xed\xf0\xff'
WRONG_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    1.0,
    1e300,
    2**63,
    -(2**63) - 1,
    2**200,
    "",
    "x",
    "1",
    [],
    [1],
    {},
    {"a": 1},
    "\u2028",
    "\ud800",
]
HEADER_KEYS = ["msg_id", "parent_msg_id", "timestamp", "resourceversion", "sync", "type"]
ROUTE_KEYS = ["source", "destination", "group", "operation", "resource"]


def mutate_bytes(rng: random.Random, data: bytes, palette: bytes, others: list[bytes]) -> bytes:
    """One to three random byte-level mutations."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        size = len(buffer)
        kind = rng.randrange(7)
        if kind == 0 and size:  # truncate
            del buffer[rng.randrange(size) :]
        elif kind == 1 and size:  # flip bits
            for _ in range(rng.randint(1, 4)):
                buffer[rng.randrange(size)] ^= 1 << rng.randrange(8)
        elif kind == 2:  # insert bytes
            at = rng.randint(0, size)
            buffer[at:at] = bytes(rng.choice(palette) for _ in range(rng.randint(1, 8)))
        elif kind == 3 and size:  # delete a slice
            start = rng.randrange(size)
            del buffer[start : start + rng.randint(1, 16)]
        elif kind == 4 and size:  # repeat a slice
            start = rng.randrange(size)
            buffer[start:start] = buffer[start : start + rng.randint(1, 32)] * rng.randint(1, 4)
        elif kind == 5:  # splice with another valid encoding
            other = rng.choice(others)
            buffer = buffer[: rng.randint(0, size)] + other[rng.randint(0, len(other)) :]
        else:  # overwrite a byte
            if size:
                buffer[rng.randrange(size)] = rng.choice(palette)
    return bytes(buffer)


def wrong_type_document(rng: random.Random, msg: Message) -> bytes:
    """A valid message's JSON with one part replaced by a value of a random type."""
    document = json.loads(encode(msg))
    target = rng.randrange(4)
    value = rng.choice(WRONG_VALUES)
    if target == 0:
        document["header"][rng.choice(HEADER_KEYS)] = value
    elif target == 1:
        document["route"][rng.choice(ROUTE_KEYS)] = value
    elif target == 2:
        document[rng.choice(["header", "route"])] = value
    else:
        document = rng.choice([value, [document], document["header"]])
    return json.dumps(document, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def hostile_protobuf(rng: random.Random) -> bytes:
    """Hand-made protobuf: random tags and wire types, lying lengths, deep groups, bad UTF-8."""
    kind = rng.randrange(5)
    if kind == 0:  # random fields with random wire types
        out = bytearray()
        for _ in range(rng.randint(1, 6)):
            number, wire = rng.choice([1, 2, 3, 4, 5, 15, 16, 2**29 - 1, 0]), rng.randrange(8)
            out += varint((number << 3) | wire)
            if wire == 0:
                out += varint(rng.getrandbits(rng.choice([7, 64, 70])))
            elif wire == 1:
                out += rng.randbytes(rng.choice([8, 3]))
            elif wire == 2:
                body = rng.randbytes(rng.randint(0, 12))
                out += varint(len(body) + rng.choice([0, 0, 1, -1 if body else 0, 2**31])) + body
            elif wire == 5:
                out += rng.randbytes(rng.choice([4, 2]))
        return bytes(out)
    if kind == 1:  # deep or unbalanced groups
        depth = rng.choice([1, 50, 99, 100, 101, 1000, 20000])
        return b"\x0b" * depth + b"\x0c" * rng.choice([depth, depth - 1, 0])
    if kind == 2:  # a string field of header or router that is not UTF-8
        bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"a\x80", b"\xf4\x90\x80\x80"])
        inner = varint((rng.randint(1, 4) << 3) | 2) + varint(len(bad)) + bad
        return varint((rng.randint(1, 2) << 3) | 2) + varint(len(inner)) + inner
    if kind == 3:  # nested length larger than the outer one
        return b"\x0a\x02\x0a\x10abc"
    return rng.randbytes(rng.randint(0, 64))


def fuzz(
    case: SynchronousTestCase,
    make_input: Callable[[], bytes],
    run: Callable[[bytes], object],
    rejections: int = INPUTS_PER_DECODER,
) -> tuple[int, int]:
    """Runs inputs until ``rejections`` of them raised DecodeError; fails on any other exception.

    Not every mutation is malformed (a flipped bit inside a string is still a message), so the
    loop counts the inputs that were rejected, up to five times as many tries. Returns
    (inputs tried, inputs rejected).
    """
    tried = rejected = 0
    unexpected: list[str] = []
    while rejected < rejections and tried < 5 * rejections:
        data = make_input()
        tried += 1
        try:
            run(data)
        except DecodeError:
            rejected += 1
        except Exception as error:  # noqa: BLE001 - any other exception is the bug we hunt
            if len(unexpected) < 5:
                unexpected.append(f"{type(error).__name__}: {error} for {data[:200]!r}")
    if unexpected:
        case.fail(
            f"seed {SEED:#x}: decoders raised other than DecodeError:\n" + "\n".join(unexpected)
        )
    case.assertGreaterEqual(rejected, rejections, f"only {rejected} of {tried} inputs malformed")
    return tried, rejected


class JsonFuzzTests(SynchronousTestCase):
    def test_malformed_json_raises_only_decode_error(self) -> None:
        rng = random.Random(SEED)
        valid = [encode(msg) for msg in CORPUS]

        def make_input() -> bytes:
            kind = rng.random()
            if kind < 0.55:
                return mutate_bytes(rng, rng.choice(valid), JSON_PALETTE, valid)
            if kind < 0.9:
                return wrong_type_document(rng, rng.choice(CORPUS))
            return rng.randbytes(rng.randint(0, 40))

        def run(data: bytes) -> None:
            # Whatever decodes must be re-encodable (issue 18: a 1e999 that decoded to
            # infinity could never be written again, and the message vanished).
            encode(decode(data))
            encode(decode(data.decode("utf-8", "replace")))  # and as a text frame

        fuzz(self, make_input, run)

    def test_values_out_of_range_are_refused_not_taken(self) -> None:
        """Numbers past float64 and lone surrogate escapes as valid messages' content: every
        one is refused with DecodeError, none is taken."""
        rng = random.Random(SEED + 4)
        valid = [encode(msg) for msg in CORPUS]
        bad = [b"1e999", b"-1E400", b"9e+308", b"0.1e310", b'"\\ud800"', b'"a\\udfff"']

        def make_input() -> bytes:
            data = rng.choice(valid)
            # "content" is the last key: replace its value, or wrap the bad one in an array.
            head = data[: data.index(b'"content":') + len(b'"content":')]
            value = rng.choice(bad)
            return head + (value if rng.random() < 0.5 else b"[1," + value + b"]") + b"}\n"

        def run(data: bytes) -> None:
            encode(decode(data))

        tried, rejected = fuzz(self, make_input, run, rejections=500)
        self.assertEqual(tried, rejected)


class PackerFuzzTests(SynchronousTestCase):
    def test_malformed_streams_raise_only_decode_error(self) -> None:
        rng = random.Random(SEED + 1)
        frames = [encode_frame(msg) for msg in CORPUS] + [pack(b""), pack(b"\x00" * 70)]
        palette = bytes(range(256))

        def make_input() -> bytes:
            stream = b"".join(rng.choice(frames) for _ in range(rng.randint(1, 4)))
            return mutate_bytes(rng, stream, palette, frames)

        def run(data: bytes) -> None:
            limit = rng.choice([0, 16, 64, 1024, 1 << 20])
            cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 4)))
            chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            decoder = PackerDecoder(max_payload_size=limit)
            for chunk in chunks:
                for _ in decoder.feed(chunk):
                    pass
            decoder.finish()

        fuzz(self, make_input, run)

    def test_malformed_streams_through_frame_decoder(self) -> None:
        rng = random.Random(SEED + 2)
        frames = [encode_frame(msg) for msg in CORPUS]
        palette = bytes(range(256))

        def make_input() -> bytes:
            stream = b"".join(rng.choice(frames) for _ in range(rng.randint(1, 3)))
            return mutate_bytes(rng, stream, palette, frames)

        def run(data: bytes) -> None:
            decoder = FrameDecoder(max_payload_size=rng.choice([64, 4096]))
            cut = rng.randint(0, len(data))
            for chunk in (data[:cut], data[cut:]):
                for msg in decoder.feed(chunk):
                    self.assertIsInstance(msg, Message)
            decoder.finish()

        fuzz(self, make_input, run, rejections=3_000)


class ProtobufFuzzTests(SynchronousTestCase):
    def test_malformed_protobuf_raises_only_decode_error(self) -> None:
        rng = random.Random(SEED + 3)
        valid = [message_to_protobuf(msg) for msg in CORPUS]
        palette = bytes(range(256))

        def make_input() -> bytes:
            if rng.random() < 0.6:
                return mutate_bytes(rng, rng.choice(valid), palette, valid)
            return hostile_protobuf(rng)

        def run(data: bytes) -> None:
            msg = message_from_protobuf(data)
            # Whatever decoded must be re-encodable on both lanes.
            encode(msg)
            message_to_protobuf(msg)

        fuzz(self, make_input, run)
