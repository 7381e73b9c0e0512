"""Node identity (issue 18, beyond KubeEdge): which node an edge certificate is for.

KubeEdge does not tie an edge certificate to a node: every certificate edgecore gets has the
subject ``CN=kubeedge.io,O=kubeEdge`` (its CSR's, §5.2), and any valid one may connect with
any ``node_id`` (§4.2). The hub's certificate server names the node in the certificates it
issues, as a subject alternative name of type URI, ``urn:cloudhub:node:<node name>``
(:func:`node_uri`), taken from the ``NodeName`` header of ``/edge.crt``; the subject stays the
CSR's CN and O, as cloudcore signs it. edgecore only presents its certificate as a TLS client
certificate (and reads its validity dates to rotate it), so the extra, non-critical extension
changes nothing for it.

The transports ask :class:`NodeIdentity` whether a connection's ``node_id`` is the one its
client certificate names, under the listener's mode (``hub.nodeIdentity``, :data:`MODES`):

``enforce``  a certificate for another node, or naming none (issued by cloudcore, or by the
             hub before node identity), is refused;
``warn``     (the default, :data:`DEFAULT_MODE`) both are let in, logged (at most once per 10 s
             per kind) and counted: certificates issued elsewhere keep working while the
             operator sees whether switching to ``enforce`` would refuse anyone;
``off``      KubeEdge's behaviour: nothing is checked, logged or counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from OpenSSL.crypto import X509
from twisted.logger import Logger

from cloudhub.limits import ThrottledLog

__all__ = [
    "DEFAULT_MODE",
    "ENFORCE",
    "MODES",
    "NODE_URI_PREFIX",
    "OFF",
    "WARN",
    "IdentityCounters",
    "IdentityVerdict",
    "NodeIdentity",
    "certificate_node_names",
    "check_mode",
    "judge",
    "node_uri",
]

log = Logger()

ENFORCE = "enforce"
WARN = "warn"
OFF = "off"
MODES = (ENFORCE, WARN, OFF)
DEFAULT_MODE = WARN

# The URI a hub-issued edge certificate carries as a subject alternative name.
NODE_URI_PREFIX = "urn:cloudhub:node:"

# Verdicts (IdentityVerdict.kind).
MATCH = "match"  # the certificate names exactly this node
MISMATCH = "mismatch"  # it names another node (or several)
UNNAMED = "unnamed"  # it names no node
UNCHECKED = "unchecked"  # mode off

Certificate = x509.Certificate | X509


def node_uri(node_name: str) -> str:
    """The SAN URI naming ``node_name`` (a valid node id) in an edge certificate."""
    return NODE_URI_PREFIX + node_name


def certificate_node_names(certificate: Certificate | None) -> tuple[str, ...]:
    """The nodes ``certificate`` names (its ``urn:cloudhub:node:`` SAN URIs), in order.

    Empty for no certificate, for one without such a URI (cloudcore's, or the hub's before
    node identity) and for one whose extensions do not parse. The hub issues one name.
    """
    if certificate is None:
        return ()
    if isinstance(certificate, X509):
        certificate = certificate.to_cryptography()
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    except ValueError:  # malformed extensions: names nothing we can trust
        return ()
    names: list[str] = []
    for uri in sans.value.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(NODE_URI_PREFIX) and uri[len(NODE_URI_PREFIX) :] not in names:
            names.append(uri[len(NODE_URI_PREFIX) :])
    return tuple(names)


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else :class:`ValueError` naming them."""
    if mode not in MODES:
        raise ValueError(f"node identity mode must be one of {', '.join(MODES)}, not {mode!r:.40}")
    return mode


@dataclass(frozen=True, slots=True)
class IdentityVerdict:
    """What :func:`judge` decided: ``kind`` (match, mismatch, unnamed, unchecked), whether
    the connection may proceed, the node(s) the certificate names, and ``reason`` (one line,
    fit for a close reason or an HTTP status; empty for match and unchecked)."""

    kind: str
    allowed: bool
    certified: tuple[str, ...] = ()
    reason: str = ""


_UNCHECKED = IdentityVerdict(UNCHECKED, True)


def judge(mode: str, certificate: Certificate | None, node_id: str) -> IdentityVerdict:
    """May a connection whose client certificate is ``certificate`` act as ``node_id``?

    The policy of the module docstring; a pure function (no log, no counter).
    """
    if mode == OFF:
        return _UNCHECKED
    names = certificate_node_names(certificate)
    if names == (node_id,):
        return IdentityVerdict(MATCH, True, names)
    allowed = mode != ENFORCE
    if not names:
        if certificate is None:
            reason = "no client certificate, so no node name"
        else:
            reason = "client certificate names no node (cloudcore's, or from before node identity)"
        return IdentityVerdict(UNNAMED, allowed, names, reason)
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    nodes = "node" if len(names) == 1 else "nodes"
    return IdentityVerdict(
        MISMATCH, allowed, names, f"client certificate is for {nodes} {shown:.120}, not this one"
    )


class IdentityCounters(Protocol):
    """The counters :class:`NodeIdentity` bumps (a transport's stats dataclass)."""

    identity_refused: int  # refused under enforce (another node's certificate, or none named)
    identity_mismatches: int  # let in under warn with another node's certificate
    identity_unnamed: int  # let in under warn with a certificate naming no node


class NodeIdentity:
    """A listener's node identity check: ``mode``, its counters, its rate-limited log.

    ``admit`` is what a transport calls once it knows the node id and has the verified peer
    certificate; it returns the verdict (refuse the connection when not ``allowed``).
    """

    __slots__ = ("mode", "counters", "transport", "_logs")

    def __init__(self, mode: str, counters: IdentityCounters, transport: str) -> None:
        self.mode = check_mode(mode)
        self.counters = counters
        self.transport = transport
        # One throttle per kind, so a flood of old certificates does not hide a mismatch.
        self._logs = {kind: ThrottledLog(log) for kind in ("refused", MISMATCH, UNNAMED)}

    @property
    def active(self) -> bool:
        """False under ``off``: nothing to check, not even the certificate to fetch."""
        return self.mode != OFF

    def admit(self, certificate: Certificate | None, node_id: str, peer: str) -> IdentityVerdict:
        """Judge, count and log one connection of ``node_id`` from ``peer``."""
        if self.mode == OFF:
            return _UNCHECKED
        verdict = judge(self.mode, certificate, node_id)
        if verdict.kind == MATCH:
            return verdict
        counters = self.counters
        if not verdict.allowed:
            counters.identity_refused += 1
            self._logs["refused"].emit(
                "{transport} connection of node {node} from {peer} refused "
                "(hub.nodeIdentity enforce): {reason}",
                transport=self.transport,
                node=node_id,
                peer=peer,
                reason=verdict.reason,
            )
            return verdict
        if verdict.kind == MISMATCH:
            counters.identity_mismatches += 1
        else:
            counters.identity_unnamed += 1
        self._logs[verdict.kind].emit(
            "{transport} connection of node {node} from {peer} let in (hub.nodeIdentity warn; "
            "enforce would refuse it): {reason}",
            transport=self.transport,
            node=node_id,
            peer=peer,
            reason=verdict.reason,
        )
        return verdict
