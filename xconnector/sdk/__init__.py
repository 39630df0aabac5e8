"""The XConnector SDK.

`XConnectorSDK`, the factories and the config classes load the native engine; they are imported
on first use so that `import xconnector.sdk.exceptions` stays free for the autopatch.
"""

from __future__ import annotations

from xconnector.exceptions import (
    CacheError,
    ConfigError,
    InternalError,
    InvalidInputError,
    NativeModuleError,
    StateError,
    XConnectorError,
)

TYPE_CHECKING = False  # see xconnector/__init__.py

if TYPE_CHECKING:
    from typing import Any

    from xconnector.config.schema import AdapterConfig, SDKConfig
    from xconnector.sdk.factory import KVCacheSDK, create_kv_cache_sdk, create_xconnector_sdk
    from xconnector.sdk.xconnector_sdk import XConnectorSDK

__all__ = [
    "AdapterConfig",
    "CacheError",
    "ConfigError",
    "InternalError",
    "InvalidInputError",
    "KVCacheSDK",
    "NativeModuleError",
    "SDKConfig",
    "StateError",
    "XConnectorError",
    "XConnectorSDK",
    "create_kv_cache_sdk",
    "create_xconnector_sdk",
]

_LAZY = {
    "AdapterConfig": "xconnector.config.schema",
    "SDKConfig": "xconnector.config.schema",
    "KVCacheSDK": "xconnector.sdk.factory",
    "create_kv_cache_sdk": "xconnector.sdk.factory",
    "create_xconnector_sdk": "xconnector.sdk.factory",
    "XConnectorSDK": "xconnector.sdk.xconnector_sdk",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'xconnector.sdk' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
