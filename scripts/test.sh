#!/usr/bin/env bash
# The whole test suite, slow tests included, on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# setup.sh installed every component the tests start for real, so a skip is a failure here.
export STREAMSED_NO_SKIPS=1
# The layers of streamsed/ and their import rules ([tool.importlinter] in pyproject.toml).
.venv/bin/lint-imports
exec .venv/bin/python -m pytest -ra "$@"
