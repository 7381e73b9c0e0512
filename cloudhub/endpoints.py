"""Where each listener listens: an address and a port, or a Twisted endpoint description.

Operators name a listener's socket the way every Twisted server does (``serverFromString``):

* ``tcp:10000:interface=0.0.0.0:backlog=1024``, ``tcp6:10000:interface=\\:\\:`` (IPv6);
* ``unix:/run/cloudhub/api.sock:mode=660`` (the API for local applications);
* ``systemd:domain=INET:index=0`` or ``systemd:domain=INET6:name=websocket`` (socket
  activation: the socket is handed over by systemd, ``LISTEN_FDS``).

The TLS of the edge-facing ports stays the hub's own (its CA, its client-certificate rules),
so only plain stream endpoints are accepted here; ``ssl:`` and the rest are refused with a
message. Without a description, ``address`` and ``port`` make a TCP endpoint (IPv6 when the
address is one).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint

__all__ = ["ENDPOINT_TYPES", "endpoint_problem", "server_endpoint"]

# The stream endpoint types a listener may use; TLS is wrapped around them by the hub.
ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")

_SYSTEMD = re.compile(r"^systemd:(?P<args>.*)$")
_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


def server_endpoint(
    reactor: Any, description: str, address: str, port: int, backlog: int = 50
) -> IStreamServerEndpoint:
    """The endpoint a listener listens on: ``description`` when given, else ``address:port``."""
    if description:
        problem = endpoint_problem(description)
        if problem is not None:
            raise ValueError(problem)
        return serverFromString(reactor, description)  # type: ignore[no-any-return]
    endpoint_type = TCP6ServerEndpoint if ":" in address else TCP4ServerEndpoint
    return endpoint_type(reactor, port, backlog=backlog, interface=address)


def endpoint_problem(description: str) -> str | None:
    """Why ``description`` cannot be a listener's endpoint, or None when it can.

    Checked without listening and without the sockets systemd hands over, so that
    ``cloudhub check-config`` gives the same verdict outside the service manager.
    """
    kind = description.split(":", 1)[0]
    if kind not in ENDPOINT_TYPES:
        if kind in ("ssl", "tls", "le", "lets"):
            return (
                f"{kind}: is not accepted: the hub wraps TLS itself (its CA, its client "
                f"certificate rules); use one of {', '.join(t + ':' for t in ENDPOINT_TYPES)}"
            )
        return (
            f"unknown endpoint type {kind!r} (known: {', '.join(t + ':' for t in ENDPOINT_TYPES)})"
        )
    match = _SYSTEMD.match(description)
    if match is not None:
        return _systemd_problem(match.group("args"))
    try:
        # Building the endpoint parses every argument; nothing listens until listen().
        serverFromString(None, description)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        return f"not a valid endpoint description: {e}"
    return None


def _systemd_problem(args: str) -> str | None:
    values: dict[str, str] = {}
    for part in args.split(":") if args else []:
        key, sep, value = part.partition("=")
        if not sep:
            return f"systemd: takes key=value arguments, not {part!r}"
        values[key] = value
    unknown = set(values) - {"domain", "index", "name"}
    if unknown:
        return f"systemd: unknown arguments {', '.join(sorted(unknown))} (domain, index, name)"
    if values.get("domain") not in _SYSTEMD_DOMAINS:
        return f"systemd: needs domain= one of {', '.join(_SYSTEMD_DOMAINS)}"
    if ("index" in values) == ("name" in values):
        return "systemd: needs exactly one of index=N or name=NAME"
    if "index" in values and not values["index"].isdigit():
        return f"systemd: index must be a number, not {values['index']!r}"
    return None
