# Docker tests (tests/test_docker.py): the Docker engine, Compose v1 (for
# `docker-compose config` and a single-service `up`), and a stand-in base image.
# Sourced by scripts/system-deps.sh (bash, set -euo pipefail).
#
# Public base images cannot be pulled here, so the image is built FROM a
# Debian bookworm root file system made by debootstrap. Making it takes about
# a minute; the tarball is cached under /var/cache/rtgateway-ci/, in a folder
# named by a hash of its recipe, so changing the recipe rebuilds it. Importing
# it needs a running engine, which only the test fixture starts: the fixture
# imports docker-base.tar (a link to the current tarball) once per recipe.
apt_install docker.io docker-compose debootstrap

if is_root; then
    docker_base_recipe="debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm; host CA bundle; v1"
    docker_base_key=$(printf '%s' "$docker_base_recipe" | sha256sum | cut -c1-12)
    docker_base_dir=/var/cache/rtgateway-ci/docker-base-$docker_base_key
    if [ ! -s "$docker_base_dir/rootfs.tar" ]; then
        echo "system-deps: building the Docker stand-in base ($docker_base_recipe)"
        mkdir -p /var/cache/rtgateway-ci
        rm -rf /var/cache/rtgateway-ci/.docker-base.*  # what a failed run left
        docker_base_tmp=$(mktemp -d /var/cache/rtgateway-ci/.docker-base.XXXXXX)
        # A failed debootstrap leaves a half-made tree: start each try afresh.
        docker_base_debootstrap() {
            rm -rf "$docker_base_tmp/root"
            debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
                bookworm "$docker_base_tmp/root" http://deb.debian.org/debian >/dev/null
        }
        retry docker_base_debootstrap
        # pip inside `docker build` then trusts exactly what the host trusts.
        cp /etc/ssl/certs/ca-certificates.crt "$docker_base_tmp/root/etc/ssl/certs/"
        # An image needs no package lists, caches or docs; they only slow the import.
        rm -rf "$docker_base_tmp"/root/var/lib/apt/lists/* "$docker_base_tmp"/root/var/cache/apt/* \
            "$docker_base_tmp"/root/usr/share/doc/* "$docker_base_tmp"/root/usr/share/man/*
        tar -C "$docker_base_tmp/root" --numeric-owner -cf "$docker_base_tmp/rootfs.tar" .
        rm -rf "$docker_base_tmp/root"
        rm -rf "$docker_base_dir"
        chmod 755 "$docker_base_tmp"
        mv "$docker_base_tmp" "$docker_base_dir"
        # Tarballs of older recipes are never used again.
        find /var/cache/rtgateway-ci -maxdepth 1 -name 'docker-base-*' \
            ! -path "$docker_base_dir" -exec rm -rf {} +
    fi
    ln -sfn "$docker_base_dir/rootfs.tar" /var/cache/rtgateway-ci/docker-base.tar
    unset docker_base_recipe docker_base_key docker_base_dir docker_base_tmp
    unset -f docker_base_debootstrap
fi
