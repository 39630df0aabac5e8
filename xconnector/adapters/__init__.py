"""Built-in adapters, chosen by name in the config: `lmcache` (cache: the native engine with
LMCache-style settings), `vllm` (inference: vLLM's KV layouts), `dynamo` (distributed: this
worker's identity and prefix-overlap scoring among workers)."""

from __future__ import annotations

import importlib

from xconnector.adapters.base import Adapter

__all__ = ["ADAPTERS", "Adapter", "adapter_class"]

#: name -> "module:Class"; imported only when configured. The config schema admits only these
#: names (`KNOWN_ADAPTERS` in the core), so every validated adapter config has a class here.
ADAPTERS = {
    "lmcache": "xconnector.adapters.lmcache:LMCacheAdapter",
    "vllm": "xconnector.adapters.vllm:VLLMAdapter",
    "dynamo": "xconnector.adapters.dynamo:DynamoAdapter",
}


def adapter_class(name: str) -> type[Adapter]:
    module, cls = ADAPTERS[name].split(":")
    found: type[Adapter] = getattr(importlib.import_module(module), cls)
    return found
