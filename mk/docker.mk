# Docker (docs/docker.md). `make docker-image` builds rtgateway:latest from the
# Dockerfile; `make docker-run` runs it on :8083 with the options that matter
# (a stop timeout longer than the 30 s drain, an explicit open-files limit);
# `make hadolint` lints the Dockerfile and is part of `make check`.
DOCKER ?= docker
DOCKER_IMAGE ?= rtgateway:latest
# e.g. DOCKER_BUILD_ARGS='--build-arg BASE_IMAGE=python:3.11-slim'
DOCKER_BUILD_ARGS ?=
DOCKER_NOFILE ?= 65536

.PHONY: docker-image docker-run hadolint

docker-image:
	$(DOCKER) build $(DOCKER_BUILD_ARGS) --tag $(DOCKER_IMAGE) .

docker-run: docker-image
	$(DOCKER) run --rm --publish 8083:8083 --stop-timeout 45 \
		--ulimit nofile=$(DOCKER_NOFILE):$(DOCKER_NOFILE) $(DOCKER_IMAGE) $(ARGS)

hadolint: venv
	$(BIN)/hadolint --config .hadolint.yaml Dockerfile

check: hadolint
