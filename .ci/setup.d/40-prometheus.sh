# Observability tests (tests/test_observability.py): a real Prometheus server
# scrapes a real gateway and evaluates the repository's alert rules; promtool
# (same package) checks and unit-tests the rules and lints /metrics.
# Sourced by scripts/system-deps.sh (bash, set -euo pipefail). The Debian
# package's own service is not started here (no systemd as PID 1); the test
# starts its own server on a free port with a temporary TSDB.
apt_install prometheus
