"""The ``cloudhub`` command: tools around a hub (the hub itself runs under ``twistd``)."""

from __future__ import annotations

import argparse
import sys

from cloudhub.config import HubConfig, load_config
from cloudhub.errors import CloudHubError


def _config(path: str | None) -> HubConfig:
    return load_config(path) if path else HubConfig()


def token(args: argparse.Namespace) -> int:
    """Print a join token for edges (like ``keadm gettoken``): the token alone on stdout."""
    from cloudhub.certs.token import issue_token

    print(issue_token(_config(args.config)))
    return 0


def sync(args: argparse.Namespace) -> int:
    """Print what the hub owes each node and what each node acknowledged, per object."""
    import os

    from twisted.internet import reactor

    from cloudhub.store import SQLiteSyncStore

    config = _config(args.config)
    if config.hub.store.type != "sqlite":
        raise CloudHubError(f"hub.store.type is {config.hub.store.type}: nothing kept on disk")
    path = config.store_path
    if not os.path.exists(path):
        raise CloudHubError(f"no sync store at {path} (has the hub run with this config?)")
    store = SQLiteSyncStore(path, reactor)
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
        resource = r.resource or (r.pending.resource if r.pending is not None else "")
        rows.append(
            (r.node_id, resource or "-", r.uid, acked, pending, str(r.attempts), r.last_error or "")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudhub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    token_parser = commands.add_parser(
        "token", help="print a join token for edge nodes (valid 2 × tokenRefreshDuration)"
    )
    token_parser.add_argument("--config", "-c", help="the hub's config file")
    token_parser.set_defaults(func=token)
    sync_parser = commands.add_parser(
        "sync", help="per object: resource, acknowledged and pending version, attempts, error"
    )
    sync_parser.add_argument("--config", "-c", help="the hub's config file")
    sync_parser.add_argument("--node", "-n", help="only this node")
    sync_parser.set_defaults(func=sync)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CloudHubError as e:
        print(f"cloudhub: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
