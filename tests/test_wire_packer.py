"""Viaduct packer framing: 10-byte header, incremental reader (§2.5)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cloudhub.errors import DecodeError
from cloudhub.wire import HEADER_SIZE, PackerDecoder, pack


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)], strict=True)]


def feed_all(decoder: PackerDecoder, chunks: list[bytes]) -> list[bytes]:
    return [payload for chunk in chunks for payload in decoder.feed(chunk)]


class PackTests(SynchronousTestCase):
    def test_header_as_kubeedge_writes_it(self) -> None:
        self.assertEqual(HEADER_SIZE, 10)
        self.assertEqual(pack(b"x" * 93)[:10], bytes.fromhex("01010100 01 00 0000005d"))
        self.assertEqual(pack(b"abc"), bytes.fromhex("01010100 01 00 00000003") + b"abc")
        self.assertEqual(pack(b""), bytes.fromhex("01010100 01 00 00000000"))

    def test_big_length_is_big_endian(self) -> None:
        self.assertEqual(pack(bytes(0x012345))[6:10], bytes.fromhex("00012345"))


class PackerDecoderTests(SynchronousTestCase):
    def test_whole_frames(self) -> None:
        decoder = PackerDecoder()
        self.assertEqual(
            list(decoder.feed(pack(b"a") + pack(b"") + pack(b"bc"))), [b"a", b"", b"bc"]
        )
        self.assertEqual(decoder.buffered, 0)
        decoder.finish()

    def test_byte_by_byte(self) -> None:
        stream = pack(b"hello") + pack(b"world!")
        decoder = PackerDecoder()
        self.assertEqual(feed_all(decoder, [bytes([b]) for b in stream]), [b"hello", b"world!"])

    def test_partial_frame_waits(self) -> None:
        decoder = PackerDecoder()
        frame = pack(b"payload")
        self.assertEqual(list(decoder.feed(frame[:12])), [])
        self.assertEqual(decoder.buffered, 12)
        self.assertRaises(DecodeError, decoder.finish)
        self.assertEqual(list(decoder.feed(frame[12:])), [b"payload"])
        decoder.finish()

    def test_version_type_and_flags_are_not_checked(self) -> None:
        # KubeEdge's reader ignores them; so do we (documented in packer.py).
        frame = bytes.fromhex("09080706 04 80 00000002") + b"ok"
        self.assertEqual(list(PackerDecoder().feed(frame)), [b"ok"])

    def test_oversized_length_fails_at_the_header(self) -> None:
        decoder = PackerDecoder(max_payload_size=100)
        self.assertEqual(list(decoder.feed(pack(b"x" * 100))), [b"x" * 100])
        header = pack(b"y" * 101)[:HEADER_SIZE]
        error = self.assertRaises(DecodeError, list, decoder.feed(header))
        self.assertIn("101", str(error))
        self.assertIn("100", str(error))
        self.assertEqual(decoder.buffered, 0)

    def test_error_is_sticky(self) -> None:
        decoder = PackerDecoder(max_payload_size=10)
        huge = bytes.fromhex("01010100 01 00 ffffffff")
        self.assertRaises(DecodeError, list, decoder.feed(huge))
        self.assertRaises(DecodeError, decoder.feed, pack(b"ok"))
        self.assertRaises(DecodeError, decoder.finish)

    def test_frames_before_a_bad_header_are_delivered(self) -> None:
        decoder = PackerDecoder(max_payload_size=10)
        got: list[bytes] = []

        def consume() -> None:
            for payload in decoder.feed(pack(b"one") + pack(b"two") + pack(b"x" * 11)):
                got.append(payload)

        self.assertRaises(DecodeError, consume)
        self.assertEqual(got, [b"one", b"two"])

    def test_default_maximum(self) -> None:
        decoder = PackerDecoder()
        self.assertEqual(decoder.max_payload_size, 8 * 1024 * 1024)
        over = bytes.fromhex("01010100 01 00 00800001")  # 8 MiB + 1
        self.assertRaises(DecodeError, list, decoder.feed(over))

    def test_frames_not_iterated_come_out_next_time(self) -> None:
        decoder = PackerDecoder()
        first = decoder.feed(pack(b"a") + pack(b"b"))
        self.assertEqual(next(first), b"a")
        self.assertEqual(list(decoder.feed(pack(b"c"))), [b"b", b"c"])

    def test_negative_maximum_is_refused(self) -> None:
        self.assertRaises(ValueError, PackerDecoder, -1)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.binary(max_size=300), max_size=12),
        st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    )
    def test_any_split_gives_the_same_payloads(
        self, payloads: list[bytes], cuts: list[int]
    ) -> None:
        stream = b"".join(pack(payload) for payload in payloads)
        decoder = PackerDecoder(max_payload_size=300)
        self.assertEqual(feed_all(decoder, split(stream, cuts)), payloads)
        self.assertEqual(decoder.buffered, 0)
        decoder.finish()
