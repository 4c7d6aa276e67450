"""sd_notify: readiness, status, watchdog and stopping, only under systemd.

Nothing is sent unless ``NOTIFY_SOCKET`` is set. The gateway feeds the
watchdog from its event loop (``app.py``), so a stalled loop stops feeding it
and systemd restarts the service.
"""

from __future__ import annotations

import os

import sdnotify

__all__ = ["Notifier", "watchdog_interval"]


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ) if environ is None else environ
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None

    def notify(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Half of ``WATCHDOG_USEC``, when the watchdog is meant for this process."""
    environ = dict(os.environ) if environ is None else environ
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2 / 1_000_000
    except ValueError:
        return None
