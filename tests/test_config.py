"""Configuration: environment, flags, defaults and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtgateway.config import SETTINGS, ConfigError, env_name, load, parse_addr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8083", ("", 8083)),
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("[::]:8083", ("::", 8083)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_parse_addr_accepts_the_documented_forms(text: str, expected: tuple[str, int]) -> None:
    """parse_addr reads :PORT, HOST:PORT and [IPV6]:PORT."""
    assert parse_addr(text) == expected


@pytest.mark.parametrize("text", ["8083", "host", ":99999", "[nothex]:1", "::1:80", ""])
def test_parse_addr_refuses_other_forms(text: str) -> None:
    """parse_addr refuses a bare port, a bare host, a bad port and unbracketed IPv6."""
    with pytest.raises(ValueError):
        parse_addr(text)


def test_defaults_match_the_settings_table() -> None:
    """The defaults are the ones the README's settings table gives."""
    config = load({})
    assert config.addr == ":8083"
    assert config.max_message_bytes == 65536
    assert config.drain_timeout_s == 30
    assert config.backlog == 4096
    assert config.outbox_max_bytes == 1 << 20
    assert config.slow_consumer_policy == "disconnect"
    assert config.max_rooms_per_connection == 128


def test_environment_sets_values_and_flags_beat_it() -> None:
    """RTG_* variables set values, and a flag beats its variable."""
    config = load(
        {"RTG_ADDR": "127.0.0.1:9000", "RTG_MAX_CONNECTIONS": "10"}, {"max_connections": "20"}
    )
    assert config.addr == "127.0.0.1:9000"
    assert config.max_connections == 20


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"RTG_ADDR": "nope"}, "RTG_ADDR: expected :PORT, HOST:PORT or [IPV6]:PORT"),
        ({"RTG_MAX_CONNECTIONS": "-1"}, "RTG_MAX_CONNECTIONS: expected an integer >= 0"),
        ({"RTG_PING_INTERVAL_S": "soon"}, "RTG_PING_INTERVAL_S: expected a number of seconds"),
        ({"RTG_LOG_LEVEL": "loud"}, "RTG_LOG_LEVEL: expected debug | info | warning | error"),
        ({"RTG_SLOW_CONSUMER_POLICY": "ignore"}, "RTG_SLOW_CONSUMER_POLICY: expected disconnect"),
        ({"RTG_ALLOWED_ORIGINS": "example.com"}, "RTG_ALLOWED_ORIGINS: expected a comma-separated"),
        ({"RTG_DEMO": "maybe"}, "RTG_DEMO: expected true or false"),
        ({"RTG_DRAIN_WINDOW_S": "40"}, "RTG_DRAIN_WINDOW_S: expected a window shorter"),
    ],
)
def test_invalid_values_name_the_setting_and_what_it_accepts(
    env: dict[str, str], fragment: str
) -> None:
    """An invalid value's error names the setting and what it accepts."""
    with pytest.raises(ConfigError) as info:
        load(env)
    assert str(info.value).startswith(fragment)


def test_readme_documents_every_setting() -> None:
    """README.md documents every RTG_* setting."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [env_name(s.name) for s in SETTINGS if f"`{env_name(s.name)}`" not in readme]
    assert not missing, f"README.md lacks {missing}"


def test_an_unknown_rtg_variable_with_no_near_name_points_at_help() -> None:
    """Without a near name the error says where the names are."""
    with pytest.raises(ConfigError) as info:
        load({"RTG_FOO": "1"})
    assert str(info.value) == "RTG_FOO: no such setting; rtgateway --help lists them"


def test_the_supervisors_variables_for_its_workers_are_accepted() -> None:
    """RTG_WORKER_* are what a supervisor tells a worker, not settings to refuse."""
    from rtgateway.worker import ENVIRONMENT

    config = load(dict.fromkeys(ENVIRONMENT, "1"), internal=ENVIRONMENT)
    assert config == load({})
    with pytest.raises(ConfigError):
        load(dict.fromkeys(ENVIRONMENT, "1"))


def test_every_default_is_declared_once_and_written_as_rtg_would_take_it() -> None:
    """The settings table is derived from the dataclass: each default converts back to itself."""
    from rtgateway.config import Config, convert

    defaults = Config()
    for setting in SETTINGS:
        assert convert(setting.name, setting.default) == getattr(defaults, setting.name)
