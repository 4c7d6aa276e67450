"""Command line: flags and ``RTG_*`` -> Config -> logging -> run. The only place that exits.

Signals are handled here, at the edge: the first SIGTERM, SIGINT or SIGHUP
starts the drain, a second one exits at once with status 1 (a worker ignores
the second: its supervisor escalates). SIGHUP drains because this appliance
has nothing to reload (its unit defines no ExecReload), and a hangup, such as
a closed terminal, must not drop every client without a close frame.

With ``RTG_WORKERS`` > 1 this process becomes the supervisor
(:mod:`rtgateway.supervisor`), which runs this same command once per worker
with the worker's index in the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import structlog
import uvloop

from . import __version__, log, namespaces
from .config import SETTINGS, Config, ConfigError, env_name, flag_name, load
from .namespaces import Namespaces
from .worker import ADDR_ENV, WorkerInfo
from .worker import ENVIRONMENT as worker_environment

__all__ = ["SHUTDOWN_SIGNALS", "main"]

# Each starts the drain (docs/systemd.md, "Signals").
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtgateway",
        description="A room-based WebSocket gateway. Every setting is a flag or an RTG_* "
        "environment variable; a flag beats the environment.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rtgateway {__version__}")
    for setting in SETTINGS:
        default = setting.default if setting.default != "" else "empty"
        parser.add_argument(
            flag_name(setting.name),
            dest=setting.name,
            metavar=setting.metavar or "VALUE",
            help=f"{setting.help} [{env_name(setting.name)}, default: {default}]",
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    try:
        config = load(os.environ, flags, internal=worker_environment)
        # The rules file is read here, so that a bad one stops the supervisor
        # before any worker starts; each worker reads it again (it is given
        # the same flags and environment).
        rules = namespaces.from_config(config)
    except ConfigError as exc:
        print(f"rtgateway: error: {exc}", file=sys.stderr)
        sys.exit(2)
    log.configure(config.log_level, config.log_format)
    worker = WorkerInfo.from_environ(os.environ, config.workers)
    if config.workers > 1 and worker is None:
        from .supervisor import supervise

        sys.exit(supervise(config, sys.argv[1:] if argv is None else argv))
    if worker is not None:
        # The supervisor resolved the address (a port 0 becomes one port for all).
        config = config.replace(addr=os.environ.get(ADDR_ENV, config.addr))
        structlog.contextvars.bind_contextvars(worker=worker.index)
    sys.exit(run(config, worker, rules))


def run(config: Config, worker: WorkerInfo | None = None, rules: Namespaces | None = None) -> int:
    from .app import Gateway

    logger = log.get_logger()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                if worker is not None:
                    # Delivered before the first was handled (below).
                    logger.info("signal_ignored_draining", signal=signal.Signals(signum).name)
                    return
                logger.warning("second_signal_exit", signal=signal.Signals(signum).name)
                os._exit(1)
            logger.info("shutdown_signal", signal=signal.Signals(signum).name)
            stop.set()
            if worker is not None:
                # systemd's default KillMode signals every process of the unit
                # as well as the supervisor, which forwards its own: a worker
                # leaves escalation to the supervisor and ignores the rest
                # until it exits. (Removed from the loop first: closing, the
                # loop would restore the default action, which kills.)
                for other in SHUTDOWN_SIGNALS:
                    loop.remove_signal_handler(other)
                    signal.signal(other, signal.SIG_IGN)

        for signum in SHUTDOWN_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
        await Gateway(config, worker=worker, namespaces=rules).serve(stop.wait)

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve())
    except OSError as exc:
        logger.error("gateway_failed", error=str(exc), addr=config.addr)
        return 1
    return 0


if __name__ == "__main__":
    main()
