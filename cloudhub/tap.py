"""twistd glue: ``twistd -n cloudhub --config FILE`` (named by the cloudhub twistd plugin)."""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from cloudhub.config import HubConfig, load_config
from cloudhub.errors import CloudHubError

log = Logger()


class Options(usage.Options):
    optParameters = [
        [
            "config",
            "c",
            None,
            "YAML config file (ours, or a whole cloudcore.yaml); default: built-in defaults",
        ],
    ]


def makeService(options: Options | dict[str, Any]) -> IService:
    from twisted.internet import reactor

    from cloudhub.service import CloudHubService

    path = options["config"]
    try:
        config = load_config(path) if path else HubConfig()
        service = CloudHubService(config, reactor=reactor)
    except CloudHubError as e:
        # One line that names the file, key and problem; twistd exits non-zero.
        raise SystemExit(f"cloudhub: {e}") from None
    reactor.callWhenRunning(install_stop_handlers, reactor)
    quiet_library_loggers()
    return service


def quiet_library_loggers() -> None:
    """aioquic reports each peer's protocol error through stdlib logging as a warning; a
    hostile client could fill the log with them. The hub logs what matters itself."""
    import logging

    logging.getLogger("quic").setLevel(logging.ERROR)


def install_stop_handlers(reactor: Any) -> None:
    """SIGINT and SIGTERM stop the hub cleanly and twistd exits 0.

    Twisted's own handlers make twistd re-raise the signal after shutdown (exit status 130 /
    143); a deliberate stop of the hub is a success for operators and service managers.
    """

    def stop(number: int, frame: object) -> None:
        log.info("received {signal}, stopping", signal=signal.Signals(number).name)
        reactor.callFromThread(reactor.stop)

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, stop)
