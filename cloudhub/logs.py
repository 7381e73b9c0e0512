"""Log output for the hub: JSON lines for machines, Twisted's text for people (design.md).

Every log call in cloudhub names its fields (``log.info("node {node} connected", node=...)``);
the JSON form keeps them as fields, so a log pipeline can select on ``node`` or ``msg_id``
without parsing text. One line per event::

    {"time": "2025-01-02T03:04:05.678Z", "level": "info", "namespace": "cloudhub.handler",
     "text": "node edge-1 connected over websocket ...", "node": "edge-1", ...}

``time`` (UTC), ``level``, ``namespace``, ``text`` (the rendered message) and, when present,
``system`` and ``failure`` (the traceback) come first; then every field of the event. A field
whose name is one of those is written with a leading underscore. Values JSON cannot carry are
written as ``str(value)``.

Which format: ``CLOUDHUB_LOG_FORMAT=json`` or ``text`` forces one; unset or ``auto``: JSON
when the stream is not a terminal (a service manager, a pipe, a container), text when it is.

With twistd (which builds its log observer before it calls the plugin, so the tap cannot
choose it), name the factory on the command line::

    twistd -n --logger cloudhub.logs.observer cloudhub --config etc/cloudhub.yaml

``--logger`` takes the place of twistd's ``--logfile``/``--syslog``: logs go to stdout.
Programs that are not twistd call :func:`begin_logging`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)

from cloudhub.errors import ConfigError

__all__ = [
    "ENV_VAR",
    "AccessLog",
    "FORMATS",
    "begin_logging",
    "event_as_json_line",
    "json_lines_observer",
    "make_observer",
    "observer",
    "select_format",
]

ENV_VAR = "CLOUDHUB_LOG_FORMAT"
FORMATS = ("auto", "json", "text")

_RESERVED = ("time", "level", "namespace", "text", "system", "failure")
# Keys twisted.python.log (legacy) events carry besides their log_* keys; "text" renders them.
_LEGACY_KEYS = frozenset({"message", "isError", "format", "time", "why", "failure", "system"})


def _utc(timestamp: float) -> str:
    seconds = int(timestamp)
    millis = int((timestamp - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _plain(value: Any) -> Any:
    """``value`` if JSON can carry it as it is, else its text."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return str(value)
    return value


def event_as_json_line(event: LogEvent) -> str:
    """One log event as one line of JSON (with the newline); never raises."""
    try:
        record: dict[str, Any] = {}
        when = event.get("log_time")
        record["time"] = _utc(when if isinstance(when, (int, float)) else time.time())
        level = event.get("log_level")
        record["level"] = getattr(level, "name", None) or "info"
        record["namespace"] = event.get("log_namespace", "")
        record["text"] = formatEvent(event)
        if "log_system" in event:
            record["system"] = event["log_system"]
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["failure"] = failure.getTraceback()
            except Exception:
                record["failure"] = repr(failure)
        # twisted.python.log.msg() events: "message" and "isError" are what log_text renders.
        legacy = "log_legacy" in event or ("isError" in event and "message" in event)
        for key, value in event.items():
            if not isinstance(key, str) or key.startswith("log_"):
                continue
            if legacy and key in _LEGACY_KEYS:
                continue
            name = f"_{key}" if key in _RESERVED else key
            record[name] = value
        try:
            text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            text = json.dumps(
                {key: _plain(value) for key, value in record.items()}, ensure_ascii=False
            )
    except Exception as e:  # a log line must never take the process down
        text = json.dumps(
            {"time": _utc(time.time()), "level": "error", "text": f"unloggable event: {e!r}"}
        )
    return text + "\n"


def json_lines_observer(stream: IO[Any]) -> FileLogObserver:
    """An observer writing :func:`event_as_json_line` lines to ``stream``."""
    return FileLogObserver(stream, event_as_json_line)


def select_format(stream: IO[Any], environ: Mapping[str, str] | None = None) -> str:
    """``"json"`` or ``"text"``: :data:`ENV_VAR` when set, else by whether ``stream`` is a tty.

    Raises :class:`ConfigError` for a value of :data:`ENV_VAR` other than json, text, auto.
    """
    environ = os.environ if environ is None else environ
    chosen = environ.get(ENV_VAR, "").strip().lower() or "auto"
    if chosen not in FORMATS:
        raise ConfigError(
            "environment", ENV_VAR, f"must be one of {', '.join(FORMATS)}, got {chosen!r}"
        )
    if chosen != "auto":
        return chosen
    isatty = getattr(stream, "isatty", None)
    try:
        terminal = bool(isatty and isatty())
    except (OSError, ValueError):
        terminal = False
    return "text" if terminal else "json"


def make_observer(stream: IO[Any], log_format: str = "auto") -> ILogObserver:
    """An observer writing ``log_format`` (json, text, or auto: by :func:`select_format`)."""
    if log_format == "auto":
        log_format = select_format(stream)
    if log_format == "json":
        return json_lines_observer(stream)
    if log_format == "text":
        return textFileLogObserver(stream)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")


def observer() -> ILogObserver:
    """The observer for ``twistd --logger cloudhub.logs.observer``: stdout, format by
    :data:`ENV_VAR` or by whether stdout is a terminal. A bad :data:`ENV_VAR` exits with
    one line, as a bad config file does."""
    stream = sys.stdout
    try:
        return make_observer(stream, select_format(stream))
    except ConfigError as e:
        raise SystemExit(f"cloudhub: {e}") from None


def begin_logging(stream: IO[Any] | None = None, log_format: str = "auto") -> ILogObserver:
    """Start Twisted's logging to ``stream`` (stdout) for a program that is not twistd.

    Standard output and error are not redirected into the log.
    """
    chosen = make_observer(stream if stream is not None else sys.stdout, log_format)
    globalLogBeginner.beginLoggingTo([chosen], redirectStandardIO=False)
    return chosen


_access = Logger(namespace="cloudhub.access")


class AccessLog:
    """A ``twisted.web`` Site mix-in: no access log unless :attr:`access_log` (``hub.accessLog``).

    twisted.web writes one Apache-style line per request through the legacy log, which under
    ``twistd -n`` is one text line per API call: thousands a second under load. When on, each
    request is one event with named fields instead, in the hub's log format (JSON lines).
    """

    access_log = False

    def log(self, request: Any) -> None:
        if not self.access_log:
            return
        peer = request.getClientAddress()
        _access.info(
            "{method} {uri} {code} {length} bytes from {peer}",
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
            code=request.code,
            length=request.sentLength,
            peer=getattr(peer, "host", None) or str(peer),
            user_agent=(request.getHeader(b"user-agent") or b"").decode("latin-1"),
        )
