"""Where each listener listens: an address and a port, or a Twisted endpoint description.

Operators name a listener's socket the way every Twisted server does (``serverFromString``):

* ``tcp:10000:interface=0.0.0.0:backlog=1024``, ``tcp6:10000:interface=\\:\\:`` (IPv6);
* ``unix:/run/cloudhub/api.sock:mode=660`` (the API for local applications);
* ``systemd:domain=INET:index=0`` or ``systemd:domain=INET6:name=websocket`` (socket
  activation: the socket is handed over by systemd, ``LISTEN_FDS`` / ``LISTEN_FDNAMES``).

The TLS of the edge-facing ports stays the hub's own (its CA, its client-certificate rules),
so only plain stream endpoints are accepted here; ``ssl:`` and the rest are refused with a
message. Without a description, ``address`` and ``port`` make a TCP endpoint (IPv6 when the
address is one).
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.systemd import ListenFDs

__all__ = ["ENDPOINT_TYPES", "endpoint_problem", "server_endpoint"]

# The stream endpoint types a listener may use; TLS is wrapped around them by the hub.
ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")

_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def server_endpoint(
    reactor: Any,
    description: str,
    address: str,
    port: int,
    backlog: int = 50,
    *,
    inherited: ListenFDs | None = None,
) -> IStreamServerEndpoint:
    """The endpoint a listener listens on: ``description`` when given, else ``address:port``.

    ``backlog`` applies to ``tcp:``/``tcp6:``/``unix:`` descriptions that do not set their
    own (a socket systemd hands over has systemd's ``Backlog=``). Raises ``ValueError`` with a
    message for a description that cannot be used (a socket systemd did not pass, say).
    ``inherited`` replaces the sockets read from this process's environment (tests).
    """
    if not description:
        endpoint_type = TCP6ServerEndpoint if ":" in address else TCP4ServerEndpoint
        return endpoint_type(reactor, port, backlog=backlog, interface=address)
    problem = endpoint_problem(description)
    if problem is not None:
        raise ValueError(f"{description}: {problem}")
    kind, positional, named = _split(description)
    if kind == "systemd":
        return _adopted(reactor, description, named, inherited)
    if "backlog" not in named:
        description += f":backlog={backlog}"
    return serverFromString(reactor, description)  # type: ignore[no-any-return]


def endpoint_problem(description: str) -> str | None:
    """Why ``description`` cannot be a listener's endpoint, or None when it can.

    Checked without listening and without the sockets systemd hands over, so that
    ``cloudhub check-config`` gives the same verdict outside the service manager.
    """
    kind, positional, named = _split(description)
    known = ", ".join(t + ":" for t in ENDPOINT_TYPES)
    if kind not in ENDPOINT_TYPES:
        if kind in ("ssl", "tls", "le", "lets"):
            return (
                f"{kind}: is not accepted: the hub wraps TLS itself (its CA, its client "
                f"certificate rules); use one of {known}"
            )
        return f"unknown endpoint type {kind!r} (known: {known})"
    if isinstance(named, str):
        return named  # a repeated argument
    if kind == "systemd":
        return _systemd_problem(positional, named)
    if kind in ("tcp", "tcp6"):
        port = named.get("port", positional[0] if positional else "")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            return f"{kind}: needs a port number from 0 to 65535, not {port!r}"
    if kind == "unix" and not named.get("address", positional[0] if positional else ""):
        return "unix: needs the socket's path (unix:/run/cloudhub/api.sock)"
    try:
        # Building the endpoint parses every argument; nothing listens until listen().
        serverFromString(None, description)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        return f"not a valid endpoint description: {e}"
    return None


def _split(description: str) -> tuple[str, list[str], Any]:
    """(type, positional arguments, named arguments, or a problem string for a repeated one)."""
    kind, _, rest = description.partition(":")
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in _UNESCAPED_COLON.split(rest) if rest else []:
        key, sep, value = part.partition("=")
        if not sep:
            positional.append(part)
            continue
        if key in named:
            return kind, positional, f"{kind}: {key}= is given twice"
        named[key] = value
    return kind, positional, named


def _systemd_problem(positional: list[str], named: dict[str, str]) -> str | None:
    if positional:
        return f"systemd: takes key=value arguments, not {positional[0]!r}"
    unknown = set(named) - {"domain", "index", "name"}
    if unknown:
        return f"systemd: unknown arguments {', '.join(sorted(unknown))} (domain, index, name)"
    if named.get("domain") not in _SYSTEMD_DOMAINS:
        return f"systemd: needs domain= one of {', '.join(_SYSTEMD_DOMAINS)}"
    if ("index" in named) == ("name" in named):
        return "systemd: needs exactly one of index=N or name=NAME"
    if "index" in named and not named["index"].isdigit():
        return f"systemd: index must be a number, not {named['index']!r}"
    return None


def _adopted(
    reactor: Any, description: str, named: dict[str, str], inherited: ListenFDs | None
) -> IStreamServerEndpoint:
    """The socket systemd passed, adopted through a duplicate of its descriptor.

    Twisted's ``systemd:`` endpoint adopts the inherited descriptor itself and closes it when
    the port stops listening, so a hub stopped and started again in the same process would
    find it gone (or, worse, reused by another file). Adopting a ``dup`` each time keeps
    systemd's descriptor for the next start. The descriptor is found by Twisted's own parser:
    it read (and took out of the environment) what systemd passed when it was imported.
    """
    try:
        if inherited is None:
            found = serverFromString(reactor, description)
            descriptor, family = found.fileno, found.addressFamily
        else:
            if "index" in named:
                descriptor = inherited.inheritedDescriptors()[int(named["index"])]
            else:
                descriptor = inherited.inheritedNamedDescriptors()[named["name"]]
            family = getattr(socket, "AF_" + named["domain"])
    except (IndexError, KeyError):
        which = f"index {named['index']}" if "index" in named else f"named {named['name']!r}"
        raise ValueError(
            f"{description}: systemd passed this process no socket {which} (socket "
            "activation sets LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID; see etc/systemd/)"
        ) from None
    return AdoptedStreamServerEndpoint(reactor, os.dup(descriptor), family)
