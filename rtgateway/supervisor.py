"""The supervisor of ``RTG_WORKERS=N``: N gateway processes sharing one port.

Each worker is this same command (``python -m rtgateway`` with the same
flags) run as a subprocess with :data:`~rtgateway.worker.INDEX_ENV` set: a full
gateway on its own event loop, listening with ``SO_REUSEPORT`` so the kernel
spreads connections over the workers, and sharing rooms with the others
through the broker (Redis). The supervisor:

- resolves the address once (``:0`` becomes one port every worker binds) and
  holds that port bound, not listening, for its lifetime;
- learns each worker's readiness and liveness from its private socket
  (``ping``: how long ago its event loop ran), never from its logs; workers
  write their own log lines to the inherited stdout;
- restarts a worker that exits, with exponential backoff, while the others
  keep serving;
- alone talks to systemd: ``READY=1`` once every worker is ready, ``STATUS=``,
  and ``WATCHDOG=1`` only while every live worker is responsive (workers get
  no ``NOTIFY_SOCKET``);
- on SIGTERM, SIGINT or SIGHUP forwards SIGTERM to every worker (each drains
  with 1012), waits for all of them, removes its runtime directory and exits
  0; a second signal kills them and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from . import log
from .config import Config, parse_addr
from .notify import Notifier, watchdog_interval
from .worker import ADDR_ENV, DIR_ENV, INDEX_ENV, socket_path

__all__ = ["Supervisor", "supervise"]

POLL_INTERVAL_S = 0.5
STALL_AFTER_S = 5.0  # a worker whose loop has not ticked for this long is unresponsive
START_GRACE_S = 30.0  # how long a starting worker may take before it counts as stalled
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
START_ATTEMPTS = 3  # a worker failing this often before first readiness: give up
STABLE_AFTER_S = 30.0  # a worker up this long resets its restart backoff
STOP_MARGIN_S = 10.0  # beyond the drain timeout, before the stragglers are killed
PR_SET_PDEATHSIG = 1


class Slot:
    """One worker position: the process filling it now, and its history."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.ready = False
        self.last_ok = 0.0  # monotonic time of the last fresh heartbeat
        self.restarts = 0
        self.failures = 0


class Supervisor:
    def __init__(
        self,
        config: Config,
        argv: list[str],
        *,
        notifier: Notifier | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.argv = argv
        self.environ = dict(os.environ) if environ is None else environ
        self.notifier = notifier or Notifier(self.environ)
        self.log = log.get_logger(role="supervisor")
        self.slots = [Slot(i) for i in range(config.workers)]
        self.stopping = False
        self.announced = False
        self.directory = ""
        self.addr = config.addr
        self.reservation: socket.socket | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop_event = asyncio.Event()
        self.gave_up = asyncio.Event()  # a worker could not start at all

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[Any]]) -> int:
        """Start the workers, run until ``shutdown_trigger()`` returns, then drain them.

        Also returns, with status 1, when a worker fails to start
        :data:`START_ATTEMPTS` times in a row before the gateway was ever
        ready: restarting it for ever would hide the error from systemd.
        """
        self.start()
        trigger = asyncio.ensure_future(shutdown_trigger())
        gave_up = asyncio.ensure_future(self.gave_up.wait())
        try:
            await asyncio.wait({trigger, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            trigger.cancel()
            gave_up.cancel()
            clean = await self.stop()
        return 0 if clean and not self.gave_up.is_set() else 1

    # Startup.

    def start(self) -> None:
        self.addr = self._reserve_addr()
        self.directory = tempfile.mkdtemp(
            prefix="rtgateway-", dir=self.environ.get("RUNTIME_DIRECTORY") or None
        )
        self.log.info(
            "supervisor_starting", workers=len(self.slots), addr=self.addr, pid=os.getpid()
        )
        for slot in self.slots:
            self._spawn(self._keep(slot))
        self._spawn(self._watch())

    def _reserve_addr(self) -> str:
        """Turn port 0 into one concrete port that every worker can bind."""
        host, port = parse_addr(self.config.addr)
        if port != 0:
            return self.config.addr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
        self.reservation = sock  # bound, never listening: it takes no connections
        port = sock.getsockname()[1]
        return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _worker_env(self, index: int) -> dict[str, str]:
        env = dict(self.environ)
        # Only the supervisor speaks to systemd.
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        env[INDEX_ENV] = str(index)
        env[DIR_ENV] = self.directory
        env[ADDR_ENV] = self.addr
        return env

    async def _keep(self, slot: Slot) -> None:
        """Keep a worker running in ``slot`` until the supervisor stops."""
        while not self.stopping:
            slot.started = time.monotonic()
            slot.ready = False
            slot.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rtgateway",
                *self.argv,
                env=self._worker_env(slot.index),
                # Its own session: a terminal's ^C reaches the supervisor only,
                # which forwards one SIGTERM (a second would abort the drain).
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            self.log.info("worker_started", worker=slot.index, pid=slot.proc.pid)
            if self.stopping:  # stop() began while this worker was being started
                slot.proc.send_signal(signal.SIGTERM)
            rc = await slot.proc.wait()
            slot.ready = False
            if self.stopping:
                self.log.info("worker_exited", worker=slot.index, returncode=rc)
                return
            uptime = time.monotonic() - slot.started
            slot.failures = 1 if uptime >= STABLE_AFTER_S else slot.failures + 1
            slot.restarts += 1
            if not self.announced and slot.failures >= START_ATTEMPTS:
                self.log.error(
                    "worker_start_failed",
                    worker=slot.index,
                    returncode=rc,
                    attempts=slot.failures,
                )
                self.gave_up.set()
                return
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (slot.failures - 1))
            self.log.warning(
                "worker_died",
                worker=slot.index,
                returncode=rc,
                uptime_s=round(uptime, 3),
                restart_in_s=delay,
                restarts=slot.restarts,
            )
            self.notifier.notify(f"STATUS=worker {slot.index} died; restarting in {delay:g} s")
            with contextlib.suppress(TimeoutError):
                # A stop during the backoff ends the wait at once.
                await asyncio.wait_for(self._stopped(), timeout=delay)

    async def _stopped(self) -> None:
        await self.stop_event.wait()

    async def _watch(self) -> None:
        """Readiness, liveness, status and the systemd watchdog."""
        interval = watchdog_interval(self.environ) if self.notifier.enabled else None
        last_feed = 0.0
        last_status = 0.0
        while not self.stopping:
            await asyncio.gather(*(self._ping(slot) for slot in self.slots))
            now = time.monotonic()
            if not self.announced and all(s.ready for s in self.slots):
                self.announced = True
                self.notifier.notify("READY=1", f"STATUS=serving with {len(self.slots)} workers")
                self.log.info(
                    "supervisor_ready",
                    workers=len(self.slots),
                    addresses=[self.addr],
                    pids=[s.proc.pid for s in self.slots if s.proc is not None],
                )
            if interval is not None and now - last_feed >= interval and self._healthy(now):
                self.notifier.notify("WATCHDOG=1")
                last_feed = now
            if self.announced and now - last_status >= 5.0:
                ready = sum(s.ready for s in self.slots)
                self.notifier.notify(f"STATUS=serving with {ready}/{len(self.slots)} workers")
                last_status = now
            pause = POLL_INTERVAL_S if interval is None else min(POLL_INTERVAL_S, interval)
            await asyncio.sleep(pause)

    async def _ping(self, slot: Slot) -> None:
        if slot.proc is None or slot.proc.returncode is not None:
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(socket_path(self.directory, slot.index)), 1.0
            )
        except (OSError, TimeoutError):
            return  # not listening yet, or gone
        try:
            writer.write(b"ping\n")
            reply = await asyncio.wait_for(reader.read(64), 1.0)
        except (OSError, TimeoutError):
            return
        finally:
            writer.close()
        parts = reply.split()
        if len(parts) == 2 and parts[0] == b"ok":
            try:
                age = float(parts[1])
            except ValueError:
                return
            if age < STALL_AFTER_S:
                slot.last_ok = time.monotonic()
                if not slot.ready:
                    slot.ready = True
                    self.log.info("worker_ready", worker=slot.index, pid=slot.proc.pid)

    def _healthy(self, now: float) -> bool:
        """Every worker responsive, starting (within its grace), or being restarted."""
        for slot in self.slots:
            if slot.proc is None or slot.proc.returncode is not None:
                continue  # dead: _keep restarts it; systemd killing the rest would not help
            if slot.ready and now - slot.last_ok < STALL_AFTER_S:
                continue
            if not slot.ready and now - slot.started < START_GRACE_S:
                continue
            return False
        return True

    # Shutdown.

    async def stop(self) -> bool:
        """Drain every worker; True when all of them exited on their own."""
        self.stopping = True
        self.stop_event.set()
        live = [s for s in self.slots if s.proc is not None and s.proc.returncode is None]
        self.notifier.notify("STOPPING=1", f"STATUS=draining {len(live)} workers")
        self.log.info("supervisor_draining", workers=len(live))
        # 1. Forward the drain.
        for slot in live:
            assert slot.proc is not None
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGTERM)
        # 2. Wait for every worker, bounded by its own drain timeout and a margin.
        timeout = self.config.drain_timeout_s + STOP_MARGIN_S
        waits = [s.proc.wait() for s in live if s.proc is not None]
        clean = True
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            clean = False
            self.kill()
            self.log.warning("supervisor_killed_workers", timeout_s=timeout)
        # 3. Stop our own tasks and clean up.
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.reservation is not None:
            self.reservation.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.log.info("supervisor_stopped", clean=clean)
        return clean

    def kill(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()


def _die_with_parent() -> None:
    # Linux: a worker whose supervisor is SIGKILLed gets SIGTERM and drains,
    # instead of serving on unsupervised.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(config: Config, argv: list[str]) -> int:
    """Run the supervisor until SIGTERM, SIGINT or SIGHUP; the exit status."""
    logger = log.get_logger(role="supervisor")

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        supervisor = Supervisor(config, argv)

        def on_signal(signum: int) -> None:
            if stop.is_set():
                logger.warning("second_signal_exit", signal=signal.Signals(signum).name)
                supervisor.kill()
                os._exit(1)
            logger.info("shutdown_signal", signal=signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, on_signal, signum)
        return await supervisor.serve(stop.wait)

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    except OSError as exc:
        logger.error("supervisor_failed", error=str(exc), addr=config.addr)
        return 1
