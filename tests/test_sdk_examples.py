"""The design document's two usage examples, as written: direct SDK use, and a
`VLLMWorkerWithXConnector` subclass whose `recv_kv_caches` consults the SDK and falls back to the
original. The second identical request is served from the cache, with exactly the KV the model
computed, into different physical blocks.

The worker is the vLLM-v0-shaped stand-in of `v0_worker.py` (vLLM's v0 engine cannot run here)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from v0_worker import BLOCK, VLLMWorker, expected_kv

# ---- the design document's example, verbatim (sdk.md 4.2) -----------------------------------
from xconnector.sdk import create_xconnector_sdk

# 初始化SDK
sdk = create_xconnector_sdk(
    mode="embedded",
    config={
        "adapters": [{"name": "lmcache", "type": "cache", "config": {"storage_backend": "memory"}}]
    },
)


# 在Worker中使用
class VLLMWorkerWithXConnector(VLLMWorker):
    def __init__(self, config):
        super().__init__(config)
        self.xconnector_sdk = sdk

    async def recv_kv_caches(self, *args, **kwargs):
        # 通过SDK处理KV缓存
        result = await self.xconnector_sdk.handle_kv_receive(*args, **kwargs)
        if result.cache_hit:
            return result.data

        # 回退到原始逻辑
        return await super().recv_kv_caches(*args, **kwargs)


# ---- end of the example ------------------------------------------------------------------------


class WorkerThatAlsoStores(VLLMWorkerWithXConnector):
    """The example shows the receive half; the send half stores what the worker computed."""

    async def send_kv_caches(
        self, model_executable: Any, model_input: Any, kv_caches: Any, hidden: Any
    ) -> None:
        await self.xconnector_sdk.handle_kv_send(model_executable, model_input, kv_caches, hidden)
        return await super().send_kv_caches(model_executable, model_input, kv_caches, hidden)


def prompt(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 32000, n).tolist()


def test_direct_sdk_use_and_the_worker_subclass_hit_on_the_second_identical_request() -> None:
    worker = WorkerThatAlsoStores({"num_blocks": 64, "seed": 1})
    p = prompt(5 * BLOCK + 3, seed=7)  # 83 tokens: 5 full blocks and 3 more

    first = asyncio.run(worker.prefill([p]))
    assert worker.model.computed_tokens == len(p)  # nothing cached yet
    assert first.input_tokens.size == len(p)
    first_table = worker.last_tables[0]
    worker.finish()

    # The blocks freed by the first request are handed out again: make sure the second
    # request's table differs, then check the KV landed in the new blocks.
    worker.allocator.free.reverse()
    second = asyncio.run(worker.prefill([p]))
    table = worker.last_tables[0]
    assert table != first_table
    hits = 5 * BLOCK  # all full blocks; the last token is recomputed anyway
    assert worker.model.computed_tokens == len(p) + (len(p) - hits)
    assert second.input_tokens.tolist() == p[hits:]
    assert second.input_positions.tolist() == list(range(hits, len(p)))
    assert second.attn_metadata.context_lens_tensor.tolist() == [hits]
    assert second.attn_metadata.num_prefill_tokens == len(p) - hits
    for got, want in zip(worker.kv_of(p, table), expected_kv(p), strict=True):
        assert np.array_equal(got, want)

    stats = sdk.get_monitoring_handler().snapshot()
    assert stats["counters"]["hit_tokens"] == hits
    assert stats["fallbacks"] == {}


def test_a_prompt_sharing_a_prefix_hits_only_the_prefix() -> None:
    worker = WorkerThatAlsoStores({"num_blocks": 64, "seed": 2})
    system = prompt(3 * BLOCK, seed=11)
    a = system + prompt(40, seed=12)
    b = system + prompt(21, seed=13)
    asyncio.run(worker.prefill([a]))
    worker.finish()
    before = worker.model.computed_tokens
    out = asyncio.run(worker.prefill([b]))
    assert out.input_tokens.tolist() == b[3 * BLOCK :]
    assert worker.model.computed_tokens - before == len(b) - 3 * BLOCK
    for got, want in zip(worker.kv_of(b, worker.last_tables[0]), expected_kv(b), strict=True):
        assert np.array_equal(got, want)


def test_a_batch_of_several_prompts_with_mixed_hits() -> None:
    worker = WorkerThatAlsoStores({"num_blocks": 128, "seed": 3})
    cached = prompt(4 * BLOCK + 1, seed=21)
    asyncio.run(worker.prefill([cached]))
    worker.finish()
    fresh = prompt(2 * BLOCK + 5, seed=22)
    short = prompt(BLOCK, seed=23)  # one block: its last token must be computed, so no hit
    out = asyncio.run(worker.prefill([fresh, cached, short]))
    assert out.input_tokens.tolist() == fresh + cached[4 * BLOCK :] + short
    assert out.attn_metadata.query_start_loc.tolist() == [
        0,
        len(fresh),
        len(fresh) + 1,
        len(fresh) + 1 + BLOCK,
    ]
    assert out.sampling_metadata.selected_token_indices.tolist() == [
        len(fresh) - 1,
        len(fresh),
        len(fresh) + BLOCK,
    ]
    for p, table in zip([fresh, cached, short], worker.last_tables, strict=True):
        for got, want in zip(worker.kv_of(p, table), expected_kv(p), strict=True):
            assert np.array_equal(got, want)
