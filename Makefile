# rtgateway: the two commands a newcomer needs are `make run` and `make test`.
# Both create the virtual environment they need; `make test` also installs the
# system packages the real-component tests use (Docker, systemd-container,
# Prometheus, Redis, Chromium) when run as root.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/*.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: run test check lint typecheck pytest system-deps venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "rtgateway needs Python 3.11 or newer"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip || $(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' || $(BIN)/python -m pip install -q -e '.[dev]'
	for f in requirements/*.txt; do [ -f "$$f" ] || continue; \
		$(BIN)/python -m pip install -q --require-hashes -r "$$f" || \
		$(BIN)/python -m pip install -q --require-hashes -r "$$f" || exit 1; done
	rm -f $(VENV)/.installed-*
	touch $@

## Run the gateway on :8083 (RTG_* variables and flags configure it).
run: venv
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
