# Sourced by deploy/build-images.sh and deploy/vm/build-image.sh: both debootstrap a Debian root
# and must use the mirror this machine's apt already uses (no other network may be reachable).
# Sets $mirror: $HAKURIVER_DEBIAN_MIRROR, else the first non-security Debian URL in apt's sources
# (deb822 "URIs:" and one-line "deb URL suite" formats), else deb.debian.org.

find_mirror() {
    local url
    url=$(grep -hsE '^\s*(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
        | grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ')
    echo "${url:-http://deb.debian.org/debian}"
}
mirror=${HAKURIVER_DEBIAN_MIRROR:-$(find_mirror)}
