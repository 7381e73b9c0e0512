"""The ``cloudhub`` command: tools around a hub (the hub itself runs under ``twistd``)."""

from __future__ import annotations

import argparse
import os
import sys

from cloudhub import __version__
from cloudhub.config import HubConfig, load_config
from cloudhub.errors import CloudHubError


def _config(path: str | None) -> HubConfig:
    """The config as ``twistd cloudhub`` loads it: the file, or the built-in defaults."""
    return load_config(path) if path else HubConfig()


def token(args: argparse.Namespace) -> int:
    """Print a join token for edges (like ``keadm gettoken``): the token alone on stdout.

    Reads the CA only and creates nothing: run as root without ``--config`` it must not
    leave a stray CA under /var/lib/cloudhub that no hub uses.
    """
    from cloudhub.certs.token import issue_token

    print(issue_token(_config(args.config)))
    return 0


def init(args: argparse.Namespace) -> int:
    """Create the data directory, the CA and the server certificate as the hub does at start.

    For operators who want the CA (and so a join token) before the first start, or who
    provision the files with their tools. A second run finds them and changes nothing.
    """
    from cloudhub.certs.authority import (
        CertificateAuthority,
        certificate_names,
        find_ca,
        find_server_pair,
        utc_now,
    )

    config = _config(args.config)
    had_data_dir = os.path.isdir(config.hub.data_dir)
    had_ca = find_ca(config) is not None
    had_server = None
    skipped: list[tuple[str, str]] = []  # what the hub passes over (and maybe replaces)
    if had_ca:
        ca = CertificateAuthority.load_ca(config)
        had_server, skipped = find_server_pair(config, ca.certificate, utc_now())
    authority = CertificateAuthority.load_or_create(config)
    ca = CertificateAuthority.load_ca(config)
    store_created = _create_store(config)
    server, skipped_now = find_server_pair(config, authority.ca_certificate, utc_now())
    if not had_ca:  # only now is there a CA to check them against
        skipped = skipped_now
    if server is None:  # pragma: no cover - load_or_create has just made one
        raise CloudHubError("no usable server certificate after creating one: is a hub running?")
    kept_server = had_server is not None and had_server.certificate == server.certificate
    if not had_data_dir:
        print(f"created the data directory {config.hub.data_dir}")
    print(f"{'found the existing' if had_ca else 'created the'} CA: {ca.path} (key {ca.key_path})")
    print(f"  sha256: {ca.ca_hash} (the first part of every join token)")
    for path, problem in skipped:
        print(f"not using the server certificate {path}: {problem}")
    verb = "found the existing" if kept_server else "created the"
    print(f"{verb} server certificate: {server.path} (key {server.key_path})")
    print(f"  names: {', '.join(certificate_names(server.certificate)) or '(none)'}")
    if store_created:
        print(f"created the sync store: {config.store_path}")
    if had_data_dir and had_ca and kept_server and not store_created:
        print("nothing changed")
    return 0


def _create_store(config: HubConfig) -> bool:
    """Create the SQLite sync store as the first start would; False when it exists (or is
    not a file): a data directory with a CA and no store is refused at start (store/guard.py)."""
    import os

    if config.hub.store.type != "sqlite" or os.path.exists(config.store_path):
        return False
    from twisted.internet import reactor

    from cloudhub.store import SQLiteSyncStore

    store = SQLiteSyncStore(config.store_path, reactor)
    store.close()
    return True


def check_config(args: argparse.Namespace) -> int:
    """Validate the config as start-up does and print the effective settings as YAML.

    Secrets are redacted; the output loads back as the same config. Reads only: no data
    directory, CA or lock file is created. A bad config or certificate file exits 1 with the
    one line the hub would print at start-up.
    """
    import yaml

    from cloudhub.certs.authority import (
        CertificateAuthority,
        certificate_names,
        find_ca,
        find_server_pair,
        server_candidates,
        utc_now,
    )

    config = _config(args.config)
    if args.config:
        lines = [
            f"# {args.config}: valid; effective settings, defaults filled in, secrets redacted"
        ]
    else:
        lines = ["# no --config: the built-in defaults, as `twistd cloudhub` uses them"]
    if find_ca(config) is None:
        lines.append(f"# no CA yet: the hub creates one in {config.data_path('ca')} at first start")
    else:
        ca = CertificateAuthority.load_ca(config)
        lines.append(f"# CA: {ca.path} (key {ca.key_path}), sha256 {ca.ca_hash}")
        server, rejected = find_server_pair(config, ca.certificate, utc_now())
        for path, problem in rejected:
            lines.append(f"# not using the server certificate {path}: {problem}")
        if server is None:
            directory = os.path.dirname(server_candidates(config)[-1][0])
            lines.append(f"# no usable server certificate: the hub creates one in {directory}")
        else:
            names = ", ".join(certificate_names(server.certificate)) or "no names"
            lines.append(f"# server certificate: {server.path} ({names})")
    print("\n".join(lines))
    print(yaml.safe_dump(config.as_dict(redact=True), sort_keys=False), end="")
    return 0


def sync(args: argparse.Namespace) -> int:
    """Print what the hub owes each node and what each node acknowledged, per object."""
    from twisted.internet import reactor

    from cloudhub.store import SQLiteSyncStore

    config = _config(args.config)
    if config.hub.store.type != "sqlite":
        raise CloudHubError(f"hub.store.type is {config.hub.store.type}: nothing kept on disk")
    path = config.store_path
    if not os.path.exists(path):
        raise CloudHubError(f"no sync store at {path} (has the hub run with this config?)")
    # The hub's retention, so that the tombstones it would forget are not shown.
    store = SQLiteSyncStore(path, reactor, tombstone_retention=config.hub.store.tombstone_retention)
    try:
        records = store.load()
    finally:
        store.close()
    if args.node:
        records = [r for r in records if r.node_id == args.node]
    header = ("NODE", "RESOURCE", "UID", "ACKED", "PENDING", "ATTEMPTS", "LAST ERROR")
    rows = [header]
    for r in records:
        pending = "-"
        if r.pending is not None:
            pending = "delete" if r.pending.operation == "delete" else r.pending.resource_version
            pending = pending or "?"
        acked = "-" if r.acked_version is None else str(r.acked_version)
        if r.deleted_at is not None:  # a tombstone: deleted, acknowledged at that version
            acked = "deleted" if r.acked_version is None else f"deleted@{r.acked_version}"
        resource = r.resource or (r.pending.resource if r.pending is not None else "")
        rows.append(
            (r.node_id, resource or "-", r.uid, acked, pending, str(r.attempts), r.last_error or "")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return 0


def edgesim(args: argparse.Namespace) -> int:
    """Run ``--nodes`` simulated edge nodes against a hub for ``--duration`` seconds."""
    from cloudhub.edgesim import SimOptions, run

    options = SimOptions(
        nodes=args.nodes,
        transport=args.transport,
        hub=args.hub,
        https_port=args.https_port,
        ws_port=args.ws_port,
        quic_port=args.quic_port,
        token=args.token,
        heartbeat=args.heartbeat,
        procs=args.procs,
        duration=args.duration,
        certs=args.certs,
        prefix=args.prefix,
        first=args.first,
        concurrency=args.concurrency,
        interval=args.interval,
        project_id=args.project_id,
    )
    options.check()
    return run(options)


def bench(args: argparse.Namespace) -> int:
    """Start a hub in a subprocess, drive it with simulated nodes, print one table."""
    from cloudhub.bench import run

    return run(args)


def _edgesim_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", "-n", type=int, default=10, help="simulated nodes (10)")
    parser.add_argument("--transport", choices=("ws", "quic"), default="ws")
    parser.add_argument("--hub", default="127.0.0.1", help="the hub's host (127.0.0.1)")
    parser.add_argument("--https-port", type=int, default=10002, help="certificate port (10002)")
    parser.add_argument("--ws-port", type=int, default=10000, help="WebSocket port (10000)")
    parser.add_argument("--quic-port", type=int, default=10001, help="QUIC port (10001)")
    parser.add_argument("--token", help="join token (`cloudhub token`) to bootstrap a certificate")
    parser.add_argument("--certs", help="directory to reuse the certificate from, or save it to")
    parser.add_argument(
        "--heartbeat", type=float, default=15.0, help="seconds between keepalives (15)"
    )
    parser.add_argument("--procs", type=int, default=1, help="processes to spread nodes over (1)")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds to run, then stop (60)"
    )
    parser.add_argument("--prefix", default="edgesim-", help="node names: PREFIX<index>")
    parser.add_argument("--first", type=int, default=0, help="index of the first node (0)")
    parser.add_argument(
        "--concurrency", type=int, default=100, help="connection attempts in flight (100)"
    )
    parser.add_argument(
        "--interval", type=float, default=5.0, help="seconds between status lines, not a tty (5)"
    )
    parser.add_argument("--project-id", default="e632aba927ea4ac2b575ec1603d56f10")


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="every scenario, smaller and once (< 2 min)"
    )
    size.add_argument("--tiny", action="store_true", help="a few nodes and messages (tests)")
    parser.add_argument(
        "--transport",
        action="append",
        choices=("ws", "quic"),
        help="transports to measure (repeatable; default both, quic when available)",
    )
    parser.add_argument(
        "--json", help="where to write the figures (benchmarks/results/<date>-<mode>.json)"
    )
    parser.add_argument("--no-plot", action="store_true", help="no PNG even with matplotlib")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the hub during throughput (.prof files)"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the hub to one CPU and the bench to the others",
    )
    parser.add_argument(
        "--runs", type=int, help="runs of the first transport, figures their median (full: 3)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudhub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cloudhub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    init_parser = commands.add_parser(
        "init", help="create the data directory, CA and server certificate, as the hub does"
    )
    init_parser.add_argument("--config", "-c", help="the hub's config file")
    init_parser.set_defaults(func=init)
    token_parser = commands.add_parser(
        "token", help="print a join token for edge nodes (valid 2 × tokenRefreshDuration)"
    )
    token_parser.add_argument("--config", "-c", help="the hub's config file")
    token_parser.set_defaults(func=token)
    check_parser = commands.add_parser(
        "check-config", help="validate the config; print the effective settings as YAML"
    )
    check_parser.add_argument("--config", "-c", help="the hub's config file")
    check_parser.set_defaults(func=check_config)
    sync_parser = commands.add_parser(
        "sync", help="per object: resource, acknowledged and pending version, attempts, error"
    )
    sync_parser.add_argument("--config", "-c", help="the hub's config file")
    sync_parser.add_argument("--node", "-n", help="only this node")
    sync_parser.set_defaults(func=sync)
    edgesim_parser = commands.add_parser(
        "edgesim", help="simulated edge nodes: connect, heartbeat, ACK; summary on exit"
    )
    _edgesim_arguments(edgesim_parser)
    edgesim_parser.set_defaults(func=edgesim)
    bench_parser = commands.add_parser(
        "bench", help="connections, throughput, latency and CPU of a hub on loopback"
    )
    _bench_arguments(bench_parser)
    bench_parser.set_defaults(func=bench)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CloudHubError as e:
        print(f"cloudhub: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
