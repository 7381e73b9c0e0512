"""``make chaos``: the hub and Python edges through network faults (issue 18; docs/chaos.md).

Root only. Two network namespaces made here, ``chaos-hub-<pid>`` and ``chaos-edge-<pid>``,
joined by one veth pair (10.200.0.1/30 on the hub's side, 10.200.0.2/30 on the edges'): the
root namespace's interfaces, addresses, routes and firewall are never touched, and every fault
(qdisc or iptables rule) lives inside these two namespaces. The hub (``twistd -n cloudhub``,
keepaliveInterval 10 s) runs in the first, its HTTP API on a UNIX socket in a temporary
directory (so this script, in the root namespace, reaches it with no network at all); the
edges (``tests/chaos/edges.py``: N ``cloudhub.edge.client.EdgeNode``, heartbeat 3 s) run in
the second. Faults, in order, each applied for a bounded time and healed:

  loss       5 % of packets dropped, each direction
  delay      300 ms added, each direction
  partition  every packet dropped, both directions, for 60 s (the half-open case: neither
             side is told, kubeedge#6965)
  reorder    packets delayed 10 ms with 25 % sent at once (out of order), each direction

With ``tc netem`` (probed at start) every fault is netem on both veth ends. Without it: loss
is an iptables ``statistic`` DROP on the INPUT side of each namespace, the partition an
iptables DROP there (both exact packet drops on the wire), delay a userspace TCP relay in the
edge namespace (a stream is delayed, not packets), and reorder is skipped: it cannot be done
without netem. The run prints which is which.

During each fault new versions of every object are sent through the API; after it, checks:

  (1) drop       partition: every node cut off is dropped by the hub within keepaliveInterval
                 + 5 s; other faults: no node is dropped for silence (keepalive timeouts
                 metric unchanged)
  (2) reconnect  after healing, every node is connected again within a bound
  (3) delivery   every accepted message is at its edge at the newest version (the edges'
                 stores), nothing is pending at the hub and acked_version is the newest, and no
                 edge ever stored a version older than one it had acknowledged

Exits 0 when every check passes, 1 otherwise (2: could not set up), with a summary. Namespaces,
rules, qdiscs and processes are removed on any exit; the temporary directory (config, logs)
is kept when something failed, and its path printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(os.path.abspath(sys.executable))

HUB_ADDRESS = "10.200.0.1"
EDGE_ADDRESS = "10.200.0.2"
WS_PORT = 10000
HTTPS_PORT = 10002
KEEPALIVE = 10
HEARTBEAT = 3.0
DROP_MARGIN = 5.0
NS_RE = re.compile(r"^chaos-(hub|edge)-(\d+)\b")

START = time.monotonic()


def now() -> float:
    return time.monotonic() - START


def say(text: str) -> None:
    print(f"[{now():6.1f}s] {text}", flush=True)


class SetupError(Exception):
    pass


class Interrupted(Exception):
    pass


# --- running things ---------------------------------------------------------------------------


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise SetupError(f"{' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *args, check=check)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 15.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class Api:
    def __init__(self, path: str) -> None:
        self.path = path

    def request(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        connection = UnixHTTPConnection(self.path)
        try:
            data = None if body is None else json.dumps(body).encode()
            connection.request(method, url, body=data, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(raw)
        return response.status, raw.decode()

    def nodes(self) -> set[str]:
        status, body = self.request("GET", "/v1/nodes")
        if status != 200:
            raise RuntimeError(f"GET /v1/nodes: {status} {body}")
        return {node["node_id"] for node in body["nodes"]}

    def metric(self, name: str) -> float:
        _, text = self.request("GET", "/metrics")
        total = 0.0
        for line in str(text).splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


# --- the checks' bookkeeping --------------------------------------------------------------------


@dataclass
class Check:
    phase: str
    name: str
    ok: bool
    detail: str


@dataclass
class Run:
    nodes: list[str]
    objects: int
    checks: list[Check] = field(default_factory=list)
    # (node, object index) -> newest accepted resourceVersion
    newest: dict[tuple[str, int], int] = field(default_factory=dict)
    version: int = 0
    sent: int = 0
    accepted: int = 0

    def check(self, phase: str, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(phase, name, ok, detail))
        say(f"{'PASS' if ok else 'FAIL'} {phase}: ({name}) {detail}")
        return ok


def message(node: str, index: int, version: int, first: bool) -> dict[str, Any]:
    name = f"chaos-{index}"
    uid = f"uid-{node}-{index}"
    return {
        "node": node,
        "message": {
            "header": {"resourceversion": str(version)},
            "route": {
                "source": "edgecontroller",
                "group": "resource",
                "operation": "insert" if first else "update",
                "resource": f"default/configmap/{name}",
            },
            "content": {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": name,
                    "namespace": "default",
                    "uid": uid,
                    "resourceVersion": str(version),
                },
                "data": {"version": str(version)},
            },
        },
    }


def send_round(api: Api, state: Run) -> str:
    """A new version of every object of every node, in one batch; what the API said."""
    entries = []
    keys = []
    for node in state.nodes:
        for index in range(state.objects):
            state.version += 1
            first = (node, index) not in state.newest
            entries.append(message(node, index, state.version, first))
            keys.append((node, index, state.version))
    status, body = api.request("POST", "/v1/messages", entries)
    state.sent += len(entries)
    if status != 200:
        return f"batch refused: {status} {body}"
    refused = []
    for (node, index, version), result in zip(keys, body["results"], strict=True):
        if result["status"] == "accepted":
            state.accepted += 1
            state.newest[(node, index)] = max(state.newest.get((node, index), 0), version)
        else:
            refused.append(f"{node}/{index}@{version}: {result['status']} {result.get('error')}")
    return "; ".join(refused)


# --- the harness ---------------------------------------------------------------------------------


class Chaos:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        tag = str(os.getpid())
        self.hub_ns = f"chaos-hub-{tag}"
        self.edge_ns = f"chaos-edge-{tag}"
        self.hub_if = f"chh{tag}"[:15]
        self.edge_if = f"che{tag}"[:15]
        self.tmp = tempfile.mkdtemp(prefix="cloudhub-chaos-")
        self.api = Api(os.path.join(self.tmp, "api.sock"))
        self.state_file = os.path.join(self.tmp, "edges.json")
        self.control_file = os.path.join(self.tmp, "control.json")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.namespaces: list[str] = []
        self.netem = False
        self.run = Run([f"chaos-edge-{i}" for i in range(options.nodes)], options.objects)

    # -- setup --

    def clean_stale(self) -> None:
        """Namespaces of an earlier run whose process is gone (it was killed -9)."""
        for line in run("ip", "netns", "list").stdout.splitlines():
            match = NS_RE.match(line)
            if match and not os.path.exists(f"/proc/{match.group(2)}"):
                name = line.split()[0]
                say(f"removing {name}, left by an earlier run (pid {match.group(2)} is gone)")
                run("ip", "netns", "del", name, check=False)

    def make_network(self) -> None:
        for ns in (self.hub_ns, self.edge_ns):
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        # Created directly inside the two namespaces: nothing appears in the root namespace.
        run(
            "ip",
            "link",
            "add",
            self.hub_if,
            "netns",
            self.hub_ns,
            "type",
            "veth",
            "peer",
            "name",
            self.edge_if,
            "netns",
            self.edge_ns,
        )
        for ns, dev, address in (
            (self.hub_ns, self.hub_if, HUB_ADDRESS),
            (self.edge_ns, self.edge_if, EDGE_ADDRESS),
        ):
            in_ns(ns, "ip", "addr", "add", f"{address}/30", "dev", dev)
            in_ns(ns, "ip", "link", "set", dev, "up")
        probe = in_ns(
            self.edge_ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            self.edge_if,
            "root",
            "netem",
            "delay",
            "1ms",
            check=False,
        )
        self.netem = probe.returncode == 0 and not self.options.no_netem
        if probe.returncode == 0:
            in_ns(self.edge_ns, "tc", "qdisc", "del", "dev", self.edge_if, "root")
            why = "available" + (" (not used: --no-netem)" if self.options.no_netem else "")
        else:
            why = f"NOT available ({probe.stderr.strip()})"
        say(
            f"namespaces {self.hub_ns} ({HUB_ADDRESS}) and {self.edge_ns} ({EDGE_ADDRESS}), "
            f"veth {self.hub_if}/{self.edge_if}; tc netem {why}"
        )

    def write_config(self) -> str:
        data = os.path.join(self.tmp, "data")
        config = {
            "cloudHub": {
                "keepaliveInterval": KEEPALIVE,
                "tlsCAFile": os.path.join(data, "ca", "rootCA.crt"),
                "tlsCAKeyFile": os.path.join(data, "ca", "rootCA.key"),
                "tlsCertFile": os.path.join(data, "certs", "server.crt"),
                "tlsPrivateKeyFile": os.path.join(data, "certs", "server.key"),
                "advertiseAddress": [HUB_ADDRESS],
                "websocket": {"address": HUB_ADDRESS, "port": WS_PORT},
                "https": {"address": HUB_ADDRESS, "port": HTTPS_PORT},
                "quic": {"enable": False},
            },
            "hub": {"dataDir": data, "api": {"endpoint": f"unix:{self.api.path}:mode=600"}},
        }
        path = os.path.join(self.tmp, "cloudhub.yaml")
        with open(path, "w") as stream:
            json.dump(config, stream, indent=2)  # JSON is YAML
        return path

    def start(self, name: str, ns: str, *argv: str) -> None:
        log = open(os.path.join(self.tmp, f"{name}.log"), "wb")
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.tmp,
        )
        log.close()

    def alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            tail = self.tail(name)
            raise SetupError(f"{name} exited with {proc.returncode}:\n{tail}")

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as stream:
                return "".join(stream.readlines()[-lines:])
        except OSError:
            return ""

    def wait(
        self, what: str, predicate: Callable[[], bool], timeout: float, every: float = 0.25
    ) -> float | None:
        """Seconds until ``predicate`` held, or None after ``timeout``."""
        began = time.monotonic()
        while True:
            for name in self.procs:
                self.alive(name)
            try:
                if predicate():
                    return time.monotonic() - began
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                pass
            if time.monotonic() - began > timeout:
                return None
            time.sleep(every)

    def start_hub_and_edges(self) -> None:
        config = self.write_config()
        self.start(
            "hub",
            self.hub_ns,
            os.path.join(BIN, "twistd"),
            "-n",
            "--pidfile=",
            "cloudhub",
            "--config",
            config,
        )
        took = self.wait("hub", lambda: self.api.request("GET", "/readyz")[0] == 200, 60)
        if took is None:
            raise SetupError(f"hub not ready within 60 s:\n{self.tail('hub')}")
        say(
            f"hub ready in {took:.1f}s (twistd -n cloudhub in {self.hub_ns}, "
            f"keepaliveInterval {KEEPALIVE}s)"
        )
        token = run(os.path.join(BIN, "cloudhub"), "token", "--config", config).stdout.strip()
        token_file = os.path.join(self.tmp, "token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as stream:
            stream.write(token)
        self.control({"path": "direct", "delay": 0.0})
        self.start(
            "edges",
            self.edge_ns,
            sys.executable,
            os.path.join(HERE, "edges.py"),
            "--hub",
            HUB_ADDRESS,
            "--ws-port",
            str(WS_PORT),
            "--https-port",
            str(HTTPS_PORT),
            "--token-file",
            token_file,
            "--nodes",
            str(self.options.nodes),
            "--heartbeat",
            str(HEARTBEAT),
            "--state",
            self.state_file,
            "--control",
            self.control_file,
        )
        took = self.wait("edges", self.all_connected, 60)
        if took is None:
            raise SetupError(f"edges not all connected within 60 s:\n{self.tail('edges')}")
        say(
            f"{self.options.nodes} edges connected in {took:.1f}s (cloudhub.edge.client.EdgeNode "
            f"in {self.edge_ns}, heartbeat {HEARTBEAT:g}s)"
        )

    def control(self, control: dict[str, Any]) -> None:
        tmp = self.control_file + ".tmp"
        with open(tmp, "w") as stream:
            json.dump(control, stream)
        os.replace(tmp, self.control_file)

    def edges(self) -> dict[str, Any]:
        with open(self.state_file) as stream:
            return json.load(stream)  # type: ignore[no-any-return]

    def all_connected(self, since: dict[str, int] | None = None) -> bool:
        """Every node connected at the hub and at the edge (with ``since``: on a connection
        opened after that snapshot of the edges' connect counters)."""
        state = self.edges()["nodes"]
        return self.api.nodes() >= set(self.run.nodes) and all(
            state[node]["connected"] and (since is None or state[node]["connects"] > since[node])
            for node in self.run.nodes
        )

    def counters(self, key: str) -> dict[str, int]:
        state = self.edges()["nodes"]
        return {node: state[node][key] for node in self.run.nodes}

    # -- faults --

    def ends(self) -> list[tuple[str, str]]:
        return [(self.hub_ns, self.hub_if), (self.edge_ns, self.edge_if)]

    def netem_on(self, *args: str) -> Callable[[], None]:
        for ns, dev in self.ends():
            in_ns(ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem", *args)

        def heal() -> None:
            for ns, dev in self.ends():
                in_ns(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)

        return heal

    def iptables_on(self, *match: str) -> Callable[[], None]:
        """A DROP rule on the INPUT side of both namespaces: packets are sent, then lost."""
        for ns, dev in self.ends():
            in_ns(ns, "iptables", "-I", "INPUT", "-i", dev, *match, "-j", "DROP")

        def heal() -> None:
            for ns, dev in self.ends():
                in_ns(ns, "iptables", "-D", "INPUT", "-i", dev, *match, "-j", "DROP", check=False)

        return heal

    def dropped_packets(self) -> tuple[str, bool]:
        """What the fault dropped, and whether it dropped something each way."""
        counts = []
        for ns, dev in self.ends():
            if self.netem:
                out = in_ns(ns, "tc", "-s", "qdisc", "show", "dev", dev, check=False).stdout
                match = re.search(r"dropped (\d+)", out)
                counts.append(match.group(1) if match else "?")
            else:
                out = in_ns(ns, "iptables", "-L", "INPUT", "-v", "-n", "-x", check=False).stdout
                total = sum(
                    int(line.split()[0])
                    for line in out.splitlines()
                    if "DROP" in line and line.split()[0].isdigit()
                )
                counts.append(str(total))
        # netem drops on each end's way out, the INPUT rules on each end's way in.
        hub_to_edge, edge_to_hub = (counts[0], counts[1]) if self.netem else (counts[1], counts[0])
        return f"packets dropped: {hub_to_edge} hub->edge, {edge_to_hub} edge->hub", all(
            c.isdigit() and int(c) > 0 for c in counts
        )

    # -- one phase --

    def phase(
        self,
        name: str,
        how: str,
        apply: Callable[[], Callable[[], None]],
        duration: float,
        partition: bool = False,
        must_reconnect: bool = False,
        drops: bool = False,
        probe_at_least: float = 0.0,
    ) -> None:
        state = self.run
        must_reconnect = must_reconnect or partition
        say(f"--- {name}: {how}, {duration:g}s")
        timeouts_before = self.api.metric("cloudhub_keepalive_timeouts_total")
        heal = apply()
        cut = time.monotonic()
        dropped_at: dict[str, float] = {}
        problems: list[str] = []
        probe = None
        self.probe_seconds: list[float] = []
        probe_seconds = self.probe_seconds
        rounds = 0
        next_round = cut
        try:
            while time.monotonic() - cut < duration:
                if time.monotonic() >= next_round:
                    if probe == "pending":
                        probe = self.ack_probe()  # before the round: an empty queue
                    refused = send_round(self.api, state)
                    if refused:
                        problems.append(refused)
                    next_round += 5.0
                    rounds += 1
                    if rounds == 1 and not partition:
                        probe = "pending"
                present = self.api.nodes()
                for node in state.nodes:
                    if node not in present and node not in dropped_at:
                        dropped_at[node] = time.monotonic() - cut
                        say(f"hub dropped {node} {dropped_at[node]:.1f}s after the fault began")
                for proc in self.procs:
                    self.alive(proc)
                time.sleep(0.25)
            packets, dropping = "", False
            if drops:
                packets, dropping = self.dropped_packets()
        finally:
            heal()
        healed = time.monotonic()
        say(f"healed after {healed - cut:.1f}s" + (f"; send -> ACK probe {probe}" if probe else ""))
        if drops:
            state.check(name, "applied", dropping, f"the fault was in effect: {packets}")
        if probe_at_least:
            took = probe_seconds[0] if probe_seconds else 0.0
            state.check(
                name,
                "applied",
                took >= probe_at_least,
                f"one message's send -> ACK took {took * 1000:.0f} ms (one round trip, 300 ms "
                f"each way: at least {probe_at_least * 1000:.0f} ms)",
            )
        if problems:
            state.check(name, "accept", False, "; ".join(problems))

        # (1) the hub drops what is cut off, and only that
        timeouts = self.api.metric("cloudhub_keepalive_timeouts_total") - timeouts_before
        if partition:
            bound = KEEPALIVE + DROP_MARGIN
            late = {n: t for n, t in dropped_at.items() if t > bound}
            missing = [n for n in state.nodes if n not in dropped_at]
            times = ", ".join(f"{n} {t:.1f}s" for n, t in sorted(dropped_at.items()))
            state.check(
                name,
                "drop",
                not late and not missing,
                f"cut-off nodes dropped within keepaliveInterval + {DROP_MARGIN:g} s "
                f"= {bound:g} s: {times or 'none'}"
                + (f"; NOT dropped: {missing}" if missing else "")
                + f"; keepalive timeouts +{timeouts:g}",
            )
        else:
            state.check(
                name,
                "drop",
                timeouts == 0,
                f"no node dropped for silence: keepalive timeouts +{timeouts:g}"
                + (f" (seen gone: {sorted(dropped_at)})" if dropped_at else ""),
            )

        # (2) every node back (on a new connection, where the fault ended the old one)
        bound = self.options.reconnect_bound
        since = self.counters("connects") if must_reconnect else None
        disconnects = self.counters("disconnects")
        noticed: list[float] = []
        began = time.monotonic()

        def back() -> bool:
            if not noticed and self.counters("disconnects") != disconnects:
                noticed.append(time.monotonic() - began)
            return self.all_connected(since)

        took = self.wait("reconnect", back, bound)
        if must_reconnect and noticed:
            say(f"the first edge saw its old connection end {noticed[0]:.1f}s after healing")
        edges = self.edges()["nodes"]
        closes = sorted({edges[n]["last_close"] for n in state.nodes if edges[n]["last_close"]})
        up = [n for n in state.nodes if edges[n]["connected"]]
        state.check(
            name,
            "reconnect",
            took is not None,
            (
                f"every node connected{' again' if must_reconnect else ''} {took:.1f}s after "
                f"healing (bound {bound:g}s)"
                if took is not None
                else f"not all connected {bound:g}s after healing: hub has "
                f"{sorted(self.api.nodes())}, edges {up}"
            )
            + (f"; edges' last close: {closes}" if closes else ""),
        )

        # (3) everything accepted is at its edge, newest version
        self.delivery(name)

    def ack_probe(self) -> str:
        """One message sent with ?wait=ack to the first node: the fault as the API sees it."""
        state = self.run
        node = state.nodes[0]
        state.version += 1
        entry = message(node, 0, state.version, (node, 0) not in state.newest)
        began = time.monotonic()
        status, body = self.api.request(
            "POST", f"/v1/nodes/{node}/messages?wait=ack&timeout=10", entry["message"]
        )
        took = time.monotonic() - began
        state.sent += 1
        if status in (200, 202, 504):
            state.accepted += 1
            state.newest[(node, 0)] = max(state.newest.get((node, 0), 0), state.version)
        self.probe_seconds.append(took)
        return f"{took * 1000:.0f} ms ({status})"

    def delivery(self, name: str) -> None:
        state = self.run
        bound = self.options.delivery_bound
        lagging: list[str] = []

        def done() -> bool:
            lagging.clear()
            edges = self.edges()["nodes"]
            for node in state.nodes:
                store = edges[node]["store"]
                for index in range(state.objects):
                    want = str(state.newest[(node, index)])
                    have = store.get(f"default/configmap/chaos-{index}")
                    if have != want:
                        lagging.append(f"{node} chaos-{index}: edge has {have}, newest {want}")
                status, body = self.api.request("GET", f"/v1/nodes/{node}/objects")
                for record in body["objects"] if status == 200 else []:
                    index = int(record["name"].rsplit("-", 1)[1])
                    want = str(state.newest[(node, index)])
                    if record.get("pending_version") or str(record.get("acked_version")) != want:
                        lagging.append(
                            f"{node} chaos-{index}: hub acked "
                            f"{record.get('acked_version')}, pending "
                            f"{record.get('pending_version')}, newest {want}"
                        )
            return not lagging

        took = self.wait("delivery", done, bound, every=0.5)
        edges = self.edges()["nodes"]
        stale = [s for n in state.nodes for s in edges[n]["stale"]]
        total = len(state.nodes) * state.objects
        state.check(
            name,
            "delivery",
            took is not None and not stale,
            (
                f"all {total} objects at their newest version on the edges and acked at "
                f"the hub {took:.1f}s after reconnecting"
                if took is not None
                else f"after {bound:g}s still: {lagging[:6]}"
            )
            + (f"; STALE versions stored after a newer ACK: {stale}" if stale else ""),
        )

    # -- the run --

    def main(self) -> int:
        self.clean_stale()
        self.make_network()
        self.start_hub_and_edges()
        real, emulated, skipped = [], [], []

        # baseline: the setup delivers at all
        say("--- baseline: no fault")
        send_round(self.api, self.run)
        self.delivery("baseline")

        if self.netem:
            real.append("loss (netem loss 5%)")
            self.phase(
                "loss",
                "netem loss 5% on both veth ends",
                lambda: self.netem_on("loss", "5%"),
                self.options.fault_time,
                drops=True,
            )
        else:
            emulated.append("loss (iptables statistic DROP 5%, each direction)")
            self.phase(
                "loss",
                "iptables: 5% of packets dropped at INPUT, each direction "
                "(-m statistic --mode random --probability 0.05 -j DROP)",
                lambda: self.iptables_on(
                    "-m", "statistic", "--mode", "random", "--probability", "0.05"
                ),
                self.options.fault_time,
                drops=True,
            )

        if self.netem:
            real.append("delay (netem delay 300ms)")
            self.phase(
                "delay",
                "netem delay 300ms on both veth ends",
                lambda: self.netem_on("delay", "300ms"),
                self.options.fault_time,
                probe_at_least=0.55,
            )
        else:
            emulated.append("delay (userspace TCP relay, 300 ms each direction)")

            def relay() -> Callable[[], None]:
                self.control({"path": "relay", "delay": 0.3})

                def heal() -> None:
                    relayed = self.edges()["relay"]["accepted"]
                    self.run.check(
                        "delay",
                        "applied",
                        relayed >= len(self.run.nodes),
                        f"the relay carried {relayed} connections (every node reconnected "
                        "through it)",
                    )
                    self.control({"path": "direct", "delay": 0.0})
                    # Once the edges have read it (their nodes are closing), not before.
                    self.wait("edges", lambda: self.edges()["path"] == "direct", 10)

                return heal

            self.phase(
                "delay",
                "relay: edges reconnect through a TCP relay in their namespace "
                "that delays the byte stream 300 ms each direction (a stream, not "
                "packets: TCP's own segments and ACKs are not delayed)",
                relay,
                self.options.fault_time,
                must_reconnect=True,
                probe_at_least=0.55,
            )

        if self.netem:
            real.append("partition (netem loss 100%)")
            self.phase(
                "partition",
                "netem loss 100% on both veth ends (half-open: nobody is told)",
                lambda: self.netem_on("loss", "100%"),
                self.options.partition_time,
                partition=True,
                drops=True,
            )
        else:
            emulated.append("partition (iptables DROP both ways; exact)")
            self.phase(
                "partition",
                "iptables: every packet dropped at INPUT, both directions "
                "(half-open: nobody is told)",
                lambda: self.iptables_on(),
                self.options.partition_time,
                partition=True,
                drops=True,
            )

        if self.netem:
            real.append("reorder (netem delay 10ms reorder 25% 50%)")
            self.phase(
                "reorder",
                "netem delay 10ms reorder 25% 50% on both veth ends",
                lambda: self.netem_on("delay", "10ms", "reorder", "25%", "50%"),
                self.options.reorder_time,
            )
        else:
            skipped.append("reorder")
            say(
                "--- reorder: SKIPPED: cannot be emulated without tc netem (this kernel has no "
                "sch_netem): iptables can only drop packets, tbf only shapes them in order, and "
                "a userspace relay sees TCP's ordered byte stream, where nothing can overtake"
            )

        for name in ("hub", "edges"):
            text = self.tail(name, lines=1_000_000)
            errors = text.count("Traceback")
            self.run.check("run", "logs", errors == 0, f"{name} log: {errors} tracebacks")
        return self.summary(real, emulated, skipped)

    def summary(self, real: list[str], emulated: list[str], skipped: list[str]) -> int:
        state = self.run
        failed = [c for c in state.checks if not c.ok]
        print("\n=== make chaos summary ===", flush=True)
        print(f"faults applied with real tc netem: {', '.join(real) or 'none'}")
        print(f"faults emulated without netem:     {', '.join(emulated) or 'none'}")
        print(f"faults skipped:                    {', '.join(skipped) or 'none'}")
        print(
            f"nodes {len(state.nodes)}, objects per node {state.objects}, messages sent "
            f"{state.sent}, accepted {state.accepted}, newest version {state.version}"
        )
        for c in state.checks:
            print(f"  {'PASS' if c.ok else 'FAIL'}  {c.phase:<10} {c.name:<10} {c.detail}")
        print(
            f"{len(state.checks) - len(failed)} of {len(state.checks)} checks passed "
            f"in {now():.0f}s" + (f"; FAILED: {len(failed)}" if failed else ""),
            flush=True,
        )
        return 1 if failed else 0

    # -- cleanup --

    def cleanup(self, keep: bool) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        # Deleting a namespace removes its veth end (and so the pair), qdiscs and iptables rules.
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)
        left = [ns for ns in self.namespaces if ns in run("ip", "netns", "list").stdout]
        if left:
            print(f"chaos: could not remove namespaces {left}", file=sys.stderr)
        if keep:
            print(f"chaos: config and logs kept in {self.tmp}", flush=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="make chaos: network faults (docs/chaos.md)")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--objects", type=int, default=5, help="objects per node")
    parser.add_argument("--fault-time", type=float, default=30.0, help="loss, delay: seconds")
    parser.add_argument("--partition-time", type=float, default=60.0)
    parser.add_argument("--reorder-time", type=float, default=20.0)
    parser.add_argument(
        "--reconnect-bound",
        type=float,
        default=90.0,
        help="seconds after healing within which every node must be back",
    )
    parser.add_argument(
        "--delivery-bound",
        type=float,
        default=60.0,
        help="seconds after reconnecting within which everything is delivered",
    )
    parser.add_argument("--no-netem", action="store_true", help="emulate even if netem exists")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--deadline", type=float, default=900.0, help="the whole run, seconds")
    options = parser.parse_args()
    if os.geteuid() != 0:
        print(
            "chaos: needs root (network namespaces, tc, iptables): run `sudo make chaos`",
            file=sys.stderr,
        )
        return 2
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            print(
                f"chaos: `{tool}` not found: install Debian's iproute2 and iptables",
                file=sys.stderr,
            )
            return 2

    def interrupted(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(signum, interrupted)
    signal.alarm(int(options.deadline))
    chaos = Chaos(options)
    status = 2
    try:
        status = chaos.main()
    except SetupError as error:
        print(f"chaos: setup failed: {error}", file=sys.stderr, flush=True)
    except Interrupted as why:
        deadline = f": the {options.deadline:g}s deadline passed" if str(why) == "SIGALRM" else ""
        print(f"chaos: stopped by {why}{deadline}", file=sys.stderr, flush=True)
        status = 1
    finally:
        signal.alarm(0)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        chaos.cleanup(keep=status != 0 or options.keep)
    return status


if __name__ == "__main__":
    sys.exit(main())
