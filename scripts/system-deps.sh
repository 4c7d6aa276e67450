#!/usr/bin/env bash
# Install the system packages and artefacts the real-component tests need.
#
# Each area keeps its own idempotent step in .ci/setup.d/*.sh (sourced in
# name order, with the helpers below). As root the steps install what is
# missing; as another user they only say what is missing, and the tests that
# need it skip (outside CI) or fail (CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."

retry() { "$@" || { echo "retrying: $*" >&2; sleep 5; "$@"; }; }

APT_UPDATED=0
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "system-deps: not root, not installing: ${missing[*]}" >&2
        return 0
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        retry apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive retry apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

is_root() { [ "$(id -u)" -eq 0 ]; }

for step in .ci/setup.d/*.sh; do
    [ -f "$step" ] || continue
    echo "system-deps: ${step}"
    # shellcheck source=/dev/null
    source "$step"
done
