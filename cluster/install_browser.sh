#!/usr/bin/env bash
# Install headless Chromium and its WebDriver for the dashboard's browser tests
# (tests/test_dashboard_browser.py). Idempotent: does nothing when both are already there.
#
#   bash cluster/install_browser.sh          # as root, or with sudo available
#
# Debian's packages put the browser at /usr/bin/chromium and the driver at /usr/bin/chromedriver,
# the paths the tests look for. The tests skip (with the reason) when either is missing.
set -euo pipefail

BROWSER=/usr/bin/chromium
DRIVER=/usr/bin/chromedriver

if [[ -x "$BROWSER" && -x "$DRIVER" ]]; then
    echo "[install_browser] $("$BROWSER" --version 2>/dev/null || echo chromium) and $("$DRIVER" --version 2>/dev/null | head -n1 || echo chromedriver) already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install_browser] apt-get not found: install Chromium and its matching chromedriver at $BROWSER and $DRIVER by hand" >&2
    exit 1
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "[install_browser] needs root (or sudo) to apt-get install chromium chromium-driver" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# The package lists of a fresh image are empty; refresh them once, then install without extras.
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null

for binary in "$BROWSER" "$DRIVER"; do
    if [[ ! -x "$binary" ]]; then
        echo "[install_browser] apt-get finished but $binary is missing" >&2
        exit 1
    fi
done
echo "[install_browser] installed $("$BROWSER" --version 2>/dev/null) and $("$DRIVER" --version 2>/dev/null | head -n1)"
