"""``cloudhub bench``: what one hub process does on this machine, on loopback (issue 8).

One entry point, three processes at most at a time:

* the **bench** process (this module's :func:`run`): drives everything and runs the simulated
  edge nodes (:class:`cloudhub.edgesim.Simulator`: real mutual TLS, edgecore's handshake,
  keepalives, metamanager-like ACKs) on its reactor;
* the **hub** process (``python -m cloudhub.bench --serve CONFIG``, :class:`HubRunner`): a
  :class:`~cloudhub.service.CloudHubService` with a temporary dataDir and the SQLite store, and
  a line protocol on stdin/stdout: ``prepare`` N messages for nodes, ``go`` (send them through
  ``upstream.send``, answer when every ACK is in and ``upstream.flush()`` fired), ``paced``
  (send at a rate, answer with send → ACK percentiles), ``count``, ``profile``, ``quit``.
  Messages are built before ``go`` so the measured hub work is delivery, not test-data making.

The hub's RSS and CPU come from ``/proc/<pid>/status`` (VmRSS) and ``/proc/<pid>/stat``
(utime + stime, all threads: the SQLite writer thread included), read by the bench process.
Each transport gets a fresh hub for its connection phase and another for its throughput and
latency phases, so the RSS per node is not inflated by messages and the throughput is not
slowed by thousands of idle nodes. Every phase is bounded in count and in time; a figure that
could not be measured says why in the table's notes and in the JSON.

``--quick`` (< 2 min), the full run (< 15 min on 2 cores) and ``--tiny`` (the tests) differ only
in their :class:`Plan`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from cloudhub.edgesim import (
    Simulator,
    TransportUnavailable,
    log_warnings_to,
    obtain_credentials,
    quic_edge_class,
    raise_open_file_limit,
)
from cloudhub.errors import CloudHubError

__all__ = ["HubProcess", "HubRunner", "PLANS", "Plan", "render_table", "run", "run_bench"]

log = Logger()

Reactor = Any

TRANSPORT_NAMES = {"ws": "websocket", "quic": "quic"}
NODE_PREFIX = "bench-"
# Sockets and ports kept free for everything that is not a simulated node.
FD_RESERVE = 200
PORT_RESERVE = 1000
# Memory per node, hub and edge together, for the "will it fit" check (twice what was measured).
BYTES_PER_NODE_ESTIMATE = 200 * 1024
# A connection step gives up when the hub's count has not grown for this long.
CONNECT_STALL = 20.0
HUB_START_TIMEOUT = 60.0
HUB_STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Plan:
    """How much one mode measures; each figure is bounded in count and in time."""

    mode: str
    connection_steps: tuple[int, ...]
    throughput_nodes: tuple[int, ...]
    throughput_seconds: float  # aimed length of one measured throughput run
    warmup_messages: int
    min_messages: int
    max_messages: int
    latency_nodes: int
    latency_seconds: float
    connect_budget: float  # seconds for one transport's connection phase
    hold_seconds: float  # how long the largest step is held before counting again
    budget: float  # seconds for the whole bench
    reserve: float  # seconds kept for the phases after the one starting
    concurrency: int = 100  # connection attempts in flight
    heartbeat: float = 15.0


PLANS = {
    "full": Plan(
        mode="full",
        connection_steps=(1000, 5000, 10000),
        throughput_nodes=(1, 100, 1000),
        throughput_seconds=8.0,
        warmup_messages=2000,
        min_messages=1000,
        max_messages=150_000,
        latency_nodes=100,
        latency_seconds=10.0,
        connect_budget=240.0,
        hold_seconds=15.0,
        budget=14 * 60.0,
        reserve=60.0,
    ),
    "quick": Plan(
        mode="quick",
        connection_steps=(200,),
        throughput_nodes=(1, 100),
        throughput_seconds=3.0,
        warmup_messages=500,
        min_messages=300,
        max_messages=30_000,
        latency_nodes=100,
        latency_seconds=4.0,
        connect_budget=30.0,
        hold_seconds=2.0,
        budget=110.0,
        reserve=10.0,
    ),
    "tiny": Plan(
        mode="tiny",
        connection_steps=(4,),
        throughput_nodes=(1, 3),
        throughput_seconds=0.5,
        warmup_messages=20,
        min_messages=30,
        max_messages=500,
        latency_nodes=3,
        latency_seconds=1.0,
        connect_budget=20.0,
        hold_seconds=0.2,
        budget=50.0,
        reserve=5.0,
    ),
}


# --- /proc -------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise CloudHubError(f"/proc/{pid}/status has no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stream:
        data = stream.read()
    # The command name (field 2) may hold spaces; fields after its ")" are plain.
    fields = data[data.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


class GcWatch:
    """Pauses of the cyclic garbage collector in this process (``gc.callbacks``).

    The hub and the edges are Python: a full collection stops everything for as long as it
    takes to walk the heap, which is where latency tails come from.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.longest = 0.0
        self._started = 0.0

    def install(self) -> None:
        import gc

        gc.callbacks.append(self._observe)

    def remove(self) -> None:
        import gc

        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        if info.get("generation") == 2 or pause >= 0.001:
            self.count += 1
            self.total += pause
            self.longest = max(self.longest, pause)

    def take(self) -> dict[str, Any]:
        """Pauses (full collections, and any of 1 ms or more) since the last take."""
        result = {
            "pauses": self.count,
            "total_ms": round(self.total * 1000, 1),
            "max_ms": round(self.longest * 1000, 1),
        }
        self.count, self.total, self.longest = 0, 0.0, 0.0
        return result


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# --- the hub process ---------------------------------------------------------------------------


class HubRunner:
    """The hub side: a :class:`CloudHubService` and the control commands (``--serve``).

    Commands and answers are JSON lines; every answer echoes the command's ``id``.
    """

    def __init__(self, reactor: Reactor, settings: dict[str, Any], write: Callable[[str], None]):
        from cloudhub.config import parse_config
        from cloudhub.service import CloudHubService

        self.reactor = reactor
        self.write = write
        base = settings["data_dir"]
        listen = {"address": "127.0.0.1", "port": 0}
        cloudhub: dict[str, Any] = {
            "https": listen,
            "websocket": listen,
            "nodeLimit": max(int(settings.get("node_limit", 500)), 1),
            "tlsCAFile": f"{base}/none.crt",
            "tlsCAKeyFile": f"{base}/none.key",
            "tlsCertFile": f"{base}/none-server.crt",
            "tlsPrivateKeyFile": f"{base}/none-server.key",
        }
        if settings.get("quic"):
            cloudhub["quic"] = {"enable": True, **listen}
        config = parse_config(
            {
                "cloudHub": cloudhub,
                "hub": {"dataDir": base, "store": {"type": "sqlite"}, "api": {"enable": False}},
            }
        )
        self.hub = CloudHubService(config, reactor=reactor)
        self.want_quic = bool(settings.get("quic"))
        self.prepared: list[tuple[str, Any]] = []
        self.outstanding = 0
        self.sequence = 0
        self.profiler: Any = None
        self.gc = GcWatch()

    async def start(self) -> None:
        self.gc.install()
        self.hub.startService()
        await self.hub.ready
        ports = {"https": self.hub.port("https"), "websocket": self.hub.port("websocket")}
        quic: int | None = None
        quic_problem = ""
        if self.want_quic:
            try:
                quic = self.hub.port("quic")
            except (KeyError, RuntimeError) as e:
                quic_problem = f"quic not available: the hub has no QUIC listener ({e!r})"
        self.write(
            json.dumps(
                {
                    "event": "ready",
                    "pid": os.getpid(),
                    "ports": {**ports, "quic": quic},
                    "quic_problem": quic_problem,
                    "token": self.hub.tokens.current,
                }
            )
        )

    async def stop(self) -> None:
        stopped = self.hub.stopService()
        if stopped is not None:
            await stopped

    # -- commands --

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "count":
            return {"connected": len(self.hub.handle.sessions)}
        if op == "prepare":
            return self.prepare(request["prefix"], int(request["nodes"]), int(request["messages"]))
        if op == "go":
            return await self.go(float(request.get("timeout", 60.0)))
        if op == "drain":
            return await self.drain(float(request.get("timeout", 30.0)))
        if op == "paced":
            return await self.paced(
                request["prefix"],
                int(request["nodes"]),
                float(request["rate"]),
                float(request["duration"]),
                float(request.get("timeout", 30.0)),
            )
        if op == "profile":
            return self.profile(request["action"], request.get("path"))
        if op == "stats":
            stats = self.hub.handle.stats
            return {
                name: getattr(stats, name)
                for name in stats.__slots__
                if name != "ack_latency_observers"
            }
        return {"error": f"unknown op {op!r}"}

    def _message(self) -> Any:
        """A fresh ACK-mode pod insert for its own object (§6.3: ACK mode, new uid)."""
        from cloudhub.model import Message

        self.sequence += 1
        name = f"p{self.sequence}"
        content = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "default",
                "uid": f"bench-uid-{self.sequence}",
                "resourceVersion": "1",
            },
        }
        return Message.new(
            "edgecontroller", "resource", "insert", f"default/pod/{name}", content, "1"
        )

    def prepare(self, prefix: str, nodes: int, messages: int) -> dict[str, Any]:
        self.prepared = [(f"{prefix}{i % nodes}", self._message()) for i in range(messages)]
        return {"prepared": len(self.prepared)}

    async def go(self, timeout: float) -> dict[str, Any]:
        """Send what was prepared, a slice per reactor turn; answer when all are ACKed and
        recorded (``flush``), or at ``timeout`` with what was ACKed by then."""
        batch, self.prepared = self.prepared, []
        total = len(batch)
        clock = time.perf_counter
        state = {"acked": 0, "failed": 0, "last": 0.0}
        done: Deferred[None] = Deferred()
        upstream = self.hub.upstream

        def acked(_: object) -> None:
            state["acked"] += 1
            state["last"] = clock()
            self.outstanding -= 1
            if state["acked"] + state["failed"] == total and not done.called:
                done.callback(None)

        def failed(failure: Failure) -> None:
            state["failed"] += 1
            self.outstanding -= 1
            if state["acked"] + state["failed"] == total and not done.called:
                done.callback(None)

        self.gc.take()
        started = clock()
        cpu_started = time.process_time()
        if not total:
            done.callback(None)

        def send_slice(offset: int) -> None:
            for node, message in batch[offset : offset + 2000]:
                self.outstanding += 1
                upstream.send(node, message).addCallbacks(acked, failed)
            if offset + 2000 < total:
                self.reactor.callLater(0, send_slice, offset + 2000)

        if total:
            send_slice(0)
        timer = self.reactor.callLater(timeout, _fire, done)
        await done
        if timer.active():
            timer.cancel()
        acked_at = clock()
        await upstream.flush()
        ended = clock()
        return {
            "messages": total,
            "acked": state["acked"],
            "failed": state["failed"],
            "timed_out": state["acked"] + state["failed"] < total,
            "ack_seconds": acked_at - started,
            "seconds": ended - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "gc": self.gc.take(),
        }

    async def drain(self, timeout: float) -> dict[str, Any]:
        """Wait until no message sent by ``go`` or ``paced`` waits for its ACK."""
        from twisted.internet.task import deferLater

        deadline = time.monotonic() + timeout
        while self.outstanding > 0 and time.monotonic() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
        return {"outstanding": self.outstanding}

    async def paced(
        self, prefix: str, nodes: int, rate: float, duration: float, timeout: float
    ) -> dict[str, Any]:
        """Send ``rate`` messages/s round-robin over the nodes for ``duration`` seconds; the
        send → ACK times (hub clock) of those ACKed within ``timeout`` after the last send."""
        from twisted.internet.task import LoopingCall, deferLater

        clock = time.perf_counter
        total = max(1, int(rate * duration))
        upstream = self.hub.upstream
        latencies: list[float] = []
        state = {"sent": 0, "failed": 0}
        self.gc.take()
        started = clock()

        def failed(failure: Failure) -> None:
            state["failed"] += 1
            self.outstanding -= 1

        def tick() -> None:
            due = min(total, int(rate * (clock() - started)) + 1)
            while state["sent"] < due:
                node = f"{prefix}{state['sent'] % nodes}"
                message = self._message()
                sent_at = clock()

                def acked(_: object, sent_at: float = sent_at) -> None:
                    latencies.append(clock() - sent_at)
                    self.outstanding -= 1

                self.outstanding += 1
                upstream.send(node, message).addCallbacks(acked, failed)
                state["sent"] += 1
            if state["sent"] >= total:
                loop.stop()

        loop = LoopingCall(tick)
        loop.clock = self.reactor
        await loop.start(0.005, now=True)
        sending = clock() - started
        deadline = time.monotonic() + timeout
        while len(latencies) + state["failed"] < total and time.monotonic() < deadline:
            await deferLater(self.reactor, 0.02, lambda: None)
        ms = [value * 1000 for value in latencies]
        return {
            "sent": state["sent"],
            "acked": len(latencies),
            "failed": state["failed"],
            "send_seconds": sending,
            "rate_sent": state["sent"] / sending if sending > 0 else None,
            "p50_ms": percentile(ms, 50),
            "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99),
            "max_ms": max(ms) if ms else None,
            "gc": self.gc.take(),
        }

    def profile(self, action: str, path: str | None) -> dict[str, Any]:
        import cProfile

        if action == "start":
            self.profiler = cProfile.Profile()
            self.profiler.enable()
            return {"profiling": True}
        profiler, self.profiler = self.profiler, None
        if profiler is None:
            return {"error": "not profiling"}
        profiler.disable()
        if path:
            profiler.dump_stats(path)
        return {"profiling": False, "top": top_functions(profiler)}


def top_functions(profiler: Any, count: int = 15) -> list[dict[str, Any]]:
    """The functions with the most own time, with their cumulative time."""
    import pstats

    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{_short_path(filename)}:{line}({name})",
                "calls": calls,
                "own_s": round(own, 3),
                "cumulative_s": round(cumulative, 3),
            }
        )
    rows.sort(key=lambda row: row["own_s"], reverse=True)
    return rows[:count]


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", "/cloudhub/", "lib/python3"):
        if marker in filename:
            return filename[filename.index(marker) + len(marker) :]
    return filename


def serve(settings: dict[str, Any]) -> None:
    """``--serve``: run a :class:`HubRunner` until ``quit`` or stdin closes."""
    from twisted.internet import reactor as global_reactor
    from twisted.internet import stdio

    reactor: Any = global_reactor
    from twisted.protocols.basic import LineReceiver

    log_warnings_to(sys.stderr)
    raise_open_file_limit()

    def write(line: str) -> None:
        # Blocking writes on fd 1 (StandardIO below only reads; its output side is /dev/null).
        data = (line + "\n").encode()
        while data:
            data = data[os.write(1, data) :]

    state: dict[str, Any] = {"runner": None, "stopping": False}

    def shutdown() -> None:
        if state["stopping"]:
            return
        state["stopping"] = True
        runner = state["runner"]
        stopping = Deferred.fromCoroutine(runner.stop()) if runner is not None else Deferred()
        if runner is None:
            stopping.callback(None)
        stopping.addErrback(lambda f: log.failure("stopping the hub failed", f))
        stopping.addBoth(lambda _: reactor.stop())

    class Control(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 20

        def lineReceived(self, line: bytes) -> None:
            try:
                request = json.loads(line)
            except ValueError:
                write(json.dumps({"error": "not JSON"}))
                return
            if request.get("op") == "quit":
                write(json.dumps({"id": request.get("id"), "quitting": True}))
                shutdown()
                return
            runner = state["runner"]
            if runner is None:
                write(json.dumps({"id": request.get("id"), "error": "hub not ready"}))
                return
            answer = Deferred.fromCoroutine(runner.handle(request))

            def reply(result: Any) -> None:
                if isinstance(result, Failure):
                    result = {"error": f"{type(result.value).__name__}: {result.getErrorMessage()}"}
                write(json.dumps({"id": request.get("id"), **result}))

            answer.addBoth(reply)

        def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
            reactor.callLater(0, shutdown)

    async def start() -> None:
        try:
            runner = HubRunner(reactor, settings, write)
            state["runner"] = runner
            await runner.start()
        except Exception as e:
            write(json.dumps({"event": "failed", "error": f"{type(e).__name__}: {e}"}))
            reactor.stop()

    devnull = os.open(os.devnull, os.O_WRONLY)
    stdio.StandardIO(Control(), stdout=devnull)  # type: ignore[call-arg]  # POSIX signature
    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()))
    # Bounded whatever the parent does: a hub of the bench never outlives an hour.
    reactor.callLater(float(settings.get("lifetime", 3600.0)), shutdown)
    reactor.run(installSignalHandlers=True)


# --- the bench side: talking to the hub process ------------------------------------------------


class HubProcess(ProcessProtocol):
    """A hub started with ``--serve``, seen from the bench: requests answered by Deferreds."""

    def __init__(self, reactor: Reactor, err: TextIO) -> None:
        self.reactor = reactor
        self.err = err
        self.ready: Deferred[dict[str, Any]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.pid = 0
        self.info: dict[str, Any] = {}
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self._buffer = b""
        self._err_buffer = b""
        self._echoed = 0
        self._waiting: dict[int, Deferred[dict[str, Any]]] = {}
        self._next_id = 0
        self._process: Any = None
        self._data_dir = ""

    @classmethod
    def start(
        cls, reactor: Reactor, err: TextIO, quic: bool, node_limit: int, lifetime: float
    ) -> HubProcess:
        hub = cls(reactor, err)
        hub._data_dir = tempfile.mkdtemp(prefix="cloudhub-bench-")
        settings = {
            "data_dir": hub._data_dir,
            "quic": quic,
            "node_limit": node_limit,
            "lifetime": lifetime,
        }
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
        args = [sys.executable, "-m", "cloudhub.bench", "--serve", json.dumps(settings)]
        hub._process = reactor.spawnProcess(hub, sys.executable, args, env=env)
        hub.pid = hub._process.pid
        return hub

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "ready" and not self.ready.called:
                self.info = message
                self.ready.callback(message)
            elif message.get("event") == "failed" and not self.ready.called:
                self.ready.errback(CloudHubError(f"the hub did not start: {message['error']}"))
            elif "id" in message:
                waiting = self._waiting.pop(message["id"], None)
                if waiting is not None:
                    waiting.callback(message)

    def errReceived(self, data: bytes) -> None:
        self._err_buffer += data
        *lines, self._err_buffer = self._err_buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.stderr_tail.append(line)
            # The hub logs warnings and worse only; show the first few, keep the rest.
            if self._echoed < 20:
                self.err.write(f"hub: {line}\n")
                self._echoed += 1

    def processEnded(self, reason: Failure) -> None:
        problem = CloudHubError(
            "the hub process ended: " + ("; ".join(list(self.stderr_tail)[-3:]) or "no output")
        )
        if not self.ready.called:
            self.ready.errback(problem)
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.errback(problem)
        shutil.rmtree(self._data_dir, ignore_errors=True)
        self.ended.callback(None)

    def request(self, op: str, wait: float = 60.0, **arguments: Any) -> Deferred[dict[str, Any]]:
        """Send a command; fires with the answer (CloudHubError on ``error``; times out after
        ``wait`` seconds)."""
        self._next_id += 1
        ident = self._next_id
        answer: Deferred[dict[str, Any]] = Deferred()
        self._waiting[ident] = answer
        line = json.dumps({"id": ident, "op": op, **arguments}) + "\n"
        if self.ended.called:
            self._waiting.pop(ident)
            answer.errback(CloudHubError("the hub process has ended"))
            return answer
        self._process.write(line.encode())
        answer.addTimeout(wait, self.reactor)

        def check(message: dict[str, Any]) -> dict[str, Any]:
            if "error" in message:
                raise CloudHubError(f"hub: {op}: {message['error']}")
            return message

        def forget(failure: Failure) -> Failure:
            self._waiting.pop(ident, None)
            return failure

        answer.addCallbacks(check, forget)
        return answer

    async def stop(self) -> None:
        """``quit`` (the hub closes every node and the store), then SIGKILL if it lingers."""
        if self.ended.called:
            return
        try:
            await self.request("quit", wait=5.0)
        except Exception:
            pass
        try:
            self._process.closeStdin()
        except Exception:
            pass
        ended: Deferred[None] = Deferred()
        self.ended.addBoth(lambda _: _fire(ended))
        timer = self.reactor.callLater(HUB_STOP_TIMEOUT, _fire, ended)
        await ended
        if timer.active():
            timer.cancel()
        if not self.ended.called:
            self.kill()
            await self.ended

    def kill(self) -> None:
        if not self.ended.called:
            try:
                self._process.signalProcess("KILL")
            except Exception:
                pass


# --- the bench ---------------------------------------------------------------------------------


def _fire(waiting: Deferred[None]) -> None:
    """Fire ``waiting`` unless it already fired (a timer racing the real event)."""
    if not waiting.called:
        waiting.callback(None)


def _sleep(reactor: Reactor, seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, max(seconds, 0.0), lambda: None)


def node_capacity() -> tuple[int, str]:
    """How many nodes this machine lets one edge process and one hub hold, and what caps it."""
    limits: list[tuple[int, str]] = []
    fds = raise_open_file_limit()
    limits.append((fds - FD_RESERVE, f"open-file limit {fds} (RLIMIT_NOFILE hard limit)"))
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as stream:
            low, high = (int(v) for v in stream.read().split())
        limits.append((high - low + 1 - PORT_RESERVE, f"ephemeral ports {low}-{high}"))
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    limits.append(
                        (
                            available // BYTES_PER_NODE_ESTIMATE,
                            f"available memory ({available >> 20} MB)",
                        )
                    )
    except OSError:
        pass
    return min(limits)


class Bench:
    """One run of ``cloudhub bench`` on ``reactor``; :meth:`run` returns the report (a dict)."""

    def __init__(
        self,
        reactor: Reactor,
        plan: Plan,
        transports: list[str],
        err: TextIO,
        profile_dir: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.plan = plan
        self.transports = transports
        self.err = err
        self.profile_dir = profile_dir
        self.started = time.monotonic()
        self.deadline = self.started + plan.budget
        self.hubs: list[HubProcess] = []
        self.simulators: list[Simulator] = []
        self.notes: list[str] = []
        self.gc = GcWatch()

    def say(self, line: str) -> None:
        elapsed = time.monotonic() - self.started
        self.err.write(f"[{elapsed:6.1f}s] {line}\n")
        self.err.flush()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def run(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "mode": self.plan.mode,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "cloudhub bench"
            + ("" if self.plan.mode == "full" else f" --{self.plan.mode}"),
            "machine": machine(),
            "plan": asdict(self.plan),
            "transports": {},
            "notes": self.notes,
        }
        try:
            for transport in self.transports:
                report["transports"][transport] = await self.measure(transport)
        finally:
            await self.cleanup()
        report["seconds"] = round(time.monotonic() - self.started, 1)
        return report

    async def cleanup(self) -> None:
        for simulator in self.simulators:
            await simulator.stop()
        self.simulators = []
        for hub in self.hubs:
            await hub.stop()
        self.hubs = []

    async def start_hub(self, transport: str, node_limit: int) -> HubProcess:
        hub = HubProcess.start(
            self.reactor,
            self.err,
            quic=transport == "quic",
            node_limit=node_limit,
            lifetime=self.plan.budget + 120,
        )
        self.hubs.append(hub)
        ready = hub.ready
        ready.addTimeout(HUB_START_TIMEOUT, self.reactor)
        try:
            await ready
        except CloudHubError as e:
            await hub.stop()
            self.hubs.remove(hub)
            if transport == "quic":
                # A hub whose QUIC listener cannot start: the transport is not available here.
                raise TransportUnavailable(f"quic not available: {e}") from None
            raise
        return hub

    async def stop_hub(self, hub: HubProcess, simulator: Simulator | None) -> None:
        if simulator is not None:
            await simulator.stop()
            if simulator in self.simulators:
                self.simulators.remove(simulator)
        await hub.stop()
        if hub in self.hubs:
            self.hubs.remove(hub)

    async def connect(
        self, transport: str, hub: HubProcess, concurrency: int | None = None
    ) -> Simulator:
        """A simulator with the hub's certificate (bootstrapped with its token), no nodes yet."""
        info = hub.info
        if transport == "quic" and not info["ports"].get("quic"):
            raise TransportUnavailable(info.get("quic_problem") or "quic not available")
        credentials, _ = await obtain_credentials(
            self.reactor,
            f"https://127.0.0.1:{info['ports']['https']}",
            info["token"],
            None,
            "bench",
        )
        port = info["ports"]["quic" if transport == "quic" else "websocket"]
        simulator = Simulator(
            self.reactor,
            transport,
            "127.0.0.1",
            port,
            credentials,
            prefix=NODE_PREFIX,
            heartbeat=self.plan.heartbeat,
            concurrency=concurrency or self.plan.concurrency,
        )
        self.simulators.append(simulator)
        return simulator

    async def measure(self, transport: str) -> dict[str, Any]:
        name = TRANSPORT_NAMES[transport]
        result: dict[str, Any] = {"transport": name, "available": True}
        try:
            if transport == "quic":
                quic_edge_class()
            result["connections"] = await self.connections(transport)
            result.update(await self.delivery(transport))
        except TransportUnavailable as e:
            self.say(f"{name}: {e}")
            await self.cleanup()
            return {"transport": name, "available": False, "reason": str(e)}
        return result

    # -- connections --

    async def connections(self, transport: str) -> dict[str, Any]:
        plan = self.plan
        name = TRANSPORT_NAMES[transport]
        capacity, capped_by = node_capacity()
        largest = max(plan.connection_steps)
        hub = await self.start_hub(transport, node_limit=largest + 10)
        simulator = await self.connect(transport, hub)
        own_pid = os.getpid()
        await _sleep(self.reactor, 0.5)
        base_rss = rss_kb(hub.pid)
        phase_deadline = min(time.monotonic() + plan.connect_budget, self.deadline - plan.reserve)
        steps: list[dict[str, Any]] = []
        stopped = ""
        held = 0
        rate = 0.0
        for target in plan.connection_steps:
            if target > capacity:
                stopped = f"stopped before {target:,} nodes: {capped_by} allows ~{capacity:,}"
                break
            if rate > 0 and time.monotonic() + (target - held) / rate > phase_deadline:
                stopped = (
                    f"stopped before {target:,} nodes: at {rate:.0f} nodes/s it would not fit "
                    f"the {plan.connect_budget:.0f} s budget of the connection phase"
                )
                break
            self.say(f"{name}: connecting {target:,} nodes")
            hub_cpu, edge_cpu = cpu_seconds(hub.pid), cpu_seconds(own_pid)
            began = time.monotonic()
            simulator.grow(target)
            count, why = await self._wait_count(hub, target, phase_deadline)
            seconds = time.monotonic() - began
            hub_cpu, edge_cpu = cpu_seconds(hub.pid) - hub_cpu, cpu_seconds(own_pid) - edge_cpu
            added = count - held
            rate = added / seconds if seconds > 0 and added > 0 else 0.0
            await _sleep(self.reactor, 1.0)  # let the last handshakes' garbage go
            rss = rss_kb(hub.pid)
            reached, count = count, (await hub.request("count"))["connected"]
            if count < reached and not why:
                why = f"{reached - count:,} nodes dropped within a second of connecting"
            snap = simulator.snapshot()
            step = {
                "nodes": target,
                "held": count,
                "seconds": round(seconds, 2),
                "connect_rate": round(rate, 1),
                "hub_rss_kb": rss,
                "hub_rss_base_kb": base_rss,
                "hub_rss_per_node_kb": round((rss - base_rss) / count, 1) if count else None,
                "hub_cpu_ms_per_connect": round(hub_cpu * 1000 / added, 2) if added > 0 else None,
                "hub_cpu_util": round(hub_cpu / seconds, 2) if seconds > 0 else None,
                "edge_cpu_util": round(edge_cpu / seconds, 2) if seconds > 0 else None,
                "edge_connect_failures": snap["connect_failures"],
                "edge_reconnects": snap["reconnects"],
            }
            steps.append(step)
            self.say(
                f"{name}: {count:,}/{target:,} held, {rate:.0f} nodes/s, hub RSS "
                f"{rss / 1024:.0f} MB ({step['hub_rss_per_node_kb']} KB/node)"
            )
            if count < target:
                stopped = (
                    f"stopped at {count:,} of {target:,} nodes: {why} (the step's last "
                    f"{added:,} nodes came at {rate:.0f}/s; hub CPU {step['hub_cpu_util']:.0%}, "
                    f"edges CPU {step['edge_cpu_util']:.0%} of a core)"
                )
                break
            held = count
        idle: dict[str, Any] | None = None
        if stopped:
            # Idle means idle: the nodes still trying to connect would load the hub.
            simulator.stop_unconnected()
            await _sleep(self.reactor, 2.0)
            held = (await hub.request("count"))["connected"]
        if steps and plan.hold_seconds:
            hub_cpu, edge_cpu = cpu_seconds(hub.pid), cpu_seconds(own_pid)
            await _sleep(self.reactor, plan.hold_seconds)
            still = (await hub.request("count"))["connected"]
            hub_cpu, edge_cpu = cpu_seconds(hub.pid) - hub_cpu, cpu_seconds(own_pid) - edge_cpu
            idle = {
                "nodes": still,
                "seconds": plan.hold_seconds,
                "heartbeat": plan.heartbeat,
                "hub_cpu_util": round(hub_cpu / plan.hold_seconds, 3),
                "edge_cpu_util": round(edge_cpu / plan.hold_seconds, 3),
            }
            if still < held:
                stopped = (
                    stopped or f"{held - still} nodes dropped while held {plan.hold_seconds:g} s"
                )
            held = still
        await self.stop_hub(hub, simulator)
        if stopped:
            self.notes.append(f"{name} connections: {stopped}")
        else:
            self.notes.append(
                f"{name} connections: all {largest:,} nodes of the largest step held "
                f"{plan.hold_seconds:g} s; this machine would stop near {capacity:,} "
                f"({capped_by})"
            )
        seconds = sum(s["seconds"] for s in steps)
        return {
            "steps": steps,
            "held": held,
            "idle": idle,
            "connect_rate": round(steps[-1]["held"] / seconds, 1) if steps and seconds else None,
            "target": largest,
            "stopped": stopped or None,
            "capacity": capacity,
            "capacity_limited_by": capped_by,
        }

    async def _wait_count(self, hub: HubProcess, target: int, deadline: float) -> tuple[int, str]:
        """Poll the hub's node count until ``target``, a stall, or ``deadline``."""
        count = 0
        last_growth = time.monotonic()
        while True:
            current = (await hub.request("count"))["connected"]
            now = time.monotonic()
            if current > count:
                count, last_growth = current, now
            if count >= target:
                return count, ""
            if now - last_growth > CONNECT_STALL:
                return count, f"no new node for {CONNECT_STALL:g} s"
            if now > deadline:
                return count, "the time budget of the connection phase ran out"
            await _sleep(self.reactor, 0.1)

    # -- throughput and latency --

    async def delivery(self, transport: str) -> dict[str, Any]:
        plan = self.plan
        name = TRANSPORT_NAMES[transport]
        nodes_needed = max(*plan.throughput_nodes, plan.latency_nodes)
        hub = await self.start_hub(transport, node_limit=nodes_needed + 10)
        simulator = await self.connect(transport, hub)
        self.say(f"{name}: connecting {nodes_needed:,} nodes for throughput")
        simulator.grow(nodes_needed)
        count, why = await self._wait_count(hub, nodes_needed, time.monotonic() + 120)
        result: dict[str, Any] = {"throughput": [], "latency": None}
        if count < nodes_needed:
            self.notes.append(f"{name} throughput: only {count} of {nodes_needed} nodes: {why}")
        peaks: dict[int, float] = {}
        for nodes in plan.throughput_nodes:
            if nodes > count:
                continue
            if self.remaining() < plan.reserve:
                self.notes.append(f"{name} throughput with {nodes} nodes skipped: time budget")
                continue
            run = await self.throughput(hub, name, nodes)
            result["throughput"].append(run)
            if run["msgs_per_s"]:
                peaks[nodes] = run["msgs_per_s"]
        if self.profile_dir and peaks:
            busiest = max(peaks, key=lambda n: peaks[n])
            result["profile"] = await self.profiled(hub, name, busiest, peaks[busiest])
        latency_nodes = min(plan.latency_nodes, count)
        peak = peaks.get(latency_nodes) or (max(peaks.values()) if peaks else 0.0)
        if peak and self.remaining() > plan.latency_seconds + plan.reserve:
            result["latency"] = await self.latency(hub, name, latency_nodes, peak / 2)
        elif peak:
            self.notes.append(f"{name} latency skipped: time budget")
        await self.stop_hub(hub, simulator)
        return result

    async def throughput(self, hub: HubProcess, name: str, nodes: int) -> dict[str, Any]:
        """ACK-mode messages/s through ``nodes`` nodes: a warm-up sized run, then one sized to
        last about ``throughput_seconds``."""
        plan = self.plan
        warmup = await self._go(hub, nodes, max(plan.warmup_messages, nodes), timeout=60.0)
        estimate = warmup["acked"] / warmup["seconds"] if warmup["seconds"] > 0 else 100.0
        messages = int(estimate * plan.throughput_seconds)
        messages = max(plan.min_messages, min(plan.max_messages, messages), nodes)
        messages -= messages % nodes  # the same number for every node
        timeout = min(
            max(3 * messages / max(estimate, 1.0), 10.0), max(self.remaining() - 20, 10.0)
        )
        self.say(f"{name}: {messages:,} messages to {nodes:,} node(s)")
        own_pid = os.getpid()
        self._quiet_edges()
        hub_cpu, edge_cpu = cpu_seconds(hub.pid), cpu_seconds(own_pid)
        answer = await self._go(hub, nodes, messages, timeout)
        hub_cpu, edge_cpu = cpu_seconds(hub.pid) - hub_cpu, cpu_seconds(own_pid) - edge_cpu
        edge_gc = self.gc.take()
        seconds = answer["seconds"]
        acked = answer["acked"]
        run = {
            "nodes": nodes,
            "messages": messages,
            "acked": acked,
            "failed": answer["failed"],
            "timed_out": answer["timed_out"],
            "seconds": round(seconds, 3),
            "msgs_per_s": round(acked / seconds, 1) if seconds > 0 and acked else None,
            "hub_cpu_s_per_1000": round(hub_cpu * 1000 / acked, 3) if acked else None,
            "hub_cpu_util": round(hub_cpu / seconds, 2) if seconds > 0 else None,
            "edge_cpu_util": round(edge_cpu / seconds, 2) if seconds > 0 else None,
            "hub_gc": answer["gc"],
            "edge_gc": edge_gc,
        }
        self.say(
            f"{name}: {nodes:,} node(s): {run['msgs_per_s'] or 0:,.0f} msg/s, hub CPU "
            f"{run['hub_cpu_util']}, edges CPU {run['edge_cpu_util']}"
        )
        if answer["timed_out"]:
            self.notes.append(
                f"{name} throughput with {nodes} nodes: {acked} of {messages} ACKed in the "
                f"{timeout:.0f} s allowed; the rate is over those"
            )
            await hub.request("drain", wait=40.0, timeout=30.0)
        return run

    async def _go(
        self, hub: HubProcess, nodes: int, messages: int, timeout: float
    ) -> dict[str, Any]:
        await hub.request("prepare", wait=120.0, prefix=NODE_PREFIX, nodes=nodes, messages=messages)
        return await hub.request("go", wait=timeout + 30.0, timeout=timeout)

    async def latency(self, hub: HubProcess, name: str, nodes: int, rate: float) -> dict[str, Any]:
        plan = self.plan
        self.say(f"{name}: paced {rate:,.0f} msg/s to {nodes} nodes for {plan.latency_seconds:g} s")
        self._quiet_edges()
        answer = await hub.request(
            "paced",
            wait=plan.latency_seconds + 60.0,
            prefix=NODE_PREFIX,
            nodes=nodes,
            rate=rate,
            duration=plan.latency_seconds,
            timeout=30.0,
        )
        result = {
            "nodes": nodes,
            "rate_target": round(rate, 1),
            "rate_sent": round(answer["rate_sent"], 1) if answer["rate_sent"] else None,
            "sent": answer["sent"],
            "acked": answer["acked"],
            **{
                k: round(answer[k], 2) if answer[k] is not None else None
                for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")
            },
            "hub_gc": answer["gc"],
            "edge_gc": self.gc.take(),
        }
        self.say(f"{name}: send → ACK p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
        return result

    def _quiet_edges(self) -> None:
        """Before a measured run: collect, then freeze, the edge process's heap.

        The simulated nodes keep every object they stored (metamanager's table), so without
        this the load generator's own full collections, tens of milliseconds each, would be
        counted as hub latency. The hub is measured as it is: nothing of the kind there.
        """
        import gc

        gc.collect()
        gc.freeze()
        self.gc.take()

    async def profiled(self, hub: HubProcess, name: str, nodes: int, rate: float) -> dict[str, Any]:
        """One more throughput run under cProfile on both sides (slower: not a figure).

        cProfile sees the reactor thread only, not the SQLite writer thread."""
        import cProfile

        assert self.profile_dir is not None
        os.makedirs(self.profile_dir, exist_ok=True)
        hub_path = os.path.join(self.profile_dir, f"{self.plan.mode}-{name}-{nodes}-hub.prof")
        edge_path = os.path.join(self.profile_dir, f"{self.plan.mode}-{name}-{nodes}-edges.prof")
        messages = int(rate * self.plan.throughput_seconds / 2)
        messages = max(self.plan.warmup_messages, min(self.plan.max_messages, messages), nodes)
        messages -= messages % nodes
        self.say(f"{name}: profiling {messages:,} messages to {nodes:,} nodes")
        await hub.request("prepare", wait=120.0, prefix=NODE_PREFIX, nodes=nodes, messages=messages)
        await hub.request("profile", action="start")
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            await hub.request("go", wait=150.0, timeout=120.0)
        finally:
            profiler.disable()
        answer = await hub.request("profile", action="stop", path=hub_path)
        profiler.dump_stats(edge_path)
        return {
            "nodes": nodes,
            "messages": messages,
            "hub_file": hub_path,
            "edges_file": edge_path,
            "hub_top": answer["top"],
            "edges_top": top_functions(profiler),
        }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import autobahn

    import twisted

    memory = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            memory = int(stream.readline().split()[1]) // 1024
    except OSError:
        pass
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as stream:
            for line in stream:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from google.protobuf.internal import api_implementation

        protobuf = api_implementation.Type()
    except ImportError:
        protobuf = "absent"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_mb": memory,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "autobahn": autobahn.__version__,
        "protobuf_backend": protobuf,
        "platform": platform.platform(),
        "open_files": raise_open_file_limit(),
    }


# --- the table ---------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


Cell = Callable[[dict[str, Any]], str]


def _step(nodes: int) -> Cell:
    """The hub RSS per node at the connection step of ``nodes``."""

    def cell(data: dict[str, Any]) -> str:
        for step in data["connections"]["steps"]:
            if step["nodes"] == nodes and step["hub_rss_per_node_kb"] is not None:
                return f"{step['hub_rss_per_node_kb']:.1f} KB"
        return "-"

    return cell


def _run(nodes: int, key: str, digits: int) -> Cell:
    """A figure of the throughput run with ``nodes`` nodes."""

    def cell(data: dict[str, Any]) -> str:
        for run in data.get("throughput", []):
            if run["nodes"] == nodes:
                return _number(run[key], digits)
        return "-"

    return cell


def _connect_cpu(data: dict[str, Any]) -> str:
    steps = data["connections"]["steps"]
    if steps and steps[0]["hub_cpu_ms_per_connect"] is not None:
        return f"{steps[0]['hub_cpu_ms_per_connect']:.2f} ms"
    return "-"


def _latency(data: dict[str, Any]) -> str:
    latency = data.get("latency")
    if latency and latency["p50_ms"] is not None:
        return f"{latency['p50_ms']:.1f} / {latency['p99_ms']:.1f}"
    return "-"


def _idle(data: dict[str, Any]) -> str:
    idle = data["connections"].get("idle")
    if not idle:
        return "-"
    return f"{idle['hub_cpu_util']:.1%} at {idle['nodes']:,}"


def _gc_pause(data: dict[str, Any]) -> str:
    latency = data.get("latency")
    if not latency or not latency.get("hub_gc"):
        return "-"
    return _number(latency["hub_gc"]["max_ms"])


def _latency_rate(data: dict[str, Any]) -> str:
    latency = data.get("latency")
    return _number(latency["rate_sent"]) if latency else "-"


def render_table(report: dict[str, Any]) -> str:
    """The figures as one plain-text table, a column per transport, then the notes."""
    transports = report["transports"]
    keys = list(transports)
    header = ["figure", *(transports[k]["transport"] for k in keys)]
    rows: list[list[str]] = []

    def row(label: str, cell: Cell) -> None:
        values = []
        for key in keys:
            data = transports[key]
            values.append(cell(data) if data.get("available") else "not available")
        rows.append([label, *values])

    def section(title: str) -> None:
        rows.append([title, *([""] * len(keys))])

    def plural(nodes: int) -> str:
        return f"  {nodes:,} node{'s' if nodes != 1 else ''}"

    available = [transports[k] for k in keys if transports[k].get("available")]
    target = max((t["connections"]["target"] for t in available), default=0)
    steps = sorted({s["nodes"] for t in available for s in t["connections"]["steps"]})
    counts = sorted({r["nodes"] for t in available for r in t.get("throughput", [])})
    latency_nodes = next((t["latency"]["nodes"] for t in available if t.get("latency")), None)

    section("connections (mutual TLS)")
    row(f"  nodes held (of {target:,})", lambda d: _number(d["connections"]["held"]))
    row("  connect rate, nodes/s", lambda d: _number(d["connections"]["connect_rate"]))
    for nodes in steps:
        row(f"  hub RSS per node at {nodes:,}", _step(nodes))
    row("  hub CPU per connect", _connect_cpu)
    row("  hub idle CPU (share of a core)", _idle)
    section("throughput, ACK mode, msg/s (send → edge ACK → recorded)")
    for nodes in counts:
        row(plural(nodes), _run(nodes, "msgs_per_s", 0))
    paced = f" ({latency_nodes} nodes, paced)" if latency_nodes else ""
    section(f"latency send → ACK at 50 % of peak{paced}")
    row("  rate sent, msg/s", _latency_rate)
    row("  p50 / p99, ms", _latency)
    row("  hub's longest GC pause meanwhile, ms", _gc_pause)
    section("hub CPU seconds per 1,000 messages")
    for nodes in counts:
        row(plural(nodes), _run(nodes, "hub_cpu_s_per_1000", 3))

    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    machine_ = report["machine"]
    lines = [
        f"{report['command']}: {machine_['cpus']} CPUs, Python {machine_['python']}, "
        f"Twisted {machine_['twisted']}, loopback, mutual TLS, SQLite store, "
        f"{report.get('seconds', 0):.0f} s",
        line(header),
        *(line(r) for r in rows),
    ]
    notes = list(report.get("notes", []))
    for key in keys:
        data = transports[key]
        if not data.get("available"):
            notes.append(f"{data['transport']}: {data.get('reason', 'not available')}")
    if notes:
        lines.append("notes:")
        lines.extend(f"  - {note}" for note in notes)
    return "\n".join(lines) + "\n"


# --- output files ------------------------------------------------------------------------------


def default_json_path(mode: str, now: datetime.date | None = None) -> str:
    day = (now or datetime.date.today()).isoformat()
    return os.path.join("benchmarks", "results", f"{day}-{mode}.json")


def write_plot(report: dict[str, Any], path: str) -> str | None:
    """A PNG of throughput and RSS per node when matplotlib is importable; its path or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    available = {k: t for k, t in report["transports"].items() if t.get("available")}
    if not available:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for data in available.values():
        runs = data.get("throughput", [])
        left.plot(
            [r["nodes"] for r in runs],
            [r["msgs_per_s"] or 0 for r in runs],
            marker="o",
            label=data["transport"],
        )
        steps = data["connections"]["steps"]
        right.plot(
            [s["held"] for s in steps],
            [s["hub_rss_per_node_kb"] or 0 for s in steps],
            marker="o",
            label=data["transport"],
        )
    left.set_xscale("log")
    left.set_xlabel("nodes")
    left.set_ylabel("ACK-mode messages/s")
    left.set_title("throughput")
    right.set_xlabel("connected nodes")
    right.set_ylabel("hub RSS per node, KB")
    right.set_title("memory")
    for axes in (left, right):
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(f"{report['command']} ({report['machine']['cpus']} CPUs)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# --- entry points ------------------------------------------------------------------------------


async def run_bench(
    reactor: Reactor,
    plan: Plan,
    transports: list[str],
    err: TextIO,
    profile_dir: str | None = None,
) -> dict[str, Any]:
    """Measure ``transports`` with ``plan``; the report (also what ``--json`` holds)."""
    raise_open_file_limit()
    bench = Bench(reactor, plan, transports, err, profile_dir)

    def kill_hubs() -> None:
        for hub in bench.hubs:
            hub.kill()

    killer = reactor.addSystemEventTrigger("before", "shutdown", kill_hubs)
    bench.gc.install()
    try:
        return await bench.run()
    finally:
        reactor.removeSystemEventTrigger(killer)
        bench.gc.remove()
        import gc

        gc.unfreeze()


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``cloudhub bench``: measure, print the table, write the JSON (and PNG)."""
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    out = out or sys.stdout
    err = err or sys.stderr
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    plan = PLANS[mode]
    transports = list(dict.fromkeys(args.transport or ["ws", "quic"]))
    json_path = args.json or default_json_path(mode)
    profile_dir = (
        os.path.join(os.path.dirname(json_path) or ".", "profiles") if args.profile else None
    )
    log_warnings_to(err)
    outcome: dict[str, Any] = {}

    async def main() -> None:
        try:
            outcome["report"] = await run_bench(reactor, plan, transports, err, profile_dir)
        except CloudHubError as e:
            err.write(f"cloudhub bench: {e}\n")
        except Exception:
            log.failure("cloudhub bench failed")
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.run()
    report = outcome.get("report")
    if report is None:
        return 1
    out.write(render_table(report))
    directory = os.path.dirname(json_path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as stream:
        json.dump(report, stream, indent=2)
        stream.write("\n")
    out.write(f"figures written to {json_path}\n")
    if not args.no_plot:
        png = write_plot(report, os.path.splitext(json_path)[0] + ".png")
        if png:
            out.write(f"plot written to {png}\n")
    out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--serve":
        serve(json.loads(argv[1]))
        return 0
    from cloudhub.cli import main as cli_main

    return cli_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
