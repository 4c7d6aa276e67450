"""The figures of a bench/c100k.py run: the summary, its table, the goals, the plot.

:func:`figures` turns what the run collected (raw arrays of handshake times
and of every delivery's latency) into the summary that is printed and stored
as JSON; :func:`plot` draws connections, gateway RSS and delivery latency
over the run. Nothing here runs anything.
"""

from __future__ import annotations

import sys
from array import array
from collections import defaultdict
from typing import Any

__all__ = ["figures", "plot", "print_report"]

GOAL_HOLD_S = 60.0
GOAL_KIB_PER_CONNECTION = 16.0
SERVICE_RESTART = 1012
PHASE_COLOURS = {
    "connect": "tab:blue",
    "idle": "tab:grey",
    "rooms": "tab:green",
    "large": "tab:orange",
    "drain": "tab:red",
}


def percentiles_ms(values: array[Any], scale: float) -> dict[str, float | None]:
    """p50/p95/p99/max in ms of ``values`` (``scale``: their unit in ms)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return round(float(ordered[min(n - 1, int(q * n))]) * scale, 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": at(1.0)}


def _kib(total_bytes: float, connections: int) -> float | None:
    return round(total_bytes / connections / 1024, 2) if connections else None


def _memory(report: dict[str, Any], connected: int) -> dict[str, Any]:
    before, after = report["memory"]["before"], report["memory"]["after"]
    gateway = sum(after["gateway_rss"]) - sum(before["gateway_rss"])
    load = sum(after["load_rss"]) - sum(before["load_rss"])
    host = after["used"] - before["used"]
    return {
        "gateway_rss_mib_before": [round(v / 2**20, 1) for v in before["gateway_rss"]],
        "gateway_rss_mib_after": [round(v / 2**20, 1) for v in after["gateway_rss"]],
        "gateway_kib_per_connection": _kib(gateway, connected),
        "host_used_kib_per_connection": _kib(host, connected),
        "host_less_load_kib_per_connection": _kib(host - load, connected),
        "load_rss_kib_per_connection": _kib(load, connected),
        "kernel_slab_kib_per_connection": _kib(after["slab"] - before["slab"], connected),
        "kernel_tcp_buffers_kib_per_connection": _kib(
            after["tcp_buffers"] - before["tcp_buffers"], connected
        ),
        "tcp_sockets_added": after["tcp_sockets"] - before["tcp_sockets"],
    }


def _phase(phase: dict[str, Any]) -> dict[str, Any]:
    latency: array[int] = phase.pop("latency_ns")
    received_at: array[int] = phase.pop("received_at_ns")
    started = phase.pop("started_ns")
    last_sent = phase.pop("last_sent_ns")
    out = dict(phase)
    out["latency_ms"] = percentiles_ms(latency, 1e-6)
    received = phase["deliveries_received"]
    if received_at:
        last = max(received_at)
        span_s = (last - started) / 1e9
        out["deliveries_per_s"] = round(received / span_s) if span_s > 0 else None
        out["backlog_s"] = round((last - last_sent) / 1e9, 2)
    else:
        out["deliveries_per_s"] = out["backlog_s"] = None
    cpu = phase["gateway_cpu_s"]
    out["deliveries_per_gateway_cpu_s"] = round(received / cpu) if cpu else None
    return out


def _latency_timeline(report: dict[str, Any], t0_ns: int) -> list[dict[str, Any]]:
    """p50/p99/max of the deliveries received in each second of the run."""
    bins: dict[int, array[int]] = defaultdict(lambda: array("q"))
    for phase in report.get("phases", {}).values():
        for at, latency in zip(phase["received_at_ns"], phase["latency_ns"], strict=True):
            bins[(at - t0_ns) // 1_000_000_000].append(latency)
    rows = []
    for second in sorted(bins):
        p = percentiles_ms(bins[second], 1e-6)
        rows.append({"t": second + 0.5, "n": len(bins[second]), **p})
    return rows


def _per_worker(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    clients = report["connect"]["per_worker_clients"]
    counters = report.get("gateway", {})
    workers = sorted(set(clients) | set(counters.get("connections_current", {})), key=int)
    return {
        w: {
            "clients": clients.get(w, 0),
            "gateway_connections": int(counters.get("connections_current", {}).get(w, 0)),
            "gateway_opened": int(counters.get("connections_opened", {}).get(w, 0)),
            "handshake_rejections": counters.get("handshake_rejections", {}).get(w, {}),
            "event_loop_lags": counters.get("event_loop_lags", {}).get(w, {}),
        }
        for w in workers
    }


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The summary of a run: every figure, the goals, the timelines."""
    conn = dict(report.get("connect", {}))
    connected = conn.get("connected", 0)
    summary: dict[str, Any] = {
        k: report.get(k) for k in ("label", "cores", "elapsed_s", "held_s", "open_before_drain")
    }
    summary["args"] = report["args"]
    if conn:
        handshake, opened = conn.pop("handshake_s"), conn.pop("open_s")
        conn["handshake_ms"] = percentiles_ms(handshake, 1e3)
        conn["open_and_join_ms"] = percentiles_ms(opened, 1e3)
        conn["per_worker"] = _per_worker(report)
        summary["connect"] = conn
    if "memory" in report:
        summary["memory"] = _memory(report, connected)
    if "idle" in report:
        idle = dict(report["idle"])
        cores = idle["gateway_cpu_s"] / idle["seconds"]
        idle["gateway_cores"] = round(cores, 3)
        idle["gateway_cores_per_100k"] = round(cores * 100_000 / max(1, idle["open"]), 3)
        idle["gateway_us_per_connection_s"] = round(cores * 1e6 / max(1, idle["open"]), 2)
        summary["idle"] = idle
    summary["latency_timeline"] = _latency_timeline(report, report["t0_ns"])
    summary["phases"] = {name: _phase(p) for name, p in report.get("phases", {}).items()}
    summary["drain"] = report.get("drain", {})
    summary["gateway"] = report.get("gateway", {})
    summary["gateway_warnings"] = report.get("gateway_warnings", {})
    summary["gateway_warning_lines"] = report.get("gateway_warning_lines", [])
    summary["redis_cpu_s_total"] = report.get("redis_cpu_s_total")
    summary["events"] = report["events"]
    summary["timeline"] = report["timeline"]
    summary["goals"] = goals(summary)
    return summary


def goals(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's goals, each with the figure that decides it."""
    target = s["args"]["connections"]
    conn = s.get("connect", {})
    phases = s.get("phases", {}).values()
    lost = sum(p["lost"] for p in phases)
    unacked = sum(p["published"] - p["acked"] for p in phases)
    gaps = sum(p["seq_gaps"] for p in phases)
    kib = s.get("memory", {}).get("gateway_kib_per_connection")
    codes = s.get("drain", {}).get("close_codes", {})
    restart = codes.get(SERVICE_RESTART, 0)
    held = s.get("held_s") or 0
    drain = s.get("drain", {})
    rows = [
        (
            f"all {target:,} connected, none failed",
            conn.get("connected") == target and conn.get("failed") == 0,
            f"{conn.get('connected', 0):,} connected, {conn.get('failed', 0):,} failed",
        ),
        (
            f"held >= {GOAL_HOLD_S:g} s, none dropped",
            held >= GOAL_HOLD_S and s.get("open_before_drain") == conn.get("connected"),
            f"{held:g} s, {s.get('open_before_drain')} open at SIGTERM",
        ),
        (
            "publications to the small rooms and to the large room",
            len(s.get("phases", {})) == 2,
            ", ".join(s.get("phases", {})) or "none",
        ),
        ("nothing lost", bool(phases) and lost == 0, f"{lost:,} deliveries lost"),
        ("every publication acknowledged", unacked == 0, f"{unacked} not acknowledged"),
        ("no seq gaps", bool(phases) and gaps == 0, f"{gaps:,} gaps"),
        (
            f"<= {GOAL_KIB_PER_CONNECTION:g} KiB gateway RSS per connection",
            kib is not None and kib <= GOAL_KIB_PER_CONNECTION,
            f"{kib} KiB",
        ),
        (
            "every client closed 1012 on drain",
            bool(restart) and restart == conn.get("connected"),
            ", ".join(f"{code}: {n:,}" for code, n in codes.items()) or "no closes seen",
        ),
        (
            "drain exit status 0",
            drain.get("exit_status") == 0,
            f"exit {drain.get('exit_status')} in {drain.get('seconds')} s",
        ),
    ]
    return [{"goal": g, "met": bool(met), "value": v} for g, met, v in rows]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _shorten(counts: dict[str, int], limit: int = 8) -> str:
    items = [f"{k}: {v:,}" for k, v in list(counts.items())[:limit]]
    more = len(counts) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def print_report(report: dict[str, Any], s: dict[str, Any]) -> None:
    out = sys.stdout
    a = s["args"]
    print(
        f"\nc100k: {a['connections']:,} connections, {a['workers']} workers, "
        f"{a['load_procs']} load processes, {s['cores']} cores, {s['elapsed_s']} s in all",
        file=out,
    )
    c = s.get("connect", {})
    if c:
        print("\nconnections", file=out)
        print(
            f"  opened {_fmt(c['connected'])}, failed {_fmt(c['failed'])} {c['failures'] or ''}",
            file=out,
        )
        print(
            f"  in {c['seconds']} s: {_fmt(c['rate_per_s'])} connections/s"
            f" (window halved {c['window_cuts']} times)",
            file=out,
        )
        h, o = c["handshake_ms"], c["open_and_join_ms"]
        print(
            f"  handshake ms p50/p99/max {h['p50']}/{h['p99']}/{h['max']};"
            f" with the joins {o['p50']}/{o['p99']}/{o['max']}",
            file=out,
        )
        print(
            "  per worker: clients whose hello came from it; its own count of open and of"
            " opened connections before SIGTERM (the publisher's included); how often its"
            " event loop ran a timer over 0.25 s and over 1 s late (the whole run);"
            " handshakes it refused",
            file=out,
        )
        print(
            f"  {'worker':>8}{'clients':>10}{'open':>10}{'opened':>10}"
            f"{'lag>0.25s':>11}{'lag>1s':>8}  refused",
            file=out,
        )
        for w, row in c["per_worker"].items():
            lags = row["event_loop_lags"]
            print(
                f"  {w:>8}{row['clients']:>10,}{row['gateway_connections']:>10,}"
                f"{row['gateway_opened']:>10,}{_fmt(lags.get('over_0.25_s')):>11}"
                f"{_fmt(lags.get('over_1.0_s')):>8}  {row['handshake_rejections'] or ''}",
                file=out,
            )
    m = s.get("memory")
    if m:
        print("\nmemory per connection (KiB)", file=out)
        for key, title in (
            ("gateway_kib_per_connection", "gateway RSS (all workers)"),
            ("host_used_kib_per_connection", "host used (MemTotal - MemAvailable)"),
            ("host_less_load_kib_per_connection", "host used less the load processes' RSS"),
            ("kernel_slab_kib_per_connection", "kernel slab (both ends of each socket)"),
            ("kernel_tcp_buffers_kib_per_connection", "kernel TCP buffers (sockstat mem)"),
            ("load_rss_kib_per_connection", "load processes' RSS"),
        ):
            print(f"  {title:<44}{_fmt(m[key]):>10}", file=out)
        print(f"  gateway RSS MiB per worker: {m['gateway_rss_mib_after']}", file=out)
    idle = s.get("idle")
    if idle:
        print(f"\nidle ({idle['seconds']} s, nothing published)", file=out)
        print(
            f"  gateway {idle['gateway_cores']} cores ({idle['gateway_cores_per_100k']} per 100k"
            f" connections, {idle['gateway_us_per_connection_s']} µs per connection-second);"
            f" load {idle['load_cpu_s']} CPU-s; host CPU busy {100 * idle['host_cpu_busy']:.0f} %",
            file=out,
        )
    for name, p in s["phases"].items():
        lat = p["latency_ms"]
        print(
            f"\npublishing: {name} ({p['rooms']} room(s) of {p['members_per_room']:,.0f},"
            f" {p['rate']:g}/s for {p['duration_s']:g} s)",
            file=out,
        )
        rows = [
            (
                "published / acknowledged",
                f"{p['published']} / {p['acked']}"
                + (f" refused {p['refused']}" if p["refused"] else "")
                + (f" unanswered {p['unanswered']}" if p["unanswered"] else ""),
            ),
            (
                "deliveries expected / received",
                f"{_fmt(p['deliveries_expected'])} / {_fmt(p['deliveries_received'])}",
            ),
            ("lost (rooms short)", f"{_fmt(p['lost'])} ({len(p['rooms_with_loss'])})"),
            (
                "seq gaps (publications skipped)",
                f"{_fmt(p['seq_gaps'])} ({_fmt(p['seq_missing'])})",
            ),
            (
                "deliveries/s (offered)",
                f"{_fmt(p['deliveries_per_s'])} ({_fmt(p['offered_deliveries_per_s'])})",
            ),
            ("deliveries per gateway CPU-s", _fmt(p["deliveries_per_gateway_cpu_s"])),
            (
                "gateway / Redis / load CPU-s",
                f"{p['gateway_cpu_s']} / {p['redis_cpu_s']} / {p['load_cpu_s']}",
            ),
            ("host CPU busy", f"{100 * p['host_cpu_busy']:.0f} %"),
            ("latency ms p50/p95/p99/max", f"{lat['p50']}/{lat['p95']}/{lat['p99']}/{lat['max']}"),
            ("last delivery after the last publication", f"{p['backlog_s']} s"),
        ]
        for title, value in rows:
            print(f"  {title:<44}{value}", file=out)
        if p["refused_by_room"]:
            print(f"  refused publications by room: {_shorten(p['refused_by_room'])}", file=out)
        if p["rooms_with_loss"]:
            print(f"  rooms short of deliveries: {_shorten(p['rooms_with_loss'])}", file=out)
        for worker, rooms in p["silent_members"].items():
            print(
                f"  worker {worker}: {sum(rooms.values()):,} members received nothing,"
                f" in {len(rooms)} room(s): {_shorten(rooms)}",
                file=out,
            )
    d = s.get("drain", {})
    print(
        f"\ndrain: exit {d.get('exit_status')} after {d.get('seconds')} s;"
        f" close codes seen {d.get('close_codes')}; still open {d.get('still_open')}",
        file=out,
    )
    if s["gateway_warnings"]:
        print(f"gateway warnings: {s['gateway_warnings']}", file=out)
        for line in s["gateway_warning_lines"][:3]:
            print(f"  {line[:200]}", file=out)
    print("\ngoals (issue 16)", file=out)
    for g in s["goals"]:
        print(f"  [{'met' if g['met'] else 'NOT met':>7}] {g['goal']}: {g['value']}", file=out)
    out.flush()


def plot(report: dict[str, Any], s: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -r requirements/bench.txt)")
        return
    rows = s["timeline"]
    t = [r["t"] for r in rows]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    top.plot(t, [r["open"] for r in rows], label="open (load side)", color="tab:blue")
    top.plot(t, [r["failed"] for r in rows], label="failed", color="tab:red")
    scraped = [r for r in rows if "gateway_connections" in r]
    workers = sorted({w for r in scraped for w in r["gateway_connections"]}, key=int)
    for w in workers:
        top.plot(
            [r["t"] for r in scraped],
            [r["gateway_connections"].get(w) for r in scraped],
            linewidth=0.8,
            marker=".",
            label=f"worker {w} (/metrics)",
        )
    top.set_ylabel("WebSockets")
    base_rss = sum(rows[0]["gateway_rss"]) if rows else 0
    base_host = rows[0]["host_used"] if rows else 0
    middle.plot(t, [sum(r["gateway_rss"]) / 2**20 for r in rows], label="gateway RSS, all workers")
    middle.plot(
        t,
        [(r["host_used"] - base_host + base_rss) / 2**20 for r in rows],
        label="host used (from the same base)",
        linestyle="--",
    )
    middle.set_ylabel("MiB")
    lat = s["latency_timeline"]
    for key, style in (("p50", "-"), ("p99", "-"), ("max", ":")):
        bottom.plot([r["t"] for r in lat], [r[key] for r in lat], style, marker=".", label=key)
    bottom.set_yscale("log")
    bottom.set_ylabel("publish to receive, ms")
    bottom.set_xlabel("seconds since the start of the run")
    events = s["events"]
    for ax in (top, middle, bottom):
        for phase, colour in PHASE_COLOURS.items():
            if f"{phase}_start" in events and f"{phase}_end" in events:
                ax.axvspan(
                    events[f"{phase}_start"],
                    events[f"{phase}_end"],
                    color=colour,
                    alpha=0.08,
                    label=f"{phase} phase" if ax is top else None,
                )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    a = s["args"]
    top.set_title(
        f"c100k: {a['connections']:,} connections, {a['workers']} workers, "
        f"{a['load_procs']} load processes, {s['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
