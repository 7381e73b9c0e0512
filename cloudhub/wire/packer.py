"""Viaduct's packer framing: a 10-byte header before each payload (protocol §2.5).

Used on QUIC streams (and by KubeEdge's unused ``WSLane``), never on a stock v1.15 WebSocket.
The header, big-endian::

    offset 0  u32  version  01 01 01 00  (1.1.1: major<<24 | minor<<16 | fix<<8)
    offset 4  u8   type     01           (message; 02 stream and 04 user-defined are unused)
    offset 5  u8   flags    00           (80 = compressed is defined but never set)
    offset 6  u32  length   of the payload that follows

Like KubeEdge's reader, :class:`PackerDecoder` does not check version, type or flags: it reads
10 bytes, then exactly ``length`` bytes. Only the length is checked, against a maximum, because
a stream peer must not make us buffer gigabytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from cloudhub.errors import DecodeError

__all__ = [
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "HEADER_SIZE",
    "PACKER_VERSION",
    "PackerDecoder",
    "TYPE_MESSAGE",
    "pack",
]

HEADER_SIZE = 10
PACKER_VERSION = 0x01010100  # 1.1.1
TYPE_MESSAGE = 0x01
FLAGS_NONE = 0x00
# Go sets no limit (u32 lengths, up to 4 GiB); ours matches config.py's maxMessageSize default.
DEFAULT_MAX_PAYLOAD_SIZE = 8 * 1024 * 1024
_MAX_U32 = 0xFFFFFFFF

_header = struct.Struct(">IBBI")
_pack_header = _header.pack
_unpack_length = struct.Struct(">I").unpack_from


def pack(payload: bytes) -> bytes:
    """``payload`` behind the header KubeEdge writes: version 1.1.1, type message, no flags."""
    size = len(payload)
    if size > _MAX_U32:
        raise ValueError(f"payload of {size} bytes does not fit the packer's u32 length")
    return _pack_header(PACKER_VERSION, TYPE_MESSAGE, FLAGS_NONE, size) + payload


class PackerDecoder:
    """Cuts a byte stream into payloads, whatever way the stream was split into chunks.

    Feed every chunk to :meth:`feed` and iterate the result. A length above
    ``max_payload_size`` raises :class:`DecodeError` as soon as its header is read, before any
    of the payload is buffered. A stream cannot be resynchronised after that, so the error is
    sticky: every later :meth:`feed` raises it again. Drop the connection.
    """

    __slots__ = ("_buffer", "_error", "max_payload_size")

    def __init__(self, max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE) -> None:
        if max_payload_size < 0:
            raise ValueError(f"max_payload_size must not be negative, not {max_payload_size}")
        self.max_payload_size = max_payload_size
        self._buffer = bytearray()
        self._error: DecodeError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """Add ``data`` to the stream; yields each payload completed so far, in order.

        The bytes are taken at once; payloads are cut while the result is iterated, so the
        payloads before a bad header are still delivered before the :class:`DecodeError`.
        Payloads not iterated stay buffered and come out of the next call's iterator.
        """
        if self._error is not None:
            raise self._error
        self._buffer += data
        return self._payloads()

    def _payloads(self) -> Iterator[bytes]:
        buffer = self._buffer
        limit = self.max_payload_size
        while len(buffer) >= HEADER_SIZE:
            if self._error is not None:
                raise self._error
            (length,) = _unpack_length(buffer, 6)
            if length > limit:
                self._error = DecodeError(
                    f"packer frame announces a payload of {length} bytes,"
                    f" over the maximum of {limit}"
                )
                buffer.clear()
                raise self._error
            end = HEADER_SIZE + length
            if len(buffer) < end:
                return
            payload = bytes(buffer[HEADER_SIZE:end])
            # bytearray drops a prefix in O(1) (it moves its start), so per-frame deletes are cheap.
            del buffer[:end]
            yield payload

    @property
    def buffered(self) -> int:
        """Bytes held: frames not yet yielded and the start of the next one."""
        return len(self._buffer)

    def finish(self) -> None:
        """Call at the end of the stream: raises :class:`DecodeError` if it ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self._buffer:
            raise DecodeError(
                f"stream ended inside a packer frame ({len(self._buffer)} bytes left)"
            )
