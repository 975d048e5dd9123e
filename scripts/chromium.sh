#!/usr/bin/env bash
# Debian's chromium, for the report test that loads report.html in a headless browser
# (tests/test_report.py; skipped where /usr/bin/chromium is absent). Needs root; idempotent.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  echo "chromium: installing the Debian package chromium" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq chromium >&2
fi
/usr/bin/chromium --version >&2
