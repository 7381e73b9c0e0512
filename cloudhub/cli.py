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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudhub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    token_parser = commands.add_parser(
        "token", help="print a join token for edge nodes (valid 2 × tokenRefreshDuration)"
    )
    token_parser.add_argument("--config", "-c", help="the hub's config file")
    token_parser.set_defaults(func=token)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CloudHubError as e:
        print(f"cloudhub: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
