#!/usr/bin/env bash
# The main job: set everything up, then run the demo (store a prompt's KV, look it up again,
# show the hit and the load bandwidth).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m xconnector.demo "$@"
