# Hostile input and faults (docs/hardening.md, docs/conformance.md).
#   make conformance        Autobahn cases 1-7 and 10 on /ws/echo, default settings
#   make conformance-full   the same plus section 9 (16 MiB messages, limits raised)
#   make soak DURATION=600  churn load against a gateway subprocess; figures at the end
#   make hardening-test     the hardening, fuzz, conformance and short soak tests only
# Reports land in reports/ (gitignored): open reports/conformance/index.html.

DURATION ?= 300
SOAK_ARGS ?=
CONFORMANCE_OUT ?= reports/conformance

.PHONY: conformance conformance-full soak hardening-test

## Autobahn cases 1-7 and 10 against /ws/echo (default settings); report in reports/conformance/.
conformance: venv
	$(BIN)/python scripts/conformance.py --out $(CONFORMANCE_OUT)

## The same plus section 9 (16 MiB messages), with the gateway's limits raised to match.
conformance-full: venv
	$(BIN)/python scripts/conformance.py --full --out $(CONFORMANCE_OUT)-full

## Churn load for DURATION seconds (default 300); RSS, fds, tasks and delivery at the end.
soak: runtime
	$(BIN)/python bench/soak.py --duration $(DURATION) --json reports/soak.json $(SOAK_ARGS)

## Only this area's tests.
hardening-test: venv
	$(BIN)/python -m pytest tests/test_hardening.py tests/test_fuzz_frames.py \
		tests/test_conformance.py tests/test_soak.py $(PYTEST_ARGS)
