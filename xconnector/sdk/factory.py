"""Ready-to-use SDKs: `create_xconnector_sdk()` and `create_kv_cache_sdk()` return initialized
instances (shut them down with `shutdown()` or use them as context managers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xconnector.config.schema import SDKConfig
from xconnector.exceptions import ConfigError
from xconnector.sdk.xconnector_sdk import XConnectorSDK, coerce_config

__all__ = ["KVCacheSDK", "create_kv_cache_sdk", "create_xconnector_sdk"]

_CACHE_BACKENDS = ("lmcache",)


def create_xconnector_sdk(
    mode: str = "embedded", config: SDKConfig | Mapping[str, Any] | None = None
) -> XConnectorSDK:
    """An initialized SDK. A `config` dict without `enabled` is enabled."""
    sdk = XConnectorSDK(coerce_config(config, mode=mode))
    sdk.initialize()
    return sdk


class KVCacheSDK(XConnectorSDK):
    """An SDK for KV caching alone: no distributed handler."""


def create_kv_cache_sdk(
    cache_backend: str = "lmcache", config: SDKConfig | Mapping[str, Any] | None = None
) -> KVCacheSDK:
    """An initialized SDK that caches KV with `cache_backend` and does nothing distributed."""
    if cache_backend not in _CACHE_BACKENDS:
        raise ConfigError(
            f"unknown cache_backend {cache_backend!r}; available: {', '.join(_CACHE_BACKENDS)}"
        )
    cfg = coerce_config(config, force=True, enable_distributed=False)
    if cfg.adapter(cache_backend) is None:
        adapters = [*cfg.to_dict()["adapters"], {"name": cache_backend}]
        cfg = coerce_config(cfg, force=True, adapters=adapters)
    sdk = KVCacheSDK(cfg)
    sdk.initialize()
    return sdk
