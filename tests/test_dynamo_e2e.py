"""XConnector inside a real NVIDIA Dynamo 1.6.1 deployment on CPU (scripts/dynamo_env.sh): the KV
router (`dynamo.frontend --router-mode kv`) in front of two `dynamo.vllm` workers with
XConnector, vLLM's KV events relayed to the router. A prompt served by one worker and then
pushed out of that worker's vLLM cache is routed back to it on repeat, because the router now
sees XConnector's host-memory copy (its own selection record says so), and XConnector serves it
there. With XConnector off, the router sees nothing of the kind and nothing is served from it.
Asserts on counts and routing, never on time."""

from __future__ import annotations

import collections
import importlib.util
import random
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.dynamo,
    pytest.mark.skipif(
        importlib.util.find_spec("dynamo") is None,
        reason="runs in .venv-dynamo, where scripts/test.sh has ai-dynamo 1.6.1",
    ),
    pytest.mark.timeout(900),
]

from dynamo_app.deployment import BLOCK, Deployment, Served, make_model  # noqa: E402

GPU_BLOCKS = 64
SECTION = {"adapters": [{"name": "lmcache", "config": {"max_cache_size": "64MiB"}}]}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-llama-tok"))


def scenario(d: Deployment, seed: int) -> tuple[int, dict[str, Any], Served]:
    """A long prompt to some worker W, then distinct prompts until W has computed more blocks
    than its vLLM cache holds (the prompt's blocks leave it), then the prompt again. Returns W,
    the router's record for the repeat, and how the repeat was served."""
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 512) for _ in range(200)]  # 6 full blocks
    first = d.complete(prompt)
    sent: collections.Counter[int] = collections.Counter()
    # Each filler is 9 full blocks: 9 of them on W are 81 blocks > its 64.
    while sent[first.worker] < 9:
        assert sum(sent.values()) < 200, f"the router never sends fillers to W: {sent}"
        filler = d.complete([rng.randrange(3, 512) for _ in range(300)], max_tokens=1)
        sent[filler.worker] += 1
    d.settle()  # the router has seen the prompt's blocks leave W's vLLM cache
    # The scheduler's cross-process lookup gives a rank 100 ms and, when the rank missed that
    # (a worker busy with the fillers on an oversubscribed CPU), answers 0 for the next second
    # without asking (lookup_service::client, retry_after): the repeat is asked after it.
    time.sleep(1.5)
    before = len(d.selections())
    repeat = d.complete(prompt)
    records = d.selections()[before:]
    assert len(records) == 1, records
    record = records[0]
    assert int(record["worker_id"]) == repeat.worker  # the record is the repeat's
    return first.worker, record, repeat


def host_hits(metrics: str) -> float:
    """vLLM's count of prompt tokens served from the connector (`CacheHitSource.HOST`)."""
    name = "vllm:prompt_tokens_cached_by_source_total{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(name) and 'source="host"' in line
    )


def test_the_router_sends_a_repeat_back_to_the_worker_whose_xconnector_holds_it(
    model: str, tmp_path: Path
) -> None:
    with Deployment(model, tmp_path, xconnector=SECTION, gpu_blocks=GPU_BLOCKS) as d:
        worker, record, repeat = scenario(d, seed=1)
        served_from_host = host_hits(d.worker_metrics(0) + d.worker_metrics(1))
    # The router chose the worker that holds the prompt, because of XConnector's host copy:
    # its GPU copy is gone (host blocks count only past the GPU match), the host copy is there.
    assert repeat.worker == worker, record
    assert int(record["host_pinned_blocks"]) == 200 // BLOCK, record
    # ... and XConnector served it there (all but the last token's block).
    assert repeat.cached_tokens >= 5 * BLOCK, (repeat, record)
    assert served_from_host >= repeat.cached_tokens


@pytest.mark.parametrize(
    "control",
    ["xconnector_off", "events_off"],
)
def test_without_xconnectors_events_the_router_sees_no_host_copy(
    model: str, tmp_path: Path, control: str
) -> None:
    """The controls: XConnector off (XCONNECTOR_DISABLE=1), and XConnector on but left out of
    vLLM's events ("report_kv_events": false). Either way the router has no host copy to
    credit; with XConnector off nothing is served from a cache either."""
    off = control == "xconnector_off"
    env = {"XCONNECTOR_DISABLE": "1"} if off else {}
    with Deployment(
        model,
        tmp_path,
        xconnector=SECTION,
        report_kv_events=off,  # off: XConnector is off anyway
        gpu_blocks=GPU_BLOCKS,
        env=env,
    ) as d:
        _, record, repeat = scenario(d, seed=1)
    assert int(record["host_pinned_blocks"]) == 0 and int(record["disk_blocks"]) == 0, record
    if off:
        assert repeat.cached_tokens == 0, (repeat, record)
