"""``cloudhub edgesim``: many simulated edgecore nodes against a hub (issue 8).

Each simulated node is a :class:`cloudhub.edge.client.EdgeNode` (or, with ``--transport quic``,
a ``QuicEdgeNode`` from :mod:`cloudhub.edge.quic`, imported only when asked for): edgecore's
handshake, a keepalive every ``--heartbeat`` seconds, control messages answered, cloud
messages stored and ACKed as metamanager does (§7.5), reconnects with backoff. All nodes of
one process share one certificate, one set of TLS options and one Autobahn factory (the hub
does not bind a certificate to a node id, §4.2), so an idle node costs about 1 KB of Python
objects plus the socket and TLS state.

Pieces:

* :class:`Simulator` runs nodes in the calling process and reactor; ``cloudhub bench`` uses
  it directly. It opens at most ``concurrency`` connections at a time, so a large run measures
  the hub's connect rate instead of a pile of handshake timeouts. :meth:`Simulator.drop_all`
  is the reconnect storm: every connection aborted at once, every node connecting again at
  once (up to a concurrency of its own), as a fleet does after a hub restart or a network cut.
* :class:`Simulation` is the command: credentials (bootstrap with ``--token`` or reuse
  ``--certs``), one :class:`Simulator` here or ``--procs`` worker processes
  (``python -m cloudhub.edgesim --worker``) reporting snapshots on stdout, the progress and
  live lines on stderr, the summary on stdout. It stops after ``--duration`` or on SIGINT.

The ACK latency the nodes report is approximate: the edge's clock now minus the message
header's ``timestamp`` (milliseconds, set by whoever built the message, §1.1). It includes
the time a message waited in the hub's queue, and is only meaningful when hub and edges share
a clock (same machine). ``cloudhub bench`` measures send → ACK on the hub side instead.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, TextIO

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cloudhub.edge.bootstrap import CA_FILE, CERT_FILE, KEY_FILE, EdgeCredentials, bootstrap
from cloudhub.edge.client import DEFAULT_PROJECT_ID
from cloudhub.edge.metamanager import MetaStore
from cloudhub.errors import CloudHubError
from cloudhub.model import GROUP_RESOURCE, Message, now_ms

__all__ = [
    "LatencyHistogram",
    "SimOptions",
    "Simulation",
    "Simulator",
    "TransportUnavailable",
    "log_warnings_to",
    "obtain_credentials",
    "quic_edge_class",
    "raise_open_file_limit",
]

log = Logger()

Reactor = Any

TRANSPORTS = ("ws", "quic")
# How often the connection window is looked at.
WINDOW_POLL = 0.02
# How long stopping may take before the remaining connections are left closing.
STOP_TIMEOUT = 30.0
# Nodes closed at a time when stopping.
STOP_BATCH = 500
# A worker stops by itself this long after its --duration, in case its parent vanished.
WORKER_GRACE = 30.0


class TransportUnavailable(CloudHubError):
    """The transport asked for cannot be used here (``quic`` before cloudhub.edge.quic exists)."""


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; the new soft limit.

    Every simulated node and every node the hub holds is a socket; the usual soft limit of
    1024 would stop a run at a thousand nodes with EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def quic_edge_class() -> type:
    """``cloudhub.edge.quic.QuicEdgeNode``, imported now; :class:`TransportUnavailable` if not."""
    try:
        from cloudhub.edge.quic import QuicEdgeNode  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        raise TransportUnavailable(
            f"quic not available: cannot import cloudhub.edge.quic ({e})"
        ) from None
    return QuicEdgeNode  # type: ignore[no-any-return]


# --- latency -----------------------------------------------------------------------------------


def _bucket(ms: int) -> int:
    """Exact below 100 ms, then two significant digits (bounded size, mergeable as JSON)."""
    if ms < 100:
        return max(ms, 0)
    digits = len(str(ms)) - 2
    step = 10**digits
    return (ms // step) * step


class LatencyHistogram:
    """Milliseconds → count; cheap to add to, to merge across processes and to subtract."""

    __slots__ = ("counts",)

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    def add(self, ms: int) -> None:
        key = _bucket(ms)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1

    def merge(self, other: LatencyHistogram) -> None:
        for key, count in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + count

    def minus(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """What was added since ``earlier`` (a copy taken before)."""
        result = {}
        for key, count in self.counts.items():
            delta = count - earlier.counts.get(key, 0)
            if delta:
                result[key] = delta
        return LatencyHistogram(result)

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, q: float) -> int | None:
        """The bucket holding the ``q``-th percentile (0–100), or None when empty."""
        total = self.total
        if not total:
            return None
        rank = max(1, -(-total * q // 100))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                return key
        return max(self.counts)

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> LatencyHistogram:
        return cls({int(k): int(v) for k, v in data.items()})


# --- the nodes of one process ------------------------------------------------------------------

COUNTERS = (
    "nodes",
    "started",
    "connected",
    "ever_connected",
    "connect_failures",
    "disconnects",
    "reconnects",
    "messages",
    "acks",
    "errors",
    "keepalives",
)


class Simulator:
    """Simulated nodes ``prefix + str(first + i)`` in this process, on ``reactor``.

    :meth:`grow` creates and starts nodes, at most ``concurrency`` connection attempts at a
    time; :meth:`snapshot` sums the nodes' counters; :meth:`stop` closes every connection.
    Raises :class:`TransportUnavailable` for ``quic`` when :mod:`cloudhub.edge.quic` is absent.
    """

    def __init__(
        self,
        reactor: Reactor,
        transport: str,
        host: str,
        port: int,
        credentials: EdgeCredentials,
        *,
        prefix: str = "edgesim-",
        first: int = 0,
        heartbeat: float = 15.0,
        concurrency: int = 100,
        project_id: str = DEFAULT_PROJECT_ID,
        track_latency: bool = True,
    ) -> None:
        if transport not in TRANSPORTS:
            raise CloudHubError(f"transport {transport!r}: must be one of {', '.join(TRANSPORTS)}")
        self.reactor = reactor
        self.transport = transport
        self.prefix = prefix
        self.first = first
        self.concurrency = max(1, concurrency)
        self.latency = LatencyHistogram()
        self.nodes: list[Any] = []
        # Latency tracking is a call and a clock read per message: off when nobody reads it.
        on_message = self._on_message if track_latency else None
        self._make = self._node_maker(
            transport, host, port, credentials, heartbeat, project_id, on_message
        )
        self._next = 0  # index of the next node to start
        # Nodes to start again (a storm), before any new one; each with its failures so far.
        self._restart: deque[Any] = deque()
        # Attempts in flight: (node, its connect_failures when started).
        self._window: list[tuple[Any, int]] = []
        self._to_requeue = 0  # nodes dropped whose close is not handled yet
        self.peak_in_flight = 0
        self._poll: LoopingCall | None = None
        self._waiters: list[Deferred[None]] = []
        self._stopped = False
        self._stopping: Deferred[None] | None = None

    def _node_maker(
        self,
        transport: str,
        host: str,
        port: int,
        credentials: EdgeCredentials,
        heartbeat: float,
        project_id: str,
        on_message: Callable[[Any, Message], None] | None,
    ) -> Callable[[str], Any]:
        reactor = self.reactor
        if transport == "quic":
            quic_node = quic_edge_class()
            # One aioquic configuration (CA, certificate, key parsed once) for every node.
            shared: dict[str, Any] = {}
            make_configuration = getattr(
                sys.modules[quic_node.__module__], "client_configuration", None
            )
            if make_configuration is not None:
                shared["configuration"] = make_configuration(
                    credentials, host, idle_timeout=max(60.0, 4.0 * heartbeat)
                )

            def make_quic(node_id: str) -> Any:
                return quic_node(
                    reactor,
                    node_id,
                    host,
                    port,
                    credentials,
                    project_id,
                    heartbeat,
                    True,
                    on_message,
                    store=MetaStore(keep_history=False),
                    **shared,
                )

            return make_quic

        from cloudhub.certs.tls import client_tls_options
        from cloudhub.edge.client import EdgeNode, edge_client_factory

        tls = client_tls_options(
            credentials.ca_pem, credentials.cert_pem, credentials.key_pem, hostname=host
        )
        factory = edge_client_factory(reactor)

        def make_ws(node_id: str) -> Any:
            return EdgeNode(
                reactor,
                node_id,
                host,
                port,
                None,
                project_id,
                heartbeat,
                True,
                on_message,
                store=MetaStore(keep_history=False),
                tls_options=tls,
                ws_factory=factory,
            )

        return make_ws

    def _on_message(self, node: Any, message: Message) -> None:
        # What metamanager stores and ACKs (§7.5); approximate, see the module docstring.
        if message.timestamp and not message.parent_msg_id and message.group == GROUP_RESOURCE:
            self.latency.add(now_ms() - message.timestamp)

    def node_id(self, index: int) -> str:
        return f"{self.prefix}{self.first + index}"

    # -- connecting --

    def grow(self, count: int) -> Deferred[None]:
        """Have ``count`` nodes (more are made and started; never fewer).

        Fires once every node started so far has connected or failed at least once.
        """
        while len(self.nodes) < count:
            self.nodes.append(self._make(self.node_id(len(self.nodes))))
        waiting: Deferred[None] = Deferred()
        self._waiters.append(waiting)
        if self._poll is None:
            self._poll = LoopingCall(self._fill)
            self._poll.clock = self.reactor
            self._poll.start(WINDOW_POLL, now=True)
        return waiting

    @property
    def connecting(self) -> bool:
        return self._poll is not None

    def _fill(self) -> None:
        # An attempt leaves the window once connected or failed (the node retries by itself,
        # with its backoff, outside the window).
        window = [
            (node, failures)
            for node, failures in self._window
            if not (node.connected or node.stats.connect_failures > failures)
        ]
        nodes = self.nodes
        restart = self._restart
        while not self._stopped and len(window) < self.concurrency:
            if restart:
                node = restart.popleft()
                node.reconnect = True
            elif self._next < len(nodes):
                node = nodes[self._next]
                self._next += 1
            else:
                break
            window.append((node, node.stats.connect_failures))
            node.start()  # fires on connect; never fails: the node retries by itself
        self._window = window
        self.peak_in_flight = max(self.peak_in_flight, len(window))
        idle = self._next >= len(nodes) and not restart and not self._to_requeue
        if not window and (idle or self._stopped):
            poll, self._poll = self._poll, None
            if poll is not None and poll.running:
                poll.stop()
            waiting, self._waiters = self._waiters, []
            for waiter in waiting:
                waiter.callback(None)

    def stop(self) -> Deferred[None]:
        """Close every node (code 1000) and stop reconnecting; fires when all are closed, or
        after :data:`STOP_TIMEOUT` with the rest still closing.

        Nodes close :data:`STOP_BATCH` at a time: ten thousand close frames at once would
        keep the hub busy past the edges' 2 s close-handshake timeout.
        """
        self._stopped = True
        self._window = []
        self._restart.clear()
        if self._poll is not None:
            self._fill()
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop_all())
        waiting: Deferred[None] = Deferred()
        self._stopping.addBoth(lambda _: waiting.callback(None))
        return waiting

    def drop_all(self, concurrency: int | None = None) -> tuple[int, Deferred[None]]:
        """The reconnect storm: abort every open connection at once (TCP reset, no close
        handshake), then have every one of those nodes connect again at once, at most
        ``concurrency`` attempts in flight (default: :attr:`concurrency`, which it replaces).

        A node does not wait out its reconnect backoff here (edgecore would wait a few
        seconds, all nodes about the same): the hub gets the whole fleet as fast as the edges
        can open connections. Returns how many nodes were dropped and a Deferred that fires
        once each of them has connected again or failed at least once. WebSocket only.
        """
        if self.transport != "ws":
            raise CloudHubError(f"drop_all: not implemented for {self.transport}")
        if concurrency is not None:
            self.concurrency = max(1, concurrency)
        dropped = [node for node in self.nodes[: self._next] if node.connected]
        for node in dropped:
            # Not reconnecting by itself: _fill starts it again, without the backoff.
            node.reconnect = False
        self._to_requeue += len(dropped)
        for node in dropped:
            node.when_disconnected().addCallback(self._requeue, node)
            node.protocol.transport.abortConnection()
        waiting: Deferred[None] = Deferred()
        self._waiters.append(waiting)
        self.peak_in_flight = 0
        if self._poll is None:
            self._poll = LoopingCall(self._fill)
            self._poll.clock = self.reactor
            # Not now: the aborted connections end on the next reactor turn.
            self._poll.start(WINDOW_POLL, now=False)
        return len(dropped), waiting

    def _requeue(self, info: object, node: Any) -> None:
        # Called while the node handles its close, before it decides not to retry: _fill
        # (a later turn) sets reconnect again and starts it.
        self._to_requeue -= 1
        if not self._stopped:
            self._restart.append(node)

    def stop_unconnected(self) -> int:
        """Start no more nodes and stop those not connected now (their retries would keep
        loading the hub); the connected ones stay. Returns how many were stopped."""
        self._stopped = True
        if self._poll is not None:
            self._fill()
        stopped = 0
        for node in self.nodes:
            if not node.connected:
                node.stop()
                stopped += 1
        return stopped

    async def _stop_all(self) -> None:
        deadline = self.reactor.seconds() + STOP_TIMEOUT
        nodes = self.nodes
        for offset in range(0, len(nodes), STOP_BATCH):
            batch: Deferred[Any] = DeferredList(
                [node.stop() for node in nodes[offset : offset + STOP_BATCH]], consumeErrors=True
            )
            left = deadline - self.reactor.seconds()
            if left > 0:
                batch.addTimeout(left, self.reactor)
                try:
                    await batch
                except Exception:
                    pass

    # -- counting --

    def snapshot(self) -> dict[str, Any]:
        """The nodes' counters summed (names in :data:`COUNTERS`) and the latency histogram."""
        connected = ever = failures = disconnects = reconnects = 0
        messages = acks = errors = keepalives = 0
        for node in self.nodes[: self._next]:
            stats = node.stats
            if node.connected:
                connected += 1
            if stats.connects:
                ever += 1
                reconnects += stats.connects - 1
            failures += stats.connect_failures
            disconnects += stats.disconnects
            messages += stats.messages_received
            acks += stats.acks_sent
            errors += stats.errors_sent
            keepalives += stats.keepalives_sent
        return {
            "nodes": len(self.nodes),
            "started": self._next,
            "connected": connected,
            "ever_connected": ever,
            "connect_failures": failures,
            "disconnects": disconnects,
            "reconnects": reconnects,
            "messages": messages,
            "acks": acks,
            "errors": errors,
            "keepalives": keepalives,
            "connecting": self.connecting,
            "latency": self.latency.to_json(),
        }


def merge_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' snapshots."""
    total: dict[str, Any] = {name: 0 for name in COUNTERS}
    latency = LatencyHistogram()
    connecting = False
    for snap in snapshots:
        for name in COUNTERS:
            total[name] += int(snap.get(name, 0))
        latency.merge(LatencyHistogram.from_json(snap.get("latency", {})))
        connecting = connecting or bool(snap.get("connecting"))
    total["connecting"] = connecting
    total["latency"] = latency.to_json()
    return total


# --- credentials -------------------------------------------------------------------------------


def _has_credentials(directory: str) -> bool:
    return all(os.path.exists(os.path.join(directory, n)) for n in (CA_FILE, CERT_FILE, KEY_FILE))


async def obtain_credentials(
    reactor: Reactor,
    https_url: str,
    token: str | None,
    certs: str | None,
    node_name: str = "edgesim",
) -> tuple[EdgeCredentials, str]:
    """The certificate every simulated node uses, and where it came from.

    Reuses ``certs`` when it holds edgecore's three files; otherwise bootstraps with
    ``token`` (like a fresh edgecore, §5.1) and saves to ``certs`` when given.
    """
    if certs and _has_credentials(certs):
        return EdgeCredentials.load(certs), f"reused {certs}"
    if not token:
        where = f"{certs} holds no {CA_FILE}/{CERT_FILE}/{KEY_FILE}" if certs else "no --certs"
        raise CloudHubError(f"give --token to bootstrap ({where})")
    credentials = await bootstrap(reactor, https_url, token, node_name)
    if certs:
        os.makedirs(certs, exist_ok=True)
        credentials.save(certs)
        return credentials, f"bootstrapped with the token, saved to {certs}"
    return credentials, "bootstrapped with the token"


# --- the command -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimOptions:
    """What ``cloudhub edgesim`` was asked to do (the command-line flags)."""

    nodes: int = 10
    transport: str = "ws"
    hub: str = "127.0.0.1"
    https_port: int = 10002
    ws_port: int = 10000
    quic_port: int = 10001
    token: str | None = None
    heartbeat: float = 15.0
    procs: int = 1
    duration: float = 60.0
    certs: str | None = None
    prefix: str = "edgesim-"
    first: int = 0
    concurrency: int = 100
    interval: float = 5.0  # seconds between status lines when stderr is not a terminal
    project_id: str = DEFAULT_PROJECT_ID

    @property
    def port(self) -> int:
        return self.quic_port if self.transport == "quic" else self.ws_port

    @property
    def https_url(self) -> str:
        host = f"[{self.hub}]" if ":" in self.hub else self.hub
        return f"https://{host}:{self.https_port}"

    def check(self) -> None:
        if self.transport not in TRANSPORTS:
            raise CloudHubError(f"--transport {self.transport}: must be ws or quic")
        if self.nodes < 1:
            raise CloudHubError(f"--nodes {self.nodes}: must be at least 1")
        if self.procs < 1:
            raise CloudHubError(f"--procs {self.procs}: must be at least 1")
        if not 0 < self.duration <= 7 * 24 * 3600:
            raise CloudHubError(f"--duration {self.duration:g}: must be > 0 seconds (≤ 1 week)")
        if self.heartbeat <= 0:
            raise CloudHubError(f"--heartbeat {self.heartbeat:g}: must be > 0 seconds")


class _Worker(ProcessProtocol):
    """One ``--worker`` child: keeps its latest snapshot; ``ended`` fires when it exits."""

    def __init__(self, err: TextIO) -> None:
        self.snapshot: dict[str, Any] = {}
        self.error = ""
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""
        self._err = err

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if "error" in report:
                self.error = str(report["error"])
            else:
                self.snapshot = report

    def errReceived(self, data: bytes) -> None:
        self._err.write(data.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class Simulation:
    """``cloudhub edgesim``: credentials, nodes here or in workers, live output, summary.

    :meth:`run` returns the summary (a dict) once the run is over: after ``duration``
    seconds, or sooner after :meth:`interrupt` (SIGINT).
    """

    def __init__(self, reactor: Reactor, options: SimOptions, out: TextIO, err: TextIO) -> None:
        self.reactor = reactor
        self.options = options
        self.out = out
        self.err = err
        self.tty = err.isatty()
        self._interrupted = False
        self._sleeping: tuple[Any, Deferred[None]] | None = None
        self._simulator: Simulator | None = None
        self._workers: list[_Worker] = []
        self._transports: list[Any] = []
        self._temp_certs: str | None = None
        self._last_line = ""

    def interrupt(self) -> None:
        """Stop now (SIGINT): close the nodes and report."""
        if self._interrupted:
            return
        self._interrupted = True
        sleeping, self._sleeping = self._sleeping, None
        if sleeping is not None and sleeping[0].active():
            sleeping[0].cancel()
            sleeping[1].callback(None)

    def snapshot(self) -> dict[str, Any]:
        if self._simulator is not None:
            return self._simulator.snapshot()
        return merge_snapshots(w.snapshot for w in self._workers)

    async def run(self) -> dict[str, Any]:
        options = self.options
        options.check()
        raise_open_file_limit()
        started = time.monotonic()
        summary: dict[str, Any] = {"nodes": options.nodes, "transport": options.transport}
        try:
            if options.transport == "quic":
                quic_edge_class()
            credentials, source = await obtain_credentials(
                self.reactor, options.https_url, options.token, options.certs
            )
            self._note(f"edgesim: certificate {source}")
            if options.procs == 1:
                self._simulator = Simulator(
                    self.reactor,
                    options.transport,
                    options.hub,
                    options.port,
                    credentials,
                    prefix=options.prefix,
                    first=options.first,
                    heartbeat=options.heartbeat,
                    concurrency=options.concurrency,
                    project_id=options.project_id,
                )
                self._simulator.grow(options.nodes)
            else:
                self._spawn_workers(credentials)
            await self._watch(started)
        except TransportUnavailable as e:
            summary["error"] = str(e)
            self._write_summary(summary)
            return summary
        finally:
            final = await self._stop()
            if self._temp_certs:
                shutil.rmtree(self._temp_certs, ignore_errors=True)
        summary.update(final)
        summary["duration"] = round(time.monotonic() - started, 1)
        summary["interrupted"] = self._interrupted
        errors = [w.error for w in self._workers if w.error]
        if errors:
            summary["error"] = errors[0]
        self._write_summary(summary)
        return summary

    # -- processes --

    def _spawn_workers(self, credentials: EdgeCredentials) -> None:
        options = self.options
        certs = options.certs
        if not (certs and _has_credentials(certs)):
            certs = self._temp_certs = tempfile.mkdtemp(prefix="edgesim-certs-")
            credentials.save(certs)
        share, extra = divmod(options.nodes, options.procs)
        first = options.first
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
        for index in range(options.procs):
            count = share + (1 if index < extra else 0)
            if not count:
                continue
            worker_options = replace(
                options, nodes=count, first=first, certs=certs, token=None, procs=1
            )
            first += count
            worker = _Worker(self.err)
            args = [sys.executable, "-m", "cloudhub.edgesim", "--worker"]
            args.append(json.dumps(asdict(worker_options)))
            transport = self.reactor.spawnProcess(worker, sys.executable, args, env=env)
            self._workers.append(worker)
            self._transports.append(transport)

    async def _stop(self) -> dict[str, Any]:
        if self._simulator is not None:
            await self._simulator.stop()
            return self._final(self._simulator.snapshot())
        for transport in self._transports:
            try:
                transport.closeStdin()  # the worker stops its nodes, reports, exits
            except Exception:
                pass
        if self._workers:
            ended: Deferred[Any] = DeferredList([w.ended for w in self._workers])
            ended.addTimeout(STOP_TIMEOUT + 10, self.reactor)
            try:
                await ended
            except Exception:
                for transport in self._transports:
                    try:
                        transport.signalProcess("KILL")
                    except Exception:
                        pass
        return self._final(self.snapshot())

    @staticmethod
    def _final(snapshot: dict[str, Any]) -> dict[str, Any]:
        latency = LatencyHistogram.from_json(snapshot.get("latency", {}))
        result = {name: snapshot.get(name, 0) for name in COUNTERS}
        result["latency_p50_ms"] = latency.percentile(50)
        result["latency_p99_ms"] = latency.percentile(99)
        result["latency_samples"] = latency.total
        return result

    # -- output --

    async def _watch(self, started: float) -> None:
        """Progress while connecting, then the live line, until the end of the run."""
        options = self.options
        deadline = started + options.duration
        tick = 0.5 if self.tty else min(1.0, options.interval)
        last_line = 0.0
        previous = self.snapshot()
        previous_at = time.monotonic()
        history = LatencyHistogram.from_json(previous.get("latency", {}))
        while not self._interrupted:
            now = time.monotonic()
            if now >= deadline:
                break
            await self._sleep(min(tick, deadline - now))
            if self._workers and all(w.ended.called for w in self._workers):
                break
            snap = self.snapshot()
            now = time.monotonic()
            connecting = bool(snap["connecting"]) or snap["started"] < options.nodes
            # Not a terminal: a line a second while connecting, then every --interval.
            every = 1.0 if connecting else options.interval
            if not self.tty and now - last_line < every:
                continue
            elapsed = max(now - previous_at, 1e-6)
            latency = LatencyHistogram.from_json(snap.get("latency", {}))
            if connecting:
                line = self._progress(snap, now - started)
            else:
                line = self._live(snap, previous, elapsed, latency.minus(history))
            self._status(line)
            last_line = now
            previous, previous_at, history = snap, now, latency
        if self.tty and self._last_line:
            self.err.write("\n")
            self.err.flush()

    def _progress(self, snap: dict[str, Any], elapsed: float) -> str:
        total = self.options.nodes
        done = snap["ever_connected"]
        width = 30
        filled = min(width, int(width * done / total))
        rate = done / elapsed if elapsed > 0 else 0.0
        return (
            f"connecting [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"{rate:.0f}/s failures {snap['connect_failures']} {elapsed:.0f}s"
        )

    def _live(
        self,
        snap: dict[str, Any],
        previous: dict[str, Any],
        elapsed: float,
        latency: LatencyHistogram,
    ) -> str:
        rate = (snap["messages"] - previous["messages"]) / elapsed
        p50, p99 = latency.percentile(50), latency.percentile(99)
        lat = f"{p50} / {p99} ms" if p50 is not None else "-"
        return (
            f"connected {snap['connected']}/{self.options.nodes}  messages {snap['messages']} "
            f"({rate:.0f}/s)  acks {snap['acks']}  ack latency p50/p99 {lat}  "
            f"reconnects {snap['reconnects']}"
        )

    def _status(self, line: str) -> None:
        if self.tty:
            pad = max(0, len(self._last_line) - len(line))
            self.err.write("\r" + line + " " * pad)
        else:
            self.err.write(line + "\n")
        self.err.flush()
        self._last_line = line

    def _note(self, line: str) -> None:
        if self.tty and self._last_line:
            self.err.write("\n")
            self._last_line = ""
        self.err.write(line + "\n")
        self.err.flush()

    def _write_summary(self, summary: dict[str, Any]) -> None:
        out = self.out
        if "connected" not in summary:
            out.write(f"edgesim: {summary.get('error', 'nothing ran')}\n")
            out.flush()
            return
        p50, p99 = summary["latency_p50_ms"], summary["latency_p99_ms"]
        latency = (
            f"p50 {p50} ms, p99 {p99} ms over {summary['latency_samples']} messages "
            "(approximate: edge clock minus header timestamp)"
            if p50 is not None
            else "no messages"
        )
        how = "interrupted" if summary["interrupted"] else "duration reached"
        rows = [
            (
                "nodes",
                f"{summary['nodes']} over {summary['transport']}, {summary['duration']} s ({how})",
            ),
            (
                "connected",
                f"{summary['ever_connected']} at least once, {summary['connected']} at the end",
            ),
            ("failures", f"{summary['connect_failures']} connection attempts failed"),
            ("messages", f"{summary['messages']} received"),
            ("acks", f"{summary['acks']} sent ({summary['errors']} error replies)"),
            ("reconnects", str(summary["reconnects"])),
            ("ack latency", latency),
        ]
        if summary.get("error"):
            rows.append(("error", str(summary["error"])))
        out.write("edgesim summary\n")
        for name, value in rows:
            out.write(f"  {name:<12} {value}\n")
        out.flush()

    def _sleep(self, seconds: float) -> Deferred[None]:
        """Sleep ``seconds``, or less if interrupted meanwhile."""
        done: Deferred[None] = Deferred()
        call = self.reactor.callLater(max(seconds, 0), done.callback, None)
        self._sleeping = (call, done)
        return done


def run(options: SimOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command on the global reactor; 0 when every node connected, else 1."""
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    out = out or sys.stdout
    err = err or sys.stderr
    log_warnings_to(err)
    result: dict[str, Any] = {}
    simulation = Simulation(reactor, options, out, err)

    def on_sigint(number: int, frame: object) -> None:
        # The first ^C stops the nodes and reports; a second one stops at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        reactor.callFromThread(simulation.interrupt)

    async def main() -> None:
        signal.signal(signal.SIGINT, on_sigint)
        try:
            result.update(await simulation.run())
        except CloudHubError as e:
            err.write(f"cloudhub: {e}\n")
            result["error"] = str(e)
        except Exception:
            log.failure("edgesim failed")
            result["error"] = "internal error"
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.run()
    if result.get("error"):
        return 1
    return 0 if result.get("ever_connected") == options.nodes else 1


def log_warnings_to(stream: TextIO) -> None:
    """Twisted log events of level warn and above to ``stream``, as text."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(
        textFileLogObserver(stream), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


# --- worker processes --------------------------------------------------------------------------


def _worker(options: SimOptions) -> None:
    """``--worker``: run a :class:`Simulator` (certificate from ``options.certs``), print a
    JSON snapshot a second, stop when stdin closes or the duration (+ grace) is over."""
    from twisted.internet import reactor as global_reactor
    from twisted.internet import stdio

    reactor: Any = global_reactor
    from twisted.internet.protocol import Protocol, connectionDone

    log_warnings_to(sys.stderr)
    raise_open_file_limit()
    state: dict[str, Any] = {}

    def report(**extra: Any) -> None:
        simulator = state.get("simulator")
        if simulator is not None:
            sys.stdout.write(json.dumps({**simulator.snapshot(), **extra}) + "\n")
            sys.stdout.flush()

    def finish() -> None:
        if state.get("finishing"):
            return
        state["finishing"] = True
        simulator = state.get("simulator")
        stopped = simulator.stop() if simulator is not None else succeed(None)
        stopped.addBoth(lambda _: report(final=True))
        stopped.addBoth(lambda _: reactor.stop())

    class Control(Protocol):
        def connectionLost(self, reason: Failure = connectionDone) -> None:
            reactor.callLater(0, finish)

    def start() -> None:
        try:
            assert options.certs, "a worker gets its certificate from --certs"
            credentials = EdgeCredentials.load(options.certs)
            simulator = Simulator(
                reactor,
                options.transport,
                options.hub,
                options.port,
                credentials,
                prefix=options.prefix,
                first=options.first,
                heartbeat=options.heartbeat,
                concurrency=options.concurrency,
                project_id=options.project_id,
            )
        except Exception as e:
            sys.stdout.write(json.dumps({"error": str(e)}) + "\n")
            sys.stdout.flush()
            reactor.stop()
            return
        state["simulator"] = simulator
        simulator.grow(options.nodes)
        LoopingCall(report).start(1.0, now=False)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    # stdin tells us when the parent is done; reports go to stdout with plain blocking writes
    # (StandardIO would make fd 1 non-blocking), so its own output side is /dev/null.
    devnull = os.open(os.devnull, os.O_WRONLY)
    stdio.StandardIO(Control(), stdout=devnull)  # type: ignore[call-arg]  # POSIX signature
    reactor.callWhenRunning(start)
    reactor.callLater(options.duration + WORKER_GRACE, finish)
    reactor.run(installSignalHandlers=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":
        fields_ = json.loads(argv[1])
        _worker(SimOptions(**fields_))
        return 0
    from cloudhub.cli import main as cli_main

    return cli_main(["edgesim", *argv])


if __name__ == "__main__":
    sys.exit(main())
