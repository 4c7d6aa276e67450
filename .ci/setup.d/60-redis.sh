# Scale-out tests (tests/test_scaleout.py, tests/test_cluster.py): workers and gateways share rooms
# through a real Redis. Sourced by scripts/system-deps.sh (bash, set -euo
# pipefail). The package's own service is not started here: the tests start
# `redis-server --port <free port> --save '' --appendonly no` themselves, and
# stop and restart it to prove recovery. The Redis Cluster tests start six
# `redis-server --cluster-enabled yes` and join them with `redis-cli --cluster
# create` (redis-cli comes with redis-server, through redis-tools).
apt_install redis-server
