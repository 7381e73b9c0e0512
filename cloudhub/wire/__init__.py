"""Pure codecs between :class:`~cloudhub.model.Message` and bytes; no I/O, no Twisted.

Two lanes (protocol §2, §2.5, §3):

* WebSocket, what a stock edgecore v1.15 speaks: one JSON document per WebSocket message,
  :func:`encode` / :func:`decode` (:mod:`cloudhub.wire.jsonlane`).
* QUIC: viaduct protobuf inside 10-byte packer frames, :func:`encode_frame` /
  :class:`FrameDecoder`, built from :func:`message_to_protobuf` / :func:`message_from_protobuf`
  (:mod:`cloudhub.wire.protobuf`) and :func:`pack` / :class:`PackerDecoder`
  (:mod:`cloudhub.wire.packer`).

What raises :class:`DecodeError` (the only exception raised for bad input):

* :func:`decode`: invalid UTF-8, not exactly one JSON object, a field of the wrong type
  (the message names the field), a timestamp that is not an int64, a ``msg_id`` or
  ``parent_msg_id`` over :data:`cloudhub.model.MAX_MSG_ID_LENGTH` characters; its subclass
  :class:`InvalidValue` for well-formed JSON the hub refuses to carry: a number outside
  float64 (``1e999``) or a lone surrogate escape (``"\\ud800"``). :func:`unmarshal_value`
  (one JSON value, what the HTTP API reads) refuses the same values; for a document judged
  part by part (an API batch), :func:`unmarshal_unchecked` keeps them and
  :func:`value_problem` says which part holds one;
* :meth:`PackerDecoder.feed` / :meth:`FrameDecoder.feed`: a frame length over
  ``max_payload_size`` (sticky: the stream cannot be resynchronised); ``finish()``: the stream
  ended inside a frame;
* :func:`message_from_protobuf` and :meth:`FrameDecoder.feed`: bytes that are not a valid
  viaduct protobuf ``Message``, an id over the length limit, and (:class:`InvalidValue`)
  JSON content holding a value :func:`decode` refuses.

The encoders raise ``TypeError``/``ValueError`` only for messages the format cannot carry (a
timestamp outside int64, content that is not JSON-serialisable): bugs of the caller.
"""

from cloudhub.errors import DecodeError
from cloudhub.wire.jsonlane import (
    InvalidValue,
    decode,
    encode,
    marshal_value,
    unmarshal_unchecked,
    unmarshal_value,
    value_problem,
)
from cloudhub.wire.packer import (
    DEFAULT_MAX_PAYLOAD_SIZE,
    HEADER_SIZE,
    PackerDecoder,
    pack,
)
from cloudhub.wire.protobuf import (
    FrameDecoder,
    encode_frame,
    message_from_protobuf,
    message_to_protobuf,
    protobuf_backend,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "HEADER_SIZE",
    "DecodeError",
    "FrameDecoder",
    "InvalidValue",
    "PackerDecoder",
    "decode",
    "encode",
    "encode_frame",
    "marshal_value",
    "message_from_protobuf",
    "message_to_protobuf",
    "pack",
    "protobuf_backend",
    "unmarshal_unchecked",
    "unmarshal_value",
    "value_problem",
]
