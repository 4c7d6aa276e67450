"""structlog setup: JSON lines on stdout, or a console renderer on a terminal.

The standard library's loggers (websockets, asyncio) go through the same
renderer, and websockets' per-connection INFO lines are turned down so ten
thousand clients do not flood the log.

Two defences keep input from the network out of the log and the log
bounded:

- tracebacks are rendered without local variables (structlog shows them by
  default, and a request's locals hold its headers, a bearer token among
  them);
- :class:`RepeatLimiter` writes at most :data:`REPEAT_BURST` warning-or-worse
  events of one name per :data:`REPEAT_WINDOW_S`; the next one written after
  that says how many were left out (``repeats_suppressed``). Every such event
  is counted in :data:`EVENTS` and the ones left out in :data:`SUPPRESSED`
  (``rtgateway_log_events_total{level}`` and
  ``rtgateway_log_events_suppressed_total{level}``), so the real count is
  never lost.

Event names are chosen by the gateway; no field of a log event holds a header
value, a token or a body.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import structlog
from structlog.tracebacks import ExceptionDictTransformer

__all__ = [
    "EVENTS",
    "LEVELS",
    "REPEAT_BURST",
    "REPEAT_WINDOW_S",
    "SUPPRESSED",
    "RepeatLimiter",
    "configure",
    "get_logger",
]

LEVELS: Final = ("warning", "error", "critical")
REPEAT_BURST: Final = 10
REPEAT_WINDOW_S: Final = 10.0
MAX_KEYS: Final = 1024  # event names tracked at once; more are forgotten oldest first
# Warning-or-worse events, by level: every one, and those not written.
EVENTS: dict[str, int] = dict.fromkeys(LEVELS, 0)
SUPPRESSED: dict[str, int] = dict.fromkeys(LEVELS, 0)
_LEVEL_OF = {"warn": "warning", "exception": "error", "fatal": "critical"}


class RepeatLimiter:
    """At most ``burst`` warning-or-worse events of one name per ``window_s``."""

    def __init__(
        self,
        burst: int = REPEAT_BURST,
        window_s: float = REPEAT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        # name -> [window start, written in the window, left out since the last one written]
        self.windows: dict[str, list[float]] = {}

    def allow(self, level: str, name: str) -> tuple[bool, int]:
        """Whether to write an event; with it, how many like it were left out before."""
        level = _LEVEL_OF.get(level, level)
        if level not in EVENTS:
            return True, 0
        EVENTS[level] += 1
        now = self.clock()
        window = self.windows.get(name)
        if window is None or now - window[0] >= self.window_s:
            suppressed = int(window[2]) if window is not None else 0
            if window is None and len(self.windows) >= MAX_KEYS:
                del self.windows[next(iter(self.windows))]
            self.windows.pop(name, None)
            self.windows[name] = [now, 1, 0]
            return True, suppressed
        if window[1] < self.burst:
            window[1] += 1
            suppressed, window[2] = int(window[2]), 0
            return True, suppressed
        window[2] += 1
        SUPPRESSED[level] += 1
        return False, 0

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        """The structlog processor."""
        allowed, suppressed = self.allow(
            str(event_dict.get("level", method_name)), str(event_dict.get("event"))[:200]
        )
        if not allowed:
            raise structlog.DropEvent
        if suppressed:
            event_dict["repeats_suppressed"] = suppressed
        return event_dict


class _RepeatFilter(logging.Filter):
    """The same limit for the standard library's records (websockets, asyncio)."""

    def __init__(self, limiter: RepeatLimiter) -> None:
        super().__init__()
        self.limiter = limiter

    def filter(self, record: logging.LogRecord) -> bool:
        allowed, suppressed = self.limiter.allow(record.levelname.lower(), str(record.msg)[:200])
        if suppressed:
            record.repeats_suppressed = suppressed
        return allowed


def configure(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    numeric = logging.getLevelNamesMapping()[level.upper()]
    limiter = RepeatLimiter()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        # Frames without their local variables: those hold requests and tokens.
        shared.append(
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    structlog.configure(
        processors=[*shared[:2], limiter, *shared[2:], renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_RepeatFilter(limiter))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # websockets logs "connection open" / "server listening" at INFO, per
    # connection; the gateway logs its own events instead.
    logging.getLogger("websockets").setLevel(max(numeric, logging.WARNING))


def get_logger(**bindings: Any) -> Any:
    return structlog.get_logger("rtgateway", **bindings)
