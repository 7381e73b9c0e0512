"""The WebSocket lane: one beehive message as one JSON document (protocol §1.1, §1.2, §2.1).

edgecore v1.15 writes each message with gorilla's ``WriteJSON``, i.e. Go's ``json.Marshal`` of
``model.Message`` followed by ``"\\n"``, and reads with ``ReadJSON``. :func:`encode` reproduces
those bytes exactly (key order, omitempty, no spaces, Go's HTML-safe escaping), so a captured
frame and our frame can be compared byte for byte. :func:`decode` accepts what Go accepts and
turns everything else into :class:`~cloudhub.errors.DecodeError`.

Where we deliberately differ from Go (all on input Go would never produce):

* invalid UTF-8 is a :class:`DecodeError` (Go would substitute U+FFFD inside strings), and so
  is a string holding a lone UTF-16 surrogate escape such as ``"\\ud800"``
  (:class:`InvalidValue`; Go would substitute U+FFFD): it is not Unicode text;
* a number with a fraction or exponent outside float64 (``1e999``) is an
  :class:`InvalidValue` (Python would read infinity, which JSON cannot write back; Go fails
  when it reads the number into a message's content, a float64). Integers are read exactly,
  so a huge one is harmless coming from an edge and taken; :func:`unmarshal_value` with
  ``float64_ints`` (the HTTP API, whose messages go to Go edges) refuses integers past
  float64 too. ``NaN`` and ``Infinity``, which Python's json reads by default, are not JSON;
* ``msg_id`` and ``parent_msg_id`` longer than :data:`cloudhub.model.MAX_MSG_ID_LENGTH`
  characters are a :class:`DecodeError` (KubeEdge writes 36-character UUIDs), except in
  messages the hub stored itself (``decode(..., trusted=True)``);
* anything after the JSON document other than whitespace is a :class:`DecodeError` (Go's
  streaming decoder would leave it unread);
* keys are matched exactly; Go also matches ``"MSG_ID"`` to ``msg_id`` (case-insensitive), we
  ignore such keys like any other unknown key.

Content is written the Python way where Go's output depends on Go types we do not have, none of
which a JSON reader can tell apart: dict keys keep their insertion order (Go sorts the keys of a
map, but keeps a struct's field order), floats are written by ``repr`` (Go switches to exponent
form at other magnitudes), and ``\\b``/``\\f`` get short escapes, as Go 1.22+ does.
"""

from __future__ import annotations

import base64
import json
import json.encoder
from typing import Any

from cloudhub.errors import DecodeError
from cloudhub.model import MAX_MSG_ID_LENGTH as _MAX_ID
from cloudhub.model import Message, msg_id_problem

__all__ = [
    "InvalidValue",
    "decode",
    "encode",
    "marshal_value",
    "unmarshal_unchecked",
    "unmarshal_value",
    "value_problem",
]


class InvalidValue(DecodeError):
    """Well-formed JSON holding a value the hub refuses to carry.

    A number outside float64 (``1e999``: Python would read infinity, which JSON cannot write
    back, and Go cannot read it at all) or a string with a lone UTF-16 surrogate escape
    (``"\\ud800"``: not Unicode text). The message starts with ``holds``, to follow a subject
    ("message holds ...", "request body holds ...").
    """


_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# C implementation of a JSON string literal, quotes included, non-ASCII left as is.
_quote = json.encoder.encode_basestring


def _go_default(value: Any) -> Any:
    """Marshal what plain JSON lacks the way Go does: a ``[]byte`` becomes base64 text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"content of type {type(value).__name__} cannot be marshalled to JSON")


# Built once: json.dumps() with non-default options builds a new encoder on every call.
_content_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_go_default
)
_marshal_content = _content_encoder.encode


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN/Infinity; they are not JSON and Go rejects them.
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


_INFINITY = float("inf")
# A JSON integer of more digits than this may not fit in a float64 (max ~1.8e308, 309 digits).
_FLOAT64_DIGITS = 309


_RANGE = "numbers must be finite and fit in a float64: no NaN, no Infinity"


def _number_text(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def _out_of_range(text: str) -> InvalidValue:
    return InvalidValue(f"holds a number out of range: {_number_text(text)} ({_RANGE})")


def _finite_float(text: str) -> float:
    # Called by the scanner only for numbers with a fraction or an exponent: rare in
    # KubeEdge messages, absent from keepalives and ACKs. Text in JSON number syntax never
    # reads as NaN, only as infinity (past float64).
    value = float(text)
    if value - value:  # nan for an infinity, 0.0 otherwise
        raise _out_of_range(text)
    return value


def _finite_int(text: str) -> int:
    if len(text) > _FLOAT64_DIGITS - 1 and float(text) in (_INFINITY, -_INFINITY):
        raise _out_of_range(text)
    return int(text)


# The C scanner itself: JSONDecoder.decode() would add two regex matches per message. It
# calls _finite_float only for numbers with a fraction or exponent (none in a keepalive or an
# ACK); a parse_int hook would cost every message ~5 % (one Python call per integer), so
# integers are checked only where they go to Go edges (the API: ``float64_ints``).
_scan = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_constant=_reject_constant, parse_float=_finite_float
).scan_once
_scan_float64_ints = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_finite_int
).scan_once
_WHITESPACE = " \t\n\r"  # JSON's whitespace; str.strip() would also take other characters


# --- encoding ----------------------------------------------------------------------------------


def _go_escape(text: str) -> bytes:
    """UTF-8 bytes of JSON text, with the escapes Go's ``json.Marshal`` adds (HTML-safe output).

    ``<``, ``>``, ``&``, U+2028 and U+2029 can only occur inside string literals of JSON text,
    so replacing them everywhere is exact. Lone surrogates (a Python ``str`` can hold them, a Go
    string cannot) become U+FFFD, which is what Go writes for invalid UTF-8.
    """
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    if not text.isascii():
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return _replace_surrogates(text).encode("utf-8")
    return text.encode("ascii")


def _replace_surrogates(text: str) -> str:
    return "".join("\ufffd" if "\ud800" <= char <= "\udfff" else char for char in text)


def _content_text(content: Any) -> str:
    if content is None:
        return "null"
    if content.__class__ is str:
        return _quote(content)
    return _marshal_content(content)


def _check_timestamp(timestamp: Any) -> int:
    if timestamp.__class__ is not int:
        if isinstance(timestamp, bool) or not isinstance(timestamp, int):
            raise TypeError(f"timestamp must be an int, not {type(timestamp).__name__}")
        timestamp = int(timestamp)
    if not _INT64_MIN <= timestamp <= _INT64_MAX:
        raise ValueError(f"timestamp {timestamp} does not fit in int64")
    return timestamp  # type: ignore[no-any-return]


def encode(msg: Message) -> bytes:
    """The payload of one WebSocket message: Go's ``json.Marshal`` of the message, plus ``\\n``.

    Key order and omitempty follow §1.1: ``header`` {msg_id, parent_msg_id?, timestamp,
    resourceversion?, sync?, type?}, ``route`` {source?, destination?, group?, operation?,
    resource?} (always present, possibly ``{}``), ``content`` (``null`` when ``None``).
    ``sync`` is written when true; clearing it before a write (§2.4) is the transport's job.

    Raises ``TypeError``/``ValueError`` for a message JSON cannot carry (a timestamp that is not
    an int64, content that is not JSON-serialisable, NaN): programming errors, not wire errors.
    """
    parts = ['{"header":{"msg_id":', _quote(msg.msg_id)]
    if msg.parent_msg_id:
        parts += (',"parent_msg_id":', _quote(msg.parent_msg_id))
    parts += (',"timestamp":', str(_check_timestamp(msg.timestamp)))
    if msg.resource_version:
        parts += (',"resourceversion":', _quote(msg.resource_version))
    if msg.sync:
        parts.append(',"sync":true')
    if msg.type:
        parts += (',"type":', _quote(msg.type))
    route: list[str] = []
    if msg.source:
        route += ('"source":', _quote(msg.source))
    if msg.destination:
        route += (',"destination":' if route else '"destination":', _quote(msg.destination))
    if msg.group:
        route += (',"group":' if route else '"group":', _quote(msg.group))
    if msg.operation:
        route += (',"operation":' if route else '"operation":', _quote(msg.operation))
    if msg.resource:
        route += (',"resource":' if route else '"resource":', _quote(msg.resource))
    parts.append('},"route":{')
    parts += route
    parts += ('},"content":', _content_text(msg.content), "}\n")
    return _go_escape("".join(parts))


def marshal_value(value: Any) -> bytes:
    """Go's ``json.Marshal`` of one JSON value (no newline): how KubeEdge turns non-string
    content into bytes (``GetContentData``, §1.2), used by the protobuf translator."""
    return _go_escape(_content_text(value))


# --- decoding ----------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_SURROGATE = "a string with a lone UTF-16 surrogate escape such as \\ud800 (not Unicode text)"
_OUT_OF_RANGE = f"a number out of range ({_RANGE})"


def _find(value: Any, path: str) -> tuple[str, str] | None:
    """(where, what) of the first part of ``value`` the hub refuses, or None."""
    kind = value.__class__
    if kind is str:
        return (path, _SURROGATE) if _has_surrogate(value) else None
    if kind is float:  # inf - inf and nan - nan are nan
        return (path, _OUT_OF_RANGE) if value - value != 0 else None
    if kind is int:
        if value.bit_length() > 1023 and float(str(value)) in (_INFINITY, -_INFINITY):
            return path, _OUT_OF_RANGE
        return None
    if kind is list:
        for index, item in enumerate(value):
            found = _find(item, f"{path}[{index}]")
            if found is not None:
                return found
    elif kind is dict:
        for key, item in value.items():
            if _has_surrogate(key):
                return f"a key of {path or 'the document'}", _SURROGATE
            found = _find(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    return None


def value_problem(value: Any, path: str = "") -> str | None:
    """What makes a parsed JSON value one the hub refuses (see :class:`InvalidValue`), and
    where (``path`` names ``value``, e.g. ``"message"``), as ``"<where> holds <what>"``; None
    when there is nothing. For values from :func:`unmarshal_unchecked`:
    :func:`unmarshal_value` refuses them itself.
    """
    found = _find(value, path)
    if found is None:
        return None
    where, what = found
    return f"{where or 'the document'} holds {what}"


def _may_hold_surrogates(text: str) -> bool:
    # Lone surrogates can only come from \uDxxx escapes; skip the walk when there are none.
    return "\\u" in text and ("\\ud" in text or "\\uD" in text)


def _scan_text(text: str, scan: Any) -> Any:
    if text[:1] in _WHITESPACE:  # also true for "", which the scanner then rejects
        text = text.lstrip(_WHITESPACE)
    try:
        value, end = scan(text, 0)
    except StopIteration as stop:
        raise DecodeError(f"not valid JSON: expecting a value at char {stop.value}") from None
    except ValueError as error:  # json.JSONDecodeError, int digit limits, NaN/Infinity
        raise DecodeError(f"not valid JSON: {error}") from None
    except RecursionError:
        raise DecodeError("not valid JSON: nested too deeply") from None
    if end != len(text) and text[end:].strip(_WHITESPACE):
        raise DecodeError(f"not valid JSON: extra data at char {end}")
    return value


def unmarshal_value(text: str, *, float64_ints: bool = False) -> Any:
    """One JSON value from text, read as Go's ``json.Unmarshal`` into ``interface{}`` would.

    Raises :class:`DecodeError` for anything that is not exactly one JSON value, and its
    subclass :class:`InvalidValue` for JSON the hub refuses to carry: a number with a fraction
    or exponent outside float64 (``1e999``), a lone surrogate escape; with ``float64_ints``
    also an integer outside float64 (310 digits or more), which a Go edge cannot read into
    a message's content (Python reads it exactly, so it is harmless coming from an edge).
    """
    # _scan_text inlined: this is every message's path (keepalives included).
    if text[:1] in _WHITESPACE:  # also true for "", which the scanner then rejects
        text = text.lstrip(_WHITESPACE)
    try:
        value, end = (_scan_float64_ints if float64_ints else _scan)(text, 0)
    except StopIteration as stop:
        raise DecodeError(f"not valid JSON: expecting a value at char {stop.value}") from None
    except ValueError as error:  # json.JSONDecodeError, int digit limits, NaN/Infinity
        raise DecodeError(f"not valid JSON: {error}") from None
    except RecursionError:
        raise DecodeError("not valid JSON: nested too deeply") from None
    if end != len(text) and text[end:].strip(_WHITESPACE):
        raise DecodeError(f"not valid JSON: extra data at char {end}")
    # Lone surrogates can only come from \uDxxx escapes; skip the walk when there are none.
    if "\\u" in text and ("\\ud" in text or "\\uD" in text):
        try:
            found = _find(value, "")
        except RecursionError:
            raise DecodeError("not valid JSON: nested too deeply") from None
        if found is not None:
            where, what = found
            raise InvalidValue(f"holds {what}{' at ' + where if where else ''}")
    return value


def unmarshal_unchecked(text: str) -> tuple[Any, bool]:
    """Like :func:`unmarshal_value`, but what :class:`InvalidValue` refuses is kept (numbers
    out of range, NaN and Infinity as floats or ints, lone surrogates as they are), for a
    caller that judges parts of a document on their own (an API batch, entry by entry).

    Returns the value and whether it may hold such parts: when True, check each part with
    :func:`value_problem`; when False, nothing in it needs checking.
    """
    suspect: list[str] = []

    def lenient_float(number: str) -> float:
        value = float(number)
        if value == _INFINITY or value == -_INFINITY:
            suspect.append(number)
        return value

    def lenient_int(number: str) -> int | float:
        if len(number) > _FLOAT64_DIGITS - 1:
            suspect.append(number)
            value = float(number)
            if value == _INFINITY or value == -_INFINITY:
                return value  # int() would refuse more than 4300 digits
        return int(number)

    def lenient_constant(name: str) -> float:
        suspect.append(name)
        return float(name)

    scan = json.JSONDecoder(  # type: ignore[attr-defined]
        parse_constant=lenient_constant, parse_float=lenient_float, parse_int=lenient_int
    ).scan_once
    value = _scan_text(text, scan)
    return value, bool(suspect) or _may_hold_surrogates(text)


def _bad_type(field: str, expected: str, value: Any) -> DecodeError:
    return DecodeError(f"{field} must be {expected}, not {_json_type(value)} {value!r:.40}")


def _string(value: Any, field: str) -> str:
    # Only reached when value is not a str; JSON null leaves Go's field at its zero value.
    if value is None:
        return ""
    raise _bad_type(field, "a string", value)


def _timestamp(value: Any) -> int:
    if value is None:
        return 0
    if value.__class__ is int:  # out of range
        raise DecodeError(f"header.timestamp {value} does not fit in int64")
    # Go reads int64 with strconv.ParseInt: 1.0 and 1e3 are rejected like 1.5.
    raise _bad_type("header.timestamp", "an integer", value)


def _part(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    raise _bad_type(field, "an object", value)


def decode(data: bytes | bytearray | memoryview | str, *, trusted: bool = False) -> Message:
    """A :class:`Message` from one WebSocket message, text or binary, ``\\n`` or not (§2.1).

    Accepts the blank message edgecore writes when it shuts down. Unknown keys are ignored
    and JSON ``null`` leaves a field at its default, as Go does. Raises :class:`DecodeError`,
    naming the field, for invalid UTF-8, text that is not one JSON object, a field of the
    wrong type (``timestamp`` must be an integer that fits in int64), a ``msg_id`` or
    ``parent_msg_id`` over :data:`~cloudhub.model.MAX_MSG_ID_LENGTH` characters (unless
    ``trusted``: what the hub wrote itself, e.g. the sync store's messages, which may predate
    the limit); and :class:`InvalidValue` for a number outside float64 or a lone surrogate
    escape, anywhere.
    """
    if data.__class__ is not str:
        try:
            data = str(data, "utf-8")  # type: ignore[arg-type]
        except UnicodeDecodeError as error:
            raise DecodeError(
                f"message is not valid UTF-8 (byte {error.start}: {error.reason})"
            ) from None
    try:
        document = unmarshal_value(data)
    except InvalidValue as error:
        raise InvalidValue(f"message {error}") from None
    except DecodeError as error:
        raise DecodeError(f"message is {error}") from None
    if document.__class__ is not dict:
        raise DecodeError(f"message must be a JSON object, not {_json_type(document)}")

    header = document.get("header")
    if header.__class__ is not dict:
        header = _part(header, "header")
    route = document.get("route")
    if route.__class__ is not dict:
        route = _part(route, "route")

    msg_id = header.get("msg_id")
    if msg_id.__class__ is not str:
        msg_id = _string(msg_id, "header.msg_id")
    parent = header.get("parent_msg_id")
    if parent.__class__ is not str:
        parent = _string(parent, "header.parent_msg_id")
    timestamp = header.get("timestamp")
    if timestamp.__class__ is not int or not _INT64_MIN <= timestamp <= _INT64_MAX:
        timestamp = _timestamp(timestamp)
    version = header.get("resourceversion")
    if version.__class__ is not str:
        version = _string(version, "header.resourceversion")
    sync = header.get("sync")
    if sync.__class__ is not bool:
        if sync is not None:
            raise _bad_type("header.sync", "a boolean", sync)
        sync = False
    kind = header.get("type")
    if kind.__class__ is not str:
        kind = _string(kind, "header.type")

    source = route.get("source")
    if source.__class__ is not str:
        source = _string(source, "route.source")
    destination = route.get("destination")
    if destination.__class__ is not str:
        destination = _string(destination, "route.destination")
    group = route.get("group")
    if group.__class__ is not str:
        group = _string(group, "route.group")
    operation = route.get("operation")
    if operation.__class__ is not str:
        operation = _string(operation, "route.operation")
    resource = route.get("resource")
    if resource.__class__ is not str:
        resource = _string(resource, "route.resource")
    if (len(msg_id) > _MAX_ID or len(parent) > _MAX_ID) and not trusted:
        raise DecodeError(msg_id_problem(msg_id, parent) or "")

    return Message(
        msg_id=msg_id,
        timestamp=timestamp,
        parent_msg_id=parent,
        resource_version=version,
        sync=sync,
        type=kind,
        source=source,
        destination=destination,
        group=group,
        operation=operation,
        resource=resource,
        content=document.get("content"),
    )
