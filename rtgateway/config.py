"""Gateway settings: one frozen dataclass, read from ``RTG_*`` and flags.

Every setting has one row in :data:`SETTINGS` (name, type, default, unit,
help); the environment variable is ``RTG_`` + the upper-cased name and the
flag is ``--`` + the name with dashes. A flag beats the environment, the
environment beats the default. Invalid values raise :exc:`ConfigError` whose
message names the setting and what it accepts; ``__main__`` turns that into
exit status 2.

This module imports nothing else from the package.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "POLICIES",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "env_name",
    "flag_name",
    "load",
    "parse_addr",
]

POLICIES = ("disconnect", "drop_oldest", "drop_newest")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")


class ConfigError(ValueError):
    """An invalid setting. ``str()`` is the one line shown to the operator."""

    def __init__(self, env: str, accepted: str, value: str) -> None:
        self.env = env
        self.accepted = accepted
        self.value = value
        super().__init__(f"{env}: expected {accepted}, got {value!r}")


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
    accepted = "redis://HOST:PORT[/DB] or empty"
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


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in (*LOG_FORMATS, "auto"):
        raise ValueError("json | console | auto")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    convert: Callable[[str], Any]
    default: str
    help: str
    metavar: str = ""


def env_name(name: str) -> str:
    return "RTG_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("addr", _addr, ":8083", "listen address: :PORT, HOST:PORT or [IPV6]:PORT", "ADDR"),
    Setting(
        "api_addr",
        _optional_addr,
        "127.0.0.1:8084",
        "publish API listen address; empty turns it off",
        "ADDR",
    ),
    Setting("api_token", str, "", "bearer token the API requires; empty = none", "TOKEN"),
    Setting("log_level", _choice(LOG_LEVELS), "info", "debug | info | warning | error", "LEVEL"),
    Setting(
        "log_format",
        _log_format,
        "auto",
        "json | console | auto (console on a terminal, else json)",
        "FORMAT",
    ),
    Setting(
        "max_connections",
        _int_at_least(0),
        "0",
        "WebSocket connections before handshakes get 503; 0 derives it from the open-files limit",
        "N",
    ),
    Setting(
        "max_connections_per_address",
        _int_at_least(0),
        "4096",
        "WebSocket connections from one source address (IPv6: its /64) before its handshakes "
        "get 503; 0 = no limit",
        "N",
    ),
    Setting(
        "max_pending_handshakes",
        _int_at_least(0),
        "0",
        "sockets that have not finished a handshake; past it a new one evicts the oldest; "
        "0 derives it: the connection limit, at most 4096",
        "N",
    ),
    Setting(
        "max_pending_handshakes_per_address",
        _int_at_least(0),
        "64",
        "the same, from one source address (IPv6: its /64); 0 = no limit",
        "N",
    ),
    Setting(
        "first_byte_timeout_s",
        _seconds(0, allow_zero=False),
        "3",
        "close a socket that sends nothing for this long after it connects, seconds",
    ),
    Setting("max_message_bytes", _int_at_least(128), "65536", "largest client message, bytes"),
    Setting("ping_interval_s", _seconds(), "20", "WebSocket ping interval, seconds (0 = off)"),
    Setting("ping_timeout_s", _seconds(), "20", "close a peer that misses a pong for this long, s"),
    Setting("open_timeout_s", _seconds(0, allow_zero=False), "10", "handshake deadline, seconds"),
    Setting(
        "close_timeout_s",
        _seconds(0, allow_zero=False),
        "5",
        "wait this long for a closing handshake before aborting, seconds",
    ),
    Setting(
        "drain_timeout_s",
        _seconds(0, allow_zero=False),
        "30",
        "on SIGTERM, wait this long for connections to close before aborting, seconds",
    ),
    Setting(
        "drain_window_s",
        _seconds(),
        "5",
        "spread the 1012 closes over this window (must be < drain timeout), seconds",
    ),
    Setting(
        "reconnect_delay_ms",
        _int_at_least(0),
        "1000",
        "reconnect delay advertised with 1012 after the drain window; jittered, ms",
    ),
    Setting("backlog", _int_at_least(1), "4096", "listen backlog, connections", "N"),
    Setting(
        "allowed_origins",
        _origins,
        "",
        "comma-separated Origin values allowed on /ws; empty allows any",
        "ORIGINS",
    ),
    Setting(
        "publish_requires_join",
        _bool,
        "true",
        "only members may publish to a room",
        "BOOL",
    ),
    Setting(
        "socket_sndbuf_bytes",
        _int_at_least(0),
        "0",
        "kernel send buffer per connection (SO_SNDBUF), bytes; 0 lets the kernel size it",
    ),
    Setting("max_rooms_per_connection", _int_at_least(1), "128", "rooms one connection may join"),
    Setting(
        "max_rooms",
        _int_at_least(1),
        "100000",
        "rooms in this process; a join that would open one more gets room_limit",
    ),
    Setting("outbox_max_messages", _int_at_least(1), "1024", "frames queued per connection"),
    Setting("outbox_max_bytes", _int_at_least(1024), "1048576", "bytes queued per connection"),
    Setting(
        "slow_consumer_policy",
        _choice(POLICIES),
        "disconnect",
        "when an outbox is full: disconnect (close 4008) | drop_oldest | drop_newest",
        "POLICY",
    ),
    Setting(
        "slow_consumer_policies",
        _choices_list(POLICIES),
        ",".join(POLICIES),
        "policies a client may choose per room at join time",
        "LIST",
    ),
    Setting(
        "rate_limit_msgs_per_s",
        _positive_float,
        "100",
        "inbound messages per second, per connection",
    ),
    Setting("rate_limit_burst", _int_at_least(1), "200", "inbound message burst, messages"),
    Setting(
        "rate_limit_bytes_per_s",
        _int_at_least(0),
        "1048576",
        "inbound bytes per second, per connection (0 = off)",
    ),
    Setting(
        "rate_limit_max_rejected",
        _int_at_least(1),
        "50",
        "rate-limited messages within 10 s before the connection is closed 1008",
    ),
    Setting(
        "stats_interval_s", _seconds(), "60", "period of the stats log line, seconds (0 = off)"
    ),
    Setting("demo", _bool, "true", "serve the demo page at /", "BOOL"),
    Setting(
        "workers",
        _int_at_least(1),
        "1",
        "gateway processes sharing the port (SO_REUSEPORT); > 1 needs RTG_BROKER_URL",
        "N",
    ),
    Setting(
        "broker_url",
        _broker_url,
        "",
        "Redis that carries publications between workers and hosts: redis://HOST:PORT[/DB]; "
        "empty = this process only",
        "URL",
    ),
    Setting(
        "broker_timeout_s",
        _seconds(0, allow_zero=False),
        "2",
        "how long Redis may take to take a publication or confirm a join, seconds",
    ),
    Setting(
        "broker_room_ttl_s",
        _seconds(1),
        "600",
        "a room's seq counter is kept in Redis this long after its last member anywhere, s",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    """Effective settings. Field names carry their unit (``_s``, ``_bytes``, ``_ms``)."""

    addr: str = ":8083"
    api_addr: str = "127.0.0.1:8084"
    api_token: str = ""
    log_level: str = "info"
    log_format: str = "auto"
    max_connections: int = 0
    max_connections_per_address: int = 4096
    max_pending_handshakes: int = 0
    max_pending_handshakes_per_address: int = 64
    first_byte_timeout_s: float = 3.0
    max_message_bytes: int = 65536
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    open_timeout_s: float = 10.0
    close_timeout_s: float = 5.0
    drain_timeout_s: float = 30.0
    drain_window_s: float = 5.0
    reconnect_delay_ms: int = 1000
    backlog: int = 4096
    allowed_origins: tuple[str, ...] = ()
    publish_requires_join: bool = True
    socket_sndbuf_bytes: int = 0
    max_rooms_per_connection: int = 128
    max_rooms: int = 100000
    outbox_max_messages: int = 1024
    outbox_max_bytes: int = 1048576
    slow_consumer_policy: str = "disconnect"
    slow_consumer_policies: tuple[str, ...] = POLICIES
    rate_limit_msgs_per_s: float = 100.0
    rate_limit_burst: int = 200
    rate_limit_bytes_per_s: int = 1048576
    rate_limit_max_rejected: int = 50
    stats_interval_s: float = 60.0
    demo: bool = True
    workers: int = 1
    broker_url: str = ""
    broker_timeout_s: float = 2.0
    broker_room_ttl_s: float = 600.0

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


def convert(name: str, raw: str) -> Any:
    """Convert one raw value, raising :exc:`ConfigError` on bad input."""
    setting = _BY_NAME[name]
    try:
        return setting.convert(raw)
    except ValueError as exc:
        raise ConfigError(env_name(name), str(exc), raw) from None


def load(
    environ: Mapping[str, str] | None = None, flags: Mapping[str, str | None] | None = None
) -> Config:
    """Build a :class:`Config` from defaults, then ``environ``, then ``flags``."""
    environ = os.environ if environ is None else environ
    flags = flags or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = flags.get(setting.name)
        if raw is None:
            raw = environ.get(env_name(setting.name))
        if raw is None:
            continue
        values[setting.name] = convert(setting.name, raw)
    return Config(**values)
