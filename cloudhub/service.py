"""CloudHubService: the whole hub as one ``MultiService``.

Built from a :class:`~cloudhub.config.HubConfig`; twistd runs it through ``cloudhub.tap``, and
an existing Twisted application embeds it with ``service.setServiceParent(application)``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from cloudhub.config import HubConfig
from cloudhub.listening import ListeningService

log = Logger()


class CloudHubService(MultiService):
    """The hub: certificate server, edge transports, delivery core and API as child services.

    :ivar ready: fires once the reactor runs and every listener is bound (``/readyz``).
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

    def listeners(self) -> list[ListeningService]:
        return [s for s in self if isinstance(s, ListeningService)]

    def startService(self) -> None:
        log.info(
            "cloudhub starting with {path}: {settings}",
            path=self.config.path,
            settings=json.dumps(self.config.as_dict(), sort_keys=True),
        )
        super().startService()
        self.reactor.callWhenRunning(self._await_listeners)

    def _await_listeners(self) -> None:
        listeners = self.listeners()

        def bound(_: object) -> dict[str, int]:
            ports = {s.name: s.bound_port for s in listeners}
            self.is_ready = True
            log.info("cloudhub ready: {ports}", ports=json.dumps(ports, sort_keys=True))
            return ports

        def failed(failure: Failure) -> None:
            log.critical("cloudhub cannot start: {error}", error=failure.getErrorMessage())
            if self.reactor.running:
                self.reactor.stop()

        listening = gatherResults([s.listening for s in listeners], consumeErrors=True)
        listening.addCallback(bound)
        listening.addErrback(lambda f: f.value.subFailure if hasattr(f.value, "subFailure") else f)
        listening.chainDeferred(self.ready)
        self.ready.addErrback(failed)

    def stopService(self):  # type: ignore[no-untyped-def]
        log.info("cloudhub stopping")
        self.is_ready = False
        return super().stopService()
