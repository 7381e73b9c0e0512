"""A service that listens on an endpoint and tells which address it got.

Twisted's ``StreamServerEndpointService`` keeps the listening port to itself; tests and the
startup log need the real port when the configured one is 0, so this one exposes it.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

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
        self._failure: Failure | None = None

    def startService(self) -> None:
        super().startService()
        self._listening = self.endpoint.listen(self.factory)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            host = port.getHost()
            log.info(
                "{service} listening on {address}",
                service=self.name,
                address=self.address,
                host=getattr(host, "host", None),
                port=getattr(host, "port", None),
            )
            return port

        self._failure = None
        self._listening.addCallback(listening)
        self._listening.addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        log.failure("{service} could not listen", failure, service=self.name)
        # Kept here and handed to each caller of ``listening``; the chain itself ends
        # handled, or garbage collection would report the same failure again, later.
        self._failure = failure

    @property
    def listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port once listening (or fails)."""
        if self.port is not None:
            return succeed(self.port)
        if self._failure is not None:
            return fail(self._failure)
        if self._listening is None:
            raise RuntimeError(f"{self.name} has not been started")
        result: Deferred[IListeningPort] = Deferred()

        def relay(outcome: Any) -> Any:
            if self._failure is not None:
                result.errback(self._failure)
            else:
                result.callback(outcome)
            return outcome

        self._listening.addBoth(relay)
        return result

    @property
    def bound_port(self) -> int:
        """The TCP/UDP port actually bound (useful when the configured port is 0)."""
        if self.port is None:
            raise RuntimeError(f"{self.name} is not listening")
        host = self.port.getHost()
        if not hasattr(host, "port"):
            raise RuntimeError(f"{self.name} listens on {self.address}, not on a port")
        return int(host.port)

    @property
    def bound(self) -> int | str:
        """The port bound, or the socket's path for a UNIX socket (``ready``'s values)."""
        if self.port is None:
            raise RuntimeError(f"{self.name} is not listening")
        host = self.port.getHost()
        return int(host.port) if hasattr(host, "port") else self.address

    @property
    def address(self) -> str:
        """Where it listens, for people: ``host:port``, ``[v6]:port`` or the socket path."""
        if self.port is None:
            return "(not listening)"
        host: Any = self.port.getHost()
        if hasattr(host, "port"):
            ip = str(host.host)
            return f"[{ip}]:{host.port}" if ":" in ip else f"{ip}:{host.port}"
        name = getattr(host, "name", None)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"unix:{name}" if name else str(host)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()  # type: ignore[return-value]
        if self._listening is not None:
            self._listening.cancel()
        return None
