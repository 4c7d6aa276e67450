#!/usr/bin/env python3
"""Run the Autobahn fuzzing cases against the gateway's /ws/echo and judge them.

    scripts/conformance.py                      # start a gateway, run 1-7 and 10
    scripts/conformance.py --full               # also 9.* (16 MiB messages), larger limits
    scripts/conformance.py --url ws://127.0.0.1:8083/ws/echo   # a gateway already running
    scripts/conformance.py --full --section '9.*'  # one section

kosoku (requirements/conformance.txt) drives the Autobahn TestSuite's own case
files and writes Autobahn-style reports (index.html, one page per case) under
``--out``. A case passes when its behaviour is OK, NON-STRICT or
INFORMATIONAL and its closing behaviour OK or INFORMATIONAL, as in Autobahn.

A case that does not pass must be a documented exception (:data:`EXCEPTIONS`,
explained in docs/conformance.md) and must fail exactly the documented way;
a documented exception that starts passing is an error too, so the document
cannot go stale. Exit status 0 when all of that holds.

Without ``--url`` the script starts ``python -m rtgateway`` on 127.0.0.1 port 0
with the default (production) settings, and checks its log for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rtgateway.testing import GatewayProcess

SECTIONS = ("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*")
FULL_SECTIONS = (*SECTIONS, "9.*")
# Settings for --full: section 9 sends messages of up to 16 MiB, echoed back
# whole, and 1000 messages per connection as fast as they are echoed (9.7, 9.8):
# /ws/echo applies the connection's rate limits.
FULL_ENV = {
    "RTG_MAX_MESSAGE_BYTES": str(16 * 2**20),
    "RTG_OUTBOX_MAX_BYTES": str(64 * 2**20),
    "RTG_RATE_LIMIT_BYTES_PER_S": "0",
    "RTG_RATE_LIMIT_MSGS_PER_S": "1000000",
    "RTG_RATE_LIMIT_BURST": "1000000",
}
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
PASSING_CLOSE = {"OK", "INFORMATIONAL"}

# case id -> the close code the gateway sends instead, and why (docs/conformance.md).
EXCEPTIONS: dict[str, dict[str, Any]] = {
    "7.1.5": {
        "remoteCloseCode": 1002,
        "why": "a close frame in the middle of a fragmented message: websockets fails the "
        "connection with 1002 'incomplete fragmented message' instead of echoing 1000",
    },
}
# Only with --full: the 4 MiB messages of 9.3.1-9.4.2 come in 64- and 256-byte
# fragments, 16384-65536 of them; websockets reassembles at most 4096 fragments
# (WEBSOCKETS_MAX_FRAGMENTS) and closes with 1009.
FULL_EXCEPTIONS: dict[str, dict[str, Any]] = {
    case: {"remoteCloseCode": 1009, "why": "more than 4096 fragments in one message"}
    for case in ("9.3.1", "9.3.2", "9.4.1", "9.4.2")
}


def kosoku_path() -> Path:
    return Path(sys.executable).parent / "kosoku"


def run_kosoku(url: str, sections: tuple[str, ...], out: Path, timeout: float) -> int:
    args = [str(kosoku_path()), url, "-o", str(out)]
    for section in sections:
        args += ["-i", section]
    # kosoku exits 1 when any case fails; judge() decides what that means here.
    done = subprocess.run(args, timeout=timeout, capture_output=True, text=True)
    if not (out / "index.json").exists():
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"kosoku wrote no report (exit {done.returncode})")
    return done.returncode


def judge(
    out: Path, sections: tuple[str, ...], exceptions: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    index = json.loads((out / "index.json").read_text())
    if len(index) != 1:
        raise SystemExit(f"expected one agent in {out}/index.json, got {list(index)}")
    [(agent, cases)] = index.items()
    verdicts: dict[str, int] = {}
    unexpected: list[str] = []
    documented: list[str] = []
    stale: list[str] = []
    for case_id, result in cases.items():
        behavior, close = result["behavior"], result["behaviorClose"]
        verdicts[behavior] = verdicts.get(behavior, 0) + 1
        passed = behavior in PASSING and close in PASSING_CLOSE
        exception = exceptions.get(case_id)
        if exception is None:
            if not passed:
                unexpected.append(
                    f"{case_id}: {behavior}/{close}, close code {result.get('remoteCloseCode')}"
                )
        elif passed:
            stale.append(f"{case_id}: documented as an exception but now passes")
        elif result.get("remoteCloseCode") != exception["remoteCloseCode"]:
            unexpected.append(
                f"{case_id}: documented exception, but close code "
                f"{result.get('remoteCloseCode')} instead of {exception['remoteCloseCode']}"
            )
        else:
            documented.append(case_id)
    ran_sections = {case_id.split(".")[0] for case_id in cases}
    missing = [s for s in sections if s.split(".")[0] not in ran_sections]
    return {
        "agent": agent,
        "total": len(cases),
        "verdicts": verdicts,
        "passed": len(cases) - len(unexpected) - len(documented) - len(stale),
        "documented_exceptions": sorted(documented),
        "unexpected": unexpected,
        "stale_exceptions": stale,
        "missing_sections": missing,
        "report": str(out / "index.html"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running gateway's echo URL (default: start one)")
    parser.add_argument("--out", default="reports/conformance", help="report directory")
    parser.add_argument("--full", action="store_true", help="also section 9, with 16 MiB limits")
    parser.add_argument(
        "--section", action="append", help="run only these sections, e.g. '9.*' (repeatable)"
    )
    parser.add_argument("--json", dest="json_path", help="also write the summary here")
    parser.add_argument("--timeout", type=float, default=600, help="kosoku time limit, s")
    args = parser.parse_args(argv)

    if not kosoku_path().exists():
        print(f"kosoku is not installed at {kosoku_path()}: run `make venv`", file=sys.stderr)
        return 2
    sections = tuple(args.section or (FULL_SECTIONS if args.full else SECTIONS))
    exceptions = {**EXCEPTIONS, **(FULL_EXCEPTIONS if args.full else {})}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.json"):
        old.unlink()

    tracebacks: list[str] = []
    if args.url:
        run_kosoku(args.url, sections, out, args.timeout)
    else:
        gateway = GatewayProcess(FULL_ENV if args.full else {}).start()
        try:
            run_kosoku(f"ws://127.0.0.1:{gateway.port}/ws/echo", sections, out, args.timeout)
        finally:
            gateway.stop(40)
        tracebacks = gateway.tracebacks()
    summary = judge(out, sections, exceptions)
    summary["gateway_tracebacks"] = tracebacks[:5]

    print(
        f"{summary['agent']}: {summary['total']} cases in {', '.join(sections)}; "
        + ", ".join(f"{n} {v}" for v, n in sorted(summary["verdicts"].items()))
    )
    for case_id in summary["documented_exceptions"]:
        print(f"  documented exception {case_id}: {exceptions[case_id]['why']}")
    for line in summary["unexpected"] + summary["stale_exceptions"] + tracebacks[:5]:
        print(f"  FAIL {line}")
    for section in summary["missing_sections"]:
        print(f"  FAIL no case of section {section} ran")
    print(f"report: {summary['report']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2) + "\n")
    ok = not (
        summary["unexpected"]
        or summary["stale_exceptions"]
        or summary["missing_sections"]
        or tracebacks
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
