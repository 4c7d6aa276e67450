"""The Docker image and the Compose file, built and run on a real Docker engine.

What `docker run -p 8083:8083 rtgateway` promises: the gateway answers on 8083
on every interface, Docker sees it healthy, it runs as an unprivileged user,
its logs are JSON lines, and `docker stop` drains it (clients get 1012, the
container exits 0).

This machine shapes how the checks run, not what they check:
- The engine has no bridge network (its private addresses are off-limits here):
  a session fixture starts ``dockerd --bridge=none`` when no engine answers.
  Containers run with ``--network host`` and RTG_ADDR on a free port, or with
  ``--network none`` to see the image's own defaults in a private namespace.
- Public images cannot be pulled: the image is built FROM a debootstrapped
  Debian bookworm (``.ci/setup.d/20-docker.sh`` caches its tarball; the fixture
  imports it) through the Dockerfile's ``BASE_IMAGE`` build argument.
- Compose starts the gateway service alone (``run --no-deps``, with an override
  for host networking): Prometheus and Grafana images cannot be pulled here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websockets
from support import ROOT, free_port, http_get, require, require_root, require_tool, wait_until
from websockets.asyncio.client import connect

BASE_TARBALL = Path("/var/cache/rtgateway-ci/docker-base.tar")
IMAGE = "rtgateway-ci/gateway:test"
BUILD_IMAGE = "rtgateway-ci/gateway-build:test"
CI_LABEL = "org.rtgateway.ci=true"
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
DRAIN_TIMEOUT_S = 30  # the gateway's default RTG_DRAIN_TIMEOUT_S


# --- the engine, the base image and the image under test --------------------


def docker(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {proc.returncode}:\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def engine_answers() -> bool:
    try:
        proc = docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A Docker engine that answers: the one running, or dockerd started (and stopped) here."""
    require_root()
    require_tool("docker")
    if engine_answers():
        yield
        return
    dockerd = require_tool("dockerd")
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [dockerd, "--bridge=none", "--iptables=false", "--ip-masq=false"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: proc.poll() is not None or engine_answers(), 90, 0.5, "dockerd to answer"
            )
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"dockerd exited {proc.returncode}:\n{log.read()[-4000:]}")
            yield
        finally:
            proc.terminate()  # dockerd stops its containers and its containerd
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="session")
def base_image(docker_engine: None) -> str:
    """The stand-in for python:3.12-slim, imported once per recipe (the tarball's folder)."""
    require(
        BASE_TARBALL.exists(),
        f"needs {BASE_TARBALL} (made by .ci/setup.d/20-docker.sh: run `make test` as root)",
    )
    key = BASE_TARBALL.resolve().parent.name.removeprefix("docker-base-")
    tag = f"rtgateway-ci/base:{key}"
    if docker("image", "inspect", tag, check=False).returncode != 0:
        with BASE_TARBALL.open("rb") as tarball:
            subprocess.run(
                ["docker", "import", "-", tag], stdin=tarball, capture_output=True, check=True
            )
    return tag


@pytest.fixture(scope="session")
def image(base_image: str) -> Iterator[str]:
    """The repository's Dockerfile, built as a user would, FROM the stand-in base."""
    # The build stage is tagged too: untagged, it would be dangling, and pruning
    # the builds a newer one replaced would take the dependency layers with it.
    for target in ("build", "runtime"):
        docker(
            "build",
            "--network", "host",
            "--build-arg", f"BASE_IMAGE={base_image}",
            "--label", CI_LABEL,
            *(["--target", target] if target == "build" else []),
            "--tag", IMAGE if target == "runtime" else BUILD_IMAGE,
            str(ROOT),
            timeout=900,
        )  # fmt: skip
    yield IMAGE
    # Each source change leaves the previous build untagged: drop ours, keep the layer cache.
    docker("image", "prune", "--force", "--filter", f"label={CI_LABEL}", check=False)


# --- containers ---------------------------------------------------------------


@dataclass
class Container:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def inspect(self) -> dict[str, Any]:
        return json.loads(docker("inspect", self.name).stdout)[0]  # type: ignore[no-any-return]

    def health(self) -> str:
        return str(self.inspect()["State"].get("Health", {}).get("Status", "none"))

    def logs(self) -> str:
        proc = docker("logs", self.name)
        return proc.stdout + proc.stderr

    def remove(self) -> None:
        docker("rm", "--force", "--volumes", self.name, check=False)


def container_name() -> str:
    return f"rtgateway-test-{os.getpid()}-{free_port()}"


def wait_serving(container: Container) -> None:
    """Until /healthz answers 200; fail at once, with the logs, if the container died."""

    def serving() -> bool:
        state = container.inspect()["State"]
        if state["Status"] in ("exited", "dead"):
            raise AssertionError(f"container exited {state['ExitCode']}:\n{container.logs()}")
        try:
            return http_get(container.url + "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    wait_until(serving, 60, 0.2, f"{container.name} to serve /healthz")


def run_gateway(image: str, *docker_args: str, env: dict[str, str] | None = None) -> Container:
    """The image on the host's network, RTG_ADDR on a free loopback port.

    The publish API is turned off: on the host's network its default address
    (127.0.0.1:8084) would be shared by every container and any local gateway.
    """
    container = Container(container_name(), free_port())
    env = {"RTG_ADDR": f"127.0.0.1:{container.port}", "RTG_API_ADDR": "", **(env or {})}
    docker(
        "run", "--detach", "--name", container.name, "--network", "host",
        # The image checks every 10 s; a test need not wait that long.
        "--health-interval", "1s", "--health-start-period", "1s",
        *[arg for key, value in env.items() for arg in ("--env", f"{key}={value}")],
        *docker_args,
        image,
    )  # fmt: skip
    try:
        wait_serving(container)
    except BaseException:
        container.remove()
        raise
    return container


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[Container]:
    """One running container shared by the tests that only look at it.

    Run locked down as the docs suggest: a read-only root file system, no
    capabilities, no privilege gain. The gateway needs none of them.
    """
    running = run_gateway(
        image, "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"
    )
    yield running
    running.remove()


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no log lines"
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line is not JSON: {line!r}") from None
        assert isinstance(event, dict), line
        events.append(event)
    return events


# --- the Dockerfile -----------------------------------------------------------


def test_dockerfile_passes_hadolint_with_the_committed_config() -> None:
    """The Dockerfile passes hadolint with the committed configuration."""
    local = Path(sys.executable).parent / "hadolint"  # from requirements/docker.txt
    hadolint = str(local) if local.exists() else require_tool("hadolint")
    proc = subprocess.run(
        [hadolint, "--config", ".hadolint.yaml", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.system
def test_image_runs_exec_form_as_unprivileged_user_with_healthcheck(image: str) -> None:
    """The image runs its entry point in exec form as user 10001, with an exec-form healthcheck."""
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/opt/rtgateway/bin/rtgateway"]  # no shell in between
    assert config["StopSignal"] == "SIGTERM"
    assert "8083/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][0] == "CMD"  # exec form: Python, no curl or shell
    assert "RTG_ADDR=:8083" in config["Env"]
    assert "RTG_LOG_FORMAT=json" in config["Env"]


@pytest.mark.system
def test_image_defaults_serve_port_8083_on_ipv4_and_ipv6(image: str) -> None:
    """With its defaults the container listens on 0.0.0.0 and [::] port 8083 and answers on both."""
    # --network none: the image's own defaults, in a namespace of its own (port
    # 8083 on the host is never touched), reached from inside with docker exec.
    # Docker turns IPv6 off in a namespace without an IPv6 network; turn it back
    # on, as an IPv6-enabled network would, so that ::1 exists.
    container = Container(container_name(), 8083)
    docker(
        "run", "--detach", "--name", container.name, "--network", "none",
        "--sysctl", "net.ipv6.conf.all.disable_ipv6=0",
        "--sysctl", "net.ipv6.conf.lo.disable_ipv6=0",
        "--health-interval", "1s", "--health-start-period", "1s", image,
    )  # fmt: skip
    try:
        wait_until(lambda: container.health() == "healthy", 60, 0.2, "the default healthcheck")
        probe = (
            "import sys, urllib.request\n"
            "for url in sys.argv[1:]:\n"
            "    print(url, urllib.request.urlopen(url, timeout=5).read().decode())\n"
        )
        out = docker(
            "exec", container.name, "python", "-c", probe,
            "http://127.0.0.1:8083/healthz", "http://[::1]:8083/healthz",
        ).stdout  # fmt: skip
        assert out.splitlines() == [
            "http://127.0.0.1:8083/healthz ok",
            "http://[::1]:8083/healthz ok",
        ]
        listening = [e for e in json_lines(container.logs()) if e["event"] == "gateway_listening"]
        assert sorted(listening[0]["addresses"]) == ["0.0.0.0:8083", "[::]:8083"]
    finally:
        container.remove()


# --- one running container ----------------------------------------------------


@pytest.mark.system
async def test_container_answers_healthz_and_echoes_over_websocket(container: Container) -> None:
    """The container answers /healthz and echoes text and binary over a WebSocket."""
    status, body, _ = http_get(container.url + "/healthz")
    assert (status, body) == (200, "ok")
    async with connect(container.ws_url + "/ws/echo", open_timeout=10) as ws:
        await ws.send("hello from outside the container")
        assert await asyncio.wait_for(ws.recv(), 10) == "hello from outside the container"
        await ws.send(b"\x00\x01\xfe\xff")
        assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\x01\xfe\xff"


@pytest.mark.system
def test_docker_reports_the_container_healthy(container: Container) -> None:
    """Docker's own healthcheck reports the container healthy."""
    wait_until(lambda: container.health() == "healthy", 60, 0.2, "Health.Status healthy")
    log = container.inspect()["State"]["Health"]["Log"]
    assert log and log[-1]["ExitCode"] == 0


@pytest.mark.system
def test_container_runs_as_non_root(container: Container) -> None:
    """The gateway, PID 1 in the container, runs with every uid 10001."""
    assert container.inspect()["Config"]["User"] == "10001:10001"
    assert docker("exec", container.name, "id", "-u").stdout.strip() != "0"
    # The gateway itself (PID 1), not only what `docker exec` runs.
    status = docker("exec", container.name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE)
    assert uids is not None
    assert set(uids.group(1).split()) == {"10001"}  # real, effective, saved, filesystem


@pytest.mark.system
def test_container_logs_are_json_lines(container: Container) -> None:
    """The container logs JSON lines, gateway_listening among them."""
    events = json_lines(container.logs())
    for event in events:
        assert {"event", "level", "timestamp"} <= event.keys(), event
    listening = [e for e in events if e["event"] == "gateway_listening"]
    assert listening and f"127.0.0.1:{container.port}" in listening[0]["addresses"]


# --- docker stop --------------------------------------------------------------


@pytest.mark.system
async def test_docker_stop_closes_clients_with_1012_and_exits_0(image: str) -> None:
    """docker stop drains: every client gets 1012 and the container exits 0."""
    gateway = run_gateway(image, env={"RTG_DRAIN_WINDOW_S": "1"})
    try:
        clients = [await connect(gateway.ws_url + "/ws/echo", open_timeout=10) for _ in range(3)]
        clients.append(await connect(gateway.ws_url + "/ws", open_timeout=10))
        hello = json.loads(await asyncio.wait_for(clients[-1].recv(), 10))
        assert hello["op"] == "hello"
        # Longer than the 30 s drain, as the docs tell users: SIGKILL never comes first.
        stop = await asyncio.create_subprocess_exec(
            "docker", "stop", "--time", str(DRAIN_TIMEOUT_S * 2), gateway.name,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        for ws in clients:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), DRAIN_TIMEOUT_S * 2)
            assert ws.close_code == 1012, ws.close_reason
        _, stderr = await asyncio.wait_for(stop.communicate(), DRAIN_TIMEOUT_S * 3)
        assert stop.returncode == 0, stderr
        state = gateway.inspect()["State"]
        assert state["Status"] == "exited"
        assert state["ExitCode"] == 0
        assert not state["OOMKilled"]
        events = [e["event"] for e in json_lines(gateway.logs())]
        assert "drain_started" in events
    finally:
        gateway.remove()


# --- Compose ------------------------------------------------------------------


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [require_tool("docker-compose"), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"docker-compose {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def compose_mounts(config: str) -> dict[str, Path]:
    """Bind mounts in `docker-compose config` output, "SOURCE:TARGET[:MODE]": target -> source."""
    pairs = re.findall(r"^\s*- (/[^:\s]+):(/[^:\s]+)", config, re.MULTILINE)
    return {target: Path(source) for source, target in pairs}


def host_path(container_path: str, mounts: dict[str, Path]) -> Path | None:
    """Where a path inside a container comes from on the host, through the bind mounts."""
    for target in sorted(mounts, key=len, reverse=True):
        if container_path == target or container_path.startswith(target + "/"):
            return mounts[target] / container_path[len(target) :].lstrip("/")
    return None


def uncommented(path: Path) -> str:
    """A YAML file without its comment lines (examples there are not configuration)."""
    lines = path.read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.lstrip().startswith("#"))


@pytest.mark.system
def test_compose_file_is_valid_and_mounts_files_that_exist() -> None:
    """docker-compose.yml is valid and mounts only files that exist."""
    assert set(compose("config", "--services").stdout.split()) == {
        "rtgateway",
        "prometheus",
        "grafana",
    }
    config = compose("config").stdout
    mounts = compose_mounts(config)
    assert mounts, config
    missing = [str(source) for source in mounts.values() if not source.exists()]
    assert not missing, f"compose.yaml mounts files that do not exist: {missing}"
    grace = re.search(r"^\s+stop_grace_period: (\d+)s$", config, re.MULTILINE)
    assert grace is not None and int(grace.group(1)) > DRAIN_TIMEOUT_S


@pytest.mark.system
def test_compose_services_find_each_other_and_the_mounted_files() -> None:
    """The compose services name each other and the files mounted for them."""
    # The Prometheus and Grafana files are written for this compose setup: their
    # host names must be its services, their paths must land on its mounts.
    services = set(compose("config", "--services").stdout.split())
    mounts = compose_mounts(compose("config").stdout)
    prometheus_yml = uncommented(ROOT / "deploy/prometheus/prometheus.yml")

    targets = re.findall(r"[\"']([\w.-]+):(\d+)[\"']", prometheus_yml)
    assert ("rtgateway", "8083") in targets, prometheus_yml
    assert {host for host, _ in targets} <= services | {"localhost", "127.0.0.1"}
    rule_files = re.findall(r"^\s*- (rules/\S+\.ya?ml)\s*$", prometheus_yml, re.MULTILINE)
    assert rule_files, prometheus_yml
    for rule_file in rule_files:
        source = host_path(f"/etc/prometheus/{rule_file}", mounts)
        assert source is not None and source.is_file(), rule_file

    provisioning = ROOT / "deploy/grafana/provisioning"
    datasources = "".join(map(uncommented, (provisioning / "datasources").glob("*.yaml")))
    urls = re.findall(r"url: https?://([\w.-]+):\d+", datasources)
    assert urls and set(urls) <= services, datasources
    dashboards = "".join(map(uncommented, (provisioning / "dashboards").glob("*.yaml")))
    paths = re.findall(r"^\s*path: (\S+)", dashboards, re.MULTILINE)
    assert paths, dashboards
    for path in paths:
        mounted = [
            t for t in mounts if t.startswith(path.rstrip("/") + "/") and t.endswith(".json")
        ]
        assert mounted, f"no dashboard is mounted under the provider path {path}"
    for kind in ("datasources", "dashboards"):
        source = host_path(f"/etc/grafana/provisioning/{kind}", mounts)
        assert source == provisioning / kind


@pytest.mark.system
def test_compose_runs_the_gateway_service(image: str, tmp_path: Path) -> None:
    """compose runs the gateway healthy, its file limit set, its stop timeout past the drain."""
    # The service as defined, moved onto the host's network (no bridge here) and
    # a free port; `run` rather than `up` because docker-compose refuses host
    # networking with published ports, and --no-deps because Prometheus and
    # Grafana cannot be pulled here.
    port = free_port()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    override = tmp_path / "host-network.yaml"
    override.write_text(
        "services:\n"
        "  rtgateway:\n"
        "    network_mode: host\n"
        "    environment:\n"
        f"      RTG_ADDR: 127.0.0.1:{port}\n"
        '      RTG_API_ADDR: ""\n'
        "    healthcheck:\n"
        "      interval: 1s\n"
        "      start_period: 1s\n"
        "  prometheus:\n"
        "    network_mode: host\n"
        "  grafana:\n"
        "    network_mode: host\n"
    )
    project = f"rtgateway-test-{os.getpid()}"
    env = {"GATEWAY_IMAGE": image, "GATEWAY_NOFILE": str(nofile)}
    args = ("-f", str(override), "-p", project)
    container = Container(f"{project}-rtgateway", port)
    try:
        compose(
            *args, "run", "--detach", "--no-deps", "--name", container.name, "rtgateway", env=env
        )
        wait_serving(container)
        wait_until(lambda: container.health() == "healthy", 60, 0.2, "Health.Status healthy")
        host_config = container.inspect()["HostConfig"]
        assert {"Name": "nofile", "Soft": nofile, "Hard": nofile} in host_config["Ulimits"]
        # stop_grace_period becomes the container's stop timeout: longer than the drain.
        assert container.inspect()["Config"]["StopTimeout"] > DRAIN_TIMEOUT_S
        docker("stop", container.name, timeout=DRAIN_TIMEOUT_S * 3)
        assert container.inspect()["State"]["ExitCode"] == 0
    finally:
        subprocess.run(
            ["docker-compose", "-f", str(COMPOSE_FILE), *args, "down", "--volumes"],
            capture_output=True,
            timeout=120,
            env={**os.environ, **env},
        )
        container.remove()
