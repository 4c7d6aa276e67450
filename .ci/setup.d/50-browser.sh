# Browser tests (tests/test_browser.py): a real headless Chromium, driven over
# the Chrome DevTools Protocol with the `websockets` library the gateway
# already depends on, so nothing beyond the Debian package is needed.
# Sourced by scripts/system-deps.sh (bash, set -euo pipefail).
apt_install chromium fonts-dejavu-core
