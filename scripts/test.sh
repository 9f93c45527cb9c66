#!/usr/bin/env bash
# Set up everything from scratch and run the whole test suite, with lint and type checks.
#   bash scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# System tools the tests use, from Debian's packages when missing (CI runs as root).
apt_updated=""
need() {  # need COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ]; then echo "scripts/test.sh: '$1' is missing: install the Debian package '$2'" >&2; exit 1; fi
  [ -n "$apt_updated" ] || { apt-get update -qq >/dev/null; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
need ss iproute2
need ip iproute2
need curl curl
need node nodejs
need chromium chromium  # the status page test renders it in a real headless browser
# Discovery tests start etcd (a cluster of their own) and dnsmasq (an authoritative DNS server).
need etcd etcd-server
need dnsmasq dnsmasq-base
need systemd-socket-activate systemd  # socket activation and sd_notify tests (tests/test_systemd.py)
need systemd-analyze systemd
# The PostgreSQL tests start a server of their own from Debian's binaries (not on PATH) unless
# RPYC_HOST_TEST_POSTGRES names a reachable one.
if [ -z "${RPYC_HOST_TEST_POSTGRES:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need initdb postgresql
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
