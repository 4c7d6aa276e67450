#!/usr/bin/env python3
"""Generate the rtgateway Grafana dashboard (``rtgateway.json``) from plain dicts.

The committed JSON is this script's output, byte for byte; a test checks it.
Change the dashboard here, then run::

    python deploy/grafana/generate.py          # rewrite rtgateway.json
    python deploy/grafana/generate.py --check  # exit 1 when the JSON is stale

Every query is PromQL against the gateway's own metric names, filtered by the
``$job`` and ``$instance`` variables, and every panel reads from the
``${datasource}`` variable, so the same file imports through the UI and loads
through provisioning without naming a datasource. No Grafana SDK: the JSON
model is small enough to spell out, and spelling it out keeps it reviewable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["OUTPUT", "dashboard", "render"]

OUTPUT = Path(__file__).resolve().parent / "rtgateway.json"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every series selector carries this filter; Grafana expands a multi-value
# variable into a regex alternation, hence =~.
SEL = 'job=~"$job", instance=~"$instance"'
# The metrics counted by room namespace (rooms, memberships, publishes,
# deliveries, drops) also filter on the $namespace variable.
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    if instant:
        t["format"] = "table"
    return t


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(expr, legend, ref=chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def timeseries(
    title: str,
    description: str,
    queries: list[dict[str, Any]],
    *,
    unit: str = "short",
    stack: bool = False,
    overrides: list[dict[str, Any]] | None = None,
    min_zero: bool = True,
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if stack else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
        "color": {"mode": "palette-classic"},
    }
    if min_zero:
        defaults["min"] = 0
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": queries,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    description: str,
    expr: str,
    *,
    unit: str = "short",
    legend: str = "",
    thresholds: list[tuple[float | None, str]] | None = None,
    mappings: list[dict[str, Any]] | None = None,
    decimals: int | None = None,
) -> Panel:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    defaults: dict[str, Any] = {
        "unit": unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "mappings": mappings or [],
        "color": {"mode": "thresholds"},
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [target(expr, legend)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background" if thresholds or mappings else "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
    }


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le, {by}" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def rate(metric: str, extra: str = "") -> str:
    sel = f"{SEL}, {extra}" if extra else SEL
    return f"rate({metric}{{{sel}}}[{RATE}])"


def series_override(regex: str, props: list[dict[str, Any]]) -> dict[str, Any]:
    return {"matcher": {"id": "byRegexp", "options": regex}, "properties": props}


LIMIT_STYLE = [
    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
    {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
]


def overview() -> list[Panel]:
    draining_map = [
        {
            "type": "value",
            "options": {
                "0": {"text": "serving", "color": "green", "index": 0},
                "1": {"text": "draining", "color": "orange", "index": 1},
            },
        }
    ]
    build = {
        "type": "table",
        "title": "Build info",
        "description": "rtgateway_build_info: gateway, Python and websockets versions "
        "per instance.",
        "datasource": DATASOURCE,
        "targets": [target(f"rtgateway_build_info{{{SEL}}}", instant=True)],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm"},
        "transformations": [
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "Value": True, "__name__": True},
                    "indexByName": {"instance": 0, "version": 1, "python": 2, "websockets": 3},
                },
            }
        ],
    }
    return [
        stat(
            "Connections",
            "Open WebSocket connections, all selected instances.",
            f"sum(rtgateway_connections_current{{{SEL}}})",
        ),
        stat(
            "Connection capacity used",
            "Open connections over the connection limit (RTG_MAX_CONNECTIONS, or the one derived "
            "from the open-files limit). At 100% new handshakes get 503.",
            f"sum(rtgateway_connections_current{{{SEL}}})"
            f" / sum(rtgateway_connections_max{{{SEL}}})",
            unit="percentunit",
            thresholds=[(None, "green"), (0.8, "orange"), (0.95, "red")],
            decimals=1,
        ),
        stat(
            "Draining",
            "rtgateway_draining: 1 from SIGTERM until exit (healthz 503, new handshakes 503).",
            f"max by (instance) (rtgateway_draining{{{SEL}}})",
            legend="{{instance}}",
            mappings=draining_map,
        ),
        stat(
            "Uptime",
            "Time since the gateway process started (process_start_time_seconds).",
            f"time() - max by (instance) (process_start_time_seconds{{{SEL}}})",
            unit="s",
            legend="{{instance}}",
        ),
        stat(
            "Deliveries /s",
            "Publication frames handed to member outboxes per second.",
            f"sum({rate('rtgateway_deliveries_total')})",
            unit="ops",
        ),
        build,
    ]


def connections() -> list[Panel]:
    return [
        timeseries(
            "Open connections",
            "rtgateway_connections_current per instance, against its connection limit "
            "(dashed, rtgateway_connections_max).",
            targets(
                (f"sum by (instance) (rtgateway_connections_current{{{SEL}}})", "{{instance}}"),
                (f"sum by (instance) (rtgateway_connections_max{{{SEL}}})", "{{instance}} limit"),
            ),
            overrides=[series_override(".* limit", LIMIT_STYLE)],
        ),
        timeseries(
            "Connects and disconnects /s by reason",
            "Connections opened per second, and closed per second by reason (client_close, "
            "drain, slow_consumer, rate_limited, protocol_error, ping_timeout, error, kicked "
            "(the backend's POST /api/disconnect), ...).",
            targets(
                (f"sum({rate('rtgateway_connections_total')})", "connect"),
                (
                    f"sum by (reason) ({rate('rtgateway_disconnects_total')})",
                    "disconnect {{reason}}",
                ),
            ),
            unit="ops",
        ),
        timeseries(
            "Handshake rejections /s by reason",
            "Opening handshakes refused: connection_limit and fd_limit mean capacity is "
            "exhausted; draining during shutdown; origin, not_found, method, bad_request and "
            "timeout are client-side problems; address_limit, address_pending_limit, "
            "pending_evicted and first_byte_timeout are one source (or a flood) holding too "
            "many sockets.",
            targets(
                (
                    f"sum by (reason) ({rate('rtgateway_handshake_rejections_total')})",
                    "{{reason}}",
                ),
            ),
            unit="ops",
        ),
        timeseries(
            "Pending handshakes",
            "Sockets accepted that have not finished a handshake "
            "(rtgateway_pending_handshakes_current). A plateau at RTG_MAX_PENDING_HANDSHAKES "
            "with pending_evicted rising is a flood of silent sockets.",
            targets(
                (
                    f"sum by (instance) (rtgateway_pending_handshakes_current{{{SEL}}})",
                    "{{instance}}",
                ),
            ),
        ),
        timeseries(
            "Rooms and memberships by namespace",
            "Rooms with at least one member, and (connection, room) memberships, per room "
            "namespace of RTG_ROOMS_FILE (default: rooms without one). A namespace's max_members "
            "caps one room per gateway process.",
            targets(
                (
                    f"sum by (namespace) (rtgateway_rooms_current{{{SEL}, {NS}}})",
                    "{{namespace}} rooms",
                ),
                (
                    f"sum by (namespace) (rtgateway_room_members_current{{{SEL}, {NS}}})",
                    "{{namespace}} memberships",
                ),
            ),
        ),
    ]


def messages() -> list[Panel]:
    return [
        timeseries(
            "Messages in and out /s",
            "WebSocket messages read from clients, and frames written by the outboxes.",
            targets(
                (f"sum({rate('rtgateway_messages_received_total')})", "in"),
                (f"sum({rate('rtgateway_messages_sent_total')})", "out"),
            ),
            unit="ops",
        ),
        timeseries(
            "Bytes in and out /s",
            "Payload bytes received, and bytes written by the outboxes.",
            targets(
                (f"sum({rate('rtgateway_received_bytes_total')})", "in"),
                (f"sum({rate('rtgateway_sent_bytes_total')})", "out"),
            ),
            unit="Bps",
        ),
        timeseries(
            "Publishes and deliveries /s",
            "Publications fanned out, and the frames they put into member outboxes, per room "
            "namespace.",
            targets(
                (
                    f"sum by (namespace) ({rate('rtgateway_publishes_total', NS)})",
                    "{{namespace}} publishes",
                ),
                (
                    f"sum by (namespace) ({rate('rtgateway_deliveries_total', NS)})",
                    "{{namespace}} deliveries",
                ),
            ),
            unit="ops",
        ),
        timeseries(
            "Fan-out size (recipients per publish)",
            "Median and p99 of rtgateway_fanout_recipients, and the mean.",
            targets(
                *[
                    pair
                    for pair in quantiles("rtgateway_fanout_recipients")
                    if not pair[1].endswith("p95")
                ],
                (
                    f"sum({rate('rtgateway_fanout_recipients_sum')}) / "
                    f"sum({rate('rtgateway_fanout_recipients_count')})",
                    "mean",
                ),
            ),
        ),
        timeseries(
            "Publish latency p50 / p95 / p99",
            "From a publication being read to its frame handed to every member's outbox "
            "(rtgateway_publish_seconds histogram). Rising p99 with flat fan-out points at a "
            "busy event loop.",
            targets(*quantiles("rtgateway_publish_seconds")),
            unit="s",
        ),
        timeseries(
            "Protocol errors /s by code",
            "Error replies sent to clients (bad_json, not_joined, rate_limited, and the room "
            "namespaces' room_full, publish_not_allowed, join_not_allowed, unknown_namespace, "
            "...).",
            targets(
                (f"sum by (code) ({rate('rtgateway_protocol_errors_total')})", "{{code}}"),
            ),
            unit="ops",
        ),
    ]


SLOW_DISCONNECTS = "sum(" + rate("rtgateway_disconnects_total", 'reason="slow_consumer"') + ")"
ABUSE_DISCONNECTS = "sum(" + rate("rtgateway_disconnects_total", 'reason="rate_limited"') + ")"


def backpressure() -> list[Panel]:
    return [
        timeseries(
            "Slow consumers: drops /s by policy, disconnects /s",
            "Frames dropped by the drop_oldest / drop_newest policies (per room namespace), and "
            "connections closed with 4008 under the disconnect policy.",
            targets(
                (
                    f"sum by (namespace, policy) ({rate('rtgateway_messages_dropped_total', NS)})",
                    "{{namespace}} {{policy}}",
                ),
                (
                    SLOW_DISCONNECTS,
                    "disconnect (4008)",
                ),
            ),
            unit="ops",
        ),
        timeseries(
            "Rate-limited clients",
            "Client messages refused by the token bucket (error rate_limited), and clients "
            "closed with 1008 after too many refusals.",
            targets(
                (f"sum({rate('rtgateway_rate_limited_total')})", "messages refused"),
                (
                    ABUSE_DISCONNECTS,
                    "clients closed (1008)",
                ),
            ),
            unit="ops",
        ),
        timeseries(
            "Outbox bytes queued",
            "Bytes waiting in per-connection outboxes, all connections of an instance. "
            "Growth means clients read slower than the gateway writes.",
            targets(
                (f"sum by (instance) (rtgateway_outbox_queued_bytes{{{SEL}}})", "{{instance}}"),
            ),
            unit="bytes",
        ),
        timeseries(
            "Frames per socket write",
            "How many frames each outbox write coalesced (mean and p99); higher means the "
            "gateway batches under load instead of one syscall per frame.",
            targets(
                (
                    f"sum({rate('rtgateway_outbox_flush_frames_sum')}) / "
                    f"sum({rate('rtgateway_outbox_flush_frames_count')})",
                    "mean",
                ),
                (
                    "histogram_quantile(0.99, sum by (le) "
                    f"({rate('rtgateway_outbox_flush_frames_bucket')}))",
                    "p99",
                ),
            ),
        ),
    ]


def api() -> list[Panel]:
    return [
        timeseries(
            "Publish API requests /s by endpoint and status",
            "Requests answered by the HTTP publish API (RTG_API_ADDR), by route template and "
            "status. No data when the API is off.",
            targets(
                (
                    f"sum by (endpoint, status) ({rate('rtgateway_api_requests_total')})",
                    "{{endpoint}} {{status}}",
                ),
            ),
            unit="reqps",
        ),
        timeseries(
            "Publish API latency p50 / p99 by endpoint",
            "From a request's head being read to its response being written "
            "(rtgateway_api_request_seconds histogram).",
            targets(
                *[
                    pair
                    for pair in quantiles("rtgateway_api_request_seconds", by="endpoint")
                    if not pair[1].endswith("p95")
                ]
            ),
            unit="s",
        ),
    ]


def broker() -> list[Panel]:
    return [
        timeseries(
            "Broker connected, per Redis Cluster master",
            "1 while connected. rtgateway_broker_connected is the whole broker (one Redis, or "
            "every master of a cluster); rtgateway_broker_node_connected is one cluster master, "
            "labelled by its address. A master that dies drops to 0 until its replica is "
            "promoted and the gateway forgets it. No data without RTG_BROKER_URL.",
            targets(
                (f"min by (instance) (rtgateway_broker_connected{{{SEL}}})", "{{instance}} all"),
                (
                    f"min by (instance, node) (rtgateway_broker_node_connected{{{SEL}}})",
                    "{{instance}} {{node}}",
                ),
            ),
        ),
        timeseries(
            "Broker errors and reconnects /s, per cluster master",
            "Lost connections, failed publishes and bad payloads (errors), connections made "
            "again (reconnects), by master; publications dropped as numbered below what "
            "members saw (stale: a counter lost with a master, shown to members as a gap).",
            targets(
                (
                    f"sum by (node) ({rate('rtgateway_broker_node_errors_total')})",
                    "{{node}} errors",
                ),
                (
                    f"sum by (node) ({rate('rtgateway_broker_node_reconnects_total')})",
                    "{{node}} reconnects",
                ),
                (f"sum({rate('rtgateway_broker_stale_total')})", "stale"),
            ),
            unit="ops",
        ),
    ]


def process() -> list[Panel]:
    return [
        timeseries(
            "Event-loop lag",
            "How late the event loop ran a timer (rtgateway_event_loop_lag_seconds): the "
            "delay every message and ping sees on top of its own work.",
            targets(
                *[
                    pair
                    for pair in quantiles("rtgateway_event_loop_lag_seconds", by="instance")
                    if not pair[1].endswith("p95")
                ]
            ),
            unit="s",
        ),
        timeseries(
            "CPU",
            "CPU time used per second (1.0 = one core busy). The gateway is one thread: "
            "near 1.0 it is saturated.",
            targets((f"sum by (instance) ({rate('process_cpu_seconds_total')})", "{{instance}}")),
            unit="percentunit",
        ),
        timeseries(
            "Memory",
            "Resident set size of the gateway process.",
            targets(
                (f"sum by (instance) (process_resident_memory_bytes{{{SEL}}})", "{{instance}} RSS"),
            ),
            unit="bytes",
        ),
        timeseries(
            "Log warnings and errors /s",
            "Log events at warning level and above, every one (rtgateway_log_events_total), "
            "and those counted but not written because one event repeated more than 10 times "
            "in 10 s (rtgateway_log_events_suppressed_total).",
            targets(
                (f"sum by (level) ({rate('rtgateway_log_events_total')})", "{{level}}"),
                (
                    f"sum by (level) ({rate('rtgateway_log_events_suppressed_total')})",
                    "{{level}} not written",
                ),
            ),
            unit="ops",
        ),
        timeseries(
            "Open files against the limit",
            "process_open_fds (one per connection, plus a few) against process_max_fds "
            "(dashed, the RLIMIT_NOFILE soft limit).",
            targets(
                (f"sum by (instance) (process_open_fds{{{SEL}}})", "{{instance}} open"),
                (f"sum by (instance) (process_max_fds{{{SEL}}})", "{{instance}} limit"),
            ),
            overrides=[series_override(".* limit", LIMIT_STYLE)],
        ),
    ]


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(sections: list[tuple[str, list[Panel], int, int]]) -> list[Panel]:
    """Place rows and panels on Grafana's 24-column grid, numbering panel ids."""
    panels: list[Panel] = []
    y = 0
    for title, items, width, height in sections:
        panels.append({**row(title), "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        x = 0
        for item in items:
            w = width if item["type"] != "table" else 24 - x
            if x + w > 24:
                x, y = 0, y + height
            panels.append({**item, "gridPos": {"h": height, "w": w, "x": x, "y": y}})
            x += w
        y += height
    for i, panel in enumerate(panels, start=1):
        panel["id"] = i
    return panels


def variables() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {},
            "options": [],
            "regex": "",
            "sort": 1,
            "hide": 0,
        }

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "options": [],
            "refresh": 1,
            "regex": "",
            "hide": 0,
        },
        query_var("job", "Job", "label_values(rtgateway_build_info, job)"),
        query_var(
            "instance", "Instance", 'label_values(rtgateway_build_info{job=~"$job"}, instance)'
        ),
        # The namespaces of RTG_ROOMS_FILE, and "default" (rooms without one).
        query_var(
            "namespace",
            "Namespace",
            'label_values(rtgateway_room_members_current{job=~"$job"}, namespace)',
        ),
    ]


def dashboard() -> dict[str, Any]:
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
            {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
            {"type": "panel", "id": "table", "name": "Table", "version": ""},
        ],
        "id": None,
        "uid": "rtgateway",
        "title": "rtgateway",
        "description": "rtgateway WebSocket gateway: connections, rooms, fan-out, backpressure "
        "and process health. Generated by deploy/grafana/generate.py.",
        "tags": ["rtgateway", "websocket"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                {
                    "datasource": DATASOURCE,
                    "enable": True,
                    "hide": False,
                    "iconColor": "orange",
                    "name": "Restarts",
                    # Grafana turns each sample whose value is 1 into an annotation.
                    "expr": f"changes(process_start_time_seconds{{{SEL}}}[$__interval]) > bool 0",
                    "step": "1m",
                    "titleFormat": "gateway restarted",
                    "textFormat": "{{instance}}",
                },
            ]
        },
        "templating": {"list": variables()},
        "panels": layout(
            [
                ("Overview", overview(), 3, 4),
                ("Connections", connections(), 12, 8),
                ("Messages and fan-out", messages(), 8, 8),
                ("Backpressure", backpressure(), 12, 8),
                ("Publish API", api(), 12, 8),
                ("Broker (Redis)", broker(), 12, 8),
                ("Process", process(), 12, 8),
            ]
        ),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is stale")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
    elif args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
    else:
        OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
