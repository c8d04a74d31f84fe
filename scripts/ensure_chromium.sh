#!/usr/bin/env bash
# Headless Chromium for the dashboard test (tests/pipeline/test_run_control.py, via tests/pipeline/chromium.py):
# Debian's `chromium` package, installed with apt-get when missing (make test runs as
# root on the project's machines). Fails loudly when it cannot be installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "chromium is missing: install Debian's chromium package (apt-get install chromium) as root" >&2
  exit 1
fi
echo "installing chromium (apt-get) for the dashboard test" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null || { echo "chromium install failed" >&2; exit 1; }
