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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

__all__ = [
    "ConnectionCounters",
    "ConnectionLimiter",
    "DescriptorBudget",
    "ThrottledLog",
    "descriptor_limit",
    "open_descriptors",
    "raise_descriptor_limit",
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
