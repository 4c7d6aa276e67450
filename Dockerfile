# rtgateway container image.
#
#   docker build -t rtgateway .
#   docker run --rm -p 8083:8083 --stop-timeout 45 rtgateway
#
# Two stages: `build` makes wheels and installs them into a virtual environment
# at /opt/rtgateway; the runtime stage is the base image plus that one folder,
# with no compiler, pip or wheel cache. Layers are ordered by how often they
# change: the dependencies (from pyproject.toml alone) are built before the
# source is copied, so editing rtgateway/ rebuilds only the last layers.
# docs/docker.md explains the choices and the `docker run` options that matter.

# Any image with python3 >= 3.11 and its venv module (ensurepip) will do; CI
# builds FROM a debootstrapped Debian bookworm because it cannot pull.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# The build tool venv (pip + a pinned setuptools) and the runtime venv. The
# runtime venv gets no pip of its own: the build venv's pip installs into it.
COPY docker/build-requirements.txt /tmp/build-requirements.txt
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes -r /tmp/build-requirements.txt \
    && python3 -m venv --without-pip /opt/rtgateway

WORKDIR /src

# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN /opt/build/bin/python -c 'import tomllib; \
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && /opt/build/bin/pip wheel --wheel-dir /wheels -r requirements.txt \
    && /opt/build/bin/pip --python /opt/rtgateway/bin/python install \
        --no-index --find-links /wheels -r requirements.txt

# Then the gateway itself, as a wheel, without touching the dependencies.
COPY rtgateway/ rtgateway/
RUN /opt/build/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /wheels . \
    && /opt/build/bin/pip --python /opt/rtgateway/bin/python install \
        --no-index --no-deps /wheels/rtgateway-*.whl \
    && /opt/rtgateway/bin/rtgateway --version


FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="rtgateway" \
      org.opencontainers.image.description="A room-based WebSocket gateway: bounded, observable, measured." \
      org.opencontainers.image.licenses="MIT"

# A fixed, numeric, unprivileged identity: `USER 10001` lets Kubernetes'
# runAsNonRoot verify it without reading /etc/passwd, and it owns nothing in the
# image (the code stays read-only to the process that runs it).
RUN groupadd --system --gid 10001 rtgateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin rtgateway

COPY docker/healthcheck.py /opt/rtgateway-healthcheck.py
COPY --from=build /opt/rtgateway /opt/rtgateway

# RTG_ADDR ":8083" binds every interface, IPv4 and IPv6 (note that "[::]:8083"
# would be IPv6 only: asyncio sets IPV6_V6ONLY). JSON logs go to stdout for
# `docker logs` and log shippers. Every other RTG_* setting works as on a host.
ENV PATH=/opt/rtgateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RTG_ADDR=:8083 \
    RTG_LOG_FORMAT=json

USER 10001:10001
WORKDIR /tmp
EXPOSE 8083

# /healthz answers 503 while draining, so a stopping container turns unhealthy
# and load balancers that follow Docker's health stop sending it clients.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/opt/rtgateway/bin/python", "-I", "/opt/rtgateway-healthcheck.py"]

# SIGTERM starts the drain (1012 to every client, spread over RTG_DRAIN_WINDOW_S,
# exit 0 within RTG_DRAIN_TIMEOUT_S = 30 s): run with --stop-timeout above that,
# or Docker sends SIGKILL after its default 10 s. Exec form: the gateway is PID 1
# and receives the signal itself, not a shell.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/rtgateway/bin/rtgateway"]
