"""Runs a real vLLM engine (the CPU build) on the tiny model and prints one JSON line (after
`XCONNECTOR_RESULT `): each
request's greedy output tokens and how many prompt tokens vLLM reports as cached (with vLLM's own
prefix caching off, those came from the KV connector).

    python run_engine.py MODEL_DIR MODE [STORAGE_DIR]
    MODE: plain | xconnector | xconnector-mp (the worker in its own process) | autopatch |
          autopatch-multi (the engine already has vLLM's
          ExampleConnector, storing under STORAGE_DIR; the autopatch composes with it)
"""

import json
import logging
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# The connector's one-line summary at shutdown, in every process (workers inherit it by fork).
logging.getLogger("xconnector").addHandler(logging.StreamHandler(sys.stderr))
logging.getLogger("xconnector").setLevel(logging.INFO)


def main() -> None:
    model, mode = sys.argv[1], sys.argv[2]
    if mode == "autopatch":
        import xconnector.integrations.dynamo.autopatch  # the one line

    from tiny_engine import engine_kwargs, xconnector_transfer_config
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(model)
    if mode == "xconnector-mp":
        # The worker in a process of its own: the scheduler's lookups cross processes.
        kwargs["distributed_executor_backend"] = "mp"
    if mode in ("xconnector", "xconnector-mp"):
        section = {"adapters": [{"name": "lmcache", "config": {"max_cache_size": 64}}]}
        kwargs["kv_transfer_config"] = xconnector_transfer_config(section)
    if mode == "autopatch-multi":
        import xconnector.integrations.dynamo.autopatch  # noqa: F401

        kwargs["kv_transfer_config"] = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": sys.argv[3]},
        }
    llm = LLM(**kwargs)
    import random

    rng = random.Random(42)
    system = [rng.randrange(1, 500) for _ in range(128)]
    a = system + [rng.randrange(1, 500) for _ in range(72)]  # 200 tokens
    b = system + [rng.randrange(1, 500) for _ in range(70)]  # shares 128 = 4 blocks of 32
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
    results = []
    for prompt in (a, a, b):  # one at a time: the repeat must find what the first stored
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        completion = out.outputs[0]
        logprobs = [
            lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids, strict=True)
        ]
        results.append(
            {
                "tokens": list(completion.token_ids),
                "logprobs": logprobs,
                "cached": out.num_cached_tokens,
            }
        )
    kv = llm.llm_engine.vllm_config.kv_transfer_config
    worker = None
    if (
        kv is not None
        and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        and mode != "xconnector-mp"
    ):
        # The worker-side connector lives in this process: its own counts, not vLLM's promise.
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        group = get_kv_transfer_group()
        connectors = [group, *getattr(group, "_connectors", [])]  # inside a MultiConnector too
        worker = next((c.stats() for c in connectors if type(c).__name__ == "XConnectorV1"), None)
    # vLLM logs to stdout too, even after this line: mark it.
    result = {"results": results, "kv_connector": kv.kv_connector if kv else None, "worker": worker}
    print("XCONNECTOR_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
