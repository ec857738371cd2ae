#!/usr/bin/env bash
# Installs what a fresh machine lacks to run and test northstar:
#   nats-server (Debian's package; JetStream included) and, with --test, the SDK clients the
#   wire tests drive (Python: segment-analytics-python, posthog; Node: @segment/analytics-node,
#   posthog-node; posthog-js in Debian's Chromium), the Postgres clients the Postgres wire test
#   drives (psql from Debian's postgresql-client; psycopg, SQLAlchemy, pandas from PyPI) and
#   promtool (Debian's prometheus package), which checks /metrics.
# Safe to run again: it only installs what is missing.
set -euo pipefail

want_test=false
[ "${1:-}" = "--test" ] && want_test=true

have_nats() {
  command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || [ -n "${NORTHSTAR_NATS_SERVER:-}" ]
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; exit 1; fi
}

if ! have_nats; then
  echo "installing nats-server (Debian package)…"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y nats-server >/dev/null 2>&1 || {
    as_root apt-get update -qq
    as_root apt-get install -y nats-server
  }
  # Debian's package starts a system nats-server on 4222; northstar runs its own, so stop it.
  as_root systemctl disable --now nats-server >/dev/null 2>&1 || true
fi

if $want_test; then
  if ! python3 -c 'import segment.analytics, posthog, psycopg, sqlalchemy, pandas' >/dev/null 2>&1; then
    echo "installing the Python SDK and Postgres clients for the wire tests…"
    python3 -m pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
  fi
  # The official Node SDKs (posthog-node, @segment/analytics-node), pinned by the lock file;
  # they need Node 20 or newer.
  node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
  if [ "$(node_major)" -lt 20 ] || ! command -v npm >/dev/null 2>&1; then
    echo "installing Node.js and npm (Debian packages)…"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y --no-install-recommends nodejs npm >/dev/null 2>&1 || {
      as_root apt-get update -qq
      as_root apt-get install -y --no-install-recommends nodejs npm
    }
    if [ "$(node_major)" -lt 20 ]; then
      echo "the Node SDK tests need Node.js 20 or newer; this machine has $(node --version 2>&1)" >&2
      exit 1
    fi
  fi
  if [ ! -d tests/sdk/node/node_modules ] || [ tests/sdk/node/package-lock.json -nt tests/sdk/node/node_modules ]; then
    echo "installing the Node SDK clients for the wire tests…"
    npm ci --prefix tests/sdk/node --no-audit --no-fund --loglevel=error
  fi
  # psql, for the Postgres wire test (Debian's postgresql-client).
  # (openssl makes the certificate of its TLS case.)
  if ! command -v psql >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
    echo "installing psql (Debian's postgresql-client) and openssl for the Postgres wire test…"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y --no-install-recommends postgresql-client openssl >/dev/null 2>&1 || {
      as_root apt-get update -qq
      as_root apt-get install -y --no-install-recommends postgresql-client openssl
    }
  fi
  # posthog-js runs in headless Chromium (Debian's package).
  if ! command -v chromium >/dev/null 2>&1; then
    echo "installing Chromium (Debian package) for the browser SDK test…"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || {
      as_root apt-get update -qq
      as_root apt-get install -y --no-install-recommends chromium
    }
  fi
  if ! command -v promtool >/dev/null 2>&1; then
    echo "installing promtool (Debian's prometheus package)…"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 || {
      as_root apt-get update -qq
      as_root apt-get install -y --no-install-recommends prometheus
    }
    # Only its promtool is wanted: the package's own server is stopped.
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
