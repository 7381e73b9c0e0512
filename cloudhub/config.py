"""HubConfig: the hub's settings from a YAML file, validated before anything starts.

Two file shapes mean the same thing (design.md, "Config is cloudcore-compatible"):

* ours: top-level ``cloudHub:`` (the keys of cloudcore's ``modules.cloudHub``, §8.1) and ``hub:``
  (settings cloudcore does not have: data directory, store, API, metrics);
* a whole ``cloudcore.yaml``: its ``modules.cloudHub`` block is read, the other modules and
  top-level keys belong to cloudcore and are ignored; a top-level ``hub:`` may sit beside them.

Any unknown key, wrong type, out-of-range value or unreadable file raises :class:`ConfigError`
naming the file and the key.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

from cloudhub.errors import ConfigError

T = TypeVar("T")
Check = Callable[[Any], str | None]

MIB = 1024 * 1024


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number from 0 to 65535"


def _at_least(low: int) -> Check:
    def check(value: int) -> str | None:
        return None if value >= low else f"must be at least {low}"

    return check


def _one_of(*choices: str) -> Check:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _ip_address(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IP address"
    return None


def _ip_addresses(values: list[str]) -> str | None:
    for value in values:
        if _ip_address(value):
            return f"{value!r} is not an IP address"
    return None


def _non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _endpoint(value: str) -> str | None:
    if not value:
        return None
    from cloudhub.endpoints import endpoint_problem

    return endpoint_problem(value)


def _key(name: str, default: Any = MISSING, check: Check | None = None, **kw: Any) -> Any:
    """A dataclass field read from YAML key ``name`` (camelCase, as cloudcore spells it)."""
    metadata = {"key": name, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    if is_dataclass(default):
        return field(default_factory=lambda: default, metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


# --- cloudHub (cloudcore modules.cloudHub, §8.1) ---------------------------------------------


@dataclass(frozen=True)
class ListenerConfig:
    enable: bool = _key("enable", True)
    address: str = _key("address", "0.0.0.0", _ip_address)
    port: int = _key("port", 0, _port)
    # Ours, not cloudcore's: a Twisted endpoint description (cloudhub/endpoints.py) that, when
    # set, replaces address and port: tcp6:, unix:, systemd: socket activation.
    endpoint: str = _key("endpoint", "", _endpoint)


@dataclass(frozen=True)
class QuicConfig:
    enable: bool = _key("enable", False)
    address: str = _key("address", "0.0.0.0", _ip_address)
    port: int = _key("port", 10001, _port)
    max_incoming_streams: int = _key("maxIncomingStreams", 10000, _at_least(1))


@dataclass(frozen=True)
class UnixSocketConfig:
    """Accepted so a cloudcore.yaml loads; cloudcore uses it for CSI only, we do not serve it."""

    enable: bool = _key("enable", True)
    address: str = _key("address", "unix:///var/lib/kubeedge/kubeedge.sock")


@dataclass(frozen=True)
class CloudHubConfig:
    enable: bool = _key("enable", True)
    keepalive_interval: int = _key("keepaliveInterval", 30, _at_least(1))
    node_limit: int = _key("nodeLimit", 500, _at_least(1))
    tls_ca_file: str = _key("tlsCAFile", "/etc/kubeedge/ca/rootCA.crt")
    tls_ca_key_file: str = _key("tlsCAKeyFile", "/etc/kubeedge/ca/rootCA.key")
    tls_cert_file: str = _key("tlsCertFile", "/etc/kubeedge/certs/server.crt")
    tls_private_key_file: str = _key("tlsPrivateKeyFile", "/etc/kubeedge/certs/server.key")
    write_timeout: int = _key("writeTimeout", 30, _at_least(1))
    advertise_address: list[str] = _key("advertiseAddress", [], _ip_addresses)
    dns_names: list[str] = _key("dnsNames", [])
    edge_cert_signing_duration: int = _key("edgeCertSigningDuration", 365, _at_least(1))
    token_refresh_duration: int = _key("tokenRefreshDuration", 12, _at_least(1))
    websocket: ListenerConfig = _key("websocket", ListenerConfig(port=10000))
    quic: QuicConfig = _key("quic", QuicConfig())
    https: ListenerConfig = _key("https", ListenerConfig(port=10002))
    unixsocket: UnixSocketConfig = _key("unixsocket", UnixSocketConfig())
    # cloudcore v1.15 authorization block (node authorization against the API server); we
    # have no API server, so it is accepted and ignored.
    authorization: dict[str, Any] = _key("authorization", {})


# --- hub (ours) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig:
    type: str = _key("type", "sqlite", _one_of("sqlite", "memory"))
    path: str = _key("path", "")  # "" = <dataDir>/cloudhub.db
    # Start with a missing or empty store file although this dataDir has run a hub before
    # (it holds the CA the hub generated): refused unless this is true (store/guard.py).
    allow_empty: bool = _key("allowEmpty", False)
    # Seconds an acknowledged delete is remembered (a tombstone), so that a late, older
    # version of the object is refused as stale instead of re-creating it; 0: not at all.
    tombstone_retention: int = _key("tombstoneRetention", 86400, _at_least(0))


@dataclass(frozen=True)
class ApiConfig:
    enable: bool = _key("enable", True)
    address: str = _key("address", "127.0.0.1", _ip_address)
    port: int = _key("port", 10350, _port)
    endpoint: str = _key("endpoint", "", _endpoint)  # replaces address and port when set
    token: str = _key("token", "")
    max_batch_size: int = _key("maxBatchSize", 64 * MIB, _at_least(1024))


@dataclass(frozen=True)
class ConnectionLimits:
    """Connections one listener admits (cloudhub/limits.py); more are closed at accept."""

    max_connections: int = _key("maxConnections", 1024, _at_least(0))  # 0: no cap
    # Open connections from one source address (0: no cap). Edges behind one NAT share one.
    max_per_address: int = _key("maxConnectionsPerAddress", 32, _at_least(0))
    # Accept only while more than this many file descriptors stay free (RLIMIT_NOFILE).
    descriptor_reserve: int = _key("descriptorReserve", 256, _at_least(0))


@dataclass(frozen=True)
class HandshakeLimits:
    """New WebSocket connections admitted at a bounded pace (a reconnect storm, limits.py)."""

    # TLS + upgrade in progress at once (0: no cap); more wait, accepted but unread.
    max_handshakes: int = _key("maxHandshakes", 64, _at_least(0))
    handshakes_per_second: int = _key("handshakesPerSecond", 0, _at_least(0))  # 0: no rate
    # Connections waiting their turn (0: closed at accept instead), and for how long (s).
    handshake_queue: int = _key("handshakeQueue", 10000, _at_least(0))
    handshake_wait: int = _key("handshakeWait", 20, _at_least(1))


@dataclass(frozen=True)
class ApiConnectionLimits(ConnectionLimits):
    # Batch requests judged at once; others wait, their bodies unread (in temporary files).
    batches: int = _key("batches", 2, _at_least(1))


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may hold of the hub (issue 18): HTTP heads, connections, descriptors."""

    # The request line and headers must be complete this many seconds after a connection (or
    # a kept-alive request) began, however slowly bytes arrive: else 408 and close.
    header_timeout: int = _key("headerTimeout", 10, _at_least(1))
    # A whole certificate-server request (head and body), seconds; 0: no such deadline.
    request_timeout: int = _key("requestTimeout", 30, _at_least(0))
    max_request_line: int = _key("maxRequestLine", 8192, _at_least(256))  # bytes; over: 414
    max_header_bytes: int = _key("maxHeaderBytes", 16384, _at_least(1024))  # bytes; over: 431
    max_headers: int = _key("maxHeaders", 100, _at_least(8))  # header lines; over: 431
    # WebSocket upgrade: request line + headers, bytes (over: 431, 414 for the line alone), and
    # seconds from accept to the 101, TLS included (over: dropped). edgecore waits 30 s.
    websocket_request_size: int = _key("websocketRequestSize", 16384, _at_least(1024))
    handshake_timeout: int = _key("handshakeTimeout", 30, _at_least(1))
    # Bytes waiting for a peer that does not read (WebSocket, QUIC): over it, dropped at once;
    # data left unsent for cloudHub.writeTimeout seconds drops it too.
    max_output_buffer: int = _key("maxOutputBuffer", 16 * MIB, _at_least(65536))
    # What may be owed (cloudhub/budget.py; 0: no limit). Bytes are encoded message sizes;
    # the hub's memory for them is about 3-4 times as much. Per node over: 429; in all: 507.
    node_messages: int = _key("nodeMessages", 10_000, _at_least(0))
    node_bytes: int = _key("nodeBytes", 64 * MIB, _at_least(0))
    total_messages: int = _key("totalMessages", 1_000_000, _at_least(0))
    total_bytes: int = _key("totalBytes", 256 * MIB, _at_least(0))
    # Node ids owed something without having connected since the start (restored: known).
    unknown_nodes: int = _key("unknownNodes", 100_000, _at_least(0))
    websocket: HandshakeLimits = _key("websocket", HandshakeLimits())
    https: ConnectionLimits = _key("https", ConnectionLimits())
    api: ApiConnectionLimits = _key(
        "api", ApiConnectionLimits(max_per_address=0, descriptor_reserve=64)
    )


@dataclass(frozen=True)
class MetricsConfig:
    enable: bool = _key("enable", True)


@dataclass(frozen=True)
class HubSettings:
    data_dir: str = _key("dataDir", "/var/lib/cloudhub", _non_empty)
    store: StoreConfig = _key("store", StoreConfig())
    api: ApiConfig = _key("api", ApiConfig())
    metrics: MetricsConfig = _key("metrics", MetricsConfig())
    limits: LimitsConfig = _key("limits", LimitsConfig())
    max_message_size: int = _key("maxMessageSize", 8 * MIB, _at_least(1024))
    listen_backlog: int = _key("listenBacklog", 1024, _at_least(1))
    # Whether an edge may connect as a node its certificate does not name (certs/identity.py):
    # enforce (refused), warn (let in, logged and counted), off (KubeEdge's behaviour).
    node_identity: str = _key("nodeIdentity", "warn", _one_of("enforce", "warn", "off"))
    # One log event per HTTP request (API and certificate server), in the hub's log format.
    access_log: bool = _key("accessLog", False)
    # Young-generation threshold of the garbage collector while the hub runs (tuning.py);
    # 0 leaves the interpreter's settings alone.
    gc_threshold: int = _key("gcThreshold", 50_000, _at_least(0))
    # GIL switch interval while the hub runs, in microseconds (tuning.py); 0 leaves Python's.
    switch_interval_us: int = _key("switchIntervalMicroseconds", 1000, _at_least(0))


@dataclass(frozen=True)
class HubConfig:
    """Everything the hub needs to start; build it with :func:`load_config` or directly."""

    cloudhub: CloudHubConfig = field(default_factory=CloudHubConfig)
    hub: HubSettings = field(default_factory=HubSettings)
    path: str = "<defaults>"

    def data_path(self, *parts: str) -> str:
        """A path inside ``hub.dataDir``."""
        return os.path.join(self.hub.data_dir, *parts)

    @property
    def store_path(self) -> str:
        return self.hub.store.path or self.data_path("cloudhub.db")

    def as_dict(self, redact: bool = False) -> dict[str, Any]:
        """The effective settings under their YAML names (defaults filled in).

        ``redact=True`` replaces every secret (:data:`SECRET_KEYS`) that is set with
        ``"<redacted>"``: for the startup log and ``cloudhub check-config``.
        """
        settings = {
            "cloudHub": _to_yaml_dict(self.cloudhub),
            "hub": _to_yaml_dict(self.hub),
        }
        if redact:
            for dotted in SECRET_KEYS:
                *parents, leaf = dotted.split(".")
                section: Any = settings
                for name in parents:
                    section = section.get(name) if isinstance(section, dict) else None
                if isinstance(section, dict) and section.get(leaf):
                    section[leaf] = "<redacted>"
        return settings


# Keys whose values never appear in logs or in `cloudhub check-config` output.
SECRET_KEYS = ("hub.api.token",)


def _to_yaml_dict(obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        result[f.metadata["key"]] = _to_yaml_dict(value) if is_dataclass(value) else value
    return result


# --- reading ---------------------------------------------------------------------------------

_TYPE_NAMES = {bool: "a boolean", int: "an integer", str: "a string", dict: "a mapping"}


def _check_type(path: str, key: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is list:
        (item_type,) = get_args(hint)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(path, key, f"must be a list, got {type(value).__name__}")
        return [_check_type(path, f"{key}[{i}]", item_type, item) for i, item in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(path, key, f"must be a mapping, got {type(value).__name__}")
        return value
    # bool is a subclass of int: "port: true" must not pass as 1.
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(path, key, f"must be an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(path, key, f"must be true or false, got {value!r}")
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(path, key, f"must be a string, got {value!r}")
    return value


def _build(cls: type[T], data: Any, path: str, prefix: str, defaults: T | None = None) -> T:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, prefix, f"must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    by_key = {f.metadata["key"]: f for f in fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in by_key:
            known = ", ".join(sorted(by_key))
            raise ConfigError(path, f"{prefix}.{key}", f"unknown key (known keys: {known})")
    values: dict[str, Any] = {}
    for key, f in by_key.items():
        full_key = f"{prefix}.{key}"
        hint = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else None
        if is_dataclass(hint):
            if default is None:
                default = f.default_factory()  # type: ignore[misc,operator]
            values[f.name] = _build(hint, data.get(key), path, full_key, default)  # type: ignore[arg-type]
            continue
        if key not in data:
            continue
        value = _check_type(path, full_key, hint, data[key])
        check = f.metadata["check"]
        problem = check(value) if check else None
        if problem:
            raise ConfigError(path, full_key, f"{problem}, got {value!r}")
        values[f.name] = value
    if defaults is not None:
        # A nested section's defaults differ per use (websocket port 10000, https 10002).
        return type(defaults)(**{**_fields_of(defaults), **values})  # type: ignore[return-value]
    return cls(**values)


def _fields_of(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def parse_config(data: Any, path: str = "<config>") -> HubConfig:
    """A :class:`HubConfig` from an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, "", "the top level must be a mapping")
    if "modules" in data or data.get("kind") == "CloudCore":
        modules = data.get("modules") or {}
        if not isinstance(modules, Mapping):
            raise ConfigError(path, "modules", "must be a mapping")
        cloudhub_data = modules.get("cloudHub")
        cloudhub_prefix = "modules.cloudHub"
    else:
        for key in data:
            if key not in ("cloudHub", "hub"):
                raise ConfigError(path, key, "unknown key (known top-level keys: cloudHub, hub)")
        cloudhub_data = data.get("cloudHub")
        cloudhub_prefix = "cloudHub"
    config = HubConfig(
        cloudhub=_build(CloudHubConfig, cloudhub_data, path, cloudhub_prefix),
        hub=_build(HubSettings, data.get("hub"), path, "hub"),
        path=path,
    )
    _check_parts(config, path, cloudhub_prefix)
    return config


def _check_parts(config: HubConfig, path: str, prefix: str) -> None:
    """``enable: false`` either turns a part off or is refused: never silently ignored."""
    hub = config.cloudhub
    if not hub.enable:
        raise ConfigError(
            path,
            f"{prefix}.enable",
            "false would turn off the whole hub (cloudhub is the cloudHub module); "
            "remove the key or set it to true",
        )
    if not hub.websocket.enable and not hub.quic.enable:
        raise ConfigError(
            path,
            f"{prefix}.websocket.enable",
            "no edge could connect: enable websocket (what edgecore uses) or quic",
        )


def load_config(path: str) -> HubConfig:
    """Read and validate ``path``; any problem raises :class:`ConfigError`."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(path, "", f"invalid YAML{where}: {problem}") from None
    return parse_config(data, path)
