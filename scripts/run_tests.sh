#!/usr/bin/env bash
# The test command: set up ./.venv on a fresh machine and run every test (unit + nnU-Net integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -ra --durations=30 "$@"
