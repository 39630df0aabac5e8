#!/usr/bin/env bash
# The whole test suite: formatting and lints, Rust tests, the typed-stub check, and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo test -p xconnector-core --quiet

echo "== ruff / mypy / stubtest"
ruff check .
ruff format --check .
python -m mypy xconnector
python -m mypy.stubtest xconnector._native

# pytest's exit code 5 means "no tests collected": a failure here, not a pass.
run_pytest() {
    set +e
    "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests: that is a failure" >&2
        return 1
    fi
    return "$rc"
}

echo "== pytest"
run_pytest python -m pytest "$@"

echo "== pytest in .venv-vllm (tests that need torch or a real vLLM engine)"
bash scripts/vllm_env.sh
VLLM_PYTHON="${XCONNECTOR_VLLM_VENV:-.venv-vllm}/bin/python"
# This pass exists to run these tests: an environment that lost torch or vLLM fails here, and
# the no_skips plugin (tests/no_skips.py) makes any skipped test a failure.
if ! "$VLLM_PYTHON" -c "import torch, vllm"; then
    echo "$VLLM_PYTHON cannot import torch and vllm: rebuild it (rm -rf the venv; scripts/vllm_env.sh)" >&2
    exit 1
fi
PYTHONPATH="$PWD:$PWD/tests" run_pytest "$VLLM_PYTHON" -m pytest -p no:cacheprovider -p no_skips \
    -m "torch or vllm" "$@"

echo "== pytest in .venv-dynamo (a real Dynamo 1.6.1 deployment: KV router + dynamo.vllm workers)"
bash scripts/dynamo_env.sh
DYNAMO_PYTHON="${XCONNECTOR_DYNAMO_VENV:-.venv-dynamo}/bin/python"
PYTHONPATH="$PWD:$PWD/tests" run_pytest "$DYNAMO_PYTHON" -m pytest -p no:cacheprovider -p no_skips \
    -m dynamo "$@"
