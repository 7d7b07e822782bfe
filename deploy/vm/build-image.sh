#!/usr/bin/env bash
# Builds the disk image of the test VM: Debian with systemd as PID 1 (cgroup v2) and a runner.
#
# The VM (harness/vm.py boots it) is where host tasks take the path they take on every
# current server: systemd-run scopes and cgroup v2 files. Everything in it comes from
# Debian packages, except the project, installed from wheels built here with pip:
#
#   base-<hash>/       the root made by debootstrap (Debian's cloud kernel, systemd, udev,
#                      python3, qemu-guest-agent, numactl); rebuilt when the package list
#                      or the recipe number changes (about a minute)
#   <hash>.img         an ext4 image of a copy of the base plus /opt/hakuriver (a venv with
#                      the project and its test extras), the repository's tests/ and harness/
#                      in /opt/hakuriver/src, and hakuriver-runner.service exactly as
#                      `hakuriver.init service --runner` writes it; rebuilt when the sources,
#                      this script or the base change (about 30 s)
#   <hash>.vmlinuz, <hash>.initrd   the image's kernel and initrd, booted directly
#   current            the name (<hash>) of the newest image, read by harness/vm.py
#
# Usage: deploy/vm/build-image.sh            build what is missing, print the image's path
# Environment: HAKURIVER_VM_CACHE (default /var/cache/hakuriver-vm), HAKURIVER_DEBIAN_MIRROR,
#   PYTHON (the interpreter whose pip builds the wheels; its Python version must be the
#   guest's, 3.11 on bookworm, as the wheels of compiled dependencies are per version).
# Needs root (debootstrap, chroot); installs debootstrap, qemu-system-x86 and socat with apt-get
# when they are missing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${HAKURIVER_VM_CACHE:-/var/cache/hakuriver-vm}
suite=bookworm
guest_python=3.11
# Packages of the base. Changing this list or the recipe number rebuilds the base.
base_packages="systemd-sysv udev dbus linux-image-cloud-amd64 python3 python3-venv qemu-guest-agent numactl procps"
base_recipe=1
log() { echo "build-image: $*" >&2; }

. "$here/../debian-mirror.sh"  # sets $mirror

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v socat >/dev/null || missing+=(socat)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
host_python=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$host_python" != "$guest_python" ]; then
    log "PYTHON=$python is Python $host_python; the guest runs $guest_python (set PYTHON to a $guest_python interpreter)"
    exit 2
fi

hash_of() { sha256sum | cut -c1-12; }
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one build at a time; a second caller waits and then reuses the result

# --- 1. the base root ------------------------------------------------------------------------
base_hash=$(printf '%s\n' "$suite" "$base_packages" "$base_recipe" | hash_of)
base=$cache/base-$base_hash
if [ -d "$base" ]; then
    log "reusing $base"
else
    tmp=$base.tmp
    rm -rf "$tmp"
    log "debootstrap $suite from $mirror"
    started=$SECONDS
    debootstrap --variant=minbase --include="${base_packages// /,}" "$suite" "$tmp" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 || { tail -n 30 "$cache/debootstrap.log" >&2; exit 1; }
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin "$tmp"/var/cache/apt/archives/*.deb \
        "$tmp"/usr/share/doc/* "$tmp"/usr/share/man/* "$tmp"/usr/share/locale/*
    log "debootstrap took $((SECONDS - started)) s"
    mv "$tmp" "$base"
    # older bases are of no use any more
    find "$cache" -maxdepth 1 -name 'base-*' -type d ! -name "base-$base_hash" -exec rm -rf {} +
fi

# --- 2. the image: the base, the project, the runner's unit ------------------------------------
# tests/vm runs on the host, not in the guest: editing it rebuilds nothing
source_hash=$(cd "$repo" && find pyproject.toml hakuriver runner client hakurun harness tests \
    \( -name '*.py' -o -name '*.toml' \) -not -path '*/__pycache__/*' -not -path 'tests/vm/*' \
    | LC_ALL=C sort | xargs sha256sum | sha256sum)
image_hash=$(printf '%s\n' "$base_hash" "$source_hash" "$(sha256sum <"$0")" | hash_of)
image=$cache/$image_hash.img
if [ -f "$image" ]; then
    log "reusing $image"
else
    started=$SECONDS
    root=$cache/root.tmp
    rm -rf "$root"
    cp -a "$base" "$root"
    trap 'rm -rf "$root"' EXIT
    log "building the wheels"
    mkdir -p "$root/tmp/wheels"
    "$python" -m pip wheel -q --disable-pip-version-check -w "$root/tmp/wheels" "$repo[test]" \
        >"$cache/pip.log" 2>&1 || { tail -n 30 "$cache/pip.log" >&2; exit 1; }
    # commands in the new root see none of this machine's environment (PIP_* settings among it)
    in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$root" "$@"; }
    in_root python3 -m venv /opt/hakuriver
    in_root /opt/hakuriver/bin/pip install -q --no-index --disable-pip-version-check \
        --find-links /tmp/wheels 'hakuriver[test]'
    rm -rf "$root/tmp/wheels"
    # the in-guest tests (tests/test_cgroups.py) run from a copy of the repository's tests
    mkdir -p "$root/opt/hakuriver/src"
    cp -r "$repo/tests" "$repo/harness" "$repo/pyproject.toml" "$root/opt/hakuriver/src/"
    rm -rf "$root/opt/hakuriver/src/tests/vm"
    find "$root/opt/hakuriver/src" -name __pycache__ -prune -exec rm -rf {} +
    # the runner's unit, written by the project itself and used as written
    in_root /opt/hakuriver/bin/hakuriver.init service --runner --config /etc/hakuriver/config.toml \
        >/dev/null 2>&1
    mkdir -p "$root/etc/hakuriver"

    # the machine: hostname, root file system, a static address on QEMU's user network
    echo hakuriver-vm >"$root/etc/hostname"
    echo "127.0.1.1 hakuriver-vm" >>"$root/etc/hosts"
    echo "/dev/vda / ext4 rw,relatime 0 1" >"$root/etc/fstab"
    mkdir -p "$root/etc/systemd/network"
    printf '[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n' \
        >"$root/etc/systemd/network/10-user.network"
    in_root systemctl enable -q systemd-networkd
    # Boot time under TCG is CPU time: nothing that is not needed. The initrd holds only what
    # mounts the root (the default, MODULES=most, loads hundreds of modules); no graphical
    # target, no persistent journal to flush, no timers or jobs that compete with the tests.
    sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
    printf 'virtio_pci\nvirtio_blk\n' >>"$root/etc/initramfs-tools/modules"
    in_root update-initramfs -u -k all >/dev/null 2>&1
    in_root systemctl set-default -q multi-user.target
    mkdir -p "$root/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\n' >"$root/etc/systemd/journald.conf.d/volatile.conf"
    in_root systemctl mask -q apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
        fstrim.timer systemd-tmpfiles-clean.timer getty@tty1.service modprobe@.service \
        systemd-update-utmp.service systemd-update-utmp-runlevel.service 2>/dev/null || true
    # the serial console logs in as root by itself (a test machine, reachable only from here)
    mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
    printf '[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200 %%I $TERM\n' \
        >"$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"

    name=$image_hash
    cp "$(ls "$root"/boot/vmlinuz-* | head -n1)" "$cache/$name.vmlinuz"
    cp "$(ls "$root"/boot/initrd.img-* | head -n1)" "$cache/$name.initrd"
    rm -f "$image.tmp"
    mkfs.ext4 -q -F -L hakuriver-vm -d "$root" "$image.tmp" 3G >/dev/null
    mv "$image.tmp" "$image"
    rm -rf "$root"
    trap - EXIT
    # older images are of no use any more
    find "$cache" -maxdepth 1 -type f \( -name '*.img' -o -name '*.vmlinuz' -o -name '*.initrd' \) \
        ! -name "$name.*" -delete
    log "image built in $((SECONDS - started)) s"
fi
echo "$image_hash" >"$cache/current.tmp" && mv "$cache/current.tmp" "$cache/current"
echo "$image"
