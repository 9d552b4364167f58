#!/usr/bin/env bash
# Headless Chromium + chromedriver for the web UI browser tests (tests/serve/test_ui.py).
# Debian packages; needs root. Without them the browser tests skip (and say so).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
