"""What both test apps start the CPU build of vLLM with: the tiny model, greedy-friendly fp32,
vLLM's own prefix cache off (so cached tokens are the connector's), and XConnector's
kv_transfer_config."""

from typing import Any


def engine_kwargs(model: str, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=model,
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        block_size=32,
        max_model_len=512,
        dtype="float32",
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


def xconnector_transfer_config(section: dict[str, Any]) -> dict[str, Any]:
    return {
        "kv_connector": "XConnectorV1",
        "kv_connector_module_path": "xconnector.integrations.vllm.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"xconnector": section},
    }
