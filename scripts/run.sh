#!/usr/bin/env bash
# Installs everything, then runs the streamsed daemon on the default model (Whisper base,
# offline) with config/streamsed.toml. Extra arguments go to `streamsed serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/streamsed serve --config config/streamsed.toml "$@"
