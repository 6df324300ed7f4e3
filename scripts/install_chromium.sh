#!/usr/bin/env bash
# Headless Chromium for the report test (tests/test_report.py renders OUT/report.html to a PNG).
# Installed from the distribution (Debian: chromium, and a font to draw text with) only when no
# Chromium or Chrome is on PATH.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        exit 0
    fi
done
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
