"""The rules file (rtgateway/namespaces.py): parsed, validated, refused with one clear line.

Unit tests of the pure module, and the command line's exit status 2 with one
line naming the file and the key, for the supervisor as for a single gateway.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import ROOT

from rtgateway import namespaces
from rtgateway.config import Config
from rtgateway.errors import ConfigError
from rtgateway.namespaces import Namespaces, parse

EXAMPLE = ROOT / "deploy" / "rooms.toml"


def rules_of(text: str, tmp_path: Path, **settings: Any) -> Namespaces:
    path = tmp_path / "rooms.toml"
    path.write_text(text)
    return namespaces.from_config(Config(rooms_file=str(path), **settings))


def refusal(text: str, tmp_path: Path) -> str:
    path = tmp_path / "rooms.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        namespaces.load(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    return message.removeprefix(f"{path}: ")


def test_a_room_is_in_the_namespace_before_its_first_colon(tmp_path: Path) -> None:
    """news:eu and news:eu:paris are in news; news, newsroom:1 and :x in the default namespace."""
    rules = rules_of('[namespaces.news]\npublish = "api"\n', tmp_path)
    assert rules.rules_for("news:eu").name == "news"  # type: ignore[union-attr]
    assert rules.rules_for("news:eu:paris").name == "news"  # type: ignore[union-attr]
    assert rules.rules_for("news").name == "default"  # type: ignore[union-attr]
    assert rules.rules_for("newsroom:1").name == "default"  # type: ignore[union-attr]
    assert rules.rules_for(":x").name == "default"  # type: ignore[union-attr]
    assert rules.names == ("default", "news")
    assert [r.index for r in rules.all] == [0, 1]


def test_undeclared_namespaces_take_the_default_rules_or_are_refused(tmp_path: Path) -> None:
    """A room of an undeclared namespace gets the default rules, or none under refuse."""
    allowed = rules_of("[namespaces.chat]\n", tmp_path)
    assert allowed.rules_for("other:1") is allowed.default
    refused = rules_of('undeclared_namespaces = "refuse"\n[namespaces.chat]\n', tmp_path)
    assert refused.rules_for("other:1") is None
    assert refused.rules_for("lobby") is refused.default  # no colon: the default namespace
    assert refused.rules_for("chat:1") is refused.declared["chat"]


def test_without_a_file_the_settings_are_the_default_namespace() -> None:
    """Without a file, RTG_PUBLISH_REQUIRES_JOIN and the policy settings are the default rules."""
    rules = namespaces.from_config(Config())
    assert rules.names == ("default",)
    default = rules.default
    assert (default.publish, default.join, default.max_members) == ("members", True, 0)
    assert (default.policy, default.policies) == (
        "disconnect",
        ("disconnect", "drop_oldest", "drop_newest"),
    )
    assert default.publish_rate_per_s == 0
    loose = namespaces.from_config(
        Config(
            publish_requires_join=False,
            slow_consumer_policy="drop_oldest",
            slow_consumer_policies=("drop_oldest", "drop_newest"),
        )
    )
    assert loose.default.publish == "clients"
    assert (loose.default.policy, loose.default.policies) == (
        "drop_oldest",
        ("drop_oldest", "drop_newest"),
    )


def test_keys_a_namespace_leaves_out_come_from_the_settings_and_the_file_wins(
    tmp_path: Path,
) -> None:
    """A key the file gives beats the setting; a key it leaves out takes the setting."""
    text = '[default]\npublish = "clients"\n[namespaces.a]\n[namespaces.b]\npublish = "members"\n'
    rules = rules_of(text, tmp_path, publish_requires_join=True, slow_consumer_policy="drop_newest")
    assert rules.default.publish == "clients"  # the file beats RTG_PUBLISH_REQUIRES_JOIN
    assert rules.declared["a"].publish == "members"  # left out: the setting
    assert rules.declared["b"].publish == "members"
    assert rules.declared["a"].policy == "drop_newest"
    assert rules_of("[namespaces.a]\n", tmp_path, publish_requires_join=False).declared[
        "a"
    ].publish == ("clients")


def test_every_key_is_read(tmp_path: Path) -> None:
    """Every documented key lands in the rules and in their description (ack, /api/info)."""
    text = """
undeclared_namespaces = "refuse"
[default]
join = false
[namespaces.chat]
publish = "members"
max_members = 1000
policies = ["drop_oldest", "disconnect"]
policy = "drop_oldest"
publish_rate_per_s = 2.5
publish_burst = 5
[namespaces."eu.news"]
publish = "api"
"""
    rules = rules_of(text, tmp_path)
    assert rules.refuse_undeclared
    assert rules.default.join is False and rules.default.publish == "api"  # no joins: api
    chat = rules.declared["chat"]
    assert (chat.max_members, chat.policy, chat.policies) == (
        1000,
        "drop_oldest",
        ("drop_oldest", "disconnect"),
    )
    assert (chat.publish_rate_per_s, chat.publish_burst) == (2.5, 5)
    assert chat.described == {
        "namespace": "chat",
        "publish": "members",
        "join": True,
        "default_policy": "drop_oldest",
        "policies": ["drop_oldest", "disconnect"],
        "max_members": 1000,
        "max_members_per": "process",
        "publish_rate_per_s": 2.5,
        "publish_burst": 5,
    }
    assert rules.rules_for("eu.news:today") is rules.declared["eu.news"]
    assert rules.describe()["undeclared_namespaces"] == "refuse"
    # The burst defaults to one second of the rate, at least 1.
    assert rules_of("[namespaces.x]\npublish_rate_per_s = 0.2\n", tmp_path).declared[
        "x"
    ].publish_burst == (1)


def test_the_shipped_example_is_valid_and_does_what_the_readme_says() -> None:
    """deploy/rooms.toml loads: news published by the API, chat of 1,000, the rest closed."""
    rules = namespaces.load(str(EXAMPLE))
    assert rules.refuse_undeclared
    assert rules.rules_for("lobby").join is False  # type: ignore[union-attr]
    news, chat = rules.declared["news"], rules.declared["chat"]
    assert news.publish == "api" and news.join
    assert chat.publish == "members" and chat.max_members == 1000


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "[namespaces.chat]\nmax_members = 'x'\n",
            "namespaces.chat.max_members: expected an integer >= 1, got 'x'",
        ),
        (
            "[namespaces.chat]\nmax_members = 0\n",
            "namespaces.chat.max_members: expected an integer >= 1, got 0",
        ),
        (
            "[namespaces.chat]\nmax_members = true\n",
            "namespaces.chat.max_members: expected an integer >= 1, got true",
        ),
        (
            "[namespaces.chat]\nmax_member = 5\n",
            "namespaces.chat.max_member: no such key; did you mean max_members?",
        ),
        ("colour = 1\n", "colour: no such key; known: undeclared_namespaces, default, namespaces"),
        (
            "[namespaces.news]\npublish = 'backend'\n",
            "namespaces.news.publish: expected clients, members or api, got 'backend'",
        ),
        (
            "[namespaces.news]\njoin = false\npublish = 'members'\n",
            "namespaces.news.publish: expected clients or api when join = false, got 'members'",
        ),
        (
            "[namespaces.news]\njoin = 'no'\n",
            "namespaces.news.join: expected true or false, got 'no'",
        ),
        (
            "[namespaces.news]\npolicies = ['drop_all']\n",
            "namespaces.news.policies: expected a list of distinct disconnect, drop_oldest, "
            "drop_newest, got ['drop_all']",
        ),
        (
            "[namespaces.news]\npolicies = ['drop_oldest']\n",
            "namespaces.news.policy: expected one of drop_oldest (the default 'disconnect' is "
            "not among the policies: set policy), got 'disconnect'",
        ),
        (
            "[namespaces.news]\npublish_rate_per_s = -1\n",
            "namespaces.news.publish_rate_per_s: expected a number > 0, got -1",
        ),
        (
            "[namespaces.news]\npublish_rate_per_s = nan\n",
            "namespaces.news.publish_rate_per_s: expected a number > 0, got nan",
        ),
        (
            "[namespaces.news]\npublish_burst = 3\n",
            "namespaces.news.publish_burst: expected publish_rate_per_s set beside it, got 3",
        ),
        (
            "[namespaces.default]\n",
            "namespaces.default: 'default' is the default namespace; give its rules in [default]",
        ),
        (
            '[namespaces."a b"]\n',
            'namespaces."a b": expected a name of 1-127 characters of A-Z a-z 0-9 _ . -, '
            "got 'a b'",
        ),
        ("namespaces = 3\n", "namespaces: expected a table, got 3"),
        (
            "undeclared_namespaces = 'allow'\n",
            "undeclared_namespaces: expected default or refuse, got 'allow'",
        ),
        ("[default]\nmax_members = -2\n", "default.max_members: expected an integer >= 1, got -2"),
    ],
)
def test_a_malformed_rules_file_is_refused_with_the_key_and_what_it_accepts(
    text: str, line: str, tmp_path: Path
) -> None:
    """A malformed file is refused in one line: the file, the key, what it accepts, what it got."""
    assert refusal(text, tmp_path) == line


def test_a_file_that_is_not_toml_or_not_there_is_refused(tmp_path: Path) -> None:
    """A file that is not TOML, or not there, is refused with one line naming it."""
    assert refusal("[namespaces.chat\n", tmp_path).startswith("not valid TOML: ")
    with pytest.raises(ConfigError) as info:
        namespaces.load(str(tmp_path / "missing.toml"))
    assert str(info.value) == f"{tmp_path / 'missing.toml'}: No such file or directory"


def test_parse_of_nothing_is_the_builtin_default() -> None:
    """An empty table is the default namespace alone, members publishing."""
    rules = parse({}, "")
    assert rules.names == ("default",) and rules.default.publish == "members"


def run_gateway(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtgateway"],
        env={**os.environ, "RTG_ADDR": "127.0.0.1:0", "RTG_API_ADDR": "", **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_bad_rules_file_stops_the_gateway_with_exit_2_and_one_line(
    workers: str, tmp_path: Path
) -> None:
    """A bad file stops a gateway or the supervisor with exit 2 and one line, before any worker."""
    path = tmp_path / "rooms.toml"
    path.write_text("[namespaces.chat]\nmax_members = 'x'\n")
    proc = run_gateway(
        {
            "RTG_ROOMS_FILE": str(path),
            "RTG_WORKERS": workers,
            "RTG_BROKER_URL": "redis://127.0.0.1:1" if workers == "2" else "",
        }
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"rtgateway: error: {path}: namespaces.chat.max_members: expected an integer >= 1, got 'x'"
    ]
    assert proc.stdout == ""  # refused before any log line, any worker


def test_a_missing_rules_file_stops_the_gateway_with_exit_2(tmp_path: Path) -> None:
    """A rules file that is not there stops the gateway with exit 2 and one line naming it."""
    proc = run_gateway({"RTG_ROOMS_FILE": str(tmp_path / "nope.toml")})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"rtgateway: error: {tmp_path / 'nope.toml'}: No such file or directory"
    )
