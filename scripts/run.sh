#!/usr/bin/env bash
# Installs everything, then runs streamsed on the default model (Whisper base, offline).
# Until the daemon lands this translates the bundled English sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/streamsed translate samples/hello_en.wav "$@"
