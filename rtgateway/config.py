"""Gateway settings: one frozen dataclass, read from ``RTG_*`` and flags.

Each setting is declared once, as a field of :class:`Config`: its default, its
converter, its help and its metavar (:func:`setting`). :data:`SETTINGS` is
derived from the fields; the environment variable is ``RTG_`` + the upper-cased
name and the flag is ``--`` + the name with dashes. A flag beats the
environment, the environment beats the default.

Invalid input raises :exc:`~rtgateway.errors.ConfigError`, whose message
names the setting as the operator gave it (``RTG_X`` or ``--x``) and what it
accepts; an ``RTG_*`` variable that is no setting is refused too, with the
nearest name ("did you mean"), rather than ignored: ``RTG_MAX_CONECTIONS=5``
must not start a gateway without a limit. ``__main__`` turns either into exit
status 2.

This module imports only the pure modules :mod:`~rtgateway.errors` and
:mod:`~rtgateway.protocol` (for the slow-consumer policy names, which are
part of the wire protocol).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from .errors import ConfigError
from .protocol import POLICIES

__all__ = [
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "env_name",
    "flag_name",
    "load",
    "parse_addr",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")
T = TypeVar("T")


# Converters: str -> value, raising ValueError with what is accepted.


def parse_addr(text: str) -> tuple[str, int]:
    """Parse ``:PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``; an empty host means all."""
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\[\]:]*)):(\d{1,5})", text)
    if match is None:
        raise ValueError(":PORT, HOST:PORT or [IPV6]:PORT")
    host = match.group(1) if match.group(1) is not None else match.group(2)
    if match.group(1) is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("[IPV6]:PORT with a valid IPv6 address") from None
    port = int(match.group(3))
    if port > 65535:
        raise ValueError("a port between 0 and 65535")
    return host, port


def _addr(text: str) -> str:
    parse_addr(text)
    return text


def _optional_addr(text: str) -> str:
    return _addr(text) if text else ""


def _broker_url(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    accepted = "redis://HOST:PORT[/DB], redis+cluster://HOST:PORT[,HOST:PORT...] or empty"
    if text.startswith("redis+cluster://"):
        node = r"([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}"
        if not re.fullmatch(rf"{node}(,{node})*/?", text[len("redis+cluster://") :]):
            raise ValueError(accepted)
        return text
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(accepted) from None
    if parts.scheme != "redis" or not parts.hostname or not re.fullmatch(r"/?\d*", parts.path):
        raise ValueError(accepted)
    return text


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"an integer >= {minimum}") from None
        if value < minimum:
            raise ValueError(f"an integer >= {minimum}")
        return value

    return convert


def _seconds(minimum: float = 0.0, *, allow_zero: bool = True) -> Callable[[str], float]:
    accepted = "a number of seconds >= 0" if allow_zero else f"a number of seconds > {minimum:g}"

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(accepted) from None
        if not math.isfinite(value) or value < minimum or (not allow_zero and value <= minimum):
            raise ValueError(accepted)
        return value

    return convert


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("a number > 0")
    return value


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(" | ".join(choices))
        return value

    return convert


def _choices_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def convert(text: str) -> tuple[str, ...]:
        values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
        if not values or any(v not in choices for v in values):
            raise ValueError("a comma-separated list of " + ", ".join(choices))
        return values

    return convert


def _origins(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    for value in values:
        if not re.fullmatch(r"https?://[^/\s]+", value):
            raise ValueError("a comma-separated list of origins like https://example.com")
    return values


def _path(text: str) -> str:
    return text.strip()


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in (*LOG_FORMATS, "auto"):
        raise ValueError("json | console | auto")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting as the command line and the environment see it."""

    name: str
    convert: Callable[[str], Any]
    default: str  # the default as it would be written in RTG_*
    help: str
    metavar: str = ""


def setting(default: T, convert: Callable[[str], T], help: str, metavar: str = "") -> T:
    """A field of :class:`Config`: its default, and how ``RTG_*`` and flags give it."""
    meta = {"convert": convert, "help": help, "metavar": metavar}
    field: T = dataclasses.field(default=default, metadata=meta)
    return field


def env_name(name: str) -> str:
    return "RTG_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _written(value: Any) -> str:
    """A default as an operator would write it in ``RTG_*``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class Config:
    """Effective settings. Field names carry their unit (``_s``, ``_bytes``, ``_ms``)."""

    addr: str = setting(":8083", _addr, "listen address: :PORT, HOST:PORT or [IPV6]:PORT", "ADDR")
    api_addr: str = setting(
        "127.0.0.1:8084", _optional_addr, "publish API listen address; empty turns it off", "ADDR"
    )
    api_token: str = setting("", str, "bearer token the API requires; empty = none", "TOKEN")
    log_level: str = setting("info", _choice(LOG_LEVELS), "debug | info | warning | error", "LEVEL")
    log_format: str = setting(
        "auto", _log_format, "json | console | auto (console on a terminal, else json)", "FORMAT"
    )
    max_connections: int = setting(
        0,
        _int_at_least(0),
        "WebSocket connections before handshakes get 503; 0 derives it from the open-files limit",
        "N",
    )
    max_connections_per_address: int = setting(
        4096,
        _int_at_least(0),
        "WebSocket connections from one source address (IPv6: its /64) before its handshakes "
        "get 503; 0 = no limit",
        "N",
    )
    max_pending_handshakes: int = setting(
        0,
        _int_at_least(0),
        "sockets that have not finished a handshake; past it a new one evicts the oldest; "
        "0 derives it: the connection limit, at most 4096",
        "N",
    )
    max_pending_handshakes_per_address: int = setting(
        64,
        _int_at_least(0),
        "the same, from one source address (IPv6: its /64); 0 = no limit",
        "N",
    )
    first_byte_timeout_s: float = setting(
        3.0,
        _seconds(0, allow_zero=False),
        "close a socket that sends nothing for this long after it connects, seconds",
    )
    max_message_bytes: int = setting(65536, _int_at_least(128), "largest client message, bytes")
    ping_interval_s: float = setting(20.0, _seconds(), "WebSocket ping interval, seconds (0 = off)")
    ping_timeout_s: float = setting(
        20.0, _seconds(), "close a peer that misses a pong for this long, s"
    )
    open_timeout_s: float = setting(
        10.0, _seconds(0, allow_zero=False), "handshake deadline, seconds"
    )
    close_timeout_s: float = setting(
        5.0,
        _seconds(0, allow_zero=False),
        "wait this long for a closing handshake before aborting, seconds",
    )
    drain_timeout_s: float = setting(
        30.0,
        _seconds(0, allow_zero=False),
        "on SIGTERM, wait this long for connections to close before aborting, seconds",
    )
    drain_window_s: float = setting(
        5.0,
        _seconds(),
        "spread the 1012 closes over this window (must be < drain timeout), seconds",
    )
    reconnect_delay_ms: int = setting(
        1000,
        _int_at_least(0),
        "reconnect delay advertised with 1012 after the drain window; jittered, ms",
    )
    backlog: int = setting(4096, _int_at_least(1), "listen backlog, connections", "N")
    allowed_origins: tuple[str, ...] = setting(
        (),
        _origins,
        "comma-separated Origin values allowed on /ws; empty allows any",
        "ORIGINS",
    )
    publish_requires_join: bool = setting(
        True,
        _bool,
        "only members may publish to a room (a namespace of RTG_ROOMS_FILE may say otherwise)",
        "BOOL",
    )
    rooms_file: str = setting(
        "",
        _path,
        "TOML file of room namespaces: who may join and publish where, member caps, "
        "policies, publish rates; empty = every room under the settings here",
        "PATH",
    )
    socket_sndbuf_bytes: int = setting(
        0,
        _int_at_least(0),
        "kernel send buffer per connection (SO_SNDBUF), bytes; 0 lets the kernel size it",
    )
    max_rooms_per_connection: int = setting(128, _int_at_least(1), "rooms one connection may join")
    max_rooms: int = setting(
        100000,
        _int_at_least(1),
        "rooms in this process; a join that would open one more gets room_limit",
    )
    outbox_max_messages: int = setting(1024, _int_at_least(1), "frames queued per connection")
    outbox_max_bytes: int = setting(1048576, _int_at_least(1024), "bytes queued per connection")
    slow_consumer_policy: str = setting(
        "disconnect",
        _choice(POLICIES),
        "when an outbox is full: disconnect (close 4008) | drop_oldest | drop_newest",
        "POLICY",
    )
    slow_consumer_policies: tuple[str, ...] = setting(
        POLICIES,
        _choices_list(POLICIES),
        "policies a client may choose per room at join time",
        "LIST",
    )
    rate_limit_msgs_per_s: float = setting(
        100.0, _positive_float, "inbound messages per second, per connection"
    )
    rate_limit_burst: int = setting(200, _int_at_least(1), "inbound message burst, messages")
    rate_limit_bytes_per_s: int = setting(
        1048576, _int_at_least(0), "inbound bytes per second, per connection (0 = off)"
    )
    rate_limit_max_rejected: int = setting(
        50,
        _int_at_least(1),
        "rate-limited messages within 10 s before the connection is closed 1008",
    )
    stats_interval_s: float = setting(
        60.0, _seconds(), "period of the stats log line, seconds (0 = off)"
    )
    demo: bool = setting(True, _bool, "serve the demo page at /", "BOOL")
    workers: int = setting(
        1,
        _int_at_least(1),
        "gateway processes sharing the port (SO_REUSEPORT); > 1 needs RTG_BROKER_URL",
        "N",
    )
    broker_url: str = setting(
        "",
        _broker_url,
        "Redis that carries publications between workers and hosts: redis://HOST:PORT[/DB], "
        "or a Redis Cluster (sharded pub/sub): redis+cluster://HOST:PORT[,HOST:PORT...]; "
        "empty = this process only",
        "URL",
    )
    broker_timeout_s: float = setting(
        2.0,
        _seconds(0, allow_zero=False),
        "how long Redis may take to take a publication or confirm a join, seconds",
    )
    broker_room_ttl_s: float = setting(
        600.0,
        _seconds(1),
        "a room's seq counter is kept in Redis this long after its last member anywhere, s",
    )

    def __post_init__(self) -> None:
        if self.workers > 1 and not self.broker_url:
            raise ConfigError(
                env_name("broker_url"),
                f"a redis://HOST:PORT[/DB] URL when RTG_WORKERS is {self.workers} "
                "(workers share rooms through it)",
                self.broker_url,
            )
        if self.drain_window_s >= self.drain_timeout_s:
            raise ConfigError(
                env_name("drain_window_s"),
                f"a window shorter than RTG_DRAIN_TIMEOUT_S ({self.drain_timeout_s:g})",
                f"{self.drain_window_s:g}",
            )
        if self.outbox_max_bytes < self.max_message_bytes:
            raise ConfigError(
                env_name("outbox_max_bytes"),
                f"at least RTG_MAX_MESSAGE_BYTES ({self.max_message_bytes}) so that one "
                "message fits",
                str(self.outbox_max_bytes),
            )
        if self.slow_consumer_policy not in self.slow_consumer_policies:
            raise ConfigError(
                env_name("slow_consumer_policy"),
                "one of RTG_SLOW_CONSUMER_POLICIES (" + ",".join(self.slow_consumer_policies) + ")",
                self.slow_consumer_policy,
            )

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_addr(self.addr)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def as_log_fields(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        if fields["api_token"]:
            fields["api_token"] = "<set>"  # never log a secret
        return fields


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(
        field.name,
        field.metadata["convert"],
        _written(field.default),
        field.metadata["help"],
        field.metadata["metavar"],
    )
    for field in dataclasses.fields(Config)
)
_BY_NAME = {s.name: s for s in SETTINGS}
_BY_ENV = {env_name(s.name): s for s in SETTINGS}


def convert(name: str, raw: str, given_as: str | None = None) -> Any:
    """Convert one raw value, raising :exc:`ConfigError` (named ``given_as``) on bad input."""
    try:
        return _BY_NAME[name].convert(raw)
    except ValueError as exc:
        raise ConfigError(given_as or env_name(name), str(exc), raw) from None


def unknown(variable: str) -> ConfigError:
    """The error for an ``RTG_*`` variable that is no setting, with the nearest one."""
    # Compared without the shared prefix, which would make every name look near.
    near = difflib.get_close_matches(variable[4:].lower(), _BY_NAME, n=1, cutoff=0.75)
    hint = f"did you mean {env_name(near[0])}?" if near else "rtgateway --help lists them"
    message = f"{variable}: no such setting; {hint}"
    return ConfigError(variable, "a setting", variable, message=message)


def load(
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
    *,
    internal: Collection[str] = (),
) -> Config:
    """Build a :class:`Config` from defaults, then ``environ``, then ``flags``.

    Every ``RTG_*`` variable of ``environ`` must be a setting, or one of
    ``internal`` (those the supervisor gives its workers).
    """
    environ = os.environ if environ is None else environ
    flags = flags or {}
    for variable in sorted(environ):
        if variable.startswith("RTG_") and variable not in _BY_ENV and variable not in internal:
            raise unknown(variable)
    values: dict[str, Any] = {}
    for item in SETTINGS:
        raw = flags.get(item.name)
        if raw is not None:
            values[item.name] = convert(item.name, raw, flag_name(item.name))
            continue
        raw = environ.get(env_name(item.name))
        if raw is not None:
            values[item.name] = convert(item.name, raw)
    return Config(**values)
