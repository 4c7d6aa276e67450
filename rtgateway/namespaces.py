"""Room namespaces: the operator's rules for a room, by the part of its name before the first ``:``.

A room ``news:eu`` is in namespace ``news``; a room without ``:`` is in the
*default* namespace. The operator declares namespaces in a TOML file
(``RTG_ROOMS_FILE``, read with :mod:`tomllib`)::

    undeclared_namespaces = "refuse"   # or "default": such rooms take [default]'s rules

    [default]                          # rooms without ":"
    join = false

    [namespaces.news]
    publish = "api"                    # clients | members | api

    [namespaces.chat]
    max_members = 1000

Each namespace has one :class:`Rules`: who may publish (any connection, the
room's members, or only the publish API), whether clients may join, the
members a room may have on one process, the slow-consumer policies allowed
and the default one, and a per-connection publish rate. A key a namespace
leaves out takes the gateway's default for it: ``RTG_PUBLISH_REQUIRES_JOIN``
(``members`` or ``clients``), ``RTG_SLOW_CONSUMER_POLICY`` and
``RTG_SLOW_CONSUMER_POLICIES``, or no limit. What the file says wins over those
settings. With no file, the default namespace is all there is, with exactly
those settings: the gateway behaves as it did before namespaces.

:meth:`Namespaces.rules_for` answers for a room (``None``: refused, its
namespace is not declared). Every :class:`Rules` has an ``index`` into
:attr:`Namespaces.names`, the bounded set of values of the metrics'
``namespace`` label: ``default`` and the declared names, never a room name.

Invalid input raises :exc:`~rtgateway.errors.ConfigError` naming the file and
the key (``/etc/rtgateway/rooms.toml: namespaces.chat.max_members: expected
an integer >= 1, got 'x'``); unknown keys are refused. Pure but for
:func:`load`, which reads the file once, at start.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from .errors import ConfigError
from .protocol import POLICIES

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "DEFAULT",
    "PUBLISHERS",
    "Namespaces",
    "Rules",
    "from_config",
    "load",
    "namespace_of",
    "parse",
]

DEFAULT: Final = "default"  # the default namespace's name, and its metrics label
PUBLISHERS: Final = ("clients", "members", "api")
UNDECLARED: Final = ("default", "refuse")
# A room name's characters, without ":" (the namespace ends at the first one).
NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,127}")
NAMESPACE_KEYS: Final = (
    "publish",
    "join",
    "max_members",
    "policy",
    "policies",
    "publish_rate_per_s",
    "publish_burst",
)
TOP_KEYS: Final = ("undeclared_namespaces", "default", "namespaces")


@dataclasses.dataclass(frozen=True, slots=True)
class Rules:
    """What applies to the rooms of one namespace."""

    name: str  # DEFAULT or a declared namespace
    index: int  # its position in Namespaces.names (the metrics label)
    publish: str  # clients | members | api
    join: bool  # whether clients may join
    max_members: int  # members of one room on one process; 0: no limit
    policy: str  # the slow-consumer policy of a join that names none
    policies: tuple[str, ...]  # those a join may name
    publish_rate_per_s: float  # client publications per connection and namespace; 0: no limit
    publish_burst: int
    # What a join's ack and /api/info say of these rules (JSON-ready).
    described: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "described", self._describe())

    def _describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "namespace": self.name,
            "publish": self.publish,
            "join": self.join,
            "default_policy": self.policy,
            "policies": list(self.policies),
            "max_members": self.max_members or None,
        }
        if self.max_members:
            # Each gateway process (each worker) counts its own members.
            described["max_members_per"] = "process"
        described["publish_rate_per_s"] = self.publish_rate_per_s or None
        if self.publish_rate_per_s:
            described["publish_burst"] = self.publish_burst
        return described


@dataclasses.dataclass(frozen=True, slots=True)
class Namespaces:
    """The default namespace, the declared ones, and what happens to rooms elsewhere."""

    default: Rules
    declared: Mapping[str, Rules]
    refuse_undeclared: bool = False
    source: str = ""  # the file they were read from; empty: the settings alone

    @property
    def names(self) -> tuple[str, ...]:
        """The ``namespace`` label's values, by :attr:`Rules.index`."""
        return (DEFAULT, *self.declared)

    @property
    def all(self) -> tuple[Rules, ...]:
        return (self.default, *self.declared.values())

    def rules_for(self, room: str) -> Rules | None:
        """The rules of ``room``; ``None`` when its namespace is undeclared and refused."""
        name, colon, _ = room.partition(":")
        if not colon:
            return self.default
        rules = self.declared.get(name)
        if rules is not None:
            return rules
        return None if self.refuse_undeclared else self.default

    def describe(self) -> dict[str, Any]:
        """What ``/api/info`` says of the rules."""
        return {
            "namespaces": [dict(rules.described) for rules in self.all],
            "undeclared_namespaces": "refuse" if self.refuse_undeclared else "default",
        }


def namespace_of(room: str) -> str | None:
    """The namespace a room's name names (``None``: none, the default namespace)."""
    name, colon, _ = room.partition(":")
    return name if colon else None


def from_config(config: Config) -> Namespaces:
    """The rules the configuration gives: ``RTG_ROOMS_FILE``'s, or the settings' alone."""
    defaults = _defaults(config)
    if not config.rooms_file:
        return Namespaces(_rules(DEFAULT, 0, {}, defaults, DEFAULT), {})
    return load(config.rooms_file, defaults)


def load(path: str, defaults: Mapping[str, Any] | None = None) -> Namespaces:
    """Read and validate the rules file at ``path``; raise :exc:`ConfigError`."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(path, "a readable file", path, message=f"{path}: {reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "TOML", path, message=f"{path}: not valid TOML: {exc}") from None
    return parse(document, path, defaults)


def parse(
    document: Mapping[str, Any], source: str, defaults: Mapping[str, Any] | None = None
) -> Namespaces:
    """Validate a parsed rules file; ``defaults`` are the settings' (see :func:`from_config`)."""
    defaults = defaults or _builtin_defaults()
    _refuse_unknown(document, TOP_KEYS, "", source)
    undeclared = document.get("undeclared_namespaces", "default")
    if undeclared not in UNDECLARED:
        raise _invalid(source, "undeclared_namespaces", "default or refuse", undeclared)
    default_table = _table(document.get("default", {}), "default", source)
    default = _rules(DEFAULT, 0, default_table, defaults, source, key="default")
    tables = _table(document.get("namespaces", {}), "namespaces", source)
    declared: dict[str, Rules] = {}
    for index, (name, table) in enumerate(tables.items(), start=1):
        key = f"namespaces.{_quoted(name)}"
        if name == DEFAULT:
            raise ConfigError(
                f"{source}: {key}",
                "another name",
                name,
                message=f"{source}: {key}: 'default' is the default namespace; "
                "give its rules in [default]",
            )
        if not NAME_RE.fullmatch(name):
            raise _invalid(
                source, key, "a name of 1-127 characters of A-Z a-z 0-9 _ . -", name, raw=True
            )
        declared[name] = _rules(name, index, _table(table, key, source), defaults, source, key=key)
    return Namespaces(default, declared, undeclared == "refuse", source)


# Validation.


def _defaults(config: Config) -> dict[str, Any]:
    return {
        "publish": "members" if config.publish_requires_join else "clients",
        "policy": config.slow_consumer_policy,
        "policies": tuple(config.slow_consumer_policies),
    }


def _builtin_defaults() -> dict[str, Any]:
    return {"publish": "members", "policy": POLICIES[0], "policies": POLICIES}


def _rules(
    name: str,
    index: int,
    table: Mapping[str, Any],
    defaults: Mapping[str, Any],
    source: str,
    *,
    key: str = "",
) -> Rules:
    _refuse_unknown(table, NAMESPACE_KEYS, key, source)

    def where(field: str) -> str:
        return f"{key}.{field}" if key else field

    join = table.get("join", True)
    if not isinstance(join, bool):
        raise _invalid(source, where("join"), "true or false", join)
    # Without joins nobody is a member: "members" would let no client publish.
    publish = table.get("publish", defaults["publish"] if join else "api")
    if publish not in PUBLISHERS:
        raise _invalid(source, where("publish"), "clients, members or api", publish)
    if publish == "members" and not join:
        raise _invalid(source, where("publish"), "clients or api when join = false", publish)
    max_members = table.get("max_members", 0)
    if "max_members" in table and (
        not isinstance(max_members, int) or isinstance(max_members, bool) or max_members < 1
    ):
        raise _invalid(source, where("max_members"), "an integer >= 1", max_members)
    policies = table.get("policies", defaults["policies"])
    if (
        not isinstance(policies, (list, tuple))
        or not policies
        or any(p not in POLICIES for p in policies)
        or len(set(policies)) != len(policies)
    ):
        raise _invalid(
            source, where("policies"), "a list of distinct " + ", ".join(POLICIES), policies
        )
    policies = tuple(policies)
    policy = table.get("policy", defaults["policy"])
    if policy not in policies:
        accepted = "one of " + ", ".join(policies)
        if "policy" not in table:
            accepted += f" (the default {policy!r} is not among the policies: set policy)"
        raise _invalid(source, where("policy"), accepted, policy)
    rate = table.get("publish_rate_per_s", 0.0)
    if "publish_rate_per_s" in table and (
        not isinstance(rate, (int, float))
        or isinstance(rate, bool)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise _invalid(source, where("publish_rate_per_s"), "a number > 0", rate)
    burst = table.get("publish_burst", max(1, math.ceil(rate)))
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise _invalid(source, where("publish_burst"), "an integer >= 1", burst)
    if "publish_burst" in table and "publish_rate_per_s" not in table:
        raise _invalid(source, where("publish_burst"), "publish_rate_per_s set beside it", burst)
    return Rules(
        name=name,
        index=index,
        publish=publish,
        join=join,
        max_members=max_members,
        policy=policy,
        policies=policies,
        publish_rate_per_s=float(rate),
        publish_burst=burst,
    )


def _table(value: Any, key: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(source, key, "a table", value)
    return value


def _refuse_unknown(
    table: Mapping[str, Any], known: tuple[str, ...], key: str, source: str
) -> None:
    for name in table:
        if name in known:
            continue
        where = f"{key}.{_quoted(name)}" if key else _quoted(name)
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else "known: " + ", ".join(known)
        raise ConfigError(
            f"{source}: {where}",
            "a known key",
            name,
            message=f"{source}: {where}: no such key; {hint}",
        )


def _quoted(name: str) -> str:
    """A key as TOML would write it in a dotted key."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


def _invalid(source: str, key: str, accepted: str, value: Any, *, raw: bool = False) -> ConfigError:
    """``SOURCE: KEY: expected ACCEPTED, got VALUE``, the value as the file wrote it."""
    shown = repr(value) if raw or isinstance(value, str) else _toml(value)
    message = f"{source}: {key}: expected {accepted}, got {shown}"
    return ConfigError(f"{source}: {key}", accepted, str(value), message=message)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) if not isinstance(v, str) else repr(v) for v in value) + "]"
    return str(value)
