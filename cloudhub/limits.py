"""Connection limits for any stream listener: per listener, per source address, and a reserve
of file descriptors that one listener may not take from the others (issue 18).

:class:`ConnectionLimiter` wraps a listener's factory (a ``Site``, a ``TLSMemoryBIOFactory``
around one, the WebSocket factory)::

    budget = DescriptorBudget(reactor)          # one per process, shared by the listeners
    factory = ConnectionLimiter(tls_factory, max_connections=1024, per_address=32,
                                reserve=256, budget=budget)

A connection over a limit is closed as soon as it is accepted (``buildProtocol`` answers
None: no protocol, no TLS handshake, no byte written) and counted in :attr:`counters`;
refusals are logged at most once per 10 s. The descriptor check compares the process's open
descriptors with ``RLIMIT_NOFILE``: a listener admits a connection only while more than its
``reserve`` descriptors stay free, so a listener with a large reserve (the certificate
server) stops long before one with a small reserve (the edges' WebSocket listener) or the
store, the logs and the API run out.
"""

from __future__ import annotations

import ipaddress
import os
import resource
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "AdmissionCounters",
    "ConnectionCounters",
    "ConnectionLimiter",
    "DescriptorBudget",
    "HandshakeAdmission",
    "ThrottledLog",
    "descriptor_limit",
    "handshake_admission",
    "open_descriptors",
    "raise_descriptor_limit",
    "tls_handshake_done",
    "websocket_handshake_done",
]

log = Logger()

# Defaults: what the certificate server uses (README "Limits").
MAX_CONNECTIONS = 1024
PER_ADDRESS = 32
RESERVE = 256


class ThrottledLog:
    """Warnings at most once per ``interval`` seconds; the ones held back are counted and
    reported (``suppressed``) with the next one that is written."""

    def __init__(
        self,
        logger: Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def emit(self, format: str, **fields: Any) -> bool:
        """Log ``format`` (a warning) unless one was logged less than ``interval`` ago."""
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return False
        self._last = now
        suppressed, self.suppressed = self.suppressed, 0
        if suppressed:
            format += " ({suppressed} similar events not logged)"
        self.logger.warn(format, suppressed=suppressed, **fields)
        return True


def open_descriptors() -> int | None:
    """How many file descriptors this process has open, or None when it cannot tell."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            # listdir opens one more descriptor for itself, listed with the others.
            return len(os.listdir(directory)) - 1
        except OSError:
            continue
    return None


def descriptor_limit() -> int | None:
    """The soft ``RLIMIT_NOFILE``, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def raise_descriptor_limit(ceiling: int = 1 << 20) -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (at most ``ceiling``), as Go's
    runtime does at start; returns the soft limit in force afterwards (None: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(int(hard), ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn("could not raise the open file limit to {target}: {e}", target=target, e=e)
    return descriptor_limit()


class DescriptorBudget:
    """The process's free file descriptors: ``RLIMIT_NOFILE`` minus those open.

    Counting open descriptors lists ``/proc/self/fd``; to keep that off the accept path, the
    count is taken at most once per ``refresh`` seconds and adjusted in between by the
    connections the limiters sharing this budget opened and closed; it is taken again at
    once when the estimate comes within ``margin`` of a limiter's reserve. Share one budget
    between the listeners of a process.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        limit: int | None | Callable[[], int | None] = descriptor_limit,
        count: Callable[[], int | None] = open_descriptors,
        refresh: float = 1.0,
        margin: int = 64,
    ) -> None:
        self.clock = clock
        self._limit = limit
        self._count = count
        self.refresh = refresh
        self.margin = margin
        self._measured = 0
        self._measured_at: float | None = None
        self._delta = 0

    @property
    def limit(self) -> int | None:
        limit = self._limit
        return limit() if callable(limit) else limit

    def _measure(self, now: float) -> None:
        count = self._count()
        self._measured_at = now
        if count is not None:
            self._measured, self._delta = count, 0
        # Cannot count: keep the connections counted through the limiters as the estimate.

    def free(self, reserve: int = 0) -> int | None:
        """Descriptors free now (None: no limit); measured afresh near ``reserve``."""
        limit = self.limit
        if limit is None:
            return None
        now = self.clock.seconds()
        if self._measured_at is None or now - self._measured_at >= self.refresh:
            self._measure(now)
        free = limit - (self._measured + self._delta)
        if free <= reserve + self.margin and self._measured_at != now:
            self._measure(now)
            free = limit - (self._measured + self._delta)
        return free

    def opened(self) -> None:
        self._delta += 1

    def closed(self) -> None:
        self._delta -= 1


@dataclass
class ConnectionCounters:
    """What a :class:`ConnectionLimiter` admitted and refused (plain counters for metrics)."""

    accepted: int = 0
    refused_listener: int = 0  # the listener had max_connections open
    refused_address: int = 0  # the source address had per_address open
    refused_descriptors: int = 0  # admitting it would have left reserve or fewer descriptors


def _host(addr: IAddress | None) -> str | None:
    """The source host of ``addr`` (None for UNIX sockets and unknown addresses)."""
    host = getattr(addr, "host", None)
    if not isinstance(host, str) or not host:
        return None
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]  # an IPv4 peer on a dual-stack socket
    return host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class _Limited(ProtocolWrapper):
    host: str | None = None


class ConnectionLimiter(WrappingFactory[_Limited]):
    """Admit connections to ``wrapped`` within the limits; close the others at once.

    ``max_connections`` open connections on this listener, ``per_address`` from one source
    host (0 = no limit; ``exempt_loopback`` lifts it for 127.0.0.0/8 and ::1), and while
    more than ``reserve`` descriptors remain free in the process (``budget``, created when
    not given; ``reserve`` None = no descriptor check). :attr:`counters` count the
    decisions, :attr:`open` and :meth:`open_from` tell what is open.
    """

    protocol = _Limited

    def __init__(
        self,
        wrapped: IProtocolFactory,
        clock: IReactorTime | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        per_address: int = PER_ADDRESS,
        reserve: int | None = RESERVE,
        budget: DescriptorBudget | None = None,
        exempt_loopback: bool = False,
        name: str = "",
        counters: ConnectionCounters | None = None,
    ) -> None:
        super().__init__(wrapped)
        if max_connections < 0 or per_address < 0 or (reserve is not None and reserve < 0):
            raise ValueError("max_connections, per_address and reserve must be >= 0")
        if budget is None and reserve is not None:
            if clock is None:
                from twisted.internet import reactor as clock  # type: ignore[assignment]
            budget = DescriptorBudget(clock)  # type: ignore[arg-type]
        self.max_connections = max_connections
        self.per_address = per_address
        self.reserve = reserve
        self.budget = budget
        self.exempt_loopback = exempt_loopback
        self.name = name or type(wrapped).__name__
        self.counters = counters if counters is not None else ConnectionCounters()
        self._per_host: dict[str, int] = {}
        self._log = ThrottledLog(log)

    @property
    def open(self) -> int:
        """Connections open through this listener."""
        return len(self.protocols)

    def open_from(self, host: str) -> int:
        return self._per_host.get(host, 0)

    def _refusal(self, addr: IAddress | None) -> str | None:
        """Why a connection from ``addr`` is refused now, or None to admit it."""
        if self.max_connections and len(self.protocols) >= self.max_connections:
            self.counters.refused_listener += 1
            return f"{self.max_connections} connections open on this listener"
        host = _host(addr)
        if (
            self.per_address
            and host is not None
            and self._per_host.get(host, 0) >= self.per_address
            and not (self.exempt_loopback and _is_loopback(host))
        ):
            self.counters.refused_address += 1
            return f"{self.per_address} connections open from this address"
        if self.reserve is not None and self.budget is not None:
            free = self.budget.free(self.reserve)
            if free is not None and free <= self.reserve:
                self.counters.refused_descriptors += 1
                return (
                    f"{free} file descriptors free, {self.reserve} reserved "
                    f"(RLIMIT_NOFILE {self.budget.limit})"
                )
        return None

    def buildProtocol(self, addr: IAddress | None) -> Any:
        why = self._refusal(addr)
        if why is not None:
            self._log.emit(
                "{listener}: refused a connection from {peer}: {why}",
                listener=self.name,
                peer=_host(addr) or str(addr),
                why=why,
            )
            return None
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        protocol = self.protocol(self, wrapped)
        protocol.host = _host(addr)
        return protocol

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.counters.accepted += 1
        host = getattr(p, "host", None)
        if host is not None:
            self._per_host[host] = self._per_host.get(host, 0) + 1
        if self.budget is not None:
            self.budget.opened()

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        host = getattr(p, "host", None)
        if host is not None:
            left = self._per_host.get(host, 0) - 1
            if left > 0:
                self._per_host[host] = left
            else:
                self._per_host.pop(host, None)
        if self.budget is not None:
            self.budget.closed()


# --- handshake admission (reconnect storms) -------------------------------------------------

# Defaults of hub.limits.websocket.* (README "Limits").
MAX_HANDSHAKES = 64
HANDSHAKES_PER_SECOND = 0  # 0: no rate, the cap on handshakes in progress alone
HANDSHAKE_QUEUE = 10_000
HANDSHAKE_WAIT = 20.0
# How long one admitted handshake holds its slot at most: a peer that opens TCP and sends
# nothing must not keep the gate shut (the listener's own handshake timeout drops it later).
SLOT_TIMEOUT = 5.0
ADMISSION_TICK = 0.01

_WS_CONNECTING = 1  # autobahn WebSocketProtocol.STATE_CONNECTING


def tls_handshake_done(protocol: Any) -> bool:
    """For a ``TLSMemoryBIOProtocol``: the TLS handshake is over (or the connection is)."""
    return bool(getattr(protocol, "_handshakeDone", True))


def websocket_handshake_done(protocol: Any) -> bool:
    """For TLS around an Autobahn WebSocket protocol: the 101 is written, or the connection
    is closing (no more handshake work either way)."""
    inner = getattr(protocol, "wrappedProtocol", None)
    if inner is None:  # ProtocolWrapper drops it once the connection is lost
        return True
    return getattr(inner, "state", _WS_CONNECTING) != _WS_CONNECTING


@dataclass
class AdmissionCounters:
    """What a :class:`HandshakeAdmission` did (plain counters for metrics)."""

    admitted: int = 0  # connections handed to the wrapped factory
    queued: int = 0  # of those and the expired: accepted, then waited with reads paused
    refused: int = 0  # closed at accept: over the limits with the queue full (or off)
    expired: int = 0  # waited longer than max_wait: closed without a byte read
    completed: int = 0  # admitted handshakes that ended (done, failed or closed)
    slot_timeouts: int = 0  # admitted handshakes that held their slot over slot_timeout
    peak_waiting: int = 0
    peak_in_progress: int = 0


class _Waiting(Protocol):
    """An accepted connection waiting for admission: reads paused, nothing built for it yet."""

    def __init__(self, admission: HandshakeAdmission, addr: IAddress | None, since: float):
        self.admission = admission
        self.addr = addr
        self.since = since

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connected = 1
        transport.pauseProducing()  # no ClientHello read until admitted

    def dataReceived(self, data: bytes) -> None:  # only if a transport ignores the pause
        self.admission._early.append((self, data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = 0


@implementer(IProtocolFactory)
class HandshakeAdmission:
    """Admit new connections to ``wrapped`` (a TLS factory) at a bounded pace, so that a
    reconnect storm cannot take the reactor from the connections already established.

    A connection is admitted (handed to ``wrapped.buildProtocol``) while fewer than
    ``max_handshakes`` admitted ones are still in their handshake (``done(protocol)`` false
    and the connection open; a slot is held ``slot_timeout`` s at most) and, with
    ``per_second``, a token is left in a bucket refilled at that rate (``burst`` tokens at
    most). Any other connection is accepted and **waits, reads paused**, in FIFO order
    (``queue`` of them at most; ``queue=0``: closed at once instead): its TLS and WebSocket
    protocols are built only when it is admitted, so waiting costs a socket and ~1 KB, no
    handshake timer runs, and the kernel's accept queue never overflows (a full backlog makes
    clients retransmit SYNs after 1, 3, 7 s). A connection that waited ``max_wait`` s is
    closed without a byte read. 0 for ``max_handshakes`` or ``per_second``: no such limit.

    No wrapper stays on an admitted connection: the placeholder of a waiting one is replaced
    on its transport by the real protocol (``transport.protocol``, or ``wrappedProtocol``
    when the transport is itself a ``ProtocolWrapper`` such as :class:`ConnectionLimiter`'s),
    so an established connection costs exactly what it costs without admission. Handshakes in
    progress are polled every ``tick`` s while any are pending (``max_handshakes`` of them at
    most); nothing runs when none is. Put it directly in front of the TLS factory
    (``ListeningService(name, endpoint, HandshakeAdmission(tls, reactor))``).
    """

    def __init__(
        self,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        *,
        max_handshakes: int = MAX_HANDSHAKES,
        per_second: float = HANDSHAKES_PER_SECOND,
        burst: int | None = None,
        queue: int = HANDSHAKE_QUEUE,
        max_wait: float = HANDSHAKE_WAIT,
        slot_timeout: float = SLOT_TIMEOUT,
        done: Callable[[Any], bool] = tls_handshake_done,
        tick: float = ADMISSION_TICK,
        name: str = "",
        counters: AdmissionCounters | None = None,
    ) -> None:
        if max_handshakes < 0 or per_second < 0 or queue < 0 or max_wait <= 0 or tick <= 0:
            raise ValueError("max_handshakes, per_second, queue must be >= 0; max_wait, tick > 0")
        self.wrappedFactory = wrapped
        self.clock = clock
        self.done = done
        self.tick = tick
        self.name = name or type(wrapped).__name__
        self.counters = counters if counters is not None else AdmissionCounters()
        self._in_progress: list[tuple[Any, float]] = []
        self._waiting: deque[_Waiting] = deque()
        self._early: list[tuple[_Waiting, bytes]] = []
        self._loop: IDelayedCall | None = None
        self._log = ThrottledLog(log)
        self.configure(
            max_handshakes=max_handshakes,
            per_second=per_second,
            burst=burst,
            queue=queue,
            max_wait=max_wait,
            slot_timeout=slot_timeout,
        )

    def configure(
        self,
        *,
        max_handshakes: int,
        per_second: float,
        burst: int | None = None,
        queue: int,
        max_wait: float = HANDSHAKE_WAIT,
        slot_timeout: float = SLOT_TIMEOUT,
    ) -> None:
        """Change the limits (the connections already waiting keep waiting)."""
        self.max_handshakes = max_handshakes
        self.per_second = float(per_second)
        # Default burst: a tenth of a second's worth, at least one.
        self.burst = max(1, burst if burst is not None else int(self.per_second / 10))
        self.queue = queue
        self.max_wait = max_wait
        self.slot_timeout = slot_timeout
        self._tokens = float(self.burst)
        self._refilled = self.clock.seconds()
        if self._waiting or self._in_progress:
            self._schedule()

    # -- what is pending --

    @property
    def waiting(self) -> int:
        """Connections accepted and not admitted yet."""
        return len(self._waiting)

    @property
    def in_progress(self) -> int:
        """Admitted connections still in their handshake (as of the last poll)."""
        return len(self._in_progress)

    # -- IProtocolFactory --

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        if self._loop is not None and self._loop.active():
            self._loop.cancel()
        self._loop = None
        waiting, self._waiting = self._waiting, deque()
        for placeholder in waiting:
            self._close(placeholder)
        self._in_progress = []
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedFactory, "logPrefix", None)
        return prefix() if callable(prefix) else self.name

    def buildProtocol(self, addr: IAddress | None) -> Any:
        now = self.clock.seconds()
        self._poll(now)
        if not self._waiting and self._room(now):
            return self._admit(addr, now)
        if len(self._waiting) < self.queue:
            placeholder = _Waiting(self, addr, now)
            self._waiting.append(placeholder)
            self.counters.queued += 1
            self.counters.peak_waiting = max(self.counters.peak_waiting, len(self._waiting))
            self._schedule()
            return placeholder
        self.counters.refused += 1
        self._log.emit(
            "{listener}: closed a new connection from {peer}: {busy} handshakes in progress, "
            "{waiting} waiting",
            listener=self.name,
            peer=_host(addr) or str(addr),
            busy=len(self._in_progress),
            waiting=len(self._waiting),
        )
        return None

    # -- admission --

    def _room(self, now: float) -> bool:
        if self.max_handshakes and len(self._in_progress) >= self.max_handshakes:
            return False
        if self.per_second:
            tokens = self._tokens + (now - self._refilled) * self.per_second
            self._tokens = min(tokens, float(self.burst))
            self._refilled = now
            if self._tokens < 1.0:
                return False
        return True

    def _admit(self, addr: IAddress | None, now: float) -> Any:
        protocol = self.wrappedFactory.buildProtocol(addr)  # type: ignore[arg-type]
        if protocol is None:
            return None
        if self.per_second:
            self._tokens -= 1.0
        self.counters.admitted += 1
        if self.max_handshakes:
            self._in_progress.append((protocol, now))
            self.counters.peak_in_progress = max(
                self.counters.peak_in_progress, len(self._in_progress)
            )
            self._schedule()
        return protocol

    def _poll(self, now: float) -> None:
        """Forget the handshakes that ended; free the slots held too long."""
        if not self._in_progress:
            return
        done, slot_timeout = self.done, self.slot_timeout
        keep = []
        for protocol, since in self._in_progress:
            transport = getattr(protocol, "transport", None)
            if transport is not None and (
                getattr(transport, "disconnected", False)
                or getattr(transport, "disconnecting", False)
                or done(protocol)
            ):
                self.counters.completed += 1
            elif now - since >= slot_timeout:
                self.counters.slot_timeouts += 1
            else:
                keep.append((protocol, since))
        self._in_progress = keep

    def _schedule(self) -> None:
        if self._loop is None or not self._loop.active():
            self._loop = self.clock.callLater(self.tick, self._step)

    def _step(self) -> None:
        self._loop = None
        now = self.clock.seconds()
        self._poll(now)
        waiting = self._waiting
        while waiting:
            placeholder = waiting[0]
            if now - placeholder.since >= self.max_wait or not placeholder.connected:
                waiting.popleft()
                self.counters.expired += 1
                self._close(placeholder)
                continue
            if not self._room(now):
                break
            waiting.popleft()
            self._hand_over(placeholder, now)
        if waiting or self._in_progress:
            self._schedule()

    def _hand_over(self, placeholder: _Waiting, now: float) -> None:
        transport: Any = placeholder.transport
        protocol = self._admit(placeholder.addr, now)
        if protocol is None or not _replace_protocol(transport, placeholder, protocol):
            self._close(placeholder)
            return
        protocol.makeConnection(transport)
        early = [data for waiting, data in self._early if waiting is placeholder]
        if early:
            self._early = [item for item in self._early if item[0] is not placeholder]
            for data in early:
                protocol.dataReceived(data)
        transport.resumeProducing()

    def _close(self, placeholder: _Waiting) -> None:
        transport = getattr(placeholder, "transport", None)
        if transport is None:
            return
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()


def _replace_protocol(transport: Any, old: Any, new: Any) -> bool:
    """Make ``transport`` deliver to ``new`` instead of ``old``; False if it cannot."""
    if getattr(transport, "wrappedProtocol", None) is old:  # a ProtocolWrapper
        transport.wrappedProtocol = new
        return True
    if getattr(transport, "protocol", None) is old:  # twisted.internet.tcp.Connection
        transport.protocol = new
        return True
    return False


def handshake_admission(
    factory: IProtocolFactory, limits: Any, clock: IReactorTime, name: str = "websocket"
) -> HandshakeAdmission:
    """``factory`` (the WebSocket listener's TLS factory) behind a :class:`HandshakeAdmission`
    configured from ``limits`` (``hub.limits.websocket``: ``max_handshakes``,
    ``handshakes_per_second``, ``handshake_queue``, ``handshake_wait``); a missing key keeps
    its default."""
    return HandshakeAdmission(
        factory,
        clock,
        max_handshakes=int(getattr(limits, "max_handshakes", MAX_HANDSHAKES)),
        per_second=float(getattr(limits, "handshakes_per_second", HANDSHAKES_PER_SECOND)),
        queue=int(getattr(limits, "handshake_queue", HANDSHAKE_QUEUE)),
        max_wait=float(getattr(limits, "handshake_wait", HANDSHAKE_WAIT)),
        done=websocket_handshake_done,
        name=name,
    )
