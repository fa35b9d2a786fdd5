#!/usr/bin/env bash
# Installs everything streamsed needs on a fresh Debian machine: system packages,
# a virtualenv in .venv with the pinned CPU torch first (a bare `torch` would pull
# a multi-GB CUDA build), then the package with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

# mosquitto: MQTT tests; chromium: browser tests; alsa-utils: virtual microphone; tmux: terminal UI tests
APT_PACKAGES=(espeak-ng sox libportaudio2 libsndfile1 mosquitto mosquitto-clients openssl chromium alsa-utils tmux curl)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
