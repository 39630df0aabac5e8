"""vLLM v1: every engine the process creates gets XConnector's KV connector (DESIGN 3.2, item 3).

`EngineArgs.create_engine_config` is wrapped so that the engine's `kv_transfer_config` names
`XConnectorV1`, alone when the engine has no connector, or next to the engine's own one in
vLLM's `MultiConnector` (the engine's first: it serves P/D transfers).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from xconnector import patching
from xconnector._loader import load_native
from xconnector.sdk import process

log = logging.getLogger("xconnector.autopatch")

MODULE = "vllm.engine.arg_utils"
#: Where an inline `remote_auth_key` travels to vLLM's engine processes (they inherit the
#: environment), instead of inside vLLM's config, which vLLM may print (the core's
#: `vllm_transfer::AUTH_KEY_ENV`).
AUTH_KEY_ENV = "XCONNECTOR_REDIS_AUTH_KEY"


def v1_transfer_config(existing: Any, section: dict[str, Any]) -> dict[str, Any] | None:
    """The `kv_transfer_config` an engine should run with (the rules are the core's
    `vllm_transfer`): XConnector's connector alone, or beside the engine's own in vLLM's
    MultiConnector; None when XConnector is in it already."""
    current = existing
    if current is not None and not isinstance(current, dict):
        is_instance = dataclasses.is_dataclass(current) and not isinstance(current, type)
        current = dataclasses.asdict(current) if is_instance else vars(current)
    config: dict[str, Any] | None
    config, auth_key = load_native().vllm_transfer_config(current, section)
    if auth_key is not None:
        os.environ[AUTH_KEY_ENV] = auth_key
    return config


def hook(module: Any) -> None:
    """Post-import hook for `MODULE`: wraps `EngineArgs.create_engine_config`."""
    engine_args = getattr(module, "EngineArgs", None)
    if not isinstance(engine_args, type) or not hasattr(engine_args, "create_engine_config"):
        return
    original = engine_args.__dict__.get("create_engine_config")
    if original is None or patching.is_wrapper(original):
        return

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            config = process.configured()
            if config is not None:
                wanted = v1_transfer_config(
                    getattr(self, "kv_transfer_config", None), config.to_dict()
                )
                if wanted is not None:
                    from vllm.config import KVTransferConfig

                    self.kv_transfer_config = KVTransferConfig(**wanted)
                    log.info("XConnector: engine KV connector %s", wanted["kv_connector"])
        except Exception as e:  # the engine starts as the user configured it
            log.error("XConnector could not add its KV connector: %s", e)
        return original(self, *args, **kwargs)

    create_engine_config.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(create_engine_config, patching.MARK, True)
    patching.replace(engine_args, "create_engine_config", create_engine_config)
