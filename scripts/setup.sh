#!/usr/bin/env bash
# Sets up everything the demo and the tests need, idempotently: a virtualenv in .venv with the
# development tools, and the Rust extension built (release) and installed into it.
# Re-running it is cheap: pip runs only when pyproject.toml changed; cargo rebuilds incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${XCONNECTOR_VENV:-.venv}

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.xconnector-deps"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing development dependencies"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # The dev extra lists the tools; install them without building the package itself.
    "$VENV/bin/python" - <<'PY' > "$VENV/.dev-requirements.txt"
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]))
PY
    "$VENV/bin/python" -m pip install --quiet -r "$VENV/.dev-requirements.txt"
    echo "$want" > "$stamp"
fi

echo "setup: building the native extension (release)"
VIRTUAL_ENV="$PWD/$VENV" PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/maturin" develop --release
"$VENV/bin/python" -c "import xconnector._native as n; print('setup: xconnector._native', n.__version__, 'ready')"
