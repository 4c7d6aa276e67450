# Scale-out: RTG_WORKERS gateways sharing a port, rooms through Redis (docs/scaleout.md).
#
#   make c100k                                  # 100k connections, cores/2 workers + cores/2 load
#   make c100k C100K_ARGS="--connections 2000 --workers 2 --load-procs 2 --duration 5"
#
# Needs redis-server on PATH (or C100K_ARGS="--broker-url redis://..."); writes results/c100k.json.

C100K_ARGS ?=

.PHONY: c100k

## Many connections on one host through workers and Redis: make c100k [C100K_ARGS=...]
c100k: venv
	$(BIN)/python bench/c100k.py $(C100K_ARGS)
