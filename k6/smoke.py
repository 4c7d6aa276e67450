"""Run every k6 script for a few seconds against gateways this driver starts itself.

    python k6/smoke.py                      # all cases, results in results/smoke/
    python k6/smoke.py drain --results /tmp/r --k6 /usr/bin/k6
    python k6/smoke.py rooms --set ROOMS=10 --set ROOM_SIZE=50 --set DURATION=60s
    python k6/smoke.py drain --set VUS=1000 --set DURATION=60s --gateway-env RTG_DRAIN_WINDOW_S=5

Each case starts ``python -m rtgateway`` on 127.0.0.1 (port 0, or a fixed free port below the
ephemeral range when the case restarts it), runs one script with short DURATION and few VUs,
and stops the gateway. For drain.js the driver waits until every client is connected, sends
the gateway SIGTERM (it closes them with 1012 and exits) and starts a new one on the same port,
so the clients' reconnects are real.

``--set`` overrides a case's knobs and ``--gateway-env`` its gateway's settings, which makes the
driver the simplest way to take longer measurements on one machine; it prints the gateway's CPU
seconds next to the figures (a figure per CPU-second survives a shared, noisy machine).

The smoke knobs keep latency thresholds loose (a shared 2-core CI box is no place for timing
claims) but keep every behavioural one: messages arrive, nothing is lost, clients come back.

Standard library and :mod:`rtgateway.testing` (the launcher) only: tests/test_k6.py imports this
file by path and calls :func:`run_case`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from rtgateway.testing import GatewayProcess, free_port

__all__ = ["CASES", "Case", "Gateway", "Result", "find_k6", "run_case"]

ROOT = Path(__file__).resolve().parent.parent
K6_DIR = ROOT / "k6"

# Loose on purpose: these catch a broken gateway, not a slow shared machine.
LOOSE = {"RTT_P95_MS": "2000", "RTT_P99_MS": "5000"}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # also the results file name: results/<name>.json
    script: str  # file in k6/
    knobs: dict[str, str]
    gateway_env: dict[str, str] = dataclasses.field(default_factory=dict)
    restart: bool = False  # SIGTERM the gateway mid-run and start a new one on the same port


CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case(
            "echo",
            "echo.js",
            {"VUS": "4", "DURATION": "4s", "MESSAGES": "50", "MODE": "mixed", **LOOSE},
        ),
        Case(
            "rooms",
            "rooms.js",
            {
                "ROOMS": "2",
                "ROOM_SIZE": "4",
                "RATE": "10",
                "DURATION": "5s",
                "SETTLE_MS": "500",
                "TAIL_MS": "500",
                "LATENCY_P95_MS": "2000",
                "LATENCY_P99_MS": "5000",
            },
        ),
        Case(
            "storm",
            "storm.js",
            {
                "RATE": "20",
                "DURATION": "3s",
                "HOLD_MS": "500",
                "HANDSHAKE_P95_MS": "5000",
                "HANDSHAKE_P99_MS": "10000",
            },
        ),
        # A storm past a small connection limit: the excess must be answered 503 + Retry-After.
        Case(
            "storm-503",
            "storm.js",
            {
                "RATE": "20",
                "DURATION": "3s",
                "HOLD_MS": "1500",
                "MIN_SUCCESS": "0",
                "MAX_503": "1000000",
                "HANDSHAKE_P95_MS": "5000",
                "HANDSHAKE_P99_MS": "10000",
            },
            gateway_env={"RTG_MAX_CONNECTIONS": "5"},
        ),
        Case(
            "soak",
            "soak.js",
            {
                "VUS": "6",
                "DURATION": "6s",
                "SESSION_MIN": "1s",
                "SESSION_MAX": "2s",
                "RATE": "4",
                "PING_MS": "300",
                "METRICS_INTERVAL": "1s",
                "LATENCY_P99_MS": "5000",
            },
        ),
        Case(
            "drain",
            "drain.js",
            {
                "VUS": "8",
                "DURATION": "14s",
                "ROOMS": "2",
                "RATE": "4",
                "JITTER_MS": "200",
                "BACKOFF_MS": "100",
                "BACKOFF_MAX_MS": "1000",
            },
            gateway_env={
                "RTG_DRAIN_WINDOW_S": "1",
                "RTG_DRAIN_TIMEOUT_S": "5",
                "RTG_RECONNECT_DELAY_MS": "500",
            },
            restart=True,
        ),
    ]
}


def find_k6(explicit: str | None = None) -> str | None:
    """``explicit``, else $K6, else the k6 next to this Python (the venv's), else PATH."""
    for candidate in (explicit, os.environ.get("K6"), str(Path(sys.executable).parent / "k6")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("k6")


class Gateway(GatewayProcess):
    """``python -m rtgateway`` on 127.0.0.1 (port 0 unless given), its JSON log lines kept."""

    def __init__(self, port: int = 0, env: dict[str, str] | None = None) -> None:
        super().__init__({"RTG_ADDR": f"127.0.0.1:{port}", "RTG_DEMO": "false", **(env or {})})

    def metric(self, name: str) -> float | None:
        """One unlabelled sample from /metrics, or None."""
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else None


@dataclasses.dataclass
class Result:
    case: Case
    returncode: int
    summary: dict[str, Any]  # results/<name>.json, {} when k6 wrote none
    output: str  # k6's stdout and stderr
    gateway_logs: list[list[str]]  # one list of log lines per gateway process
    gateway_returncodes: list[int | None]
    gateway_cpu_seconds: float  # all gateway processes of the case, measured before they stop
    k6_cpu_seconds: float  # the load generator's, for comparison: both share the machine
    seconds: float

    def count(self, metric: str) -> float:
        """A counter's total from the summary; 0 when the metric never got a sample."""
        values = self.summary.get("metrics", {}).get(metric, {}).get("values", {})
        return float(values.get("count", 0))

    def trend(self, metric: str, stat: str = "p(95)") -> float | None:
        values = self.summary.get("metrics", {}).get(metric, {}).get("values")
        return None if values is None else values.get(stat)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wait_for(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def run_case(
    case: Case,
    k6: str,
    results_dir: Path,
    timeout_s: float = 120.0,
    restart_after_s: float = 1.0,
) -> Result:
    """Start a gateway, run ``case``'s script against it, stop the gateway.

    With ``case.restart``, the gateway is restarted ``restart_after_s`` after every client
    connected.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    summary_path = results_dir / f"{case.name}.json"
    summary_path.unlink(missing_ok=True)
    port = free_port() if case.restart else 0
    started = time.monotonic()
    children_before = _children_cpu()
    gateways = [Gateway(port, case.gateway_env).start()]
    try:
        port = gateways[0].port
        knobs = {**case.knobs, "TARGET": f"ws://127.0.0.1:{port}", "RESULTS_DIR": str(results_dir)}
        knobs["SUMMARY_NAME"] = case.name
        command = [k6, "run", "--quiet", "--no-usage-report"]
        for key, value in knobs.items():
            command += ["-e", f"{key}={value}"]
        command.append(str(K6_DIR / case.script))
        log_path = results_dir / f"{case.name}.log"
        with open(log_path, "w+") as log:
            env = {**os.environ, "K6_NO_USAGE_REPORT": "true", "K6_NO_COLOR": "true"}
            k6_proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
            try:
                if case.restart:
                    clients = int(case.knobs["VUS"])
                    gateways.append(_restart(gateways[0], clients, case, restart_after_s))
                returncode = k6_proc.wait(timeout_s)
            finally:
                if k6_proc.poll() is None:
                    k6_proc.kill()
                    k6_proc.wait()
            log.seek(0)
            output = log.read()
    finally:
        cpu = sum(gw.cpu_seconds() for gw in gateways)
        codes = [gw.stop(10) for gw in gateways]
    # Every child has been waited for now: what they used, less the gateways', is k6's.
    k6_cpu = max(0.0, _children_cpu() - children_before - cpu)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return Result(
        case=case,
        returncode=returncode,
        summary=summary,
        output=output,
        gateway_logs=[gw.lines for gw in gateways],
        gateway_returncodes=codes,
        gateway_cpu_seconds=cpu,
        k6_cpu_seconds=k6_cpu,
        seconds=time.monotonic() - started,
    )


def _restart(old: Gateway, clients: int, case: Case, after_s: float) -> Gateway:
    """Once ``clients`` are connected, drain ``old`` and start its successor on its port."""
    if not _wait_for(lambda: (old.metric("rtgateway_connections_current") or 0) >= clients, 60):
        raise RuntimeError(f"{case.name}: the k6 clients did not all connect")
    time.sleep(after_s)  # let messages flow before the restart
    old.signal(signal.SIGTERM)
    old.wait(30)
    return Gateway(old.port or 0, case.gateway_env).start()


FIGURES = {
    "echo": [("echo_messages", "count"), ("echo_rtt", "p(50)"), ("echo_rtt", "p(99)")],
    "rooms": [
        ("rooms_messages_received", "count"),
        ("rooms_seq_gaps", "count"),
        ("rooms_delivery_latency", "p(50)"),
        ("rooms_delivery_latency", "p(99)"),
    ],
    "storm": [("storm_connections", "count"), ("ws_connecting", "p(95)")],
    "storm-503": [("storm_connections", "count"), ("storm_rejected_503", "count")],
    "soak": [("soak_sessions", "count"), ("soak_messages_received", "count")],
    "drain": [
        ("drain_close_1012", "count"),
        ("drain_reconnects", "count"),
        ("drain_reconnect_delay", "p(50)"),
        ("drain_reconnect_delay", "max"),
        ("drain_messages_after_reconnect", "count"),
    ],
}


def _figures(result: Result) -> str:
    parts = []
    for metric, stat in FIGURES.get(result.case.name, []):
        values = result.summary.get("metrics", {}).get(metric, {}).get("values", {})
        value = values.get(stat, 0)
        shown = f"{value:.2f}" if isinstance(value, float) and not value.is_integer() else value
        parts.append(f"{metric}{'' if stat == 'count' else f' {stat}'}={shown}")
    return ", ".join(parts)


def _pairs(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"expected NAME=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _timeout(case: Case) -> float:
    """How long k6 may run: the case's DURATION (a k6 duration) plus two minutes."""
    text = case.knobs.get("DURATION", "60s")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) + 120.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    return sum(float(n) * units[u] for n, u in parts) + 120.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help=f"any of {', '.join(CASES)} (default: all)")
    parser.add_argument("--k6", help="k6 binary (default: $K6, the venv's, or PATH)")
    parser.add_argument("--results", default=str(ROOT / "results" / "smoke"), type=Path)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KNOB=VALUE", help="override a k6 knob"
    )
    parser.add_argument(
        "--restart-after",
        type=float,
        default=1.0,
        metavar="S",
        help="drain: restart the gateway S seconds after all clients connected (default 1)",
    )
    parser.add_argument(
        "--gateway-env", action="append", default=[], metavar="RTG_X=VALUE", help="gateway setting"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    k6 = find_k6(args.k6)
    if k6 is None:
        print("smoke: no k6 found; `make venv` installs it into .venv/bin", file=sys.stderr)
        return 2
    knobs = _pairs(parser, args.set)
    gateway_env = _pairs(parser, args.gateway_env)
    failed = 0
    started = time.monotonic()
    for name in args.cases or list(CASES):
        case = CASES[name]
        case = dataclasses.replace(
            case,
            knobs={**case.knobs, **knobs},
            gateway_env={**case.gateway_env, **gateway_env},
        )
        result = run_case(
            case, k6, args.results, timeout_s=_timeout(case), restart_after_s=args.restart_after
        )
        ok = result.returncode == 0 and result.summary.get("ok", False)
        failed += not ok
        status = "ok  " if ok else f"FAIL (k6 exit {result.returncode})"
        print(
            f"{status} {name:<10} {result.seconds:5.1f} s  cpu_s gateway="
            f"{result.gateway_cpu_seconds:.2f} k6={result.k6_cpu_seconds:.2f}  {_figures(result)}",
            flush=True,
        )
        if not ok:
            print(result.output[-4000:], file=sys.stderr)
    print(f"smoke: {failed} failed, {time.monotonic() - started:.0f} s; results in {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
