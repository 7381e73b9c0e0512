"""Issue 18, finding 12: node identity beyond KubeEdge.

The certificate server names the node in the certificates it issues (a SAN URI
``urn:cloudhub:node:<name>``, CN/O kept as KubeEdge signs them), and the transports compare
that name with the ``node_id`` a connection announces under ``hub.nodeIdentity``: ``enforce``
refuses (WebSocket: 403 instead of the 101; QUIC: 1008), ``warn`` lets in, logs and counts,
``off`` checks nothing. A certificate naming no node (cloudcore's, or the hub's from before)
is refused under ``enforce`` only.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.identity import (
    MODES,
    NodeIdentity,
    certificate_node_names,
    check_mode,
    judge,
    node_uri,
)
from cloudhub.config import HubConfig, parse_config
from cloudhub.edge.bootstrap import EdgeCredentials, bootstrap, make_csr, new_key
from cloudhub.edge.client import EdgeNode
from cloudhub.edge.quic import QuicEdgeNode
from cloudhub.interfaces import CLOSE_POLICY
from cloudhub.service import CloudHubService
from cloudhub.transport.quic import QuicHubProtocol, QuicStats
from cloudhub.transport.websocket import WebSocketHubFactory, WebSocketStats
from tests.helpers_tls import key_pem, load_ca_key, make_config, pem

from .test_integration_ws import hub_config, wait_for
from .test_transport_quic import quiet
from .test_transport_websocket import EDGECORE_REQUEST, CountingTransport, RecordingHandler


def log_events(test: SynchronousTestCase) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def identity_lines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "hub.nodeIdentity" in e.get("log_format", "")]


def signed(authority: CertificateAuthority, node: str = "") -> x509.Certificate:
    """An edge certificate from ``authority``: naming ``node``, or none (cloudcore-style)."""
    return x509.load_der_x509_certificate(authority.sign_csr(make_csr(new_key()), None, node))


def credentials_for(authority: CertificateAuthority, node: str = "") -> EdgeCredentials:
    key = new_key()
    cert = x509.load_der_x509_certificate(authority.sign_csr(make_csr(key), None, node))
    return EdgeCredentials(authority.ca_pem, pem(cert), key_pem(key))


def with_node_identity(config: HubConfig, mode: str) -> HubConfig:
    """``config`` with ``hub.nodeIdentity: mode``, as read from a config file."""
    data = config.as_dict()
    data["hub"]["nodeIdentity"] = mode
    return parse_config(data)


# --- what a certificate names ----------------------------------------------------------------


class CertificateNamesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = make_config(self.mktemp())
        self.authority = CertificateAuthority.load_or_create(self.config)

    def test_named(self) -> None:
        cert = signed(self.authority, "edge-a")
        self.assertEqual(certificate_node_names(cert), ("edge-a",))
        # What a TLS transport's getPeerCertificate() returns works the same.
        self.assertEqual(certificate_node_names(X509.from_cryptography(cert)), ("edge-a",))
        self.assertEqual(node_uri("edge-a"), "urn:cloudhub:node:edge-a")

    def test_unnamed(self) -> None:
        self.assertEqual(certificate_node_names(signed(self.authority)), ())
        self.assertEqual(certificate_node_names(None), ())

    def build(self, *names: x509.GeneralName) -> x509.Certificate:
        key = new_key()
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeedge.io")]))
            .issuer_name(self.authority.ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(list(names)), False)
            .sign(load_ca_key(self.config), hashes.SHA256())
        )

    def test_other_names_do_not_name_a_node(self) -> None:
        cert = self.build(
            x509.DNSName("edge-a"),
            x509.UniformResourceIdentifier("urn:other:node:edge-a"),
            x509.UniformResourceIdentifier("URN:CLOUDHUB:NODE:edge-a"),
            x509.RFC822Name("edge-a@example.com"),
        )
        self.assertEqual(certificate_node_names(cert), ())

    def test_several_names(self) -> None:
        cert = self.build(
            x509.UniformResourceIdentifier(node_uri("edge-a")),
            x509.UniformResourceIdentifier(node_uri("edge-b")),
        )
        self.assertEqual(certificate_node_names(cert), ("edge-a", "edge-b"))
        # Not ours (the hub issues one name): it is for no single node, so no match.
        verdict = judge("enforce", cert, "edge-a")
        self.assertEqual((verdict.kind, verdict.allowed), ("mismatch", False))


# --- the policy ------------------------------------------------------------------------------


class JudgeTests(SynchronousTestCase):
    def setUp(self) -> None:
        authority = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        self.named = signed(authority, "edge-a")
        self.unnamed = signed(authority)

    def test_modes(self) -> None:
        cases = [
            # mode, certificate, node_id -> kind, allowed
            ("enforce", self.named, "edge-a", "match", True),
            ("enforce", self.named, "edge-b", "mismatch", False),
            ("enforce", self.unnamed, "edge-a", "unnamed", False),
            ("enforce", None, "edge-a", "unnamed", False),
            ("warn", self.named, "edge-a", "match", True),
            ("warn", self.named, "edge-b", "mismatch", True),
            ("warn", self.unnamed, "edge-a", "unnamed", True),
            ("off", self.named, "edge-b", "unchecked", True),
            ("off", self.unnamed, "edge-a", "unchecked", True),
        ]
        for mode, cert, node, kind, allowed in cases:
            verdict = judge(mode, cert, node)
            self.assertEqual((verdict.kind, verdict.allowed), (kind, allowed), (mode, node))
        self.assertIn("'edge-a'", judge("enforce", self.named, "edge-b").reason)
        self.assertIn("names no node", judge("enforce", self.unnamed, "edge-a").reason)

    def test_check_mode(self) -> None:
        self.assertEqual(MODES, ("enforce", "warn", "off"))
        for mode in MODES:
            self.assertEqual(check_mode(mode), mode)
        for bad in ("", "Enforce", "strict", "on"):
            e = self.assertRaises(ValueError, check_mode, bad)
            self.assertIn("enforce, warn, off", str(e))

    def test_counts_and_logs_at_most_once_per_kind(self) -> None:
        events = log_events(self)
        stats = WebSocketStats()
        identity = NodeIdentity("warn", stats, "WebSocket")
        for _ in range(3):
            self.assertTrue(identity.admit(self.named, "edge-b", "10.0.0.5:1").allowed)
            self.assertTrue(identity.admit(self.unnamed, "edge-c", "10.0.0.5:2").allowed)
        self.assertTrue(identity.admit(self.named, "edge-a", "10.0.0.5:3").allowed)
        self.assertEqual(
            (stats.identity_mismatches, stats.identity_unnamed, stats.identity_refused), (3, 3, 0)
        )
        lines = identity_lines(events)
        self.assertEqual([e["node"] for e in lines], ["edge-b", "edge-c"])  # throttled
        self.assertIn("enforce would refuse it", lines[0]["log_format"])

        stats = WebSocketStats()
        identity = NodeIdentity("enforce", stats, "WebSocket")
        self.assertFalse(identity.admit(self.named, "edge-b", "10.0.0.5:1").allowed)
        self.assertFalse(identity.admit(self.unnamed, "edge-c", "10.0.0.5:2").allowed)
        self.assertTrue(identity.admit(self.named, "edge-a", "10.0.0.5:3").allowed)
        self.assertEqual(
            (stats.identity_mismatches, stats.identity_unnamed, stats.identity_refused), (0, 0, 2)
        )

        del events[:]
        stats = WebSocketStats()
        identity = NodeIdentity("off", stats, "WebSocket")
        self.assertFalse(identity.active)
        self.assertTrue(identity.admit(self.unnamed, "edge-c", "10.0.0.5:2").allowed)
        self.assertEqual(stats, WebSocketStats())
        self.assertEqual(identity_lines(events), [])

    def test_transports_refuse_an_unknown_mode(self) -> None:
        authority = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        handler = RecordingHandler()
        self.assertRaises(
            ValueError, WebSocketHubFactory, handler, reactor=reactor, node_identity="strict"
        )
        self.assertRaises(
            ValueError, QuicHubProtocol, handler, authority, reactor, node_identity="strict"
        )
        # The default: warn.
        self.assertEqual(WebSocketHubFactory(handler, reactor=reactor).identity.mode, "warn")
        self.assertEqual(QuicHubProtocol(handler, authority, reactor).identity.mode, "warn")
        self.assertIsInstance(QuicHubProtocol(handler, authority, reactor).stats, QuicStats)


# --- the WebSocket upgrade, on a fake TLS transport ------------------------------------------


class TLSTransport(CountingTransport):
    """A fake transport that has a peer certificate, as the TLS transport does."""

    def __init__(self, certificate: x509.Certificate | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.certificate = X509.from_cryptography(certificate) if certificate else None

    def getPeerCertificate(self) -> X509 | None:
        return self.certificate


class WebSocketUpgradeTests(SynchronousTestCase):
    """EDGECORE_REQUEST announces node edge-node-1."""

    def setUp(self) -> None:
        authority = CertificateAuthority.load_or_create(make_config(self.mktemp()))
        self.right = signed(authority, "edge-node-1")
        self.wrong = signed(authority, "edge-other")
        self.unnamed = signed(authority)

    def upgrade(self, mode: str, certificate: x509.Certificate | None, tls: bool = True) -> Any:
        self.handler = RecordingHandler()
        self.factory = WebSocketHubFactory(self.handler, reactor=Clock(), node_identity=mode)
        address = IPv4Address("TCP", "10.0.0.5", 40000)
        protocol = self.factory.buildProtocol(address)
        assert protocol is not None
        transport = (
            TLSTransport(certificate, peerAddress=address)
            if tls
            else CountingTransport(peerAddress=address)
        )
        protocol.makeConnection(transport)
        protocol.dataReceived(EDGECORE_REQUEST)
        return transport.value().split(b"\r\n", 1)[0]

    def test_enforce(self) -> None:
        self.assertTrue(self.upgrade("enforce", self.right).startswith(b"HTTP/1.1 101 "))
        self.assertEqual(len(self.handler.of("made")), 1)
        for cert, why in [
            (self.wrong, b"client certificate is for node 'edge-other', not this one"),
            (self.unnamed, b"client certificate names no node"),
        ]:
            status = self.upgrade("enforce", cert)
            self.assertTrue(status.startswith(b"HTTP/1.1 403 node identity: " + why), status)
            self.assertEqual(self.handler.events, [])
            self.assertEqual(self.factory.stats.identity_refused, 1)
        # No certificate at all (not a TLS transport): refused too.
        status = self.upgrade("enforce", None, tls=False)
        self.assertTrue(status.startswith(b"HTTP/1.1 403 "), status)

    def test_warn(self) -> None:
        for cert, counter in [
            (self.wrong, "identity_mismatches"),
            (self.unnamed, "identity_unnamed"),
        ]:
            self.assertTrue(self.upgrade("warn", cert).startswith(b"HTTP/1.1 101 "))
            self.assertEqual(len(self.handler.of("made")), 1)
            self.assertEqual(getattr(self.factory.stats, counter), 1)
            self.assertEqual(self.factory.stats.identity_refused, 0)

    def test_off(self) -> None:
        for cert in (self.wrong, self.unnamed, None):
            self.assertTrue(self.upgrade("off", cert).startswith(b"HTTP/1.1 101 "))
            self.assertEqual(self.factory.stats, WebSocketStats())


# --- end to end: a real hub on loopback, real TLS, the Python edges --------------------------


def find_identity(factory: Any) -> NodeIdentity:
    """The WebSocket factory's NodeIdentity, inside whatever wraps it (TLS, limits)."""
    while factory is not None:
        identity = getattr(factory, "identity", None)
        if isinstance(identity, NodeIdentity):
            return identity
        factory = getattr(factory, "wrappedFactory", None)
    raise AssertionError("no NodeIdentity in the WebSocket listener")


class HubNodeIdentityTests(TestCase):
    """CloudHubService with WebSocket and QUIC; node edge-a bootstraps with the join token."""

    timeout = 60

    async def start(self, mode: str) -> None:
        quiet(self)
        self.events = log_events(self)
        quic = {"enable": True, "address": "127.0.0.1", "port": 0}
        config = hub_config(os.path.abspath(self.mktemp()), quic=quic)
        self.hub = CloudHubService(with_node_identity(config, mode), reactor=reactor)
        self.hub.startService()
        self.addCleanup(self.hub.stopService)
        await self.hub.ready
        url = f"https://127.0.0.1:{self.hub.port('https')}"
        assert self.hub.tokens is not None
        # Through /edge.crt with NodeName, as edgecore bootstraps.
        self.edge_a = await bootstrap(reactor, url, self.hub.tokens.current, "edge-a")
        self.assertEqual(certificate_node_names(self.edge_a.certificate), ("edge-a",))
        assert self.hub.authority is not None and self.hub.quic is not None
        # As cloudcore (or the hub before node identity) issued it: no node named.
        self.cloudcore = credentials_for(self.hub.authority)
        listener = self.hub.websocket.factory if self.hub.websocket else None
        self.ws_stats = find_identity(listener).counters
        self.quic_stats = cast(Any, self.hub.quic).protocol.stats

    def ws(self, node_id: str, credentials: EdgeCredentials) -> EdgeNode:
        node = EdgeNode(
            reactor,
            node_id,
            "127.0.0.1",
            self.hub.port("websocket"),
            credentials,
            reconnect=False,
        )
        self.addCleanup(node.stop)
        return node

    def quic(self, node_id: str, credentials: EdgeCredentials) -> QuicEdgeNode:
        node = QuicEdgeNode(
            reactor, node_id, "127.0.0.1", self.hub.port("quic"), credentials, reconnect=False
        )
        self.addCleanup(node.stop)
        return node

    async def connects(self, node: EdgeNode | QuicEdgeNode) -> None:
        await node.start()
        await wait_for(lambda: self.hub.upstream.is_connected(node.node_id))
        await node.stop()
        await wait_for(lambda: not self.hub.upstream.is_connected(node.node_id))

    async def refused(self, node: EdgeNode | QuicEdgeNode) -> str:
        node.start().addErrback(lambda f: None)
        closed = await node.when_disconnected()
        assert closed is not None
        self.assertFalse(closed.was_open, closed)
        self.assertFalse(self.hub.upstream.is_connected(node.node_id))
        if isinstance(node, QuicEdgeNode):
            self.assertEqual(closed.code, CLOSE_POLICY)
        else:
            self.assertIsNone(closed.code)  # no 101, so no close frame
            self.assertIn("403", closed.reason)
        return closed.reason

    async def test_enforce(self) -> None:
        await self.start("enforce")
        await self.connects(self.ws("edge-a", self.edge_a))
        await self.connects(self.quic("edge-a", self.edge_a))
        reason = await self.refused(self.ws("edge-b", self.edge_a))
        self.assertIn("node identity: client certificate is for node 'edge-a'", reason)
        reason = await self.refused(self.quic("edge-b", self.edge_a))
        self.assertIn("node identity: client certificate is for node 'edge-a'", reason)
        await self.refused(self.ws("edge-a", self.cloudcore))
        reason = await self.refused(self.quic("edge-a", self.cloudcore))
        self.assertIn("names no node", reason)
        self.assertEqual(self.ws_stats.identity_refused, 2)
        self.assertEqual(self.quic_stats.identity_refused, 2)
        self.assertEqual([n.node_id for n in self.hub.upstream.nodes()], [])
        self.assertTrue(identity_lines(self.events))

    async def test_warn(self) -> None:
        await self.start("warn")
        for transport in (self.ws, self.quic):
            await self.connects(transport("edge-a", self.edge_a))
            await self.connects(transport("edge-b", self.edge_a))
            await self.connects(transport("edge-c", self.cloudcore))
        for counters in (self.ws_stats, self.quic_stats):
            self.assertEqual(
                (
                    counters.identity_mismatches,
                    counters.identity_unnamed,
                    counters.identity_refused,
                ),
                (1, 1, 0),
            )
        nodes = {e["node"] for e in identity_lines(self.events)}
        self.assertEqual(nodes, {"edge-b", "edge-c"})

    async def test_off(self) -> None:
        await self.start("off")
        for transport in (self.ws, self.quic):
            await self.connects(transport("edge-b", self.edge_a))
            await self.connects(transport("edge-c", self.cloudcore))
        for counters in (self.ws_stats, self.quic_stats):
            self.assertEqual(
                (
                    counters.identity_mismatches,
                    counters.identity_unnamed,
                    counters.identity_refused,
                ),
                (0, 0, 0),
            )
        self.assertEqual(identity_lines(self.events), [])
