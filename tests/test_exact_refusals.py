"""Issue 18, finding 3 and part of 11: input the hub cannot carry faithfully is refused, exactly.

* numbers outside float64 (``1e999``, a 400-digit integer) and ``NaN`` / ``Infinity``;
* strings holding a lone UTF-16 surrogate escape (``"\\ud800"``), which are not Unicode text;
* a ``msg_id`` / ``parent_msg_id`` longer than :data:`cloudhub.model.MAX_MSG_ID_LENGTH`.

From the API: 400 naming the problem (in a batch, that entry is ``invalid`` and the others are
judged as usual). From an edge: the connection is closed with 1007, on either lane, because
both decode with the same codec.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cloudhub import wire
from cloudhub.api import parse_message
from cloudhub.errors import DecodeError
from cloudhub.interfaces import CLOSE_INVALID_PAYLOAD
from cloudhub.model import MAX_MSG_ID_LENGTH, Message
from cloudhub.transport.quic import STREAM_PREFIX, MessageStreamReader, QuicStreamError
from cloudhub.wire import message_from_protobuf, message_to_protobuf, pack

from .test_api import ApiTestCase, _ndjson, pod_body, wait_for
from .test_transport_websocket import (
    RecordingHandler,
    Unit,
    client_frame,
    close_of,
    parse_frames,
)

# Each: (a JSON value as text, what the refusal says). Valid JSON text for the first group;
# NaN / Infinity are not JSON at all but Python's json module reads them by default.
OUT_OF_RANGE = ["1e999", "-1e999", "1E400", "123456789e301", "1.5e+309", "-0.1e310"]
# Integers Go cannot read into a float64: refused from the API (they would go to Go edges).
BIG_INTEGERS = ["1" + "0" * 400, "-" + "9" * 309, "1" + "0" * 5000]
NOT_JSON_CONSTANTS = ["NaN", "Infinity", "-Infinity"]
NON_FINITE = OUT_OF_RANGE + NOT_JSON_CONSTANTS + BIG_INTEGERS
LONE_SURROGATES = ['"\\ud800"', '"a\\uDFFFb"', '"\\udbff\\u0041"', '"\\ude00\\ud83d"']
LONG_ID = "x" * (MAX_MSG_ID_LENGTH + 1)


def message_text(content: str, msg_id: str = "m-1", parent: str = "") -> bytes:
    """A wire JSON message (§1.1) whose content is ``content`` verbatim."""
    header = f'"msg_id":{json.dumps(msg_id)},"timestamp":1700000000000'
    if parent:
        header += f',"parent_msg_id":{json.dumps(parent)}'
    return (
        f'{{"header":{{{header}}},"route":{{"source":"edged","group":"meta",'
        f'"operation":"update","resource":"default/podstatus/p"}},'
        f'"content":{{"status":{{"x":[1,{content}]}}}}}}'
    ).encode()


class DecodeRefusalTests(SynchronousTestCase):
    """cloudhub.wire.decode: the edge lane's codec (and the store's)."""

    def test_numbers_outside_float64_are_refused(self) -> None:
        for number in OUT_OF_RANGE:
            error = self.assertRaises(DecodeError, wire.decode, message_text(number))
            self.assertIn("out of range", str(error), number)
            self.assertIn(number[:20], str(error))

    def test_nan_and_infinity_are_refused(self) -> None:
        for constant in NOT_JSON_CONSTANTS:
            error = self.assertRaises(DecodeError, wire.decode, message_text(constant))
            self.assertIn(constant.lstrip("-"), str(error))

    def test_lone_surrogates_are_refused(self) -> None:
        for text in LONE_SURROGATES:
            error = self.assertRaises(DecodeError, wire.decode, message_text(text))
            self.assertIn("surrogate", str(error), text)
        # In a key, and in a header field, too.
        error = self.assertRaises(
            DecodeError, wire.decode, b'{"header":{"msg_id":"\\ud800"},"content":null}'
        )
        self.assertIn("surrogate", str(error))
        self.assertRaises(DecodeError, wire.decode, message_text('{"\\uD800":1}'))

    def test_surrogate_pairs_and_big_finite_numbers_still_decode(self) -> None:
        msg = wire.decode(message_text('"\\ud83d\\ude00", 1.7976931348623157e308, 1e-999, 2.5'))
        self.assertEqual(
            msg.content, {"status": {"x": [1, "\U0001f600", 1.7976931348623157e308, 0.0, 2.5]}}
        )
        self.assertEqual(
            wire.decode(message_text("9" * 308)).content["status"]["x"][1], int("9" * 308)
        )

    def test_msg_id_length_is_bounded(self) -> None:
        longest = "y" * MAX_MSG_ID_LENGTH
        msg = wire.decode(message_text("1", msg_id=longest, parent=longest))
        self.assertEqual((msg.msg_id, msg.parent_msg_id), (longest, longest))
        for data, field in (
            (message_text("1", msg_id=LONG_ID), "header.msg_id"),
            (message_text("1", parent=LONG_ID), "header.parent_msg_id"),
            (message_text("1", msg_id="z" * 100_000), "header.msg_id"),
        ):
            error = self.assertRaises(DecodeError, wire.decode, data)
            self.assertIn(field, str(error))
            self.assertIn(str(MAX_MSG_ID_LENGTH), str(error))
            self.assertLess(len(str(error)), 200)  # the id itself is not repeated

    def test_stored_messages_with_long_ids_still_load(self) -> None:
        """The sync store keeps wire JSON; messages it took before the limit existed must
        still load at start-up (``trusted``), while the same bytes from an edge are refused."""
        data = wire.encode(Message(msg_id=LONG_ID, parent_msg_id=LONG_ID, content=None))
        self.assertRaises(DecodeError, wire.decode, data)
        self.assertEqual(wire.decode(data, trusted=True).msg_id, LONG_ID)
        # Values are never trusted: the encoder cannot write what decode would refuse.
        self.assertRaises(DecodeError, wire.decode, message_text("1e999"), trusted=True)

    def test_integers_outside_float64(self) -> None:
        """Exact in Python, so taken from an edge (no hook on the hot path); refused where
        they would go to a Go edge (the API reads with ``float64_ints``)."""
        for text in BIG_INTEGERS[:2]:
            self.assertEqual(wire.decode(message_text(text)).content["status"]["x"][1], int(text))
            error = self.assertRaises(
                wire.InvalidValue, wire.unmarshal_value, f"[{text}]", float64_ints=True
            )
            self.assertIn("out of range", str(error))
        error = self.assertRaises(
            wire.InvalidValue, wire.unmarshal_value, BIG_INTEGERS[2], float64_ints=True
        )
        self.assertIn("(5001 characters)", str(error))
        largest = str(int(1.7976931348623157e308))
        self.assertEqual(wire.unmarshal_value(largest, float64_ints=True), int(largest))

    def test_unmarshal_value_refuses_the_same(self) -> None:
        for text in NON_FINITE + LONE_SURROGATES:
            self.assertRaises(DecodeError, wire.unmarshal_value, f"[{text}]", float64_ints=True)


class ProtobufRefusalTests(SynchronousTestCase):
    """The QUIC lane carries content as JSON bytes: refused the same way (1007)."""

    def proto(self, content: bytes, msg_id: str = "m-1", parent: str = "") -> bytes:
        data = message_to_protobuf(
            Message(msg_id=msg_id, parent_msg_id=parent, group="meta", content="")
        )
        # Field 3 (Content, bytes) appended by hand: our encoder would never write such bytes.
        return data + b"\x1a" + bytes([len(content)]) + content

    def test_content_with_non_finite_numbers_or_lone_surrogates_is_refused(self) -> None:
        for text in OUT_OF_RANGE[:4] + LONE_SURROGATES:
            for content in (f'{{"a":{text}}}', f"[{text}]"):
                error = self.assertRaises(
                    DecodeError, message_from_protobuf, self.proto(content.encode())
                )
                self.assertIn("content", str(error))

    def test_content_that_is_not_json_stays_text(self) -> None:
        # As before: KubeEdge keeps content bytes; what does not parse is kept as text.
        self.assertEqual(message_from_protobuf(self.proto(b'{"a":NaN}')).content, '{"a":NaN}')
        self.assertEqual(message_from_protobuf(self.proto(b"1e999")).content, "1e999")

    def test_msg_id_length_is_bounded(self) -> None:
        longest = "y" * MAX_MSG_ID_LENGTH
        msg = message_from_protobuf(self.proto(b"{}", msg_id=longest, parent=longest))
        self.assertEqual((msg.msg_id, msg.parent_msg_id), (longest, longest))
        for data, field in (
            (self.proto(b"{}", msg_id=LONG_ID), "header.msg_id"),
            (self.proto(b"{}", parent=LONG_ID), "header.parent_msg_id"),
        ):
            error = self.assertRaises(DecodeError, message_from_protobuf, data)
            self.assertIn(field, str(error))

    def test_quic_stream_closes_with_1007(self) -> None:
        bad = self.proto(b'{"a":1e999}')
        reader = MessageStreamReader(4, 1 << 20, expect_prefix=True)
        with self.assertRaises(QuicStreamError) as caught:
            list(reader.feed(STREAM_PREFIX + pack(bad)))
        self.assertEqual(caught.exception.code, CLOSE_INVALID_PAYLOAD)
        self.assertIn("out of range", caught.exception.reason)


class WebSocketRefusalTests(SynchronousTestCase):
    """A WebSocket edge that sends such a message is closed with 1007 and the reason."""

    def setUp(self) -> None:
        self.handler = RecordingHandler()
        self.unit = Unit(self.handler, max_message_size=1 << 20)
        self.protocol, self.transport, self.connection = self.unit.open()

    def assertClosed1007(self, payload: bytes, pattern: str) -> None:
        self.protocol.dataReceived(client_frame(payload))
        frames, _ = parse_frames(self.transport.value())
        self.assertEqual(frames[-1][0], 8)
        code, reason = close_of(frames[-1][2])
        self.assertEqual(code, CLOSE_INVALID_PAYLOAD)
        self.assertRegex(reason, pattern)
        self.assertEqual(self.handler.messages("edge-node-1"), [])

    def test_1e999(self) -> None:
        self.assertClosed1007(message_text("1e999"), "^message holds a number out of range")

    def test_infinity(self) -> None:
        self.assertClosed1007(message_text("-Infinity"), "Infinity")

    def test_lone_surrogate(self) -> None:
        self.assertClosed1007(message_text('"\\ud800"'), "surrogate")

    def test_long_msg_id(self) -> None:
        self.assertClosed1007(message_text("1", msg_id="z" * 100_000), "header.msg_id")


class ParseMessageRefusalTests(SynchronousTestCase):
    def test_parse_message_names_the_problem(self) -> None:
        from cloudhub.api import ApiError

        for content, expected in (
            ("1e999", "out of range"),
            ("NaN", "NaN"),
            ('"\\ud800"', "surrogate"),
        ):
            body = message_text(content)
            error = self.assertRaises(ApiError, parse_message, body)
            self.assertEqual(error.code, 400)
            self.assertIn(expected, error.message)


class ApiRefusalTests(ApiTestCase):
    async def test_single_message_400_and_nothing_stored(self) -> None:
        await self.start_hub()
        bodies: list[tuple[bytes, str]] = []
        for text in NON_FINITE:
            body = json.dumps(pod_body("uid-1", "1")).replace(
                '"kind": "Pod"', f'"kind": "Pod", "replicas": {text}'
            )
            # The refusal names the number (its first digits) or the constant.
            bodies.append((body.encode(), text.lstrip("-")[:10]))
        for text in LONE_SURROGATES:
            body = json.dumps(pod_body("uid-1", "1")).replace('"nginx"', text, 1)
            bodies.append((body.encode(), "surrogate"))
        long_id = pod_body("uid-1", "1")
        long_id["header"]["msg_id"] = "m" * 60_000  # the test hub's body limit: 64 KiB
        bodies.append((json.dumps(long_id).encode(), "header.msg_id"))
        long_parent = pod_body("uid-1", "1")
        long_parent["header"]["parent_msg_id"] = LONG_ID
        bodies.append((json.dumps(long_parent).encode(), "header.parent_msg_id"))
        for body, expected in bodies:
            reply = await self.post("edge-1", body)
            self.assertEqual(reply.code, 400, (body[:200], reply.body))
            self.assertIn(expected, reply.json["error"], body[:200])
            self.assertLess(len(reply.body), 500)
        self.assertEqual(await self.objects("edge-1"), [])
        # A message at the limits is fine.
        ok = pod_body("uid-1", "1")
        ok["header"]["msg_id"] = "m" * MAX_MSG_ID_LENGTH
        ok["content"]["spec"] = {"x": 1.7976931348623157e308, "face": "\U0001f600"}
        reply = await self.post("edge-1", json.dumps(ok).encode())  # ensure_ascii: a pair
        self.assertEqual(reply.code, 202, reply.body)

    def batch_entries(self) -> tuple[list[bytes], list[str]]:
        """Entries as JSON texts, and the status each should get."""

        def entry(uid: str, **replace: Any) -> str:
            body = pod_body(uid, "1", name=uid)
            text = json.dumps({"node": "edge-b", "message": body})
            for old, new in replace.items():
                text = text.replace(old, new, 1)
            return text

        entries = [entry("u0")]
        statuses = ["accepted"]
        for i, text in enumerate(NON_FINITE + LONE_SURROGATES):
            entries.append(entry(f"bad{i}", **{'"Pod"': text}))
            statuses.append("invalid")
            entries.append(entry(f"u{i + 1}"))
            statuses.append("accepted")
        long_id = {"node": "edge-b", "message": pod_body("u-long", "1", name="u-long")}
        long_id["message"]["header"]["msg_id"] = LONG_ID
        entries.append(json.dumps(long_id))
        statuses.append("invalid")
        return [e.encode() for e in entries], statuses

    async def test_batch_array_reports_the_bad_entries_invalid(self) -> None:
        await self.start_hub()
        entries, statuses = self.batch_entries()
        body = b"[" + b",".join(entries) + b"]"
        reply = await self.call(b"POST", "/v1/messages", body)
        self.assertEqual(reply.code, 200, reply.body[:500])
        results = reply.json["results"]
        self.assertEqual([r["status"] for r in results], statuses)
        self.assertEqual(reply.json["accepted"], statuses.count("accepted"))
        for result, status in zip(results, statuses, strict=True):
            if status == "invalid":
                self.assertRegex(result["error"], "out of range|surrogate|msg_id")
        self.assertIn("msg_id", results[-1]["error"])
        uids = sorted(o["uid"] for o in await self.objects("edge-b"))
        self.assertEqual(uids, sorted(f"u{i}" for i in range(statuses.count("accepted"))))

    async def test_batch_array_deep_entry_with_a_bad_value(self) -> None:
        """Walking a suspect batch cannot fail the batch: a too deep entry is that entry's."""
        await self.start_hub()
        depth = 900  # the scanner reads it; a walk from inside the API might not
        deep = '{"node":"n","message":' + "[" * depth + "1e999" + "]" * depth + "}"
        good = json.dumps({"node": "edge-d", "message": pod_body("uid-d", "1")})
        reply = await self.call(b"POST", "/v1/messages", f"[{good},{deep}]".encode())
        self.assertEqual(reply.code, 200, reply.body[:300])
        self.assertEqual([r["status"] for r in reply.json["results"]], ["accepted", "invalid"])

    async def test_batch_ndjson_reports_the_bad_entries_invalid(self) -> None:
        await self.start_hub()
        entries, statuses = self.batch_entries()
        reply = await self.call(
            b"POST",
            "/v1/messages",
            b"\n".join(entries),
            headers={b"content-type": b"application/x-ndjson"},
        )
        self.assertEqual(reply.code, 200, reply.body[:500])
        self.assertEqual([r["status"] for r in reply.json["results"]], statuses)
        self.assertEqual(len(await self.objects("edge-b")), statuses.count("accepted"))

    async def test_unexpected_error_in_a_batch_is_that_entrys_fate_not_a_500(self) -> None:
        """Whatever goes wrong while one entry is judged, the answer reports every entry:
        never a 500 after others were accepted."""
        from cloudhub import api as api_module

        self.patch(api_module, "BATCH_SLICE", 3)
        await self.start_hub()
        upstream = self.hub.upstream
        send_many = upstream.send_many

        def failing_for_poison(entries: Any) -> Any:
            entries = list(entries)
            if any(message.resource.endswith("/poison") for _, message in entries):
                raise RuntimeError("a bug")
            return send_many(entries)

        self.patch(upstream, "send_many", failing_for_poison)
        names = ["a", "b", "poison", "c", "d", "e", "f"]
        entries = [
            {"node": "edge-p", "message": pod_body(f"uid-{name}", "1", name=name)} for name in names
        ]
        for ndjson in (False, True):
            node = "edge-p" if not ndjson else "edge-q"
            for entry in entries:
                entry["node"] = node
            body = _ndjson(entries) if ndjson else json.dumps(entries).encode()
            headers = {b"content-type": b"application/x-ndjson"} if ndjson else None
            reply = await self.call(b"POST", "/v1/messages", body, headers=headers)
            self.assertEqual(reply.code, 200, reply.body)
            results = reply.json["results"]
            self.assertEqual(
                [r["status"] for r in results],
                ["accepted", "accepted", "error", "accepted", "accepted", "accepted", "accepted"],
            )
            self.assertIn("internal error", results[2]["error"])
            self.assertEqual((reply.json["accepted"], reply.json["refused"]), (6, 1))
            objects = await self.objects(node)
            self.assertEqual(len(objects), 6)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)  # logged once a batch

    async def test_edge_value_refused_never_reaches_the_event_stream(self) -> None:
        """The edge lane refuses at decode, so nothing half-delivered reaches subscribers."""
        await self.start_hub()
        heard: list[Any] = []
        self.hub.upstream.subscribe(lambda node, msg: heard.append(msg))
        node = await self.join("edge-e", reconnect=False)
        closed = node.when_disconnected()
        assert node.protocol is not None
        node.protocol.send_payload(message_text("1e999"))
        info = await closed
        assert info is not None
        self.assertEqual(info.code, CLOSE_INVALID_PAYLOAD)
        self.assertIn("out of range", info.reason)
        await wait_for(lambda: not self.hub.upstream.is_connected("edge-e"))
        self.assertEqual(heard, [])


class StoredBeforeTheLimitTests(SynchronousTestCase):
    """A message the store took before the msg_id limit existed still loads at start-up."""

    def test_long_msg_id_in_the_store_loads(self) -> None:
        import os

        from cloudhub.store import SQLiteSyncStore

        from .test_store import ManualPool, ThreadlessReactor

        path = os.path.join(os.path.abspath(self.mktemp()), "cloudhub.db")
        store = SQLiteSyncStore(path, ThreadlessReactor(), threadpool=ManualPool(run_at_once=True))
        message = Message(msg_id=LONG_ID, content={"metadata": {"uid": "u"}})
        store.put_pending("edge-1", "u", message, "Pod", "default", "p")
        self.successResultOf(store.close())
        reopened = SQLiteSyncStore(
            path, ThreadlessReactor(), threadpool=ManualPool(run_at_once=True)
        )
        [record] = reopened.load()
        assert record.pending is not None
        self.assertEqual(record.pending.msg_id, LONG_ID)
        self.successResultOf(reopened.close())
