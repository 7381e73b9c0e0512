"""A service that listens on an endpoint and tells which address it got.

Twisted's ``StreamServerEndpointService`` keeps the listening port to itself; tests and the
startup log need the real port when the configured one is 0, so this one exposes it.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

log = Logger()


class ListeningService(Service):
    """Listen on ``endpoint`` with ``factory`` while running; stop listening on stop.

    A failure to listen (port taken, permission) is logged and delivered through
    :attr:`listening`; whoever runs the hub decides to stop (``tap.py`` does).
    """

    def __init__(self, name: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory):
        self.setName(name)
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None

    def startService(self) -> None:
        super().startService()
        self._listening = self.endpoint.listen(self.factory)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            address = port.getHost()
            log.info(
                "{service} listening on {host}:{port}",
                service=self.name,
                host=getattr(address, "host", "?"),
                port=getattr(address, "port", "?"),
            )
            return port

        self._listening.addCallback(listening)
        self._listening.addErrback(self._failed)

    def _failed(self, failure):  # type: ignore[no-untyped-def]
        log.failure("{service} could not listen", failure, service=self.name)
        return failure

    @property
    def listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port once listening (or fails)."""
        if self.port is not None:
            return succeed(self.port)
        if self._listening is None:
            raise RuntimeError(f"{self.name} has not been started")
        result: Deferred[IListeningPort] = Deferred()

        def relay(outcome: Any) -> Any:
            result.callback(outcome)
            return outcome

        self._listening.addBoth(relay)
        return result

    @property
    def bound_port(self) -> int:
        """The TCP/UDP port actually bound (useful when the configured port is 0)."""
        if self.port is None:
            raise RuntimeError(f"{self.name} is not listening")
        return int(self.port.getHost().port)  # type: ignore[attr-defined]

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()  # type: ignore[return-value]
        if self._listening is not None:
            self._listening.cancel()
        return None
