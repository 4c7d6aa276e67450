#!/usr/bin/env bash
# Install rtgateway on a systemd host: a virtual environment of its own in
# /opt/rtgateway, the hardened unit, the C100k sysctl drop-in and an example
# /etc/default/rtgateway (written once, never overwritten). Safe to run again:
# a rerun upgrades in place and restarts a running service only if the unit or
# the installed code changed.
#
#   deploy/install.sh [install] [--wheels DIR] [--from PATH] [--no-enable]
#       Install from PATH: this repository checkout (the default) or a built
#       rtgateway wheel; dependencies come from the package index. With
#       --wheels DIR nothing is downloaded: everything comes from DIR
#       (pip --no-index --find-links DIR), which `wheels` below fills.
#       --no-enable leaves the unit disabled (not started at boot).
#   deploy/install.sh wheels DIR
#       On a machine that reaches the package index and has the same Python
#       as the target (`python3 -V`, to the patch level: a dependency may
#       depend on it, as redis needs async-timeout before 3.11.3): build wheels
#       of this checkout and every dependency into DIR, for an offline
#       `install --wheels DIR`.
#   deploy/install.sh uninstall [--purge]
#       Stop and remove the service, the venv, the unit and the sysctl file.
#       /etc/default/rtgateway is the operator's and stays, unless --purge.
#
# Needs root (except `wheels`) and Python >= 3.11 with the venv module
# (Debian/Ubuntu: apt-get install python3-venv). PYTHON=... picks the
# interpreter. Works without systemd running (an image build): it then only
# writes the files.
set -euo pipefail

PREFIX=/opt/rtgateway
UNIT_PATH=/etc/systemd/system/rtgateway.service
SYSCTL_PATH=/etc/sysctl.d/60-rtgateway.conf
ENV_PATH=/etc/default/rtgateway
PYTHON=${PYTHON:-python3}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(dirname "$HERE")

TMP_DIRS=()
cleanup() { [ ${#TMP_DIRS[@]} -eq 0 ] || rm -rf "${TMP_DIRS[@]}"; }
trap cleanup EXIT
new_tmp() { local d; d=$(mktemp -d); TMP_DIRS+=("$d"); echo "$d"; }

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }
retry() { "$@" || { say "retrying: $*"; sleep 5; "$@"; }; }
systemd_running() { [ -d /run/systemd/system ]; }
need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*)"; }

check_python() {
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=...)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "rtgateway needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1)"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
        || die "$PYTHON lacks the venv module (Debian/Ubuntu: apt-get install python3-venv)"
}

# A copy of the checkout without its build debris: pip builds in the source
# tree, which may be read-only (a bind mount) or hold someone's .venv.
copy_checkout() {
    local dest=$1
    [ -f "$CHECKOUT/pyproject.toml" ] || die "$CHECKOUT is not an rtgateway checkout"
    tar -C "$CHECKOUT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.mypy_cache \
        --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude=./results \
        --exclude=./reports -cf - . | tar -C "$dest" -xf -
}

# What a running service would notice: the unit, the environment defaults and
# every installed file of the package (pip's RECORD holds their hashes).
fingerprint() {
    {
        cat "$UNIT_PATH" 2>/dev/null || true
        # direct_url.json names the temporary build directory: not a change.
        cat "$PREFIX"/lib/python3*/site-packages/*.dist-info/RECORD 2>/dev/null \
            | grep -v '/direct_url.json,' | sort || true
        "$PREFIX/bin/python" -V 2>/dev/null || true
    } | sha256sum | cut -d' ' -f1
}

cmd_wheels() {
    local dir=${1:-}
    [ -n "$dir" ] || die "usage: $0 wheels DIR"
    check_python
    mkdir -p "$dir"
    local src
    src=$(new_tmp)
    copy_checkout "$src"
    # Debian's python3 has no pip of its own: borrow a throwaway venv's.
    local py=$PYTHON
    if ! "$py" -m pip --version >/dev/null 2>&1; then
        local venv
        venv=$(new_tmp)
        "$PYTHON" -m venv "$venv"
        py=$venv/bin/python
    fi
    retry "$py" -m pip wheel -q --disable-pip-version-check --use-pep517 --wheel-dir "$dir" "$src"
    "$PYTHON" -V >"$dir/PYTHON-VERSION"
    say "wheels for $("$PYTHON" -V) in $dir:"
    ls -1 "$dir"
}

cmd_install() {
    local wheels="" from="" enable=1
    while [ $# -gt 0 ]; do
        case $1 in
            --wheels) wheels=${2:?--wheels needs a directory}; shift 2 ;;
            --from) from=${2:?--from needs a path}; shift 2 ;;
            --no-enable) enable=0; shift ;;
            *) die "unknown option: $1" ;;
        esac
    done
    need_root install
    check_python
    [ -z "$wheels" ] || [ -d "$wheels" ] || die "no such directory: $wheels"
    if [ -f "$wheels/PYTHON-VERSION" ] \
        && [ "$(cat "$wheels/PYTHON-VERSION")" != "$("$PYTHON" -V 2>&1)" ]; then
        say "warning: $wheels was built with $(cat "$wheels/PYTHON-VERSION"), this is" \
            "$("$PYTHON" -V 2>&1); a dependency for this version may be missing"
    fi

    local before
    before=$(fingerprint)

    # 1. The virtual environment; rebuilt when the system Python changed under it.
    if ! "$PREFIX/bin/python" -c 'import sys' 2>/dev/null \
        || [ "$("$PREFIX/bin/python" -V 2>&1)" != "$("$PYTHON" -V 2>&1)" ]; then
        say "creating the virtual environment $PREFIX"
        rm -rf "$PREFIX"
        "$PYTHON" -m venv "$PREFIX"
    fi

    # 2. The package, then the package alone again with --force-reinstall: a
    # rebuilt wheel keeps its version number, and pip would keep the old files.
    local pip=("$PREFIX/bin/python" -m pip -q --disable-pip-version-check --no-cache-dir)
    local src=""
    if [ -z "$from" ] || [ -d "$from" ]; then
        src=$(new_tmp)
        if [ -n "$from" ]; then CHECKOUT=$(cd "$from" && pwd); fi
        copy_checkout "$src"
    fi
    if [ -n "$wheels" ]; then
        local target=${src:-$from}
        # No PATH given: the rtgateway wheel in DIR (building the checkout
        # offline would need setuptools there too).
        if [ -z "$from" ]; then
            compgen -G "$wheels/rtgateway-*.whl" >/dev/null \
                || die "no rtgateway wheel in $wheels (make one: $0 wheels DIR)"
            target=rtgateway
        fi
        say "installing $target from $wheels (offline)"
        "${pip[@]}" install --no-index --find-links "$wheels" --upgrade "$target"
        "${pip[@]}" install --no-index --find-links "$wheels" --force-reinstall --no-deps "$target"
    else
        say "installing ${from:-$CHECKOUT} (dependencies from the package index)"
        retry "${pip[@]}" install --use-pep517 --upgrade "${src:-$from}"
    fi
    "$PREFIX/bin/rtgateway" --version >/dev/null || die "the installed gateway does not run"

    # 3. System files. The unit and sysctl file are ours and replaced; the
    # environment file is the operator's and only created.
    install -D -m 0644 "$HERE/systemd/rtgateway.service" "$UNIT_PATH"
    install -D -m 0644 "$HERE/systemd/60-rtgateway.conf" "$SYSCTL_PATH"
    # The unit's Documentation=; it goes with the venv on uninstall.
    if [ -f "$CHECKOUT/docs/systemd.md" ]; then
        install -D -m 0644 "$CHECKOUT/docs/systemd.md" "$PREFIX/share/doc/rtgateway/systemd.md"
    fi
    # The commented example of RTG_ROOMS_FILE (an example: nothing reads it there).
    if [ -f "$HERE/rooms.toml" ]; then
        install -D -m 0644 "$HERE/rooms.toml" "$PREFIX/share/doc/rtgateway/rooms.toml"
    fi
    if [ -e "$ENV_PATH" ]; then
        say "keeping the existing $ENV_PATH"
    else
        # 0600: it may hold RTG_API_TOKEN. systemd reads it as root.
        install -D -m 0600 "$HERE/systemd/rtgateway.env" "$ENV_PATH"
        say "wrote $ENV_PATH (every setting, commented out)"
    fi
    # Kernel settings now as well as at boot; a container cannot change them.
    sysctl -q -p "$SYSCTL_PATH" 2>/dev/null \
        || say "could not apply $SYSCTL_PATH now (a container?); it applies at boot"

    # 4. systemd: load the unit, enable it, restart it if it runs old code.
    if systemd_running; then
        systemctl daemon-reload
        if [ "$enable" -eq 1 ]; then systemctl enable --quiet rtgateway.service; fi
        if systemctl --quiet is-active rtgateway.service; then
            if [ "$before" != "$(fingerprint)" ]; then
                say "restarting rtgateway (a graceful drain) to run the new version"
                systemctl restart rtgateway.service
            else
                say "rtgateway is running and unchanged"
            fi
        else
            say "start it with: systemctl start rtgateway"
        fi
    else
        say "systemd is not running here: files written, nothing started"
    fi
    say "installed $("$PREFIX/bin/rtgateway" --version)"
}

cmd_uninstall() {
    local purge=0
    while [ $# -gt 0 ]; do
        case $1 in
            --purge) purge=1; shift ;;
            *) die "unknown option: $1" ;;
        esac
    done
    need_root uninstall
    if systemd_running && [ -e "$UNIT_PATH" ]; then
        # `stop` drains: open WebSockets get 1012 before the process exits.
        systemctl disable --now --quiet rtgateway.service || true
    fi
    rm -f "$UNIT_PATH" "$SYSCTL_PATH"
    if systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed rtgateway.service 2>/dev/null || true
    fi
    # Only a tree this script made: a venv has pyvenv.cfg at its top.
    if [ -f "$PREFIX/pyvenv.cfg" ]; then
        rm -rf "$PREFIX"
    elif [ -e "$PREFIX" ]; then
        say "leaving $PREFIX: it is not a virtual environment"
    fi
    if [ "$purge" -eq 1 ]; then
        rm -f "$ENV_PATH"
    elif [ -e "$ENV_PATH" ]; then
        say "kept $ENV_PATH (remove it, or uninstall --purge)"
    fi
    say "uninstalled; kernel settings from 60-rtgateway.conf stay until reboot"
}

case ${1:-install} in
    install) shift || true; cmd_install "$@" ;;
    uninstall) shift; cmd_uninstall "$@" ;;
    wheels) shift; cmd_wheels "$@" ;;
    -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    --*) cmd_install "$@" ;;
    *) die "unknown command: $1 (install, uninstall, wheels)" ;;
esac
