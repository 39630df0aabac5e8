#!/usr/bin/env bash
# The main job: set everything up, then run a Dynamo-shaped worker (integrations/dynamo) through
# the autopatch with the YAML toggle on, and show the second request served from the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python integrations/dynamo/demo.py "$@"
