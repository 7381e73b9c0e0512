"""CloudHubService: the whole hub as one ``MultiService``.

Built from a :class:`~cloudhub.config.HubConfig`; twistd runs it through ``cloudhub.tap``, and
an existing Twisted application embeds it with ``service.setServiceParent(application)``.

Construction does no I/O. Each ``startService`` loads the certificate authority and opens the
sync store (in threads, so the reactor never waits on a disk), restores what the store holds,
then adds and starts the parts: the join-token refresher, the certificate server (HTTPS), the
WebSocket listener, the QUIC listener (when enabled), the HTTP API and, when asked for, the
interpreter tuning. ``stopService`` stops them, commits what was accepted, closes what the
start opened and removes the parts, so the hub can start again.

What an embedder passes in (txacme style) is used as given and never closed by the hub: a
``store`` (any :class:`~cloudhub.store.ISyncStore`), an ``authority``. What it does not pass is
built from the config at each start and released at each stop.
Applications talk to the hub through :attr:`CloudHubService.upstream`, which lives as long as
the service object (subscriptions survive restarts).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from cloudhub.budget import Budget
from cloudhub.certs.authority import CertificateAuthority
from cloudhub.certs.tls import server_tls_options
from cloudhub.certs.token import TokenIssuer
from cloudhub.certs.web import CertificateSite, HttpLimits, certificate_site
from cloudhub.config import ConnectionLimits, HubConfig, LimitsConfig
from cloudhub.endpoints import server_endpoint
from cloudhub.errors import HubNotRunning
from cloudhub.handler import MessageHandle
from cloudhub.limits import ConnectionLimiter, DescriptorBudget
from cloudhub.listening import ListeningService
from cloudhub.metrics import HubMetrics
from cloudhub.store import MemorySyncStore, open_store
from cloudhub.store.guard import check_store_file, has_run_before
from cloudhub.store.interfaces import ISyncStore, SyncRecord
from cloudhub.tuning import InterpreterTuning
from cloudhub.upstream import Upstream

__all__ = ["CloudHubService"]

log = Logger()

Ports = dict[str, int | str]


class CloudHubService(MultiService):
    """The hub: certificate server, edge transports and delivery core as child services.

    :param config: the settings (:func:`cloudhub.config.load_config`, or ``HubConfig()``).
    :param reactor: the reactor to run on (default: the global one).
    :param store: a sync store to use instead of the configured one; the caller owns it
        (the hub flushes it at stop, never closes it).
    :param authority: a certificate authority to use instead of loading or creating the
        configured one.
    :param interpreter_tuning: apply ``hub.gcThreshold`` / ``hub.switchIntervalMicroseconds``
        to the whole process while the hub runs. ``twistd cloudhub`` does; an application
        that embeds the hub keeps its interpreter as it is unless it asks.

    :ivar upstream: the API to send to nodes and hear from them (:class:`Upstream`).
    :ivar is_ready: True between a start's completion and the next stop.
    """

    def __init__(
        self,
        config: HubConfig,
        reactor: Any = None,
        *,
        store: ISyncStore | None = None,
        authority: CertificateAuthority | None = None,
        interpreter_tuning: bool = False,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.reactor = reactor
        self.interpreter_tuning = interpreter_tuning
        if store is None and config.hub.store.type == "memory":
            # Lives as long as this object: a restart in the same process keeps what is owed.
            store = MemorySyncStore(
                reactor, tombstone_retention=config.hub.store.tombstone_retention
            )
        self._given_store = store
        self._given_authority = authority
        self.store: ISyncStore | None = store
        self.authority: CertificateAuthority | None = authority

        hub = config.cloudhub
        limits = config.hub.limits
        self.handle = MessageHandle(
            reactor,
            keepalive_interval=hub.keepalive_interval,
            node_limit=hub.node_limit,
            running=False,
            budget=Budget(
                node_messages=limits.node_messages,
                node_bytes=limits.node_bytes,
                total_messages=limits.total_messages,
                total_bytes=limits.total_bytes,
                unknown_nodes=limits.unknown_nodes,
            ),
        )
        self.upstream = Upstream(self.handle)

        self.is_ready = False
        # The parts one start added (removed at its stop), and the outcome of that start.
        self._parts: list[IService] = []
        self._outcome: Ports | Failure | None = None
        self._observers: list[Deferred[Ports]] = []
        # What the last startService() returned: whoever runs the hub may handle its failure
        # there (tap.py does) rather than leave it to "Unhandled error in Deferred".
        self.started: Deferred[Ports] | None = None
        self._stopping: Deferred[Any] | None = None
        self._has_run_before = False
        self._start_after_stop = False
        self._stop_observers: list[Deferred[None]] = []

        self.descriptors: DescriptorBudget | None = None
        self.https_limiter: ConnectionLimiter | None = None
        self.tokens: TokenIssuer | None = None
        self.certificate_site: CertificateSite | None = None
        self.https: ListeningService | None = None
        self.metrics: HubMetrics | None = None
        self.websocket: ListeningService | None = None
        self.quic: ListeningService | None = None
        self.api: Any = None  # cloudhub.api.ApiService
        self.tuning: InterpreterTuning | None = None

    # --- readiness ---------------------------------------------------------------------------

    @property
    def ready(self) -> Deferred[Ports]:
        """Fires with ``{listener name: port}`` (a UNIX socket: its path) when the current or
        next start is complete, or fails with why it could not start. A new outcome per start."""
        if self._outcome is None:
            waiter: Deferred[Ports] = Deferred()
            self._observers.append(waiter)
            return waiter
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        return succeed(self._outcome)

    def _settle(self, outcome: Ports | Failure) -> None:
        self._outcome = outcome
        observers, self._observers = self._observers, []
        for waiter in observers:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    # --- start ------------------------------------------------------------------------------

    def startService(self) -> Deferred[Ports]:  # type: ignore[override]
        """Start the hub; returns :attr:`ready` for this start."""
        if self.running:
            return self.ready
        if self._stopping is not None:
            # A stop is still releasing what the last start opened: start once it is done,
            # unless a stop is asked for meanwhile (the last call wins).
            later: Deferred[Ports] = Deferred()
            self._start_after_stop = True

            def start(_: object) -> None:
                if self._start_after_stop:
                    self._start_after_stop = False
                    self.startService().chainDeferred(later)
                else:
                    later.errback(HubNotRunning("cloudhub was stopped before it started"))

            self._stopping.addCallback(start)
            self.started = later
            return later
        settings = self.config.as_dict(redact=True)
        log.info(
            "cloudhub starting with {path}: {settings}",
            path=self.config.path,
            settings=json.dumps(settings, sort_keys=True),
        )
        self._outcome = None
        self.is_ready = False
        ready = self.started = self.ready
        super().startService()  # running; any child an embedder added starts now
        starting = self._open()
        starting.addCallback(self._start_parts)
        starting.addCallback(lambda _: self._await_listeners())
        starting.addCallbacks(self._started, self._start_failed)
        return ready

    def _open(self) -> Deferred[tuple[CertificateAuthority, ISyncStore, list[SyncRecord]]]:
        """The authority and the store with its records, read without blocking the reactor."""
        if self._given_authority is not None:
            authority: Deferred[CertificateAuthority] = succeed(self._given_authority)
        else:
            authority = self._in_thread(self._load_authority)

        def open_store_and_read(authority: CertificateAuthority) -> Deferred[Any]:
            self.authority = authority
            if self._given_store is not None:
                store = self._given_store
                return store.records().addCallback(lambda records: (authority, store, records))
            opened = self._in_thread(self._open_configured_store)

            def opened_store(result: tuple[ISyncStore, list[SyncRecord]]) -> Any:
                self.store = result[0]  # closed at stop, whatever happens next
                return authority, result[0], result[1]

            return opened.addCallback(opened_store)

        return authority.addCallback(open_store_and_read)

    def _load_authority(self) -> CertificateAuthority:
        # Looked at before the CA may be created: a data directory that has run a hub before.
        self._has_run_before = has_run_before(self.config)
        return CertificateAuthority.load_or_create(self.config)

    def _open_configured_store(self) -> tuple[ISyncStore, list[SyncRecord]]:
        if self.config.hub.store.type == "sqlite" and not self.config.hub.store.allow_empty:
            check_store_file(self.config.store_path, self._has_run_before)
        store = open_store(
            self.config.hub.store.type,
            self.config.store_path,
            self.reactor,
            tombstone_retention=self.config.hub.store.tombstone_retention,
        )
        try:
            return store, store.load()
        except BaseException:
            store.close()
            raise

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    def _start_parts(
        self, opened: tuple[CertificateAuthority, ISyncStore, list[SyncRecord]]
    ) -> None:
        if not self.running:
            raise HubNotRunning("cloudhub was stopped before it was ready")
        authority, store, records = opened
        self.handle.attach(store, records)
        config, hub, reactor = self.config, self.config.cloudhub, self.reactor

        self.tokens = self._add(TokenIssuer(authority, hub.token_refresh_duration, reactor))
        limits = config.hub.limits
        self.descriptors = DescriptorBudget(reactor)  # shared by the limited listeners
        self.certificate_site = certificate_site(
            authority,
            self.tokens,
            reactor,
            # Not ready while the store's commits fail: accepting nothing, edges may still join.
            ready=lambda: self.is_ready and self.handle.store_failing is None,
            http_limits=http_limits(limits, limits.request_timeout or None),
        )
        self.certificate_site.access_log = config.hub.access_log
        if config.hub.metrics.enable:
            # The store's figures follow handle.store, so they stay right across restarts.
            self.metrics = HubMetrics(
                self.handle,
                self.certificate_site.counters,
                authority=authority,
                limits=self._limit_sources,
            )
        if hub.https.enable:
            endpoint = server_endpoint(
                reactor,
                hub.https.endpoint,
                hub.https.address,
                hub.https.port,
                config.hub.listen_backlog,
            )
            tls = TLSMemoryBIOFactory(
                server_tls_options(authority, "request"), False, self.certificate_site
            )
            # In front of TLS: a connection over a cap costs no handshake.
            self.https_limiter = connection_limiter(
                tls, limits.https, reactor, self.descriptors, "https"
            )
            self.https = self._add(ListeningService("https", endpoint, self.https_limiter))
        if hub.websocket.enable:
            from cloudhub.transport.websocket import websocket_listener

            self.websocket = self._add(websocket_listener(config, authority, self.handle, reactor))
        if hub.quic.enable:
            from cloudhub.transport.quic import quic_listener

            self.quic = self._add(quic_listener(config, authority, self.handle, reactor))
        if config.hub.api.enable:
            from cloudhub.api import api_listener, api_site

            site = api_site(
                self.upstream,
                store,
                reactor,
                max_body=config.hub.max_message_size,
                max_batch=config.hub.api.max_batch_size,
                token=config.hub.api.token,
                metrics_resource=self.metrics.resource() if self.metrics is not None else None,
                accepting=lambda: bool(self.running),
                ready=lambda: self.is_ready,
                max_batches=limits.api.batches,
            )
            site.access_log = config.hub.access_log
            # Added after the edge listeners, so stopped before them: no API write is
            # accepted once the hub stops.
            self.api = self._add(api_listener(config, site, reactor, self.descriptors))
        if self.interpreter_tuning and (config.hub.gc_threshold or config.hub.switch_interval_us):
            # Added last: what it freezes includes everything built above.
            self.tuning = self._add(
                InterpreterTuning(config.hub.gc_threshold, config.hub.switch_interval_us / 1e6)
            )

    def _limit_sources(self) -> dict[str, tuple[Any, Any]]:
        """The limited listeners and their sites, for the metrics (read at each scrape)."""
        sources: dict[str, tuple[Any, Any]] = {}
        if self.https is not None:
            sources["https"] = (self.https_limiter, self.certificate_site)
        if self.api is not None:
            sources["api"] = (getattr(self.api, "limiter", None), self.api.site)
        if self.websocket is not None:
            # admission → TLS → the WebSocket factory, whose stats these are.
            admission: Any = self.websocket.factory
            tls = getattr(admission, "wrappedFactory", None)
            stats = getattr(getattr(tls, "wrappedFactory", None), "stats", None)
            sources["websocket"] = (None, _TransportStats(stats, admission))
        if self.quic is not None:
            protocol: Any = getattr(self.quic, "protocol", None)
            sources["quic"] = (None, _TransportStats(getattr(protocol, "stats", None)))
        return sources

    def _add(self, part: Any) -> Any:
        self._parts.append(part)
        part.setServiceParent(self)  # running: started now
        return part

    def listeners(self) -> list[ListeningService]:
        return [s for s in self if isinstance(s, ListeningService)]

    def _await_listeners(self) -> Deferred[Ports]:
        listeners = self.listeners()
        listening: Deferred[Any] = gatherResults(
            [s.listening for s in listeners], consumeErrors=True
        )
        listening.addErrback(_first_error)
        return listening.addCallback(lambda _: {str(s.name): s.bound for s in listeners})

    def _started(self, ports: Ports) -> None:
        if not self.running:
            self._start_failed(Failure(HubNotRunning("cloudhub was stopped before it was ready")))
            return
        self.is_ready = True
        log.info("cloudhub ready: {ports}", ports=json.dumps(ports, sort_keys=True))
        self._settle(ports)

    def _start_failed(self, failure: Failure) -> None:
        if self.running:
            log.critical("cloudhub cannot start: {error}", error=failure.getErrorMessage())
        self._settle(failure)

    # --- stop -------------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Stop: close the nodes' connections, stop the parts, commit what was accepted,
        close what the start opened. Fires when all of that is done."""
        if not self.running:
            self._start_after_stop = False  # a start queued behind a stop is called off
            return self._when_stopped()
        log.info("cloudhub stopping")
        self.is_ready = False
        # No new node session from now on; the API (stopped first) answers what it began,
        # then the store commits everything accepted until then.
        self.handle.stop_serving()
        stopped: Deferred[Any] = super().stopService()  # the parts, the API first
        stopped.addErrback(lambda f: log.failure("stopping a part of the hub failed", f))
        if self._outcome is None:
            # Still opening (threads cannot be interrupted): wait for it, then undo it.
            log.info("cloudhub stopping: waiting for the CA and the sync store to finish opening")
            stopped.addCallback(lambda _: self._when_settled())
        else:
            self._outcome = None  # ``ready`` now waits for the next start
        stopped.addCallback(lambda _: self._release())
        self._stopping = stopped

        def done(result: object) -> object:
            self._stopping = None
            observers, self._stop_observers = self._stop_observers, []
            for observer in observers:
                observer.callback(None)
            return result

        stopped.addBoth(done)
        return self._when_stopped()

    def _when_stopped(self) -> Deferred[None]:
        """Fires once no stop is under way (at once when none is)."""
        if self._stopping is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_observers.append(waiter)
        return waiter

    def _when_settled(self) -> Deferred[None]:
        settled: Deferred[None] = Deferred()
        self.ready.addBoth(lambda _: settled.callback(None))
        return settled

    def _release(self) -> Deferred[None]:
        if self.running:
            return succeed(None)  # started again meanwhile: what is open is in use
        self._outcome = None
        if self.metrics is not None:
            self.metrics.close()
        done = self._commit_and_close()
        released: Deferred[None] = Deferred()

        def relay(result: object) -> None:
            if isinstance(result, Failure):
                log.failure("closing the sync store failed", result)
                released.errback(result)
            else:
                released.callback(None)

        done.addBoth(relay)
        # Sends accepted during the stop are committed by this close: until it is done, a
        # flush() waits for it instead of answering at once.
        self.handle.detach(released)
        released.addErrback(lambda _: None)  # logged above; flush() callers got it
        parts, self._parts = self._parts, []
        for part in parts:
            part.disownServiceParent()
        self.tokens = self.certificate_site = self.https = self.metrics = None
        self.https_limiter = self.descriptors = None
        self.websocket = self.quic = self.api = self.tuning = None
        if self._given_authority is None:
            self.authority = None
        return done

    def _commit_and_close(self) -> Deferred[Any]:
        """Commit what was accepted; close the store if this start opened it."""
        store, given = self.store, self._given_store
        if store is None:
            return succeed(None)
        if store is given:
            # The embedder's (or the in-memory one this service keeps): committed, left open.
            done = store.flush()
        else:
            self.store = None
            done = store.close()
        return done

    def port(self, name: str) -> int:
        """The bound port of listener ``name`` (``https``, ``websocket``, ...)."""
        for listener in self.listeners():
            if listener.name == name:
                return listener.bound_port
        raise KeyError(name)


class _TransportStats:
    """An edge transport's counters, as the metrics' limit sources carry them."""

    def __init__(self, stats: Any, admission: Any = None) -> None:
        self.transport_stats = stats
        self.admission = admission  # a HandshakeAdmission, when the listener has one


def http_limits(limits: LimitsConfig, request_timeout: float | None) -> HttpLimits:
    """``hub.limits`` as the HTTP limits of a site (certificate server, API)."""
    return HttpLimits(
        head_timeout=limits.header_timeout,
        request_timeout=request_timeout,
        request_line=limits.max_request_line,
        header_bytes=limits.max_header_bytes,
        max_headers=limits.max_headers,
    )


def connection_limiter(
    factory: Any, limits: ConnectionLimits, reactor: Any, budget: DescriptorBudget, name: str
) -> ConnectionLimiter:
    """``factory`` behind the connection caps and descriptor reserve of ``limits``."""
    return ConnectionLimiter(
        factory,
        reactor,
        max_connections=limits.max_connections,
        per_address=limits.max_per_address,
        reserve=limits.descriptor_reserve,
        budget=budget,
        name=name,
    )


def _first_error(failure: Failure) -> Failure:
    """The failure of the listener that could not listen (gatherResults wraps it)."""
    return failure.value.subFailure  # type: ignore[no-any-return,union-attr]
