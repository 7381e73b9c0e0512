"""Sync store throughput, and what it costs the reactor (issue 5: durable delivery).

A pipelined hub: every reactor turn hands the store ``--per-turn`` new pending messages
(``put_pending``) and the ACKs of the previous turn's (``acknowledged``), spread over
``--nodes`` nodes, until ``--records`` objects were sent and acknowledged; then one ``flush()``.
Printed per store:

* records/s: objects put *and* acknowledged, durably, per wall-clock second (end = the final
  flush fired);
* reactor µs/write: time the reactor thread spent inside the store's write calls, per call
  (message encoding included; messages are built beforehand);
* turn max: the longest turn's store calls (how long the reactor was blocked at once);
* tick lag p99/max: lateness of a 10 ms LoopingCall, i.e. what other connections would feel
  (includes the GIL the writer thread holds between SQLite calls, and GC pauses);
* batches and mean changes per batch.

Not a test: it prints figures and asserts nothing. Bounded: each run stops after ``--budget``
seconds. Run from the checkout: ``python benchmarks/store_bench.py``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import LoopingCall, react  # noqa: E402

from cloudhub.model import Message  # noqa: E402
from cloudhub.store import ISyncStore, MemorySyncStore, SQLiteSyncStore  # noqa: E402

TICK = 0.010


def build_messages(count: int) -> list[Message]:
    """Pod updates of realistic size (~600 bytes of JSON each)."""
    messages = []
    for index in range(count):
        uid = f"6f1c2a4e-{index:08d}-4d2b-9c1e-1234567890ab"
        content = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"web-{index}",
                "namespace": "default",
                "uid": uid,
                "resourceVersion": str(1000 + index),
                "labels": {"app": "web", "tier": "frontend"},
            },
            "spec": {
                "nodeName": f"edge-{index % 100}",
                "containers": [
                    {
                        "name": "nginx",
                        "image": "nginx:1.25",
                        "ports": [{"containerPort": 80, "protocol": "TCP"}],
                        "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}},
                    }
                ],
            },
        }
        messages.append(
            Message.new(
                "edgecontroller",
                "resource",
                "update",
                f"default/pod/web-{index}",
                content,
                resource_version=str(1000 + index),
            )
        )
    return messages


@dataclass
class Result:
    name: str
    records: int = 0
    seconds: float = 0.0
    write_calls: int = 0
    write_seconds: float = 0.0
    turn_max: float = 0.0
    lags: list[float] = field(default_factory=list)
    batches: int | None = None
    changes: int | None = None
    file_bytes: int | None = None
    stopped_early: bool = False

    def print(self) -> None:
        lags = sorted(self.lags) or [0.0]
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        line = (
            f"{self.name:<22} {self.records / self.seconds:>10,.0f} records/s "
            f"({self.records:,} in {self.seconds:.2f} s)  "
            f"reactor {self.write_seconds / self.write_calls * 1e6:5.1f} µs/write  "
            f"turn max {self.turn_max * 1e3:6.1f} ms  "
            f"tick lag p99 {p99 * 1e3:5.1f} ms max {lags[-1] * 1e3:5.1f} ms"
        )
        if self.batches:
            assert self.changes is not None
            line += f"  {self.batches} batches, {self.changes / self.batches:,.0f} changes/batch"
        if self.file_bytes is not None:
            line += f"  file {self.file_bytes / 1e6:.0f} MB"
        if self.stopped_early:
            line += "  (budget hit: stopped early)"
        print(line, flush=True)


async def run(
    reactor: Any,
    name: str,
    store: ISyncStore,
    messages: list[Message],
    per_turn: int,
    nodes: int,
    budget: float,
) -> Result:
    result = Result(name)
    last_tick = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        result.lags.append(max(0.0, now - last_tick[0] - TICK))
        last_tick[0] = now

    ticker = LoopingCall(tick)
    ticker.clock = reactor
    ticker.start(TICK, now=False)

    done: Deferred[None] = Deferred()
    started = time.perf_counter()
    chunks = [messages[i : i + per_turn] for i in range(0, len(messages), per_turn)]

    def turn(index: int) -> None:
        begin = time.perf_counter()
        calls = 0
        if index < len(chunks):
            base = index * per_turn
            for offset, message in enumerate(chunks[index]):
                number = base + offset
                store.put_pending(
                    f"edge-{number % nodes}",
                    message.content["metadata"]["uid"],
                    message,
                    "Pod",
                    "default",
                    message.content["metadata"]["name"],
                )
            calls += len(chunks[index])
        if index > 0:
            base = (index - 1) * per_turn
            for offset, message in enumerate(chunks[index - 1]):
                number = base + offset
                store.acknowledged(
                    f"edge-{number % nodes}",
                    message.content["metadata"]["uid"],
                    1000 + number,
                    deleted=False,
                )
            calls += len(chunks[index - 1])
            result.records += len(chunks[index - 1])
        spent = time.perf_counter() - begin
        result.write_calls += calls
        result.write_seconds += spent
        result.turn_max = max(result.turn_max, spent)
        if index >= len(chunks) or time.perf_counter() - started > budget:
            result.stopped_early = index < len(chunks)
            store.flush().chainDeferred(done)
        else:
            reactor.callLater(0, turn, index + 1)

    reactor.callLater(0, turn, 0)
    await done
    result.seconds = time.perf_counter() - started
    ticker.stop()
    if isinstance(store, SQLiteSyncStore):
        result.batches = store.batches_committed
        result.changes = store.changes_committed
        result.file_bytes = sum(
            os.path.getsize(store.path + suffix)
            for suffix in ("", "-wal")
            if os.path.exists(store.path + suffix)
        )
    await store.close()
    return result


async def main(reactor: Any, options: argparse.Namespace) -> None:
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {options.records:,} records "
        f"over {options.nodes} nodes, {options.per_turn} puts + {options.per_turn} ACKs per turn",
        flush=True,
    )
    began = time.perf_counter()
    messages = build_messages(options.records)
    print(f"built messages in {time.perf_counter() - began:.1f} s", flush=True)
    if options.freeze:
        # The prebuilt messages are ~1M objects; a full collection walking them stalls the
        # reactor for up to ~0.5 s whatever the store does. A hub holding as many pending
        # messages has the same pauses (gc.freeze() after startup is the cure there too).
        gc.collect()
        gc.freeze()
    with tempfile.TemporaryDirectory(prefix="store-bench-", dir=options.dir) as directory:
        runs: list[tuple[str, Any]] = [("memory", MemorySyncStore)]
        for mode in options.synchronous:
            path = os.path.join(directory, f"{mode.lower()}.db")
            runs.append((f"sqlite {mode}", lambda p=path, m=mode: SQLiteSyncStore(p, reactor, m)))
        for name, make in runs:
            result = await run(
                reactor, name, make(), messages, options.per_turn, options.nodes, options.budget
            )
            result.print()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--per-turn", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--budget", type=float, default=15.0, help="seconds per run at most")
    parser.add_argument(
        "--synchronous", nargs="*", default=["NORMAL", "FULL"], help="SQLite modes to run"
    )
    parser.add_argument(
        "--no-freeze",
        dest="freeze",
        action="store_false",
        help="leave the prebuilt messages to the cyclic GC (shows its pauses)",
    )
    parser.add_argument("--dir", default=None, help="where the database files go (a tmp dir)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
