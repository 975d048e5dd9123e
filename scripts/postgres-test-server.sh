#!/usr/bin/env bash
# A throw-away PostgreSQL server on loopback for the history tests; prints its URL on stdout.
#
#   export HARNESS_TEST_POSTGRES="$(bash scripts/postgres-test-server.sh)"   # start (or reuse)
#   bash scripts/postgres-test-server.sh stop                               # stop, delete its data
#
# Idempotent: a server already answering on the port is reused. The data directory is temporary
# (${TMPDIR:-/tmp}/harness-postgres-PORT), trust authentication, reachable only from 127.0.0.1 and
# the socket in /tmp. Installs the Debian package `postgresql` when no server binaries are found
# (needs root). PostgreSQL refuses to run as root, so as root the server runs as user `postgres`.
# Everything but the URL goes to stderr.
set -euo pipefail
PORT=${HARNESS_PG_PORT:-55432}
DATA=${TMPDIR:-/tmp}/harness-postgres-$PORT
URL="postgresql://postgres@127.0.0.1:$PORT/postgres"

bin_dir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$d" ]; then echo "$d"; elif command -v pg_ctl >/dev/null; then dirname "$(command -v pg_ctl)"; fi
}

BIN=$(bin_dir)
if [ -z "$BIN" ]; then
  echo "postgres-test-server: installing the Debian package postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
  BIN=$(bin_dir)
fi

# as root, run the server tools as `postgres` (from /, which that user can always enter)
as_owner() { if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi; }

if [ "${1:-start}" = stop ]; then
  [ -d "$DATA" ] && as_owner "$BIN/pg_ctl" -D "$DATA" -m immediate stop >&2 || true
  rm -rf "$DATA"
  exit 0
fi

if ! "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  if [ ! -f "$DATA/PG_VERSION" ]; then
    rm -rf "$DATA"
    mkdir -p "$DATA"
    [ "$(id -u)" = 0 ] && chown postgres: "$DATA"
    as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --no-sync >&2
  fi
  # a server killed earlier leaves its pid file behind; pg_ctl start copes with a stale one
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-k /tmp -h 127.0.0.1 -p $PORT -c fsync=off" start >&2
fi
echo "$URL"
