"""Offload benchmark on the real vLLM engine (CPU build): a working set larger than vLLM's own KV
cache, asked about round-robin, so vLLM's prefix cache alone keeps evicting what comes back next.

The workload: D documents of T tokens (random token ids, seeded), each asked about R times
round-robin; a request is a document plus a question of Q tokens (24 by default: short; new in
each round, so its prefill runs on top of the loaded document), greedy, 8 new
tokens, one request at a time. The model is a small random-weight Llama made here (4 layers,
hidden 256, fp32, 4k context; nothing is downloaded). Arms, each in its own process:

  vllm             vLLM alone, its prefix cache on, KV cache room for about two documents;
  reference        vLLM alone with room for every document: its own prefix cache serves every
                   repeat with no copy at all (the figure to reach);
  xconnector       the capped vLLM + XConnector (memory tier), loads layer by layer beside the
                   forward pass, saves after the step;
  xconnector-sync  the same with `"async_saves": false`: saves finish inside the step (the
                   save-wait baseline);
  xconnector-whole the same with `"layerwise_loads": false`: each step's loads finish before
                   its forward pass (the load-wait baseline).

Per arm: mean latency per request over the repeats (rounds 2..R) and over all requests; the
prompt tokens vLLM reports cached; XConnector's loaded tokens; the mean time a step waited inside
XConnector for its loads and for its saves (`xconnector_step_wait_seconds`); whether the greedy
outputs are identical to the `vllm` arm's. Then each arm's repeat latency as a ratio to the
reference, the save wait of `xconnector` against `xconnector-sync` and its load wait against
`xconnector-whole`.

Run from the repository root in the vLLM environment (scripts/vllm_env.sh):

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/vllm_offload.py [--docs 8] [--doc-tokens 3000]
        [--rounds 3] [--question-tokens 24]
        [--arms vllm,reference,xconnector,xconnector-sync,xconnector-whole] [--quick]

`--quick` is a smoke run (3 documents of 600 tokens, 2 rounds). The default run takes about five
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ARMS = ("vllm", "reference", "xconnector", "xconnector-sync", "xconnector-whole")
LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 32
#: Bytes of KV per token: K and V, per layer, fp32.
KV_BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4
NEW_TOKENS = 8


def make_model(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def workload(docs: int, doc_tokens: int, question: int, rounds: int, seed: int) -> list[list[int]]:
    """The prompts in the order they are sent: round by round, every document once."""
    rng = random.Random(seed)
    bodies = [[rng.randrange(1, 1000) for _ in range(doc_tokens)] for _ in range(docs)]
    return [
        body + [rng.randrange(1, 1000) for _ in range(question)]
        for _ in range(rounds)
        for body in bodies
    ]


def run_arm(arm: str, model: str, prompts: list[list[int]], docs: int) -> dict:
    # The engine in this process (as a single-GPU `vllm serve` runs its scheduler and worker
    # together): the connector's step-wait totals are read from it directly.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    prompt_tokens = len(prompts[0])
    doc_bytes = (prompt_tokens + NEW_TOKENS + BLOCK) * KV_BYTES_PER_TOKEN
    room = (docs + 1) * doc_bytes if arm == "reference" else int(2.5 * doc_bytes)
    kwargs: dict[str, Any] = dict(
        model=model,
        skip_tokenizer_init=True,
        enable_prefix_caching=True,
        block_size=BLOCK,
        max_model_len=prompt_tokens + 256,
        max_num_batched_tokens=prompt_tokens + 256,
        dtype="float32",
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=room,
    )
    if arm.startswith("xconnector"):
        section = {"adapters": [{"name": "lmcache", "config": {"max_cache_size": "2GiB"}}]}
        kwargs["kv_transfer_config"] = {
            "kv_connector": "XConnectorV1",
            "kv_connector_module_path": "xconnector.integrations.vllm.connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {
                "xconnector": section,
                "async_saves": arm != "xconnector-sync",
                "layerwise_loads": arm != "xconnector-whole",
            },
        }
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], params, use_tqdm=False)  # warm-up
    latencies, cached, outputs = [], [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        latencies.append(time.perf_counter() - t0)
        cached.append(out.num_cached_tokens or 0)
        outputs.append(list(out.outputs[0].token_ids))
    totals: dict[str, Any] = {}
    if arm.startswith("xconnector"):
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
        connector.wait_for_saves()
        totals = connector.stats()
    return {"latencies": latencies, "cached": cached, "outputs": outputs, "xconnector": totals}


def wait_ms(totals: dict[str, Any], op: str) -> float | None:
    steps = totals.get(f"{op}_wait_steps", 0)
    return 1e3 * totals[f"{op}_wait_seconds"] / steps if steps else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # child mode: one arm, JSON on stdout
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.docs, args.doc_tokens, args.rounds = 3, 600, 2
    prompts = workload(args.docs, args.doc_tokens, args.question_tokens, args.rounds, args.seed)
    if args.arm:
        result = run_arm(args.arm, args.model, prompts, args.docs)
        print("OFFLOAD_RESULT " + json.dumps(result), flush=True)
        return

    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        sys.exit(f"unknown arm(s) {sorted(unknown)}; choose from {', '.join(ARMS)}")
    print(
        f"{args.docs} documents x {args.doc_tokens} tokens + {args.question_tokens}-token "
        f"questions, {args.rounds} rounds round-robin; "
        f"vLLM's KV cache: room for ~2.5 documents (reference: all)"
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        make_model(model)
        for arm in arms:
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--arm", arm, "--model", model]
            cmd += ["--docs", str(args.docs), "--doc-tokens", str(args.doc_tokens)]
            cmd += ["--rounds", str(args.rounds), "--seed", str(args.seed)]
            cmd += ["--question-tokens", str(args.question_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next(
                (ln for ln in proc.stdout.splitlines() if ln.startswith("OFFLOAD_RESULT ")), None
            )
            if proc.returncode != 0 or line is None:
                sys.exit(f"arm {arm} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            results[arm] = json.loads(line.split(" ", 1)[1])
            print(f"  {arm}: done in {time.perf_counter() - t0:.0f} s", flush=True)

    first = args.docs  # requests of round 1: every document computed once
    header = (
        f"{'arm':<18}{'repeat ms':>10}{'all ms':>9}{'cached tok':>11}{'loaded tok':>11}"
        f"{'load wait':>10}{'save wait':>10}  same outputs"
    )
    print("\n" + header)
    base = results.get("vllm")
    for arm, r in results.items():
        lat, xc = r["latencies"], r["xconnector"]
        same = "-" if base is None or arm == "vllm" else str(r["outputs"] == base["outputs"])
        load, save = wait_ms(xc, "load"), wait_ms(xc, "save")
        print(
            f"{arm:<18}{1e3 * statistics.mean(lat[first:] or lat):>10.1f}"
            f"{1e3 * statistics.mean(lat):>9.1f}{sum(r['cached']):>11}"
            f"{xc.get('loaded_tokens', 0) if xc else '-':>11}"
            f"{'-' if load is None else f'{load:.2f} ms':>10}"
            f"{'-' if save is None else f'{save:.2f} ms':>10}  {same}"
        )
    print("  (repeat ms: mean latency of rounds 2..; waits: mean per step that had loads/saves)")
    ref = results.get("reference")
    if ref is not None:
        ref_ms = statistics.mean(ref["latencies"][first:] or ref["latencies"])
        for arm, r in results.items():
            if arm != "reference":
                ms = statistics.mean(r["latencies"][first:] or r["latencies"])
                print(f"{arm} / reference (repeat latency): {ms / ref_ms:.2f}x")
    a, s = results.get("xconnector"), results.get("xconnector-sync")
    if a and s:
        wa, ws = wait_ms(a["xconnector"], "save"), wait_ms(s["xconnector"], "save")
        if wa is not None and ws:
            print(f"save wait per step, after the step vs inside it: {wa:.3f} ms vs {ws:.3f} ms")
    w = results.get("xconnector-whole")
    if a and w:
        la, lw = wait_ms(a["xconnector"], "load"), wait_ms(w["xconnector"], "load")
        if la is not None and lw:
            print(f"load wait per step, layer by layer vs whole: {la:.3f} ms vs {lw:.3f} ms")
    for arm, r in results.items():
        if r["xconnector"].get("fallbacks"):
            print(f"{arm}: XConnector fell back: {r['xconnector']['fallbacks']}")


if __name__ == "__main__":
    main()
