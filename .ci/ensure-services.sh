#!/usr/bin/env bash
# Makes sure what HakuRiver and its tests need is installed and running (run as root):
# a virtual environment with the project, numactl, RabbitMQ, Chromium for the browser test
# (unless HAKURIVER_NO_BROWSER=1), and (unless HAKURIVER_NO_DOCKER=1)
# a Docker engine with the locally built base image. Idempotent: each step checks first.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
command -v numactl >/dev/null 2>&1 || missing+=(numactl)
command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
# The dashboard's browser test drives Debian's Chromium (a test tool's own browser download
# cannot work offline). HAKURIVER_NO_BROWSER=1 skips it where no test runs (deploy/local-up).
if [ "${HAKURIVER_NO_BROWSER:-0}" != 1 ]; then
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt_install "${missing[@]}"
fi

# RabbitMQ: the machine's own broker, started if it is not running.
if ! rabbitmq-diagnostics -q check_running >/dev/null 2>&1; then
    echo "starting RabbitMQ" >&2
    rabbitmq-server -detached
    for _ in $(seq 1 60); do
        rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && break
        sleep 1
    done
fi

# The project in its own virtual environment.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# compat mode: a plain path entry; the default editable finder costs ~25 ms at every start-up.
# An editable install only needs redoing when pyproject.toml changes (dependencies, entry
# points): a stamp named after its hash saves the ~30 s pip takes even when nothing is missing.
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
    rm -f .venv/.installed-*
    touch "$stamp"
fi

if [ "${HAKURIVER_NO_DOCKER:-0}" != 1 ]; then
    bash .ci/setup-docker.sh
fi
