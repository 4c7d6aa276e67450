"""The Grafana dashboard and the Prometheus alerts, checked against the real thing.

- The committed dashboard JSON is exactly what ``deploy/grafana/generate.py``
  produces, and its structure is what Grafana's import and provisioning need.
- ``promtool`` checks the rules, runs their unit tests, checks the example
  config, and lints the gateway's real ``/metrics`` output.
- The end-to-end test runs a real gateway with low limits and a real
  Prometheus (1 s scrapes, the repository's rule files), drives a load with
  real ``websockets`` clients that moves every counter, then runs every query
  of every dashboard panel and every alert expression through Prometheus's
  HTTP API. A query must parse and return at least one series.

How an alert expression is proved: every rule ends in one comparison with a
threshold (``... > 0.8``). The test evaluates the full expression (it must
parse), then the expression with that trailing comparison removed, which must
return a series from the real gateway: the selectors, label names and
aggregations match real data, whatever the current value. The two alerts
about the process going away are proved with a real restart of the gateway on
the same port: ``up`` records a 0 and ``process_start_time_seconds`` changes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT, GatewayProcess, free_port, http_get, require_tool, wait_until
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

GRAFANA = ROOT / "deploy" / "grafana"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "rtgateway.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules" / "rtgateway_test.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
JOB = "rtgateway"  # the job name the alert rules select on

# A trailing comparison with a number: what stripping an alert leaves is its query.
THRESHOLD_RE = re.compile(r"^(?P<query>.*?)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+0-9.eE]+\s*$")

# Every metric the contract promises, each of which the dashboard must show.
CONTRACT_METRICS = (
    "rtgateway_connections_current",
    "rtgateway_connections_total",
    "rtgateway_disconnects_total",
    "rtgateway_handshake_rejections_total",
    "rtgateway_messages_received_total",
    "rtgateway_messages_sent_total",
    "rtgateway_received_bytes_total",
    "rtgateway_sent_bytes_total",
    "rtgateway_event_loop_lag_seconds_bucket",
    "rtgateway_draining",
    "rtgateway_build_info",
    "rtgateway_rooms_current",
    "rtgateway_room_members_current",
    "rtgateway_publishes_total",
    "rtgateway_deliveries_total",
    "rtgateway_fanout_recipients_bucket",
    "rtgateway_publish_seconds_bucket",
    "rtgateway_protocol_errors_total",
    "rtgateway_messages_dropped_total",
    "rtgateway_rate_limited_total",
    "rtgateway_outbox_queued_bytes",
    "rtgateway_outbox_flush_frames_bucket",
    "process_open_fds",
    "process_max_fds",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
    "rtgateway_api_requests_total",
    "rtgateway_api_request_seconds_bucket",
)

# Counters the load must move, as Prometheus selectors.
MOVED_BY_LOAD = (
    "rtgateway_connections_total",
    'rtgateway_disconnects_total{reason="client_close"}',
    'rtgateway_disconnects_total{reason="slow_consumer"}',
    'rtgateway_disconnects_total{reason="rate_limited"}',
    'rtgateway_handshake_rejections_total{reason="connection_limit"}',
    'rtgateway_handshake_rejections_total{reason="not_found"}',
    "rtgateway_messages_received_total",
    "rtgateway_messages_sent_total",
    "rtgateway_received_bytes_total",
    "rtgateway_sent_bytes_total",
    "rtgateway_publishes_total",
    "rtgateway_deliveries_total",
    "rtgateway_fanout_recipients_count",
    "rtgateway_publish_seconds_count",
    'rtgateway_protocol_errors_total{code="not_joined"}',
    'rtgateway_protocol_errors_total{code="rate_limited"}',
    'rtgateway_messages_dropped_total{policy="drop_oldest"}',
    'rtgateway_messages_dropped_total{policy="drop_newest"}',
    "rtgateway_rate_limited_total",
    "rtgateway_outbox_flush_frames_count",
    "rtgateway_event_loop_lag_seconds_count",
    'rtgateway_api_requests_total{endpoint="/api/info", status="200"}',
    'rtgateway_api_request_seconds_count{endpoint="/api/info"}',
)

# Low limits, so that a few dozen messages reach every one of them.
MAX_CONNECTIONS = 8
GATEWAY_ENV = {
    "RTG_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    # Above the rate-limit burst: replies to one pipelined burst are queued
    # in one event-loop iteration and must fit, or the abuser below would be
    # closed as a slow consumer (4008) before the rate limit closes it (1008).
    "RTG_OUTBOX_MAX_MESSAGES": "64",
    "RTG_OUTBOX_MAX_BYTES": "32768",
    "RTG_MAX_MESSAGE_BYTES": "16384",  # an outbox must hold one max-size message
    # A small kernel send buffer: the slow consumer's backlog lands in the
    # outbox instead of in 4 MiB of socket buffers.
    "RTG_SOCKET_SNDBUF_BYTES": "4096",
    "RTG_RATE_LIMIT_MSGS_PER_S": "50",
    "RTG_RATE_LIMIT_BURST": "50",
    "RTG_RATE_LIMIT_MAX_REJECTED": "5",
    "RTG_STATS_INTERVAL_S": "0",
    "RTG_DEMO": "false",
    "RTG_API_ADDR": "",  # off unless a test gives it a free port
}
PAYLOAD = "x" * 6000  # about a fifth of an outbox


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("rtgateway_dashboard", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "rtgateway.json").read_text())


def all_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every Prometheus annotation."""
    queries = [
        (f"panel {panel['title']!r} target {t['refId']}", t["expr"])
        for panel in all_panels(dash)
        for t in panel.get("targets", [])
    ]
    queries += [
        (f"annotation {a['name']!r}", a["expr"])
        for a in dash["annotations"]["list"]
        if a.get("datasource", {}).get("type") == "prometheus"
    ]
    return queries


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


# Static checks: no daemon needed.


def test_dashboard_json_is_the_generator_output() -> None:
    """The committed dashboard JSON is exactly what generate.py renders."""
    generate = load_generator()
    assert (GRAFANA / "rtgateway.json").read_text() == generate.render(), (
        "deploy/grafana/rtgateway.json is stale: run python deploy/grafana/generate.py"
    )


def test_dashboard_generator_check_mode_accepts_committed_json() -> None:
    """generate.py --check accepts the committed dashboard."""
    result = subprocess.run(
        [sys.executable, str(GRAFANA / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_dashboard_uses_datasource_variable_everywhere() -> None:
    """Every panel and variable uses the ${datasource} variable: importable and provisionable."""
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    # Importable and provisionable: no import-time inputs, no fixed dashboard id.
    assert "__inputs" not in dash
    assert dash["id"] is None and dash["uid"] == "rtgateway"
    for panel in all_panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    text = json.dumps(dash)
    assert '"uid": "prometheus"' not in text  # no datasource uid baked in


def test_dashboard_queries_filter_on_job_and_instance() -> None:
    """Every dashboard query filters on $job and $instance."""
    for where, expr in dashboard_queries(dashboard()):
        selectors = re.findall(r"[a-z_:]+\{([^}]*)\}", expr)
        assert selectors, f"{where}: no label selector in {expr}"
        for sel in selectors:
            assert 'job=~"$job"' in sel and 'instance=~"$instance"' in sel, f"{where}: {expr}"


def test_dashboard_layout_is_valid() -> None:
    """Panel ids are unique and no panel overlaps another or leaves the grid."""
    panels = list(all_panels(dashboard()))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_dashboard_shows_every_contract_metric() -> None:
    """Every metric of the contract appears in a panel."""
    exprs = " ".join(expr for _, expr in dashboard_queries(dashboard()))
    missing = [m for m in CONTRACT_METRICS if not re.search(rf"\b{m}\b", exprs)]
    assert not missing, f"metrics without a panel: {missing}"


def test_dashboard_has_the_required_panels() -> None:
    """The dashboard has every required panel, by title."""
    titles = {p["title"] for p in all_panels(dashboard())}
    for wanted in (
        "Connects and disconnects /s by reason",
        "Handshake rejections /s by reason",
        "Messages in and out /s",
        "Publishes and deliveries /s",
        "Fan-out size (recipients per publish)",
        "Publish latency p50 / p95 / p99",
        "Slow consumers: drops /s by policy, disconnects /s",
        "Rate-limited clients",
        "Outbox bytes queued",
        "Event-loop lag",
        "Draining",
        "CPU",
        "Memory",
        "Open files against the limit",
        "Build info",
    ):
        assert wanted in titles


def test_grafana_provisioning_files() -> None:
    """The provisioning files give a default Prometheus datasource and a file provider."""
    prov = GRAFANA / "provisioning"
    datasources = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert ds["isDefault"] is True  # what ${datasource} resolves to by default
    providers = yaml.safe_load((prov / "dashboards" / "rtgateway.yaml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


def test_every_alert_is_documented_and_strippable() -> None:
    """Every alert has a severity, a summary, a description and a trailing threshold."""
    rules = alert_rules()
    assert len(rules) >= 7
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"]) > 100, name
        assert THRESHOLD_RE.match(rule["expr"].strip()), f"{name}: no trailing threshold"


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    """Every alert has a promtool unit test that fires it and one that does not."""
    doc = yaml.safe_load(RULE_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


@pytest.mark.system
def test_promtool_check_rules() -> None:
    """promtool check rules accepts the alert rules."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.system
def test_promtool_rule_unit_tests_pass() -> None:
    """promtool test rules passes the rules' unit tests."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.system
def test_promtool_check_example_config() -> None:
    """promtool check config accepts the example Prometheus config and its rule file."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@pytest.mark.system
def test_promtool_check_metrics_on_real_gateway_output() -> None:
    """promtool check metrics finds nothing to say about a real gateway's /metrics."""
    promtool = require_tool("promtool")
    with GatewayProcess(GATEWAY_ENV) as gw:
        # One protocol error, so that labelled family has a sample too.
        asyncio.run(_one_protocol_error(gw.port))
        status, body, headers = http_get(gw.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "rtgateway_protocol_errors_total{" in body
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


async def _one_protocol_error(port: int | None) -> None:
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.recv()
        await ws.send(json.dumps({"op": "publish", "room": "r", "data": 1, "id": 1}))
        assert json.loads(await ws.recv())["code"] == "not_joined"


# The real Prometheus.


class Prometheus:
    """A Prometheus server with its own config and TSDB in a temporary directory."""

    def __init__(self, binary: str, target: str, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": JOB, "static_configs": [{"targets": [target]}]},
            ],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._ready, 30, 0.1, "prometheus /-/ready")
        except AssertionError:
            self.stop()
            raise AssertionError("prometheus did not start:\n" + self.logs()) from None

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("prometheus exited:\n" + self.logs())
        try:
            return http_get(self.url + "/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def logs(self) -> str:
        self.log.flush()
        return (self.tmp / "prometheus.log").read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def api(self, path: str, **params: str) -> tuple[int, dict[str, Any]]:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body, _ = http_get(url)
        return status, json.loads(body)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant query; fail the test with Prometheus's error if it does not parse."""
        status, reply = self.api("query", query=expr)
        assert status == 200 and reply["status"] == "success", f"{expr}\n-> {reply}"
        assert reply["data"]["resultType"] == "vector", expr
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def target_health(self) -> str:
        _, reply = self.api("targets")
        targets = reply["data"]["activeTargets"]
        return str(targets[0]["health"]) if targets else "unknown"


def values(series: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in series]


def substitute(expr: str, job: str, instance: str, window: str) -> str:
    """Expand Grafana's variables as a dashboard showing this test would."""
    for name, value in (
        ("$__rate_interval", window),
        ("$__interval", "1s"),
        # Grafana regex-escapes variable values, and doubles the backslashes
        # inside a PromQL string literal.
        ("$instance", re.escape(instance).replace("\\", "\\\\")),
        ("$job", re.escape(job).replace("\\", "\\\\")),
    ):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


# The load: real websockets clients against the real gateway.


async def raw_socket(port: int, rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect, so that the TCP window is negotiated small.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def request(ws: ClientConnection, msg: dict[str, Any]) -> dict[str, Any]:
    """Send ``msg`` and return the ack or error with its id, skipping publications."""
    await ws.send(json.dumps(msg))
    while True:
        reply = json.loads(await ws.recv())
        if reply.get("id") == msg["id"] and reply["op"] in ("ack", "error"):
            return reply


def metric_value(port: int, name: str, labels: str = "") -> float:
    _, body, _ = http_get(f"http://127.0.0.1:{port}/metrics")
    for line in body.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def member(port: int, room: str, policy: str | None, *, slow: bool) -> ClientConnection:
    """A room member; a slow one has a tiny receive buffer and never reads after its ack."""
    kwargs: dict[str, Any] = {"compression": None}
    if slow:
        kwargs["sock"] = await raw_socket(port, 4096)
        kwargs["max_queue"] = 1  # websockets stops reading the socket past one message
    ws = await connect(f"ws://127.0.0.1:{port}/ws", **kwargs)
    assert json.loads(await ws.recv())["op"] == "hello"
    join: dict[str, Any] = {"op": "join", "room": room, "id": 1}
    if policy:
        join["policy"] = policy
    ack = await request(ws, join)
    assert ack["op"] == "ack", ack
    return ws


async def publish_until(
    ws: ClientConnection, port: int, room: str, moved: tuple[str, str], limit: int = 400
) -> int:
    """Publish to ``room`` until the gateway's metric ``moved`` (name, labels) is non-zero."""
    for i in range(limit):
        # Stay under RTG_RATE_LIMIT_MSGS_PER_S: the publisher must not be closed 1008.
        await asyncio.sleep(1 / 40)
        reply = await request(ws, {"op": "publish", "room": room, "data": PAYLOAD, "id": 1000 + i})
        if reply["op"] == "error":
            assert reply["code"] == "rate_limited", reply
            await asyncio.sleep(reply["retry_after_ms"] / 1000)  # as a client is told to
        if i % 4 == 3 and await asyncio.to_thread(metric_value, port, *moved):
            return i + 1
    raise AssertionError(f"{moved} did not move after {limit} publishes to {room}")


async def drive_load(port: int) -> None:
    url = f"ws://127.0.0.1:{port}/ws"
    publisher = await member(port, "lobby", None, slow=False)
    listener = await member(port, "lobby", None, slow=False)

    # Publishes, deliveries and fan-out in a room whose members keep up.
    for i in range(20):
        reply = await request(
            publisher, {"op": "publish", "room": "lobby", "data": {"n": i}, "id": 100 + i}
        )
        assert reply["op"] == "ack", reply
    received = 0
    while received < 20:
        if json.loads(await listener.recv())["op"] == "message":
            received += 1

    # A protocol error: publishing to a room one has not joined.
    reply = await request(publisher, {"op": "publish", "room": "nowhere", "data": 0, "id": 7})
    assert reply["code"] == "not_joined"

    # Slow consumers, one per policy, each in its own room with the publisher.
    for room, policy, moved in (
        (
            "slow-disconnect",
            "disconnect",
            ("rtgateway_disconnects_total", '{reason="slow_consumer"}'),
        ),
        (
            "slow-oldest",
            "drop_oldest",
            ("rtgateway_messages_dropped_total", '{policy="drop_oldest"}'),
        ),
        (
            "slow-newest",
            "drop_newest",
            ("rtgateway_messages_dropped_total", '{policy="drop_newest"}'),
        ),
    ):
        slow = await member(port, room, policy, slow=True)
        ack = await request(publisher, {"op": "join", "room": room, "id": 2})
        assert ack["op"] == "ack", ack
        await publish_until(publisher, port, room, moved)
        await request(publisher, {"op": "leave", "room": room, "id": 3})
        slow.transport.abort()  # it never reads: no closing handshake to wait for

    # A client past the rate limit: refused messages, then closed with 1008.
    async with connect(url) as abuser:
        await abuser.recv()
        with pytest.raises(ConnectionClosed) as closed:
            for i in range(120):
                await abuser.send(json.dumps({"op": "ping", "id": i}))
            while True:
                await abuser.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

    # Handshakes past the connection limit get 503.
    extra: list[ClientConnection] = []
    try:
        with pytest.raises(InvalidStatus) as refused:
            for _ in range(MAX_CONNECTIONS + 1):
                extra.append(await connect(url))
        assert refused.value.response.status_code == 503
    finally:
        for ws in extra:
            await ws.close()

    # An unknown path: 404.
    status, _, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/no-such-path")
    assert status == 404

    await publisher.close()
    await listener.close()


@pytest.mark.system
@pytest.mark.timeout(180)
def test_dashboard_and_alert_queries_return_series_from_real_prometheus() -> None:
    """Real Prometheus on a loaded gateway: every panel and alert query has series."""
    prometheus_bin = require_tool("prometheus")
    with tempfile.TemporaryDirectory(prefix="rtg-prom-") as tmpdir:
        tmp = Path(tmpdir)
        port = free_port()
        api_port = free_port()
        env = {
            **GATEWAY_ENV,
            "RTG_ADDR": f"127.0.0.1:{port}",
            "RTG_API_ADDR": f"127.0.0.1:{api_port}",
        }
        instance = f"127.0.0.1:{port}"
        gateways = [GatewayProcess(env).start()]
        try:
            prom = Prometheus(prometheus_bin, instance, tmp)
            try:
                _scrape_restart_and_load(prom, gateways, env, port, api_port, instance)
            except BaseException:
                print("gateway log tail:\n" + "\n".join(gateways[-1].lines[-40:]))
                print("prometheus log tail:\n" + prom.logs())
                raise
            finally:
                prom.stop()
        finally:
            for gw in gateways:
                gw.kill()


def _scrape_restart_and_load(
    prom: Prometheus,
    gateways: list[GatewayProcess],
    env: dict[str, str],
    port: int,
    api_port: int,
    instance: str,
) -> None:
    # A real restart on the same address, so that `up` records a 0 and
    # process_start_time_seconds changes: what the down and restart-loop
    # alerts watch.
    wait_until(lambda: prom.target_health() == "up", 30, 0.2, "first scrape")
    gateways[-1].kill()
    wait_until(lambda: prom.target_health() == "down", 30, 0.2, "a failed scrape")
    gateways.append(GatewayProcess(env).start())
    wait_until(lambda: prom.target_health() == "up", 30, 0.2, "scrape after restart")

    started = time.time()
    # The API first: its counter's series appears at its first request, and
    # rate() needs the scrapes that follow.
    status, body, _ = http_get(f"http://127.0.0.1:{api_port}/api/info")
    assert status == 200, body
    asyncio.run(drive_load(port))

    # Wait for a scrape taken after the load, and for enough samples for rate().
    final = metric_value(port, "rtgateway_publishes_total")
    wait_until(
        lambda: values(prom.query(f'rtgateway_publishes_total{{job="{JOB}"}}')) == [final],
        30,
        0.2,
        "a scrape after the load",
    )
    wait_until(
        lambda: values(prom.query(f'count_over_time(up{{job="{JOB}"}}[1m])'))[0] >= 5,
        30,
        0.2,
        "five scrapes",
    )
    # As a dashboard zoomed on this test would: the rate window covers the load.
    window = f"{math.ceil(time.time() - started) + 5}s"
    _check_counters_moved(prom)
    _check_variables(prom, instance)
    _check_dashboard_queries(prom, instance, window)
    _check_alert_expressions(prom)
    _check_restart_seen(prom)


def _check_counters_moved(prom: Prometheus) -> None:
    still = []
    for selector in MOVED_BY_LOAD:
        name, _, labels = selector.rstrip("}").partition("{")
        matchers = ", ".join(m for m in (f'job="{JOB}"', labels) if m)
        if sum(values(prom.query(f"{name}{{{matchers}}}"))) <= 0:
            still.append(selector)
    assert not still, f"the load did not move: {still}"


def _check_variables(prom: Prometheus, instance: str) -> None:
    # label_values(metric, label) is Grafana's name for the label values API.
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"])
        assert match, var["definition"]
        selector = match.group(1).replace("$job", JOB)
        _, reply = prom.api(f"label/{match.group(2)}/values", **{"match[]": selector})
        assert reply["status"] == "success", reply
        wanted = {"job": JOB, "instance": instance}[var["name"]]
        assert wanted in reply["data"], (var["name"], reply)


def _check_dashboard_queries(prom: Prometheus, instance: str, window: str) -> None:
    empty = []
    for where, expr in dashboard_queries(dashboard()):
        series = prom.query(substitute(expr, JOB, instance, window))
        if not series:
            empty.append(f"{where}: {expr}")
        elif where.startswith("panel") and not any(math.isfinite(v) for v in values(series)):
            # NaN everywhere would be an empty graph: a histogram with no observations.
            empty.append(f"{where} (only NaN): {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def _check_alert_expressions(prom: Prometheus) -> None:
    empty = []
    for rule in alert_rules():
        expr = " ".join(rule["expr"].split())
        prom.query(expr)  # parses; whether it fires is not the point here
        match = THRESHOLD_RE.match(expr)
        assert match is not None, rule["alert"]
        if not prom.query(match.group("query")):
            empty.append(f"{rule['alert']}: {match.group('query')}")
    assert not empty, "alert queries without data:\n" + "\n".join(empty)

    # And Prometheus itself loaded and evaluated every rule without error.
    _, reply = prom.api("rules")
    loaded = {
        r["name"]: r for g in reply["data"]["groups"] for r in g["rules"] if r["type"] == "alerting"
    }
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    wait_until(
        lambda: all(
            r["health"] == "ok" for g in prom.api("rules")[1]["data"]["groups"] for r in g["rules"]
        ),
        10,
        0.2,
        "every rule evaluated with health ok",
    )


def _check_restart_seen(prom: Prometheus) -> None:
    # RTGatewayDown's selector saw the gateway down, RTGatewayRestartLoop's saw it restart.
    down = prom.query(f'min_over_time(up{{job="{JOB}"}}[5m])')
    assert values(down) == [0.0]
    restarts = prom.query(f'changes(process_start_time_seconds{{job="{JOB}"}}[5m])')
    assert values(restarts) and values(restarts)[0] >= 1
