#!/usr/bin/env bash
# Brings up a Docker engine and the test base image on a fresh CI machine (run as root).
#
# Idempotent: every step checks first. No registry is reachable from CI, so the
# base image is built locally from Debian's busybox-static and `docker import`ed.
# The machine has no systemd as PID 1, so dockerd is started in the background.
set -euo pipefail

LOG=/tmp/dockerd.log
BASE_IMAGE=hakuriver/hakuriver-base:base
ALIAS_IMAGE=hakuriver/busybox:base

# `docker` alone may be a client-only binary; the engine is what we need.
if ! command -v dockerd >/dev/null 2>&1 || ! command -v busybox >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
        docker.io busybox-static iptables >/dev/null
fi

engine_up() { docker info >/dev/null 2>&1; }

if ! engine_up; then
    # overlay2 when the kernel and backing fs allow it, else vfs (slow but works anywhere).
    driver=overlay2
    if ! grep -qw overlay /proc/filesystems; then driver=vfs; fi
    start_dockerd() {
        # iptables/bridge rules need privileges a CI sandbox may not grant; tasks use host networking.
        nohup dockerd --storage-driver="$1" --iptables=false --ip6tables=false --bridge=none \
            >>"$LOG" 2>&1 </dev/null &
        for _ in $(seq 1 60); do
            engine_up && return 0
            kill -0 $! 2>/dev/null || return 1
            sleep 0.5
        done
        return 1
    }
    if ! start_dockerd "$driver"; then
        if [ "$driver" != vfs ]; then
            echo "dockerd failed with $driver, retrying with vfs (see $LOG)" >&2
            pkill -x dockerd 2>/dev/null || true
            sleep 1
            start_dockerd vfs || { tail -n 30 "$LOG" >&2; exit 1; }
        else
            tail -n 30 "$LOG" >&2; exit 1
        fi
    fi
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,tmp,proc,sys,dev,etc,shared,local_temp,root}
    chmod 1777 "$root/tmp"
    cp "$(command -v busybox)" "$root/bin/busybox"
    # every applet as a symlink to /bin/busybox, made by busybox itself inside the tree
    chroot "$root" /bin/busybox --install -s
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/sh"]' - "$BASE_IMAGE" >/dev/null
fi
if ! docker image inspect "$ALIAS_IMAGE" >/dev/null 2>&1; then
    docker tag "$BASE_IMAGE" "$ALIAS_IMAGE"
fi
docker info --format 'docker {{.ServerVersion}} storage={{.Driver}} cgroup={{.CgroupVersion}}'
