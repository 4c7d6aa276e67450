#!/usr/bin/env bash
# Build (once) the Debian root file system that tests/test_systemd.py boots
# with systemd-nspawn, and print its path.
#
# This file is the recipe: the cache directory is keyed by its hash, so any
# edit here builds a fresh tree on the next run, and an unchanged recipe reuses
# the cached one (about a minute saved per run). The tree is never booted
# writable: the test boots it with --volatile=overlay, so every run starts from
# this exact state and nothing a test installs leaks into the cache.
#
#   bash .ci/systemd-rootfs.sh          build if missing, print the path
#   bash .ci/systemd-rootfs.sh --path   print the path only (build nothing)
set -euo pipefail

SUITE=bookworm
MIRROR=${RTGATEWAY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the appliance test needs inside: systemd as PID 1, python3-venv for
# deploy/install.sh, procps for pgrep/ps, ca-certificates for online pip.
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,procps

CACHE=${RTGATEWAY_CI_CACHE:-/var/cache/rtgateway-ci}
KEY=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
ROOT="$CACHE/systemd-rootfs-$KEY"

if [ "${1:-}" = "--path" ]; then
    echo "$ROOT"
    exit 0
fi
if [ -f "$ROOT/.complete" ]; then
    touch "$ROOT.used" 2>/dev/null || true
    echo "$ROOT"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "systemd-rootfs: building the rootfs needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "systemd-rootfs: needs debootstrap" >&2; exit 1; }

mkdir -p "$CACHE"
# One builder at a time: two test runs may start together on a cold cache.
exec 9>"$CACHE/systemd-rootfs.lock"
flock 9
if [ -f "$ROOT/.complete" ]; then
    echo "$ROOT"
    exit 0
fi
# Trees of other recipes (~200 MB each) that no checkout used for two days.
# Not sooner: checkouts of older and newer versions of this file may share the
# machine, and each would otherwise delete the other's tree.
for used in "$CACHE"/systemd-rootfs-*.used; do
    [ -e "$used" ] || continue
    old=${used%.used}
    if [ "$old" != "$ROOT" ] && [ -z "$(find "$used" -mmin -2880)" ]; then
        rm -rf --one-file-system "$old" "$used"
    fi
done

build="$ROOT.tmp"
rm -rf --one-file-system "$build"
ok=0
for attempt in 1 2; do
    if debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$build" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1; then
        ok=1
        break
    fi
    echo "systemd-rootfs: debootstrap attempt $attempt failed (see $CACHE/debootstrap.log)" >&2
    rm -rf --one-file-system "$build"
    sleep 5
done
[ "$ok" -eq 1 ] || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }

# pip inside the container reaches the package index exactly as the host does.
cp /etc/ssl/certs/ca-certificates.crt "$build/etc/ssl/certs/ca-certificates.crt"
echo rtg-ci >"$build/etc/hostname"
# A machine id of its own per boot (nspawn fills an empty file), and no
# services the test does not need competing for two cores while it runs.
: >"$build/etc/machine-id"
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    systemd-timesyncd.service e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$build/etc/systemd/system/$unit"
done
rm -rf "$build/var/cache/apt/archives/"*.deb "$build/var/lib/apt/lists/"*

touch "$build/.complete"
mv "$build" "$ROOT"
touch "$ROOT.used"
echo "$ROOT"
