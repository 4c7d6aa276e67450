# Scale-out: RTG_WORKERS gateways sharing a port, rooms through Redis (docs/scaleout.md).
#
#   make c100k      # issue 16's benchmark, ~6 minutes on 2 cores: redis-server, the supervisor
#                   # with max(cores/2, connections/17000) workers (6 on 2 cores, 8 on 16), as
#                   # many load processes (3 source addresses each) + 1 publisher; 100,000
#                   # WebSockets opened paced (64 handshakes in flight per load process at most,
#                   # halved over 0.5 s), each in a room of 1000 and all in one large room;
#                   # 10 s idle, 20 s publishing to the small rooms (7500 deliveries/s per core),
#                   # 20 s to the large room (10000 per core), held >= 60 s, drained by SIGTERM
#   make c100k C100K_ARGS="--connections 3000 --workers 2 --load-procs 2 --hold 10"
#   make c100k C100K_ARGS="--no-broker --connections 15000"     # one process, no Redis
#   make c100k C100K_ARGS="--broker-url redis://127.0.0.1:6379" # a Redis you run
#
# Other flags: --room-size, --large-share, --rooms-rate, --large-rate, --rooms-duration,
# --large-duration, --connect-window, --connect-latency-target, --connect-rate (see --help).
# Needs redis-server on PATH (or --broker-url); prints a table and whether each goal was met,
# writes results/c100k.json and results/c100k.png (matplotlib: requirements/bench.txt).

#
#   make c100k-cluster  # the same benchmark on one Redis, then on a Redis Cluster of 3 masters
#                       # with a replica each (started by the script): deliveries/s and Redis CPU
#                       # per publication side by side (bench/c100k_cluster.py; ~4 minutes)
#   make c100k-cluster C100K_CLUSTER_ARGS="--connections 3000 -- --room-size 100"

C100K_ARGS ?=
C100K_CLUSTER_ARGS ?= --connections 6000 -- --room-size 50 --hold 40 --rooms-duration 20 \
	--large-duration 10

.PHONY: c100k c100k-cluster

## Many connections on one host through workers and Redis: make c100k [C100K_ARGS=...]
c100k: venv
	$(BIN)/python bench/c100k.py $(C100K_ARGS)

## C100k's sibling: one Redis next to a 3+3 Redis Cluster: make c100k-cluster [C100K_CLUSTER_ARGS=...]
c100k-cluster: venv
	$(BIN)/python bench/c100k_cluster.py $(C100K_CLUSTER_ARGS)
