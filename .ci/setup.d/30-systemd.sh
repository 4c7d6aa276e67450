# systemd appliance tests (tests/test_systemd.py): a real systemd booted in a
# container with systemd-nspawn, from a Debian tree debootstrapped once and
# cached under /var/cache/rtgateway-ci/ (rebuilt when .ci/systemd-rootfs.sh,
# its recipe, changes; it retries debootstrap once). systemd-analyze (unit lint
# and exposure score) comes with the host's systemd package.
# Sourced by scripts/system-deps.sh (bash, set -euo pipefail).
apt_install systemd systemd-container debootstrap
if is_root; then
    bash .ci/systemd-rootfs.sh >/dev/null
fi
