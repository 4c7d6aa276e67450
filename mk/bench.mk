# Fan-out benchmark: rtgateway against stock websockets in the same run (docs/performance.md).
#
#   make bench                          # full: 15k idle, fan-out up to 10k subscribers (~10 min)
#   make bench BENCH_ARGS=--quick       # < 2 min
#   make bench BENCH_ARGS="--repeat 3"  # medians of 3 runs per scenario
#   make bench-profile                  # py-spy flame graph of the gateway at the fan-out limit
#   make bench-heap                     # tracemalloc: where an idle connection's bytes go
#
# Writes results/bench.json and results/bench.png; prints every gateway/baseline ratio.

BENCH_ARGS ?=

.PHONY: bench bench-profile bench-heap

## Benchmark the gateway against stock websockets: make bench [BENCH_ARGS=--quick]
bench: venv
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

## py-spy flame graph of the gateway's fan-out path: results/fanout-flame.svg
bench-profile: venv
	$(BIN)/python bench/bench.py --only fanout --fanout 5000 --py-spy results/fanout-flame.svg \
		--json results/bench-profile.json --no-plot $(BENCH_ARGS)

## tracemalloc breakdown of the memory of idle connections: results/heap.txt
bench-heap: runtime
	$(BIN)/python bench/heap.py --connections 5000 --out results/heap.txt
	$(BIN)/python bench/heap_objects.py | tee results/heap-objects.txt
