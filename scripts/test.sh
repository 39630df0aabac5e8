#!/usr/bin/env bash
# The whole test suite: formatting and lints, Rust tests, the typed-stub check, and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
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

echo "== pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
