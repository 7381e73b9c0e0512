"""CloudHubService: the whole hub as one ``MultiService``.

Built from a :class:`~cloudhub.config.HubConfig`; twistd runs it through ``cloudhub.tap``, and
an existing Twisted application embeds it with ``service.setServiceParent(application)``.
Children: the join-token refresher, the certificate server (HTTPS), the WebSocket listener,
the QUIC listener (when enabled) and the HTTP API.
Applications talk to the hub through :attr:`CloudHubService.upstream`.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from cloudhub.api import ApiService, api_listener, api_site
from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.tls import server_tls_options
from cloudhub.certs.token import TokenIssuer
from cloudhub.certs.web import certificate_site
from cloudhub.config import HubConfig
from cloudhub.handler import MessageHandle
from cloudhub.interfaces import CLOSE_GOING_AWAY
from cloudhub.listening import ListeningService
from cloudhub.metrics import HubMetrics
from cloudhub.store import open_store
from cloudhub.tuning import InterpreterTuning
from cloudhub.upstream import Upstream

log = Logger()


class CloudHubService(MultiService):
    """The hub: certificate server, edge transports and delivery core as child services.

    The CA and server certificate are loaded or created when the service is built, so a bad
    certificate file stops startup before anything listens.

    :ivar upstream: the API to send to nodes and hear from them (:class:`Upstream`).
    :ivar ready: fires with ``{listener name: port}`` once every listener is bound.
    """

    def __init__(self, config: HubConfig, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.reactor = reactor
        self.is_ready = False
        self.ready: Deferred[dict[str, int]] = Deferred()
        hub = config.cloudhub

        self.authority = CertificateAuthority.load_or_create(config)
        self.tokens = TokenIssuer(self.authority, hub.token_refresh_duration, reactor)
        self.tokens.setServiceParent(self)

        self.store = open_store(config.hub.store.type, config.store_path, reactor)
        self.handle = MessageHandle(
            reactor,
            keepalive_interval=hub.keepalive_interval,
            node_limit=hub.node_limit,
            store=self.store,
        )
        self.upstream = Upstream(self.handle)

        self.certificate_site = certificate_site(
            self.authority, self.tokens, reactor, ready=lambda: self.is_ready
        )
        https = SSL4ServerEndpoint(
            reactor,
            hub.https.port,
            server_tls_options(self.authority, "request"),
            backlog=config.hub.listen_backlog,
            interface=hub.https.address,
        )
        self.https = ListeningService("https", https, self.certificate_site)
        self.https.setServiceParent(self)

        self.metrics: HubMetrics | None = None
        if config.hub.metrics.enable:
            self.metrics = HubMetrics(self.handle, self.certificate_site.counters)

        self.websocket: ListeningService | None = None
        if hub.websocket.enable:
            from cloudhub.transport.websocket import websocket_listener

            self.websocket = websocket_listener(config, self.authority, self.handle, reactor)
            self.websocket.setServiceParent(self)

        self.quic: ListeningService | None = None
        if hub.quic.enable:
            from cloudhub.transport.quic import quic_listener

            self.quic = quic_listener(config, self.authority, self.handle, reactor)
            self.quic.setServiceParent(self)

        # Added last, stopped first: no API write is accepted once the hub stops.
        self.api: ApiService | None = None
        if config.hub.api.enable:
            site = api_site(
                self.upstream,
                self.store,
                reactor,
                max_body=config.hub.max_message_size,
                max_batch=config.hub.api.max_batch_size,
                token=config.hub.api.token,
                metrics_resource=self.metrics.resource() if self.metrics is not None else None,
                accepting=lambda: bool(self.running),
            )
            self.api = api_listener(config, site, reactor)
            self.api.setServiceParent(self)

        # Started last: what it freezes includes everything built above.
        self.tuning: InterpreterTuning | None = None
        if config.hub.gc_threshold or config.hub.switch_interval_us:
            self.tuning = InterpreterTuning(
                config.hub.gc_threshold, config.hub.switch_interval_us / 1_000_000
            )
            self.tuning.setServiceParent(self)

    def listeners(self) -> list[ListeningService]:
        return [s for s in self if isinstance(s, ListeningService)]

    def startService(self) -> None:
        settings = self.config.as_dict()
        if settings["hub"]["api"]["token"]:
            settings["hub"]["api"]["token"] = "<redacted>"
        log.info(
            "cloudhub starting with {path}: {settings}",
            path=self.config.path,
            settings=json.dumps(settings, sort_keys=True),
        )
        super().startService()
        self.reactor.callWhenRunning(self._await_listeners)

    def _await_listeners(self) -> None:
        listeners = self.listeners()

        def bound(_: object) -> dict[str, int]:
            ports = {str(s.name): s.bound_port for s in listeners}
            self.is_ready = True
            log.info("cloudhub ready: {ports}", ports=json.dumps(ports, sort_keys=True))
            return ports

        def failed(failure: Failure) -> None:
            log.critical("cloudhub cannot start: {error}", error=failure.getErrorMessage())
            if self.reactor.running:
                self.reactor.stop()

        listening: Deferred[Any] = gatherResults(
            [s.listening for s in listeners], consumeErrors=True
        )
        listening.addCallbacks(bound, lambda f: f.value.subFailure)
        listening.chainDeferred(self.ready)
        self.ready.addErrback(failed)

    def stopService(self) -> Deferred[None] | None:
        log.info("cloudhub stopping")
        self.is_ready = False
        self.handle.close_all(CLOSE_GOING_AWAY, "hub shutting down")
        stopped: Deferred[Any] = super().stopService()
        # Listeners first, then what they accepted is committed and the store closed.
        stopped.addBoth(lambda _: self.store.close())
        stopped.addErrback(lambda f: log.failure("closing the sync store failed", f))
        return stopped

    def port(self, name: str) -> int:
        """The bound port of listener ``name`` (``https``, ``websocket``, ...)."""
        for listener in self.listeners():
            if listener.name == name:
                return listener.bound_port
        raise KeyError(name)
