#!/usr/bin/env bash
# Builds every image of the compose cluster without a container registry.
#
# For machines that reach a Debian mirror and PyPI but no Docker registry (CI, air-gapped
# labs with a local mirror). Three images come out, each tagged with a hash of its inputs
# so that a second run with the same inputs reuses what is there:
#
#   hakuriver/debian-base:<hash>   Debian (debootstrap, minbase) with python3, python3-venv
#                                  and rabbitmq-server; made with `docker import`
#   hakuriver/rabbitmq:<hash>      the broker: the base plus a config that lets the cluster's
#                                  containers log in (and `:local`, the tag compose uses)
#   hakuriver/hakuriver:<hash>     the project: deploy/Dockerfile on the base, installing
#                                  wheels built here on the build machine (and `:base`, the
#                                  tag compose uses; also the default task environment)
#
# Usage: deploy/build-images.sh [--print-env]
#   --print-env  print the environment variables docker-compose.yml reads to use these images
# Environment: HAKURIVER_DEBIAN_MIRROR (default: the first Debian mirror in /etc/apt/sources*,
#   else http://deb.debian.org/debian), HAKURIVER_DEBIAN_SUITE (default bookworm),
#   PYTHON (the interpreter whose pip builds the wheels, default python3).
# Needs root (debootstrap, chroot), python3 with pip, and a running Docker engine; installs
# debootstrap and docker-compose with apt-get when they are missing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
suite=${HAKURIVER_DEBIAN_SUITE:-bookworm}
# Packages inside the base. Changing this list (or the recipe number, when the way the
# base is made changes) changes the base hash, so the base is rebuilt.
base_packages="python3 python3-venv ca-certificates rabbitmq-server"
base_recipe=1
log() { echo "build-images: $*" >&2; }

print_env=false
[ "${1:-}" = "--print-env" ] && print_env=true

. "$here/debian-mirror.sh"  # sets $mirror

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "$@" >/dev/null
}
# The images are for docker-compose.yml: make sure there is a compose to run them with,
# the plugin where Docker ships it, else Debian's docker-compose (v1).
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    log "installing docker-compose"
    apt_install docker-compose
fi

hash_of() { sha256sum | cut -c1-12; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# --- 1. Debian base root filesystem ------------------------------------------------------
# The mirror is not part of the hash: any mirror of the suite gives the same packages.
base_hash=$(printf '%s\n' "$suite" "$base_packages" "$base_recipe" | hash_of)
base_image=hakuriver/debian-base:$base_hash
if image_exists "$base_image"; then
    log "reusing $base_image"
else
    command -v debootstrap >/dev/null || {
        log "installing debootstrap"
        apt_install debootstrap
    }
    root=$(mktemp -d /tmp/hakuriver-rootfs.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    log "debootstrap $suite from $mirror into $root"
    started=$SECONDS
    debootstrap --variant=minbase --include="${base_packages// /,}" \
        "$suite" "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
    rm -f "$root.log"
    # What a Docker image does not need: package lists, caches, docs, locales.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
    # debootstrap copies the build machine's resolv.conf; Docker writes its own.
    : >"$root/etc/resolv.conf"
    log "debootstrap took $((SECONDS - started)) s; importing"
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' - "$base_image" >/dev/null
    rm -rf "$root"
    trap - EXIT
fi

# --- 2. RabbitMQ ---------------------------------------------------------------------------
rabbit_hash=$(printf '%s\n' "$base_hash" "$(cat "$here/rabbitmq/Dockerfile" "$here/rabbitmq/rabbitmq.conf" | sha256sum)" | hash_of)
rabbit_image=hakuriver/rabbitmq:$rabbit_hash
if image_exists "$rabbit_image"; then
    log "reusing $rabbit_image"
else
    log "building $rabbit_image"
    docker build -q --network none --build-arg BASE_IMAGE="$base_image" \
        -t "$rabbit_image" "$here/rabbitmq" >/dev/null
fi
docker tag "$rabbit_image" hakuriver/rabbitmq:local

# --- 3. The project, from wheels built here ------------------------------------------------
# The wheel's bytes change with build time stamps, so hash the sources it is made of instead.
source_hash=$(cd "$repo" && find pyproject.toml hakuriver runner client hakurun -name '*.py' -o -name '*.toml' \
    | LC_ALL=C sort | xargs sha256sum | sha256sum)
project_hash=$(printf '%s\n' "$base_hash" "$source_hash" "$(sha256sum <"$here/Dockerfile")" | hash_of)
project_image=hakuriver/hakuriver:$project_hash
if image_exists "$project_image"; then
    log "reusing $project_image"
else
    context=$(mktemp -d /tmp/hakuriver-context.XXXXXX)
    trap 'rm -rf "$context"' EXIT
    # The wheels of the project and of every dependency are made here, with this machine's
    # pip set-up (index, proxy, certificates), so the image build itself needs no network.
    log "building the wheels"
    "${PYTHON:-python3}" -m pip wheel -q --disable-pip-version-check -w "$context/dist" "$repo" >"$context/pip.log" 2>&1 \
        || { tail -n 30 "$context/pip.log" >&2; exit 1; }
    rm "$context/pip.log"
    cp "$here/Dockerfile" "$context/Dockerfile"
    log "building $project_image"
    docker build -q --network none --build-arg BASE_IMAGE="$base_image" \
        -t "$project_image" "$context" >/dev/null
    rm -rf "$context"
    trap - EXIT
fi
docker tag "$project_image" hakuriver/hakuriver:base
# Each change of the sources makes a new project image; drop the older ones (those still
# used by a container stay).
docker images --format '{{.Repository}}:{{.Tag}}' hakuriver/hakuriver | grep -E ':[0-9a-f]{12}$' \
    | grep -vx "$project_image" | xargs -r docker rmi >/dev/null 2>&1 || true

if $print_env; then
    echo "HAKURIVER_IMAGE=$project_image"
    echo "HAKURIVER_RABBITMQ_IMAGE=$rabbit_image"
fi
log "done: $project_image (hakuriver/hakuriver:base), $rabbit_image (hakuriver/rabbitmq:local)"
