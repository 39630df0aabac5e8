"""XConnector: a KV-cache connector for NVIDIA Dynamo and vLLM.

Importing this package is cheap: the native engine is loaded on first use, so the one-line
autopatch can run in every process Dynamo starts.
"""

from __future__ import annotations

# Not `typing.TYPE_CHECKING`: importing typing costs ~10 ms in every process the autopatch runs in.
TYPE_CHECKING = False

__version__ = "1.0.0"

if TYPE_CHECKING:
    from typing import Any

    from xconnector._native import (
        BlockView,
        Engine,
        OverlapIndex,
        PagedKv,
        Router,
        local_block_hashes,
        sequence_hashes,
    )

__all__ = [
    "BlockView",
    "Engine",
    "OverlapIndex",
    "PagedKv",
    "Router",
    "__version__",
    "local_block_hashes",
    "native",
    "sequence_hashes",
]


def native() -> Any:
    """The compiled extension module, or `NativeModuleError` saying why it cannot be loaded."""
    from xconnector._loader import load_native

    return load_native()


def __getattr__(name: str) -> Any:
    """The names of `__all__` that live in the extension, loaded on first use."""
    if name in __all__ and name not in ("__version__", "native"):
        return getattr(native(), name)
    raise AttributeError(f"module 'xconnector' has no attribute {name!r}")
