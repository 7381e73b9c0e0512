"""twistd glue: ``twistd -n cloudhub --config FILE`` (named by the cloudhub twistd plugin)."""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any

from twisted.application.service import IService
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from cloudhub import __version__
from cloudhub.config import HubConfig, load_config
from cloudhub.errors import CloudHubError, HubNotRunning

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

    def opt_version(self) -> None:
        """Print cloudhub's version and exit."""
        print(f"cloudhub {__version__}")
        raise SystemExit(0)


# The exit status of a hub that could not start (a port taken, a bad CA file, a store that
# cannot be opened): twistd itself would exit 0 once the reactor stopped.
EXIT_START_FAILED = 1


def makeService(options: Options | dict[str, Any]) -> IService:
    from twisted.internet import reactor

    from cloudhub.service import CloudHubService

    path = options["config"]
    try:
        config = load_config(path) if path else HubConfig()
    except CloudHubError as e:
        # One line that names the file, key and problem; twistd exits non-zero.
        raise SystemExit(f"cloudhub: {e}") from None
    # The daemon owns its process: interpreter tuning on (embedders opt in).
    service = CloudHubService(config, reactor=reactor, interpreter_tuning=True)
    reactor.callWhenRunning(install_stop_handlers, reactor)
    reactor.callWhenRunning(stop_if_start_fails, service, reactor)
    quiet_library_loggers()
    return service


def stop_if_start_fails(service: Any, reactor: Any) -> None:
    """A hub that cannot start stops the daemon, which then exits with a non-zero status.

    A start cut short by a deliberate stop (SIGTERM while the store opens) is no failure.
    """

    def failed(failure: Failure) -> None:
        if failure.check(HubNotRunning) or not service.running:
            return
        # At interpreter exit, after twistd has removed its pid file.
        atexit.register(_exit, EXIT_START_FAILED)
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping: the exit status is set all the same

    if service.started is not None:
        service.started.addErrback(failed)


def _exit(status: int) -> None:
    # The hub has stopped and twistd has cleaned up: only buffered log lines are left.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing more can be said on it
    os._exit(status)


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
