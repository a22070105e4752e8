#!/usr/bin/env bash
# Create .venv (if needed) and install hyperowl with its test extra. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# CPU machines: this exact version installs a CPU build. On a GPU machine install the torch build you want first.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
# The web-page test drives Debian's chromium (never a downloaded browser). Install it only where we can:
# as root, with apt-get, and only when it is missing (re-runs do nothing).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "setup: could not install chromium; the web-page test will be skipped" >&2
fi
