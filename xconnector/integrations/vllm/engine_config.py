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
from xconnector.sdk import process

log = logging.getLogger("xconnector.autopatch")

MODULE = "vllm.engine.arg_utils"
CONNECTOR = "XConnectorV1"
CONNECTOR_MODULE = "xconnector.integrations.vllm.connector"
#: Where an inline `remote_auth_key` travels to vLLM's engine processes (they inherit the
#: environment), instead of inside vLLM's config, which vLLM may print.
AUTH_KEY_ENV = "XCONNECTOR_REDIS_AUTH_KEY"

# What a child of MultiConnector keeps of the engine's own connector config.
_CHILD_KEYS = (
    "kv_connector",
    "kv_connector_module_path",
    "kv_role",
    "kv_rank",
    "kv_parallel_size",
    "kv_ip",
    "kv_port",
    "kv_buffer_device",
    "kv_buffer_size",
    "kv_connector_extra_config",
)


def _without_inline_secrets(section: dict[str, Any]) -> dict[str, Any]:
    """`section` with an inline `remote_auth_key` moved into this process's environment
    (`AUTH_KEY_ENV`) and named by `remote_auth_key_env`."""
    adapters = section.get("adapters")
    if not isinstance(adapters, list):
        return section
    out = []
    for a in adapters:
        cfg = a.get("config") if isinstance(a, dict) else None
        if isinstance(cfg, dict) and isinstance(cfg.get("remote_auth_key"), str):
            os.environ[AUTH_KEY_ENV] = cfg["remote_auth_key"]
            cfg = {k: v for k, v in cfg.items() if k != "remote_auth_key"}
            cfg["remote_auth_key_env"] = AUTH_KEY_ENV
            a = {**a, "config": cfg}
        out.append(a)
    return {**section, "adapters": out}


def v1_transfer_config(existing: Any, section: dict[str, Any]) -> dict[str, Any] | None:
    """The `kv_transfer_config` an engine should run with: XConnector's connector when it has
    none, vLLM's MultiConnector over its own connector and XConnector's when it has one; None
    when XConnector is in it already."""
    ours = {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"xconnector": _without_inline_secrets(section)},
    }
    current = existing
    if current is not None and not isinstance(current, dict):
        is_instance = dataclasses.is_dataclass(current) and not isinstance(current, type)
        current = dataclasses.asdict(current) if is_instance else vars(current)
    if current is None or current.get("kv_connector") is None:
        return {**ours, "kv_load_failure_policy": "recompute"}
    children = current.get("kv_connector_extra_config", {}).get("connectors", [])
    names = [current.get("kv_connector"), *(c.get("kv_connector") for c in children)]
    if CONNECTOR in names:
        return None
    inner = {k: v for k, v in current.items() if k in _CHILD_KEYS and v is not None}
    return {
        "kv_connector": "MultiConnector",
        "kv_role": current.get("kv_role") or "kv_both",
        "kv_load_failure_policy": current.get("kv_load_failure_policy") or "recompute",
        "kv_connector_extra_config": {"connectors": [inner, ours]},
    }


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
