"""The QUIC transport: viaduct's QUIC lane over standard QUIC (RFC 9000, TLS 1.3) (§2.5, §3).

KubeEdge's QUIC is Google QUIC, which no Python stack speaks (quic.txt); ours is IETF QUIC via
aioquic's sans-IO :class:`~aioquic.quic.connection.QuicConnection`, driven here by one Twisted
:class:`~twisted.internet.protocol.DatagramProtocol` on ``cloudHub.quic.address:port``
(design.md, Decisions). It carries exactly KubeEdge's framing, so an edge that speaks standard
QUIC (``cloudhub.edge.quic`` first) uses it; a stock edgecore cannot (its gQUIC ``Q044``
datagrams are dropped, with a rate-limited log line saying so).

Handshake and identity:

* ALPN ``kubeedge-viaduct`` (:data:`ALPN`); a client offering no or another ALPN fails the
  TLS handshake.
* TLS 1.3 with the hub's server certificate. A client certificate is **required** and verified
  against the hub's CA (:meth:`CertificateAuthority.verify_client_certificate`) as soon as the
  handshake completes, before anything the client sends on a stream is read. aioquic 1.7 asks
  for a client certificate only through a private flag of its TLS context and checks only the
  CertificateVerify signature, not the chain (:class:`HubQuicConnection`; aioquic is pinned
  ``>=1.7.0,<1.8`` and :func:`check_aioquic` fails loudly if those internals move).
  A connection without a certificate, or with one our CA did not sign, or expired, is closed
  with application error 1008 and the reason.
* The first client-initiated bidirectional stream (id 0) is the **control stream** (§3): the
  client writes one packer frame, route ``{resource: "header", operation: "header"}``, content
  the JSON of a Go ``http.Header`` map (``{"Node_id":["edge1"],"Project_id":["..."]}``; keys
  in any case, values lists of strings or strings). The hub answers on the same stream with
  ``operation: "response"``, content ``"ack"``; for content that is not such a map it answers
  ``"nack"`` and closes (1007); a header without ``node_id``, or whose (first) ``node_id`` is
  not a Kubernetes node name (:mod:`cloudhub.nodeid`), closes with 1008; so does, under
  ``node_identity`` ``enforce`` (:mod:`cloudhub.certs.identity`), a node id the client
  certificate does not name (``warn`` lets it in, logged and counted). Afterwards every
  non-response message on the control stream is answered with ``"ack"`` and not passed on.
* The whole setup (QUIC handshake + header) must finish within :data:`SETUP_TIMEOUT` seconds.
* A peer that leaves what the hub sends unread (flow control keeps it queued in aioquic) is
  closed with 1008 when more than ``max_output_buffer`` bytes are queued for it, or more than
  :data:`BACKLOG_MARK` for ``write_timeout`` seconds (checked at each transmit, so at the
  latest with its next packet or aioquic's next timer).

Message streams (§3): any other stream the client opens starts with the 3-byte ASCII prefix
``msg`` (``str``/``shr`` or anything else: 1007), then back-to-back packer frames (protobuf
messages); the client may open as many as ``maxIncomingStreams`` allows at once. The hub writes
all its messages on **one** server-initiated stream per connection, opened on its first write
(``msg`` prefix first), so the edge receives them in the order the core sent them. Messages on
different client streams have no order between them. A client may also write frames (without a
prefix) on the hub's stream, as viaduct reuses streams in both directions.

What crosses the wire, and what not (§2.5): protobuf has no ``resourceVersion``,
``destination`` or ``type``. A QUIC edge therefore sees neither the message's resourceVersion
(only the one inside the object's ``metadata``, which ``cloudhub.edge.quic`` uses) nor
destination/type; ``header.sync`` is cleared as on WebSocket (§2.4). Nothing of delivery
depends on them: the hub keeps each node's delivery state by ``msg_id`` and object UID, and an
ACK is matched by ``parent_msg_id``, which protobuf carries.

Contract towards the :class:`~cloudhub.interfaces.IConnectionHandler` is the WebSocket
transport's (see :mod:`cloudhub.transport.websocket`), with QUIC application error codes
equal to the WebSocket close codes:

* nothing is called for a connection that never completes the handshake, the certificate
  check or the header exchange;
* ``connection_made(conn)`` once, after the ``"ack"`` is queued; ``conn.send_message`` works
  from inside it. :class:`~cloudhub.errors.NodeRefused` closes with 1013 and the reason, and
  the handler hears nothing more (no ``connection_lost``); another exception closes with 1011;
* then ``message_received`` for every message, in stream order, until the connection starts
  closing (the hub's ``close``, the edge's CONNECTION_CLOSE, a bad stream prefix or frame:
  1007, a frame over ``hub.maxMessageSize``: 1009); ``connection_lost(conn, reason)`` exactly
  once, when aioquic reports the connection terminated (after the closing/draining period,
  or at the idle timeout), or when the listener stops.

I/O: datagrams are demultiplexed by destination connection ID; a client's first Initial
(≥ 1200 bytes, supported version) creates a connection only if it decrypts with the Initial
keys and aioquic then has something to answer: Initials that do not decrypt leave no state
behind and cost one AEAD check, and at most ``max_pending_handshakes`` connections may be
mid-setup at once. Unsupported versions get a
Version Negotiation packet (only for datagrams of ≥ 1200 bytes, so it never amplifies);
``retry=True`` validates client addresses with Retry packets first. Each connection has one
reactor timer (aioquic's ``get_timer``), re-armed after every transmit; everything queued in
one reactor turn (stream writes, ACKs, timers' work) is transmitted by one ``callLater(0)``
flush for the whole transport.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoError, CryptoPair
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.quic.stream import QuicStreamSender
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.identity import DEFAULT_MODE, NodeIdentity
from cloudhub.config import HubConfig
from cloudhub.errors import CertificateError, CloudHubError, DecodeError, NodeRefused
from cloudhub.interfaces import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    IConnection,
    IConnectionHandler,
)
from cloudhub.listening import ListeningService
from cloudhub.model import OP_HEADER, OP_RESPONSE, Message, new_response
from cloudhub.nodeid import validate_node_id
from cloudhub.transport.websocket import (
    DEFAULT_MAX_OUTPUT_BUFFER,
    DEFAULT_WRITE_TIMEOUT,
    close_reason_bytes,
)
from cloudhub.wire import PackerDecoder, encode_frame, message_from_protobuf, protobuf_backend

__all__ = [
    "ALPN",
    "BACKLOG_MARK",
    "CLOSE_INTERNAL_ERROR",
    "MAX_PENDING_HANDSHAKES",
    "SETUP_TIMEOUT",
    "STREAM_PREFIX",
    "HeaderError",
    "HubQuicConnection",
    "MessageStreamReader",
    "check_protobuf",
    "QuicHubConnection",
    "QuicHubProtocol",
    "QuicListeningService",
    "QuicStats",
    "QuicStreamError",
    "check_aioquic",
    "header_message",
    "parse_header_message",
    "quic_listener",
    "server_configuration",
]

log = Logger()

# The injected reactor: IReactorTime (callLater, seconds) and, for the listener, IReactorUDP.
Reactor = Any

ALPN = "kubeedge-viaduct"
STREAM_PREFIX = b"msg"  # §3: the opener of a message stream writes it first
HEADER_RESOURCE = "header"
# edgecore's quic.handshakeTimeout is 30 s (§8.2); here it bounds first Initial -> header ack.
SETUP_TIMEOUT = 30.0
MAX_PENDING_HANDSHAKES = 1024
CLOSE_INTERNAL_ERROR = 1011
DEFAULT_MAX_MESSAGE_SIZE = 8 * 1024 * 1024
# UDP payloads up to 64 KiB are read whole (a truncated datagram would just fail to decrypt).
MAX_DATAGRAM_READ = 65535
SOCKET_BUFFER_SIZE = 4 * 1024 * 1024
# Bytes queued for a peer (sent and unacknowledged, or not yet sent) above which the write
# timeout runs, as Twisted's TCP transport pauses its producer above 64 KiB.
BACKLOG_MARK = 64 * 1024
# One warning per this many seconds about gQUIC (stock edgecore) and about a full setup table.
WARN_INTERVAL = 60.0

_FIRST_BYTE_LONG = 0x80


# --- aioquic internals we depend on ---------------------------------------------------------


def check_protobuf() -> None:
    """Refuse to start QUIC on protobuf's pure-Python runtime.

    Every QUIC message is a protobuf; the pure-Python runtime is ~27x slower than upb
    (performance-notes.md), enough to turn a busy hub into a stalled one. It is what one gets
    with ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` or on a platform without wheels.
    """
    backend = protobuf_backend()
    if backend != "upb":
        raise CloudHubError(
            f"the QUIC transport needs protobuf's upb runtime, found {backend!r} (~27x slower); "
            "unset PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION, or install a protobuf wheel for "
            "this platform, or set cloudHub.quic.enable: false"
        )


def check_aioquic() -> None:
    """Fail with a clear message if aioquic lacks the private internals this transport uses.

    aioquic (1.7) requests a client certificate only when its TLS context's
    ``_request_client_certificate`` is set (marked "for test purposes"), exposes the peer's
    certificate only as ``_peer_certificate``, and has no setting for the number of streams a
    peer may open (``_local_max_streams_bidi``/``_uni``). Without them the hub would accept
    clients without a certificate, so it must not start.
    """
    context = tls.Context(is_client=False)
    missing = [
        name
        for name in ("_request_client_certificate", "_peer_certificate")
        if not hasattr(context, name)
    ]
    if not callable(getattr(QuicConnection, "_initialize", None)):
        missing.append("QuicConnection._initialize")
    sender = QuicStreamSender(0, True)
    for name in ("_buffer_start", "_buffer_stop"):
        if not isinstance(getattr(sender, name, None), int):
            missing.append(f"QuicStreamSender.{name}")
    configuration = QuicConfiguration(is_client=True)
    probe = QuicConnection(configuration=configuration)
    if not isinstance(getattr(probe, "_streams", None), dict):
        missing.append("QuicConnection._streams")
    for name in ("_local_max_streams_bidi", "_local_max_streams_uni"):
        limit = getattr(probe, name, None)
        if limit is None or not hasattr(limit, "value") or not hasattr(limit, "sent"):
            missing.append(f"QuicConnection.{name}")
    if missing:
        raise CloudHubError(
            "this aioquic version lacks what the QUIC transport relies on to require client "
            f"certificates and limit streams and buffers ({', '.join(missing)}); "
            "install aioquic>=1.7,<1.8"
        )


class HubQuicConnection(QuicConnection):
    """aioquic's server connection, asking for a client certificate and limiting streams.

    ``max_incoming_streams`` is the number of bidirectional streams the client may have open
    at once (aioquic grants a new one as each closes); unidirectional streams are not part of
    the protocol and are refused (a client opening one gets STREAM_LIMIT_ERROR).
    """

    def __init__(self, *, max_incoming_streams: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Read by _initialize into the transport parameters; sent == value: nothing to raise.
        bidi = self._local_max_streams_bidi
        bidi.value = bidi.sent = max_incoming_streams
        uni = self._local_max_streams_uni
        uni.value = uni.sent = 0

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        # Private in aioquic 1.7 ("for test purposes only"): sends a CertificateRequest.
        # aioquic then checks only the CertificateVerify signature; the chain is ours to check.
        self.tls._request_client_certificate = True

    @property
    def peer_certificate(self) -> Any:
        """The certificate the client presented (a ``cryptography`` certificate) or None."""
        context = getattr(self, "tls", None)
        return None if context is None else context._peer_certificate


def server_configuration(
    authority: CertificateAuthority, idle_timeout: float = 60.0
) -> QuicConfiguration:
    """The hub's QUIC settings: its certificate and key, ALPN, idle timeout."""
    configuration = QuicConfiguration(
        is_client=False, alpn_protocols=[ALPN], idle_timeout=idle_timeout
    )
    configuration.certificate = authority.server_certificate
    configuration.private_key = load_pem_private_key(authority.server_key_pem, None)
    return configuration


# --- framing shared by the hub and the edge --------------------------------------------------


class QuicStreamError(CloudHubError):
    """A stream carried bytes the protocol does not allow; close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


class MessageStreamReader:
    """Messages from one QUIC stream: the ``msg`` prefix (if the peer opened the stream),
    then packer frames (§3), however the stream is cut into chunks.

    :meth:`feed` yields the messages completed so far and raises :class:`QuicStreamError`
    with 1007 for a wrong prefix or a frame that is not a message, 1009 for a frame over
    ``max_message_size``, after yielding the messages before it.
    """

    __slots__ = ("_prefix", "_packer", "stream_id")

    def __init__(self, stream_id: int, max_message_size: int, expect_prefix: bool) -> None:
        self.stream_id = stream_id
        self._prefix: bytes | None = b"" if expect_prefix else None
        self._packer = PackerDecoder(max_message_size)

    def feed(self, data: bytes) -> Iterator[Message]:
        prefix = self._prefix
        if prefix is not None:
            needed = len(STREAM_PREFIX) - len(prefix)
            prefix += data[:needed]
            data = data[needed:]
            if len(prefix) < len(STREAM_PREFIX):
                self._prefix = prefix
                return
            self._prefix = None
            if prefix != STREAM_PREFIX:
                raise QuicStreamError(
                    CLOSE_INVALID_PAYLOAD,
                    f"stream {self.stream_id} starts with {prefix!r}, not b'msg'"
                    " (only message streams are supported)",
                )
        if not data:
            return
        payloads = self._packer.feed(data)
        while True:
            try:
                payload = next(payloads)
            except StopIteration:
                return
            except DecodeError as error:  # the only framing error: a length over the limit
                raise QuicStreamError(CLOSE_TOO_BIG, f"stream {self.stream_id}: {error}") from None
            try:
                yield message_from_protobuf(payload)
            except DecodeError as error:
                raise QuicStreamError(
                    CLOSE_INVALID_PAYLOAD, f"stream {self.stream_id}: {error}"
                ) from None

    def finish(self) -> None:
        """The peer ended the stream: 1007 if it ended inside the prefix or a frame."""
        if self._prefix:
            raise QuicStreamError(
                CLOSE_INVALID_PAYLOAD, f"stream {self.stream_id} ended inside its prefix"
            )
        try:
            self._packer.finish()
        except DecodeError as error:
            raise QuicStreamError(
                CLOSE_INVALID_PAYLOAD, f"stream {self.stream_id}: {error}"
            ) from None


class HeaderError(CloudHubError):
    """The control stream's first message is not a header message (the hub answers "nack")."""


def header_message(node_id: str, project_id: str) -> Message:
    """What an edge writes first on the control stream (§3): Go's ``http.Header`` as JSON."""
    return Message.new(
        "", "", OP_HEADER, HEADER_RESOURCE, {"Node_id": [node_id], "Project_id": [project_id]}
    )


def parse_header_message(message: Message) -> dict[str, str]:
    """The headers of a control-stream header message, names lowercased, first values.

    Raises :class:`HeaderError` when the operation is not ``header`` or the content is not a
    JSON object of strings or lists of strings.
    """
    if message.operation != OP_HEADER:
        raise HeaderError(
            f"the first message on the control stream has operation {message.operation!r},"
            " not 'header'"
        )
    content = message.content
    if isinstance(content, (bytes, str)):
        try:
            content = json.loads(content)
        except ValueError:
            raise HeaderError("the header message content is not JSON") from None
    if not isinstance(content, dict):
        raise HeaderError("the header message content is not a JSON object")
    headers: dict[str, str] = {}
    for name, value in content.items():
        if isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise HeaderError(f"header {name!r} is not a list of strings")
            value = value[0] if value else ""
        elif not isinstance(value, str):
            raise HeaderError(f"header {name!r} is not a string or a list of strings")
        headers.setdefault(name.lower(), value.strip())
    return headers


def _initial_decrypts(header: Any, data: bytes, encrypted_offset: int) -> bool:
    """Whether a client's first Initial packet decrypts with the Initial keys of its
    destination CID (RFC 9001 §5.2), as aioquic would find out after building a connection."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    try:
        crypto.decrypt_packet(data[: header.packet_length], encrypted_offset, 0)
    except CryptoError:
        return False
    return True


def peer_string(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def close_reason(reason: str) -> str:
    """``reason`` cut to what fits a CONNECTION_CLOSE frame comfortably (as a WS close frame)."""
    return close_reason_bytes(reason).decode("utf-8")


def describe_termination(event: events.ConnectionTerminated) -> str:
    """One line for a ConnectionTerminated the peer caused (or an idle timeout)."""
    text = event.reason_phrase
    if event.frame_type is None:  # APPLICATION_CLOSE from the peer
        return f"{event.error_code}{': ' + text if text else ''}"
    if text == "Idle timeout":
        return "idle timeout (no packet from the peer)"
    return f"QUIC error 0x{event.error_code:x}{': ' + text if text else ''}"


# --- the connection the core sees -----------------------------------------------------------

# Life of a hub connection.
_HANDSHAKE = 0  # QUIC/TLS handshake running
_HEADER = 1  # handshake done, certificate accepted, waiting for the header message
_OPEN = 2  # header acked; in a session unless refused
_CLOSING = 3  # close() called or the peer closed; waiting for aioquic to terminate
_GONE = 4  # terminated: no timers, no table entries


@implementer(IConnection)
class QuicHubConnection:
    """One edge node's QUIC connection, as the core sees it (:class:`IConnection`), plus the
    per-connection state the listener keeps (aioquic connection, streams, timer)."""

    __slots__ = (
        "node_id",
        "project_id",
        "peer",
        "quic",
        "state",
        "in_session",
        "cids",
        "timer",
        "timer_at",
        "setup_timer",
        "readers",
        "control",
        "out_stream",
        "pending",
        "dirty",
        "closed_by_hub",
        "backlog_since",
        "_hub",
    )

    transport = "quic"

    def __init__(self, hub: QuicHubProtocol, quic: HubQuicConnection, peer: str) -> None:
        self.node_id = ""
        self.project_id = ""
        self.peer = peer
        self.quic = quic
        self.state = _HANDSHAKE
        self.in_session = False
        self.cids: set[bytes] = set()
        self.timer: IDelayedCall | None = None
        self.timer_at: float | None = None
        self.setup_timer: IDelayedCall | None = None
        self.readers: dict[int, MessageStreamReader] = {}
        self.control: MessageStreamReader | None = None
        self.out_stream: int | None = None
        # Frames queued this turn for the hub's message stream.
        self.pending: list[bytes] = []
        self.dirty = False
        self.closed_by_hub: tuple[int, str] | None = None
        # When the bytes queued for the peer last went over BACKLOG_MARK (None: under it).
        self.backlog_since: float | None = None
        self._hub = hub

    @property
    def is_open(self) -> bool:
        """True while ``send_message`` would write (header acked, no close started)."""
        return self.state == _OPEN

    def send_message(self, message: Message, encoded: bytes | None = None) -> None:
        """Queue ``message`` on the hub's message stream; transmitted at the end of the turn.

        ``encoded`` (the JSON lane's bytes) is of no use here: QUIC carries protobuf.

        Dropped (debug log) when the connection is closing or closed.
        """
        if self.state != _OPEN:
            log.debug(
                "node {node}: connection closed, message {msg_id} dropped",
                node=self.node_id,
                msg_id=message.msg_id,
            )
            return
        if message.sync:  # §2.4
            message = message.copy(sync=False)
        self.pending.append(encode_frame(message))
        if not self.dirty:
            self._hub.mark_dirty(self)

    def close(self, code: int, reason: str) -> None:
        """Close with application error ``code`` and ``reason`` after the queued messages;
        nothing if already closing."""
        if self.state >= _CLOSING:
            return
        self._hub.close_connection(self, code, reason)

    def __repr__(self) -> str:
        return f"<QuicHubConnection node={self.node_id!r} peer={self.peer}>"


# --- the UDP side ---------------------------------------------------------------------------


@dataclass(slots=True)
class QuicStats:
    """Counters of the QUIC listener (plain ints)."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    datagrams_dropped: int = 0  # unknown connection ID, unparsable, too small to start one
    send_errors: int = 0  # the socket refused a datagram (buffer full): QUIC resends
    version_negotiations: int = 0
    retries: int = 0
    bogus_initials: int = 0  # Initials aioquic could not use: no state kept
    gquic_datagrams: int = 0  # Google QUIC (stock edgecore): not supported
    handshakes_refused: int = 0  # no or unacceptable client certificate
    headers_refused: int = 0  # bad header message, no node id
    setup_timeouts: int = 0
    setups_dropped: int = 0  # new connections dropped: max_pending_handshakes reached
    stream_errors: int = 0
    output_overflows: int = 0  # more than max_output_buffer queued for a peer: closed
    write_timeouts: int = 0  # over BACKLOG_MARK queued for write_timeout seconds: closed
    # Node identity (cloudhub.certs.identity): refused under enforce (1008); let in under warn
    # with another node's certificate, or with one naming no node.
    identity_refused: int = 0
    identity_mismatches: int = 0
    identity_unnamed: int = 0


class QuicHubProtocol(DatagramProtocol):
    """Every QUIC connection of the hub on one UDP socket; see the module docstring.

    ``handler`` is told about nodes (:class:`IConnectionHandler`), ``authority`` judges client
    certificates, ``configuration`` is the server's :class:`QuicConfiguration` (built from
    ``authority`` when omitted), ``node_identity`` (``enforce``, ``warn``, ``off``) says what
    to do with a certificate that does not name the connecting node (:attr:`identity`).
    """

    noisy = False

    def __init__(
        self,
        handler: IConnectionHandler,
        authority: CertificateAuthority,
        reactor: Reactor,
        *,
        configuration: QuicConfiguration | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_incoming_streams: int = 10000,
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
        setup_timeout: float = SETUP_TIMEOUT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        max_output_buffer: int = DEFAULT_MAX_OUTPUT_BUFFER,
        retry: bool = False,
        node_identity: str = DEFAULT_MODE,
    ) -> None:
        self.handler = handler
        self.authority = authority
        self.reactor = reactor
        self.configuration = configuration or server_configuration(authority)
        self.max_message_size = max_message_size
        self.max_incoming_streams = max_incoming_streams
        self.max_pending_handshakes = max_pending_handshakes
        self.setup_timeout = setup_timeout
        self.write_timeout = write_timeout
        self.max_output_buffer = max_output_buffer
        self._retry = QuicRetryTokenHandler() if retry else None
        self._cid_length = self.configuration.connection_id_length
        # Every connection ID of every live connection -> its connection.
        self.connections_by_cid: dict[bytes, QuicHubConnection] = {}
        self.connections: set[QuicHubConnection] = set()
        self.stats = QuicStats()
        self.identity = NodeIdentity(node_identity, self.stats, "QUIC")
        self._setting_up = 0  # connections in _HANDSHAKE or _HEADER
        self._dirty: list[QuicHubConnection] = []
        self._flush_call: IDelayedCall | None = None
        self._last_warning: dict[str, float] = {}

    # -- receiving --

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.stats.datagrams_received += 1
        if not data:
            return
        cid_length = self._cid_length
        if not data[0] & _FIRST_BYTE_LONG:
            # Short header: the destination CID follows the first byte (§17.3); no parse.
            connection = self.connections_by_cid.get(data[1 : 1 + cid_length])
            if connection is None:
                self.stats.datagrams_dropped += 1
                return
            self._receive(connection, data, addr)
            return
        buffer = Buffer(data=data)
        try:
            header = pull_quic_header(buffer, host_cid_length=cid_length)
        except Exception:  # untrusted bytes: any parse failure is a drop
            self._maybe_gquic(data, addr)
            self.stats.datagrams_dropped += 1
            return
        connection = self.connections_by_cid.get(header.destination_cid)
        if connection is not None:
            self._receive(connection, data, addr)
            return
        version = header.version
        supported = self.configuration.supported_versions
        if version is not None and version not in supported:
            # A VN packet has version 0 and must never be answered (reflection loops); and
            # only datagrams that could start a connection get one (RFC 9000 §6.1, §14.1).
            if (
                header.packet_type != QuicPacketType.VERSION_NEGOTIATION
                and len(data) >= SMALLEST_MAX_DATAGRAM_SIZE
            ):
                self.stats.version_negotiations += 1
                self._send(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=supported,
                    ),
                    addr,
                )
            else:
                self._maybe_gquic(data, addr)
                self.stats.datagrams_dropped += 1
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            self.stats.datagrams_dropped += 1
            return
        if not _initial_decrypts(header, data, buffer.tell()):
            # Random bytes behind a valid-looking header: dropped for the price of one AEAD
            # check (~50 µs), before a connection and a TLS context are built (~300 µs).
            self.stats.bogus_initials += 1
            return
        self._new_connection(header, data, addr)

    def _maybe_gquic(self, data: bytes, addr: Any) -> None:
        # edgecore v1.15's quic-go speaks gQUIC: long header, version "Q0xx" (quic.txt).
        if len(data) >= 5 and data[1:3] == b"Q0":
            self.stats.gquic_datagrams += 1
            self._warn(
                "gquic",
                "Google QUIC ({version}) datagram from {peer}: a stock edgecore's QUIC is not "
                "supported (standard QUIC only); configure the edge for WebSocket",
                version=data[1:5].decode("ascii", "replace"),
                peer=peer_string(addr),
            )

    def _warn(self, key: str, format: str, **fields: Any) -> None:
        now = self.reactor.seconds()
        last = self._last_warning.get(key)
        if last is None or now - last >= WARN_INTERVAL:
            self._last_warning[key] = now
            log.warn(format, **fields)

    def _new_connection(self, header: Any, data: bytes, addr: Any) -> None:
        if self._setting_up >= self.max_pending_handshakes:
            self.stats.setups_dropped += 1
            self._warn(
                "setups",
                "QUIC: {count} connections are being set up already; new ones are dropped",
                count=self._setting_up,
            )
            return
        original_dcid: bytes | None = header.destination_cid
        retry_scid: bytes | None = None
        retry = self._retry
        if retry is not None:
            now = self.reactor.seconds()
            if not header.token:
                source_cid = os.urandom(self._cid_length)
                self.stats.retries += 1
                self._send(
                    encode_quic_retry(
                        version=header.version,
                        source_cid=source_cid,
                        destination_cid=header.source_cid,
                        original_destination_cid=header.destination_cid,
                        retry_token=retry.create_token(
                            address=addr,
                            original_destination_connection_id=header.destination_cid,
                            retry_source_connection_id=source_cid,
                            now=now,
                        ),
                    ),
                    addr,
                )
                return
            try:
                original_dcid = retry.validate_token(
                    address=addr,
                    destination_cid=header.destination_cid,
                    token=header.token,
                    now=now,
                )
            except ValueError:
                # A forged, stale or replayed token: no state, no answer (a client whose
                # token expired retries from scratch after its own timeout).
                self.stats.datagrams_dropped += 1
                return
            retry_scid = header.destination_cid
        quic = HubQuicConnection(
            configuration=self.configuration,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
            max_incoming_streams=self.max_incoming_streams,
        )
        now = self.reactor.seconds()
        try:
            quic.receive_datagram(data, addr, now=now)
            datagrams = quic.datagrams_to_send(now=now)
        except Exception:
            log.failure("QUIC: a new connection from {peer} failed", peer=peer_string(addr))
            return
        if not datagrams:
            # aioquic could not decrypt or use it (random bytes with a valid-looking header):
            # nothing to answer, so nothing is kept (a flood of these costs no memory).
            self.stats.bogus_initials += 1
            return
        connection = QuicHubConnection(self, quic, peer_string(addr))
        self.connections.add(connection)
        self._setting_up += 1
        for cid in (header.destination_cid, quic.host_cid):
            self.connections_by_cid[cid] = connection
            connection.cids.add(cid)
        connection.setup_timer = self.reactor.callLater(
            self.setup_timeout, self._setup_expired, connection
        )
        for datagram, to in datagrams:
            self._send(datagram, to)
        self._process_events(connection)
        self._arm_timer(connection)

    def _receive(self, connection: QuicHubConnection, data: bytes, addr: Any) -> None:
        if connection.state == _GONE:
            return
        try:
            connection.quic.receive_datagram(data, addr, now=self.reactor.seconds())
        except Exception:
            log.failure("node {node}: QUIC receive failed", node=connection.node_id or "?")
            self.close_connection(connection, CLOSE_INTERNAL_ERROR, "internal error")
            return
        self._process_events(connection)
        self.mark_dirty(connection)

    # -- events --

    def _process_events(self, connection: QuicHubConnection) -> None:
        quic = connection.quic
        event = quic.next_event()
        while event is not None:
            kind = type(event)
            if kind is events.StreamDataReceived:
                if connection.state <= _OPEN:
                    self._stream_data(connection, event)  # type: ignore[arg-type]
            elif kind is events.HandshakeCompleted:
                self._handshake_completed(connection)
            elif kind is events.ConnectionIdIssued:
                cid = event.connection_id  # type: ignore[attr-defined]
                if connection.state != _GONE:
                    self.connections_by_cid[cid] = connection
                    connection.cids.add(cid)
            elif kind is events.ConnectionIdRetired:
                cid = event.connection_id  # type: ignore[attr-defined]
                connection.cids.discard(cid)
                if self.connections_by_cid.get(cid) is connection:
                    del self.connections_by_cid[cid]
            elif kind is events.StreamReset:
                connection.readers.pop(event.stream_id, None)  # type: ignore[attr-defined]
            elif kind is events.StopSendingReceived:
                # The edge will not read that stream any more (aioquic reset it): the next
                # message opens a new one; what was in flight is resent by the core.
                if event.stream_id == connection.out_stream:  # type: ignore[attr-defined]
                    connection.out_stream = None
            elif kind is events.ConnectionTerminated:
                self._terminated(connection, event)  # type: ignore[arg-type]
                return
            event = quic.next_event()

    def _handshake_completed(self, connection: QuicHubConnection) -> None:
        if connection.state != _HANDSHAKE:
            return
        certificate = connection.quic.peer_certificate
        if certificate is None:
            self.stats.handshakes_refused += 1
            log.info(
                "QUIC connection from {peer} refused: no client certificate", peer=connection.peer
            )
            self.close_connection(connection, CLOSE_POLICY, "a client certificate is required")
            return
        try:
            self.authority.verify_client_certificate(certificate)
        except CertificateError as error:
            self.stats.handshakes_refused += 1
            log.info(
                "QUIC connection from {peer} refused: {error}", peer=connection.peer, error=error
            )
            self.close_connection(connection, CLOSE_POLICY, f"client certificate refused: {error}")
            return
        connection.state = _HEADER

    def _stream_data(self, connection: QuicHubConnection, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        if connection.state == _HANDSHAKE:
            # Cannot happen in aioquic 1.7 (no 0-RTT without session tickets; 1-RTT keys
            # come with the client's Finished), but never read before the certificate check.
            self.close_connection(connection, CLOSE_POLICY, "stream data before the handshake")
            return
        try:
            if stream_id == 0:
                self._control_data(connection, event)
                return
            if connection.state != _OPEN:
                raise QuicStreamError(
                    CLOSE_INVALID_PAYLOAD, f"stream {stream_id} opened before the header exchange"
                )
            reader = connection.readers.get(stream_id)
            if reader is None:
                # Streams the client opened start with the prefix; ours it may reuse (§3).
                reader = MessageStreamReader(
                    stream_id, self.max_message_size, expect_prefix=not stream_id & 1
                )
                connection.readers[stream_id] = reader
            handler = self.handler
            for message in reader.feed(event.data):
                if connection.state != _OPEN or not connection.in_session:
                    return
                try:
                    handler.message_received(connection, message)
                except Exception:
                    log.failure(
                        "node {node}: message_received failed for {msg_id}",
                        node=connection.node_id,
                        msg_id=message.msg_id,
                    )
            if event.end_stream:
                del connection.readers[stream_id]
                reader.finish()
                if not stream_id & 1:
                    # End our (unused) half too, so aioquic discards the stream and lets
                    # the edge open another (maxIncomingStreams counts open streams).
                    self._send_stream(connection, stream_id, b"", end_stream=True)
        except QuicStreamError as error:
            self.stats.stream_errors += 1
            log.info(
                "node {node}: closing, {error}", node=connection.node_id or "?", error=error.reason
            )
            self.close_connection(connection, error.code, error.reason)

    def _control_data(
        self, connection: QuicHubConnection, event: events.StreamDataReceived
    ) -> None:
        reader = connection.control
        if reader is None:
            reader = connection.control = MessageStreamReader(
                0, self.max_message_size, expect_prefix=False
            )
        for message in reader.feed(event.data):
            if connection.state == _HEADER:
                self._header(connection, message)
            elif connection.state == _OPEN:
                # §3: each side keeps reading the control stream and acks what arrives.
                if message.operation != OP_RESPONSE:
                    self._write_control(connection, new_response(message, "ack"))
            else:
                return

    def _write_control(self, connection: QuicHubConnection, message: Message) -> None:
        self._send_stream(connection, 0, encode_frame(message))
        self.mark_dirty(connection)

    @staticmethod
    def _send_stream(
        connection: QuicHubConnection, stream_id: int, data: bytes, end_stream: bool = False
    ) -> bool:
        try:
            connection.quic.send_stream_data(stream_id, data, end_stream=end_stream)
        except (RuntimeError, ValueError):  # the edge reset or stopped the stream
            return False
        return True

    def _header(self, connection: QuicHubConnection, message: Message) -> None:
        try:
            headers = parse_header_message(message)
        except HeaderError as error:
            self.stats.headers_refused += 1
            log.info("QUIC connection from {peer}: {error}", peer=connection.peer, error=error)
            self._write_control(connection, new_response(message, "nack"))
            self.close_connection(connection, CLOSE_INVALID_PAYLOAD, str(error))
            return
        node_id = headers.get("node_id", "")
        if not node_id:
            self.stats.headers_refused += 1
            log.info("QUIC connection from {peer} refused: no node_id header", peer=connection.peer)
            self.close_connection(connection, CLOSE_POLICY, "missing node_id header")
            return
        problem = validate_node_id(node_id)
        if problem is not None:
            self.stats.headers_refused += 1
            log.info(
                "QUIC connection from {peer} refused: invalid node_id {node!r:.80}: {problem}",
                peer=connection.peer,
                node=node_id,
                problem=problem,
            )
            self.close_connection(connection, CLOSE_POLICY, f"invalid node_id header: {problem}")
            return
        identity = self.identity
        if identity.active:
            # The certificate _handshake_completed verified against the CA.
            certificate = connection.quic.peer_certificate
            verdict = identity.admit(certificate, node_id, connection.peer)
            if not verdict.allowed:
                self.close_connection(connection, CLOSE_POLICY, f"node identity: {verdict.reason}")
                return
        connection.node_id = node_id
        connection.project_id = headers.get("project_id", "")
        self._write_control(connection, new_response(message, "ack"))
        connection.state = _OPEN
        self._setup_done(connection)
        try:
            self.handler.connection_made(connection)
        except NodeRefused as refused:
            log.debug(
                "node {node} refused ({peer}): {reason}",
                node=node_id,
                peer=connection.peer,
                reason=refused.reason,
            )
            self.close_connection(connection, CLOSE_TRY_AGAIN_LATER, refused.reason)
            return
        except Exception:
            log.failure("node {node}: connection_made failed; closing", node=node_id)
            self.close_connection(connection, CLOSE_INTERNAL_ERROR, "internal error")
            return
        if connection.state == _OPEN:
            connection.in_session = True
            log.debug(
                "node {node} connected over QUIC from {peer} (project {project})",
                node=node_id,
                peer=connection.peer,
                project=connection.project_id or "-",
            )

    def _setup_done(self, connection: QuicHubConnection) -> None:
        call, connection.setup_timer = connection.setup_timer, None
        if call is not None:
            self._setting_up -= 1
            if call.active():
                call.cancel()

    def _setup_expired(self, connection: QuicHubConnection) -> None:
        connection.setup_timer = None
        self._setting_up -= 1
        self.stats.setup_timeouts += 1
        log.info(
            "QUIC connection from {peer} closed: no header exchange within {timeout:g} s",
            peer=connection.peer,
            timeout=self.setup_timeout,
        )
        self.close_connection(
            connection,
            CLOSE_POLICY,
            f"handshake and header not completed within {self.setup_timeout:g} seconds",
        )

    def _terminated(
        self, connection: QuicHubConnection, event: events.ConnectionTerminated
    ) -> None:
        if connection.closed_by_hub is not None:
            code, text = connection.closed_by_hub
            why = f"closed by the hub ({code}{': ' + text if text else ''})"
        elif event.frame_type is None:
            why = f"closed by the edge ({describe_termination(event)})"
        else:
            why = describe_termination(event)
        self._forget(connection, why)

    def _forget(self, connection: QuicHubConnection, why: str) -> None:
        """Drop every trace of ``connection``; ``connection_lost`` if it had a session."""
        if connection.state == _GONE:
            return
        connection.state = _GONE
        self._setup_done(connection)
        timer, connection.timer = connection.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        by_cid = self.connections_by_cid
        for cid in connection.cids:
            if by_cid.get(cid) is connection:
                del by_cid[cid]
        connection.cids.clear()
        connection.readers.clear()
        connection.pending = []
        self.connections.discard(connection)
        if connection.in_session:
            connection.in_session = False
            log.debug(
                "node {node} disconnected ({peer}): {why}",
                node=connection.node_id,
                peer=connection.peer,
                why=why,
            )
            try:
                self.handler.connection_lost(connection, why)
            except Exception:
                log.failure("node {node}: connection_lost failed", node=connection.node_id)

    # -- sending --

    def close_connection(self, connection: QuicHubConnection, code: int, reason: str) -> None:
        """Write what is queued, then CONNECTION_CLOSE with ``code`` and ``reason``."""
        if connection.state >= _CLOSING:
            return
        if connection.state >= _HEADER:
            # aioquic sends nothing but the CONNECTION_CLOSE once close() is called: what is
            # queued (messages, the "nack") goes out first, as far as the congestion window
            # allows. Not retransmitted if lost: the core resends unacknowledged messages.
            self._push_pending(connection)
            self._transmit(connection)
            if connection.state == _GONE:
                return
        connection.state = _CLOSING
        connection.closed_by_hub = (code, reason)
        self._setup_done(connection)
        connection.quic.close(error_code=code, reason_phrase=close_reason(reason))
        self.mark_dirty(connection)

    def mark_dirty(self, connection: QuicHubConnection) -> None:
        """Have ``connection`` transmitted at the end of this reactor turn (one timer for all)."""
        if connection.dirty:
            return
        connection.dirty = True
        self._dirty.append(connection)
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Transmit every connection touched this turn, and re-arm its timer."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        dirty, self._dirty = self._dirty, []
        now = self.reactor.seconds()
        for connection in dirty:
            connection.dirty = False
            if connection.state == _GONE:
                continue
            self._push_pending(connection)
            if connection.state == _OPEN and not self._backlog_ok(connection, now):
                continue
            self._transmit(connection, now)

    def _backlog_ok(self, connection: QuicHubConnection, now: float) -> bool:
        """False (and the connection closing) if the peer leaves too much unread: more than
        ``max_output_buffer`` bytes queued in aioquic on the hub's streams (control and
        message stream), or more than :data:`BACKLOG_MARK` for ``write_timeout`` seconds.
        Checked at each transmit (each datagram from the peer, each aioquic timer): no timer
        of its own."""
        streams = connection.quic._streams
        queued = 0
        for stream_id in (0, connection.out_stream):
            stream = streams.get(stream_id) if stream_id is not None else None
            if stream is not None:
                sender = stream.sender
                queued += sender._buffer_stop - sender._buffer_start
        if queued <= BACKLOG_MARK:
            connection.backlog_since = None
            return True
        if queued > self.max_output_buffer:
            self.stats.output_overflows += 1
            why = f"more than {self.max_output_buffer} bytes not taken by the peer"
        else:
            since = connection.backlog_since
            if since is None:
                connection.backlog_since = now
                return True
            if now - since < self.write_timeout:
                return True
            self.stats.write_timeouts += 1
            why = f"data not taken by the peer for {self.write_timeout:g} s (writeTimeout)"
        log.info(
            "node {node} ({peer}): closing, {why}",
            node=connection.node_id,
            peer=connection.peer,
            why=why,
        )
        self.close_connection(connection, CLOSE_POLICY, why)
        return False

    def _transmit(self, connection: QuicHubConnection, now: float | None = None) -> None:
        try:
            datagrams = connection.quic.datagrams_to_send(
                now=self.reactor.seconds() if now is None else now
            )
        except Exception:
            log.failure("node {node}: QUIC transmit failed", node=connection.node_id or "?")
            self._forget(connection, "internal error in the QUIC stack")
            return
        for data, addr in datagrams:
            self._send(data, addr)
        self._arm_timer(connection)

    def _push_pending(self, connection: QuicHubConnection) -> None:
        pending = connection.pending
        if not pending:
            return
        connection.pending = []
        data = b"".join(pending)
        stream_id = connection.out_stream
        if stream_id is not None and self._send_stream(connection, stream_id, data):
            return
        stream_id = connection.out_stream = connection.quic.get_next_available_stream_id()
        self._send_stream(connection, stream_id, STREAM_PREFIX + data)

    def _send(self, data: bytes, addr: Any) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            transport.write(data, addr)  # type: ignore[attr-defined]
        except (OSError, MessageLengthError) as error:
            # ENOBUFS/EAGAIN under load: QUIC's loss recovery sends it again.
            self.stats.send_errors += 1
            if getattr(error, "errno", None) not in (errno.EAGAIN, errno.ENOBUFS):
                log.debug("QUIC: cannot send to {peer}: {error}", peer=addr, error=error)
            return
        self.stats.datagrams_sent += 1

    # -- timers --

    def _arm_timer(self, connection: QuicHubConnection) -> None:
        timer_at = connection.quic.get_timer()
        timer = connection.timer
        if timer_at is None:
            if timer is not None:
                connection.timer = None
                if timer.active():
                    timer.cancel()
            connection.timer_at = None
            return
        if timer is not None and connection.timer_at == timer_at and timer.active():
            return
        delay = max(0.0, timer_at - self.reactor.seconds())
        previous_at = connection.timer_at
        connection.timer_at = timer_at
        if timer is not None and timer.active():
            if previous_at is not None and timer_at >= previous_at:
                timer.reset(delay)  # later: Twisted moves it lazily, O(1)
                return
            # Earlier: reset() would scan the reactor's whole timer list (_moveCallLaterSooner),
            # which made an idle 10,000-node QUIC hub busy; a new call is O(log n).
            timer.cancel()
        connection.timer = self.reactor.callLater(delay, self._timer_fired, connection)

    def _timer_fired(self, connection: QuicHubConnection) -> None:
        connection.timer = None
        if connection.state == _GONE:
            return
        now = max(connection.timer_at or 0.0, self.reactor.seconds())
        connection.timer_at = None
        try:
            connection.quic.handle_timer(now=now)
        except Exception:
            log.failure("node {node}: QUIC timer failed", node=connection.node_id or "?")
            self._forget(connection, "internal error in the QUIC stack")
            return
        self._process_events(connection)
        if connection.state != _GONE:
            self.mark_dirty(connection)

    # -- life --

    def shutdown(self, code: int = CLOSE_GOING_AWAY, reason: str = "hub shutting down") -> None:
        """Close every connection and transmit the closes now (the socket goes next)."""
        for connection in list(self.connections):
            self.close_connection(connection, code, reason)
        self.flush()

    def stopProtocol(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._dirty = []
        for connection in list(self.connections):
            closed = connection.closed_by_hub
            self._forget(
                connection,
                f"closed by the hub ({closed[0]}: {closed[1]})"
                if closed
                else "the hub stopped listening on QUIC",
            )
        self.connections_by_cid.clear()


# --- the service -----------------------------------------------------------------------------


class _UDPEndpoint:
    """``listen(protocol)`` for UDP, the one thing :class:`ListeningService` asks of an endpoint
    (Twisted has no UDP server endpoint)."""

    def __init__(self, reactor: Reactor, port: int, interface: str) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface

    def listen(self, protocol: DatagramProtocol) -> Deferred[IListeningPort]:
        try:
            port = self.reactor.listenUDP(
                self.port, protocol, interface=self.interface, maxPacketSize=MAX_DATAGRAM_READ
            )
        except Exception:
            return fail()
        handle = getattr(port, "getHandle", None)
        if handle is not None:
            # Bursts of handshakes and ACKs overflow the default ~200 KB buffers; best effort
            # (the kernel caps it at net.core.rmem_max / wmem_max).
            sock = handle()
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)
                except OSError:
                    pass
        return succeed(port)


class QuicListeningService(ListeningService):
    """The QUIC listener as a service: ``listening``/``bound_port`` as every listener has;
    stopping closes every connection (1001) before the socket closes."""

    protocol: QuicHubProtocol

    def __init__(self, name: str, endpoint: _UDPEndpoint, protocol: QuicHubProtocol) -> None:
        super().__init__(name, endpoint, protocol)  # type: ignore[arg-type]
        self.protocol = protocol

    def stopService(self) -> Deferred[None] | None:
        if self.port is not None:
            self.protocol.shutdown()
        return super().stopService()


def quic_listener(
    config: HubConfig,
    authority: CertificateAuthority,
    handler: IConnectionHandler,
    reactor: Reactor,
    *,
    retry: bool = False,
    node_identity: str | None = None,
) -> QuicListeningService:
    """The QUIC port (``cloudHub.quic``) as a service named ``quic``.

    Client certificates are required and verified against the hub's CA; messages are limited
    to ``hub.maxMessageSize``; a client may have ``quic.maxIncomingStreams`` streams open; the
    QUIC idle timeout is twice ``keepaliveInterval`` (at least 60 s), so the core's keepalive
    watchdog, not QUIC, decides when a silent node is gone; a peer that leaves more than
    :data:`BACKLOG_MARK` bytes unread for ``cloudHub.writeTimeout`` seconds is closed (1008).
    ``retry`` turns on address validation with Retry packets (one more round trip per
    connection). The node a client certificate names is checked under ``node_identity``, by
    default ``hub.nodeIdentity`` (``warn`` while the config has no such key).
    """
    check_aioquic()
    check_protobuf()
    settings = config.cloudhub.quic
    idle_timeout = max(60.0, 2.0 * config.cloudhub.keepalive_interval)
    protocol = QuicHubProtocol(
        handler,
        authority,
        reactor,
        configuration=server_configuration(authority, idle_timeout),
        max_message_size=config.hub.max_message_size,
        max_incoming_streams=settings.max_incoming_streams,
        write_timeout=float(config.cloudhub.write_timeout),
        max_output_buffer=config.hub.limits.max_output_buffer,
        retry=retry,
        node_identity=node_identity or str(getattr(config.hub, "node_identity", DEFAULT_MODE)),
    )
    return QuicListeningService(
        "quic", _UDPEndpoint(reactor, settings.port, settings.address), protocol
    )
