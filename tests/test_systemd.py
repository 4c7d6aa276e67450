"""The systemd appliance: deploy/install.sh, the hardened notify unit, the sysctl drop-in.

The first tests lint the files on the host (systemd-analyze, bash). The system
tests boot a real systemd in a container with systemd-nspawn, from the Debian
tree that ``.ci/systemd-rootfs.sh`` debootstraps once and caches. The tree is
booted with ``--volatile=overlay``: every run starts from the same state and
nothing a test does reaches the cache. The repository is bound in read-only;
inside, ``deploy/install.sh wheels`` builds the wheelhouse with the container's
own Python (dependencies may depend on its exact version: redis needs
async-timeout before 3.11.3) and ``install --wheels`` installs from it offline.
The container shares the host's network, so the service answers on
127.0.0.1:PORT to real ``websockets`` clients in this process.

The container is booted once for the module and always powered off.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, free_port, http_get, require, require_root, require_tool, wait_until
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rtgateway.config import SETTINGS, Config, env_name
from rtgateway.supervisor import STOP_MARGIN_S

UNIT = ROOT / "deploy/systemd/rtgateway.service"
SYSCTL = ROOT / "deploy/systemd/60-rtgateway.conf"
ENV_EXAMPLE = ROOT / "deploy/systemd/rtgateway.env"
INSTALL = ROOT / "deploy/install.sh"
MAX_EXPOSURE = 2.0
EXPOSURE_RE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# pip's downloads, kept across runs (the container's own tree is thrown away).
CI_CACHE = Path(os.environ.get("RTGATEWAY_CI_CACHE", "/var/cache/rtgateway-ci"))
PIP_CACHE = CI_CACHE / "systemd-pip-cache"
WHEELS = "/var/tmp/wheels"
INSTALL_CMD = ("/src/deploy/install.sh", "install", "--wheels", WHEELS)


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    scale = {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


def exposure(output: str) -> float:
    match = EXPOSURE_RE.search(output)
    assert match, output[-2000:]
    return float(match.group(1))


# The files, checked on the host.


def test_unit_passes_systemd_analyze_verify_with_no_output(tmp_path: Path) -> None:
    """systemd-analyze verify has nothing to say about the unit."""
    analyze = require_tool("systemd-analyze")
    # The unit names /opt/rtgateway, which only an install creates (the system
    # tests verify that copy); here it points at this environment's gateway.
    entry_point = Path(sys.executable).parent / "rtgateway"
    assert entry_point.exists(), entry_point
    unit = tmp_path / "rtgateway.service"
    text = UNIT.read_text()
    assert "ExecStart=/opt/rtgateway/bin/rtgateway\n" in text
    unit.write_text(text.replace("/opt/rtgateway/bin/rtgateway", str(entry_point)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_exposure_score_is_at_most_2_0() -> None:
    """systemd-analyze security rates the unit's exposure at most 2.0."""
    analyze = require_tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", f"--threshold={round(MAX_EXPOSURE * 10)}", UNIT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exposure(result.stdout) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_is_a_notify_service_with_watchdog_restart_and_file_limit() -> None:
    """The unit is Type=notify, restarts on failure, has a watchdog and a file limit."""
    unit = unit_settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["Restart"] == ["on-failure"]
    assert "StartLimitBurst" in unit and "StartLimitIntervalSec" in unit
    assert unit["LimitNOFILE"] == ["200000"]
    assert unit["EnvironmentFile"] == ["-/etc/default/rtgateway"]
    assert seconds(unit["WatchdogSec"][0]) > 0
    # Process metrics read /proc/stat, which ProcSubset=pid hides.
    assert "ProcSubset" not in unit


def test_stop_timeout_outlasts_the_default_drain() -> None:
    """TimeoutStopSec outlasts the slowest drain the defaults allow."""
    unit = unit_settings(UNIT.read_text())
    defaults = Config()
    # A single gateway gives up at the drain timeout; a supervisor (RTG_WORKERS
    # > 1) waits for its workers a margin longer, then kills them and exits.
    slowest_exit_s = defaults.drain_timeout_s + max(defaults.close_timeout_s, STOP_MARGIN_S)
    assert seconds(unit["TimeoutStopSec"][0]) > slowest_exit_s


def test_env_example_lists_every_setting_with_its_default() -> None:
    """The environment file example lists every setting, commented, with its default."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    commented = dict(
        line[1:].split("=", 1) for line in lines if re.match(r"#RTG_[A-Z0-9_]+=", line)
    )
    assert not [line for line in lines if line.strip() and not line.startswith("#")]
    for setting in SETTINGS:
        name = env_name(setting.name)
        assert name in commented, f"{name} missing from {ENV_EXAMPLE.name}"
        if name != "RTG_LOG_FORMAT":  # the unit sets json; the example says so
            assert commented[name] == setting.default, name
    assert set(commented) == {env_name(s.name) for s in SETTINGS}


def test_sysctl_dropin_explains_every_key_and_names_real_ones() -> None:
    """The sysctl drop-in explains each key, and each key exists in the kernel."""
    lines = SYSCTL.read_text().splitlines()
    keys = []
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith("#"):
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        assert value.isdigit(), line
        assert lines[i - 1].startswith("#"), f"{key} has no comment saying why"
        keys.append(key)
    assert {"net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog"} <= set(keys)
    assert "net.core.netdev_max_backlog" in keys
    for key in keys:
        assert Path("/proc/sys", *key.split(".")).exists(), key


def test_install_script_parses() -> None:
    """The install script parses as bash."""
    result = subprocess.run(["bash", "-n", INSTALL], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")


# A real systemd in a container.


class Machine:
    """A container booted with systemd-nspawn, driven with nsenter."""

    def __init__(
        self, rootfs: Path, binds_ro: dict[Path, str], binds: dict[Path, str], log_path: Path
    ) -> None:
        self.name = f"rtg-test-{os.getpid()}"
        self.log_path = log_path
        self.cmd = [
            "systemd-nspawn",
            f"--directory={rootfs}",
            "--volatile=overlay",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            f"--machine={self.name}",
            *(f"--bind-ro={src}:{dest}" for src, dest in binds_ro.items()),
            *(f"--bind={src}:{dest}" for src, dest in binds.items()),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 90) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.leader = wait_until(self._find_leader, 30, what="the container's init")

        def booted() -> bool:
            result = self.run("systemctl", "is-system-running", "--wait", check=False)
            return result.stdout.strip() in ("running", "degraded")

        wait_until(booted, timeout, interval=0.5, what="systemd to finish booting")

    def _find_leader(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited:\n{self.log_path.read_text()[-3000:]}")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        pids = children.read_text().split() if children.exists() else []
        return int(pids[0]) if pids else 0

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120, **env_vars: str
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside, as root, with a clean environment (plus ``env_vars``)."""
        env = ["env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "SYSTEMD_COLORS=0"]
        env += [f"{name}={value}" for name, value in env_vars.items()]
        result = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", *env, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def write(self, path: str, text: str) -> None:
        self.run("mkdir", "-p", str(Path(path).parent))
        self.run("sh", "-c", f"cat > {path} <<'EOF'\n{text}EOF\n")

    def show(self, *props: str) -> dict[str, str]:
        args = [f"--property={p}" for p in props]
        out = self.run("systemctl", "show", *args, "rtgateway.service").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.run(
            "journalctl", "--unit=rtgateway.service", "--output=cat", "--no-pager"
        ).stdout

    def poweroff(self) -> None:
        if self.proc is None:
            return
        if self.leader and self.proc.poll() is None:
            self.run("systemctl", "poweroff", check=False, timeout=30)
        try:
            self.proc.wait(60)
            return
        except subprocess.TimeoutExpired:
            pass
        # SIGTERM asks nspawn for an orderly shutdown; SIGKILL of the
        # container's init ends every process in its PID namespace.
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            if self.leader:
                os.kill(self.leader, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(20)


class Appliance:
    """The installed gateway inside a booted :class:`Machine`."""

    def __init__(self, machine: Machine, port: int) -> None:
        self.machine = machine
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws"

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.machine.run("systemctl", *args, check=check)

    def start(self) -> None:
        """Start the unit unless running; clear the start rate limit first."""
        self.systemctl("reset-failed", "rtgateway.service", check=False)
        self.systemctl("start", "rtgateway.service")

    def healthy(self) -> bool:
        try:
            return http_get(self.url + "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    def restarted_after(self, before: dict[str, str]) -> dict[str, str] | None:
        """The unit's state once systemd restarted it and it is ready again."""
        now = self.machine.show("MainPID", "NRestarts", "ActiveState", "SubState")
        if (
            int(now["NRestarts"]) > int(before["NRestarts"])
            and now["MainPID"] not in ("0", before["MainPID"])
            and (now["ActiveState"], now["SubState"]) == ("active", "running")
        ):
            return now
        return None


@pytest.fixture(scope="module")
def rootfs() -> Path:
    require_root()
    for tool in ("systemd-nspawn", "nsenter", "debootstrap"):
        require_tool(tool)
    result = subprocess.run(
        ["bash", str(ROOT / ".ci/systemd-rootfs.sh")], capture_output=True, text=True, timeout=900
    )
    require(result.returncode == 0, f"could not build the container rootfs: {result.stderr}")
    return Path(result.stdout.strip())


@pytest.fixture(scope="module")
def appliance(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    log_path = tmp_path_factory.mktemp("nspawn") / "console.log"
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    machine = Machine(rootfs, {ROOT: "/src"}, {PIP_CACHE: "/root/.cache/pip"}, log_path)
    try:
        machine.boot()
        # The one step that reaches the package index, as pip on the host does.
        machine.run(
            "/src/deploy/install.sh",
            "wheels",
            WHEELS,
            timeout=600,
            PIP_CERT="/etc/ssl/certs/ca-certificates.crt",
        )
        app = Appliance(machine, free_port())
        api_port = free_port()
        while api_port == app.port:
            api_port = free_port()
        # The operator's settings exist before the install, which must keep them.
        # The container shares the host's network: no default port may be used.
        machine.write(
            "/etc/default/rtgateway",
            f"RTG_ADDR=127.0.0.1:{app.port}\n"
            f"RTG_API_ADDR=127.0.0.1:{api_port}\n"
            "RTG_DRAIN_WINDOW_S=1\n"
            "RTG_STATS_INTERVAL_S=0\n",
        )
        machine.run(*INSTALL_CMD)
        yield app
    finally:
        machine.poweroff()


@pytest.mark.system
def test_install_keeps_the_operators_settings_and_the_unit_verifies(
    appliance: Appliance,
) -> None:
    """Installing keeps the operator's settings and installs a unit that verifies."""
    run = appliance.machine.run
    assert f"RTG_ADDR=127.0.0.1:{appliance.port}" in run("cat", "/etc/default/rtgateway").stdout
    assert run("cat", "/etc/sysctl.d/60-rtgateway.conf").stdout == SYSCTL.read_text()
    assert run("/opt/rtgateway/bin/rtgateway", "--version").stdout.startswith("rtgateway ")
    # The unit's Documentation= points at the installed copy of docs/systemd.md.
    doc = run("cat", "/opt/rtgateway/share/doc/rtgateway/systemd.md").stdout
    assert doc == (ROOT / "docs/systemd.md").read_text()
    unit = "/etc/systemd/system/rtgateway.service"
    verify = run("systemd-analyze", "verify", unit, check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    security = run("systemd-analyze", "security", "--offline=yes", unit)
    assert exposure(security.stdout) <= MAX_EXPOSURE
    assert run("systemctl", "is-enabled", "rtgateway.service").stdout.strip() == "enabled"


@pytest.mark.system
def test_start_returns_once_ready_and_the_sandbox_keeps_process_metrics(
    appliance: Appliance,
) -> None:
    """systemctl start returns once READY=1, and the sandbox keeps process metrics."""
    appliance.systemctl("stop", "rtgateway.service")
    appliance.start()
    # No waiting: Type=notify means `start` returned after READY=1, which the
    # gateway sends only once its socket is bound.
    assert appliance.systemctl("is-active", "rtgateway.service").stdout.strip() == "active"
    status, body, _ = http_get(appliance.url + "/healthz")
    assert (status, body) == (200, "ok")
    assert appliance.machine.show("StatusText")["StatusText"].startswith("serving 0 connections")
    _, metrics, _ = http_get(appliance.url + "/metrics")
    for name in ("process_open_fds", "process_max_fds", "process_start_time_seconds"):
        assert re.search(rf"^{name} \d", metrics, re.M), f"{name} missing under the sandbox"
    # LimitNOFILE=200000, or the hard limit the container inherited from this
    # process where systemd inside may not raise it (as on these CI machines).
    match = re.search(r"^process_max_fds (\S+)", metrics, re.M)
    assert match
    max_fds = float(match.group(1))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert max_fds == 200000 or max_fds == hard < 200000


@pytest.mark.system
async def test_status_shows_the_connection_count(appliance: Appliance) -> None:
    """systemctl status shows the gateway's STATUS with its connection count."""
    await asyncio.to_thread(appliance.start)
    clients = [await connect(appliance.ws_url) for _ in range(3)]
    try:
        for ws in clients:
            assert json.loads(await ws.recv())["op"] == "hello"

        def status_text() -> str | None:
            text = appliance.machine.show("StatusText")["StatusText"]
            return text if text.startswith("serving 3 connections") else None

        text = await asyncio.to_thread(wait_until, status_text, 30, 0.5, "STATUS= with 3")
        status = await asyncio.to_thread(
            appliance.systemctl, "status", "--no-pager", "rtgateway.service"
        )
        assert f'Status: "{text}"' in status.stdout
    finally:
        for ws in clients:
            await ws.close()


@pytest.mark.system
def test_journal_holds_the_gateways_json_log_lines(appliance: Appliance) -> None:
    """The journal holds the gateway's JSON log lines."""
    appliance.start()

    def gateway_lines() -> list[str]:
        out = appliance.machine.run(
            "journalctl", "_SYSTEMD_UNIT=rtgateway.service", "--output=cat", "--no-pager"
        ).stdout
        return out.splitlines() if "gateway_listening" in out else []

    lines = wait_until(gateway_lines, 30, 0.5, "gateway_listening in the journal")
    events = [json.loads(line) for line in lines if line]  # every line is JSON
    assert all({"event", "level", "timestamp"} <= set(e) for e in events)
    listening = [e for e in events if e["event"] == "gateway_listening"]
    assert f"127.0.0.1:{appliance.port}" in listening[-1]["addresses"]
    assert listening[-1]["level"] == "info"
    assert listening[-1]["timestamp"].endswith("Z")


async def _closed(ws: ClientConnection) -> tuple[int, str]:
    """The close code and reason the server sent, reading until it comes."""
    try:
        while True:
            await ws.recv()
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, "closed without a close frame"
        return exc.rcvd.code, exc.rcvd.reason


@pytest.mark.system
async def test_stop_closes_open_websockets_with_1012_and_exits_0(appliance: Appliance) -> None:
    """systemctl stop closes every WebSocket 1012 and the service exits 0."""
    await asyncio.to_thread(appliance.start)
    clients = [await connect(appliance.ws_url) for _ in range(5)]
    for ws in clients:
        assert json.loads(await ws.recv())["op"] == "hello"

    stop = asyncio.create_task(asyncio.to_thread(appliance.systemctl, "stop", "rtgateway.service"))
    closes = await asyncio.wait_for(asyncio.gather(*(_closed(ws) for ws in clients)), 120)
    await stop
    assert [code for code, _ in closes] == [1012] * len(clients)
    assert all("retry_after_ms=" in reason for _, reason in closes)
    state = appliance.machine.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    # ExecMainCode=1 is CLD_EXITED: the process exited by itself, not killed
    # by the stop timeout's SIGKILL (that would be Result=timeout, code 2).
    assert state == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",
        "ExecMainStatus": "0",
    }
    assert '"event": "drain_finished"' in appliance.machine.journal()


@pytest.mark.system
def test_kill_9_of_the_main_process_is_restarted(appliance: Appliance) -> None:
    """SIGKILL of the main process is restarted by systemd."""
    appliance.start()
    before = appliance.machine.show("MainPID", "NRestarts")
    appliance.machine.run("kill", "-KILL", before["MainPID"])
    wait_until(lambda: appliance.restarted_after(before), 60, 0.2, "a restart after SIGKILL")
    assert appliance.healthy()
    assert "code=killed, status=9/KILL" in appliance.machine.journal()


@pytest.mark.system
def test_a_stalled_event_loop_trips_the_watchdog_and_is_restarted(
    appliance: Appliance,
) -> None:
    """A stalled event loop stops feeding the watchdog and systemd restarts the service."""
    dropin = "/run/systemd/system/rtgateway.service.d/50-test-watchdog.conf"
    appliance.machine.write(dropin, "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=5s\n")
    try:
        appliance.systemctl("daemon-reload")
        appliance.systemctl("reset-failed", "rtgateway.service", check=False)
        appliance.systemctl("restart", "rtgateway.service")
        before = appliance.machine.show("MainPID", "NRestarts", "WatchdogUSec")
        assert before["WatchdogUSec"] == "2s"
        # A live loop feeds the watchdog: the service outlives several periods (time
        # passing is the condition).
        time.sleep(5)
        assert appliance.machine.show("MainPID", "NRestarts") == {
            "MainPID": before["MainPID"],
            "NRestarts": before["NRestarts"],
        }
        # SIGSTOP stalls everything, the event loop included.
        appliance.machine.run("kill", "-STOP", before["MainPID"])
        wait_until(lambda: appliance.restarted_after(before), 60, 0.2, "a watchdog restart")
        assert appliance.healthy()
        assert "Failed with result 'watchdog'" in appliance.machine.journal()
    finally:
        appliance.machine.run("rm", "-f", dropin)
        appliance.systemctl("daemon-reload")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A ``redis-server`` on the host, which the container shares the network with."""
    port = free_port()
    no_persistence = ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [require_tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", *no_persistence],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers_ping(port), 10, what="redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.mark.system
async def test_workers_run_under_the_sandbox_and_drain_on_stop(
    appliance: Appliance, redis_url: str
) -> None:
    """RTG_WORKERS=2 runs under the sandbox and drains on stop."""
    machine = appliance.machine
    dropin = "/run/systemd/system/rtgateway.service.d/50-test-workers.conf"
    machine.write(dropin, f"[Service]\nEnvironment=RTG_WORKERS=2 RTG_BROKER_URL={redis_url}\n")
    try:
        await asyncio.to_thread(appliance.systemctl, "daemon-reload")
        await asyncio.to_thread(appliance.systemctl, "stop", "rtgateway.service")
        await asyncio.to_thread(appliance.start)
        # READY=1 comes from the supervisor once both workers are ready.
        main_pid = machine.show("MainPID")["MainPID"]
        children = machine.run("ps", "-o", "pid=", "--ppid", main_pid).stdout.split()
        assert len(children) == 2
        assert appliance.healthy()
        # The supervisor reaches its workers through sockets in RuntimeDirectory=.
        assert machine.run("stat", "-c", "%a", "/run/rtgateway").stdout.strip() == "700"
        _, metrics, _ = http_get(appliance.url + "/metrics")
        assert 'worker="0"' in metrics and 'worker="1"' in metrics

        clients = [await connect(appliance.ws_url) for _ in range(6)]
        for ws in clients:
            assert json.loads(await ws.recv())["op"] == "hello"
        stop = asyncio.create_task(
            asyncio.to_thread(appliance.systemctl, "stop", "rtgateway.service")
        )
        closes = await asyncio.wait_for(asyncio.gather(*(_closed(ws) for ws in clients)), 120)
        await stop
        assert [code for code, _ in closes] == [1012] * len(clients)
        state = machine.show("Result", "ExecMainCode", "ExecMainStatus")
        assert state == {"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}
    finally:
        machine.run("rm", "-f", dropin)
        await asyncio.to_thread(appliance.systemctl, "daemon-reload")


@pytest.mark.system
def test_reinstall_is_a_no_op_and_uninstall_removes_all_but_the_settings(
    appliance: Appliance,
) -> None:
    """Reinstalling changes nothing; uninstalling removes everything but the settings."""
    run = appliance.machine.run
    appliance.start()
    pid = appliance.machine.show("MainPID")["MainPID"]
    again = run(*INSTALL_CMD)
    assert "rtgateway is running and unchanged" in again.stdout
    assert appliance.machine.show("MainPID")["MainPID"] == pid

    # With no settings file, an install writes the example, private to root.
    settings = run("cat", "/etc/default/rtgateway").stdout
    run("rm", "/etc/default/rtgateway")
    run(*INSTALL_CMD)
    assert run("cat", "/etc/default/rtgateway").stdout == ENV_EXAMPLE.read_text()
    assert run("stat", "-c", "%a %U", "/etc/default/rtgateway").stdout.split() == ["600", "root"]
    appliance.machine.write("/etc/default/rtgateway", settings)

    run("/src/deploy/install.sh", "uninstall")
    assert not appliance.healthy()
    assert appliance.machine.show("LoadState")["LoadState"] == "not-found"
    for path in (
        "/opt/rtgateway",
        "/etc/systemd/system/rtgateway.service",
        "/etc/sysctl.d/60-rtgateway.conf",
    ):
        assert run("test", "-e", path, check=False).returncode == 1, path
    assert run("cat", "/etc/default/rtgateway").stdout == settings
    run("/src/deploy/install.sh", "uninstall")  # idempotent
    run("/src/deploy/install.sh", "uninstall", "--purge")
    assert run("test", "-e", "/etc/default/rtgateway", check=False).returncode == 1
