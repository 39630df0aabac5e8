"""Runs a real vLLM engine (the CPU build) through a workload in phases, with faults applied
between phases, and prints one JSON line (after `XCONNECTOR_RESULT `): per phase, each request's
greedy tokens, logprobs and the prompt tokens vLLM reports as cached; and, with XConnector in
this process, the worker connector's own counts (loaded tokens, load failures, fallbacks).

    python run_workload.py MODEL_DIR SPEC.json

SPEC: {"xconnector": section | null, "engine": {extra LLM kwargs}, "in_process": bool,
       "kv_events": bool (vLLM's KV events on; in process, each phase's published events are
       in "kv_events", and the tokens XConnector holds of every prompt of the spec after it,
       in spec order, in "held"),
       "phases": [{"requests": [{"prompt": [ids], "cache_salt": str?,
                                  "lora": [name, int_id, path]?}], "fault": {...}?}]}
In process, the result also has the connector's counts after each phase ("worker_phases"; not
with "workers_elsewhere": tensor-parallel workers are processes of their own and log their
counts at shutdown) and how many times vLLM's scheduler preempted a request ("preemptions").
A phase with "abort": {"after_steps": k, "requests": [indices]} drives the engine step by step
and aborts those requests after k steps (their outputs are left out). A fault is applied before
its phase: {"inject": [point, fault]} (process-wide, so only with
"in_process"), {"corrupt_disk": dir} (flips a payload byte in every block file),
{"redis": [url, "FLUSHALL"]}, {"redis_swap": url} (every value moved under another key).
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def apply(fault: dict[str, Any]) -> None:
    if "inject" in fault:
        from xconnector import native

        point, kind = fault["inject"]
        native()._inject_fault(point, kind)
    if "corrupt_disk" in fault:
        for f in Path(fault["corrupt_disk"]).rglob("*.xcb"):
            data = bytearray(f.read_bytes())
            data[-1] ^= 0xFF
            f.write_bytes(bytes(data))
    if "redis" in fault:
        url, *cmd = fault["redis"]
        subprocess.run(["redis-cli", "-u", url, *cmd], check=True, capture_output=True)
    if "redis_swap" in fault:
        url = fault["redis_swap"]
        cli = ["redis-cli", "-u", url]
        keys = sorted(
            subprocess.run(
                [*cli, "KEYS", "*"], check=True, capture_output=True, text=True
            ).stdout.split()
        )
        for a, b in zip(keys, keys[1:] + keys[:1], strict=True):
            subprocess.run([*cli, "RENAME", a, b + ".tmp"], check=True, capture_output=True)
        for k in keys:
            subprocess.run([*cli, "RENAME", k + ".tmp", k], check=True, capture_output=True)


def lora_request(spec: list[Any] | None) -> Any:
    if spec is None:
        return None
    from vllm.lora.request import LoRARequest

    name, int_id, path = spec
    return LoRARequest(name, int_id, path)


def stepped(llm: Any, prompts: list[Any], params: Any, after: int, aborted: set[int]) -> list[Any]:
    """The prompts through the engine's step loop, aborting some after `after` steps; the
    finished outputs of the others in prompt order."""
    engine = llm.llm_engine
    ids = [f"w{i}" for i in range(len(prompts))]
    internal = [engine.add_request(rid, p, params) for rid, p in zip(ids, prompts, strict=True)]
    done: dict[str, Any] = {}
    steps = 0
    while engine.has_unfinished_requests():
        if steps == after:
            engine.abort_request([ids[i] for i in sorted(aborted)])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
    # Outputs carry the caller's id (or, depending on the version, the engine's own).
    return [
        done.get(rid) or done[inner]
        for i, (rid, inner) in enumerate(zip(ids, internal, strict=True))
        if i not in aborted
    ]


def event_json(event: Any) -> dict[str, Any]:
    def name(h: Any) -> Any:
        return h.hex() if isinstance(h, bytes) else h

    out = {"type": type(event).__name__, "medium": getattr(event, "medium", None)}
    out["block_hashes"] = [name(h) for h in getattr(event, "block_hashes", [])]
    if out["type"] == "BlockStored":
        out["parent"] = name(event.parent_block_hash)
        out["token_ids"] = list(event.token_ids)
        out["block_size"] = event.block_size
        out["lora_name"] = event.lora_name
    return out


def main() -> None:
    model, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    in_process = spec.get("in_process", True)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    # The connector's one-line summary at shutdown (worker processes inherit this by fork).
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("xconnector").addHandler(handler)
    logging.getLogger("xconnector").setLevel(logging.INFO)

    from tiny_engine import engine_kwargs, xconnector_transfer_config
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(model, **{"max_model_len": 1024, **spec.get("engine", {})})
    if spec.get("xconnector") is not None:
        kwargs["kv_transfer_config"] = xconnector_transfer_config(spec["xconnector"])
    if spec.get("kv_events"):
        kwargs["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "null"}
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=spec.get("max_tokens", 6), temperature=0.0, logprobs=0)
    connector = None
    preemptions = [0]
    if in_process:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        preempt = scheduler._preempt_request

        def counted(*args: Any, **kw: Any) -> Any:
            preemptions[0] += 1
            return preempt(*args, **kw)

        scheduler._preempt_request = counted
        published: list[Any] = []
        if spec.get("kv_events"):
            # What the scheduler hands its publisher (the stream dynamo.vllm relays to its router).
            publish = scheduler.kv_event_publisher.publish

            def recorded(batch: Any) -> None:
                published.extend(batch.events)
                publish(batch)

            scheduler.kv_event_publisher.publish = recorded
        if spec.get("xconnector") is not None and not spec.get("workers_elsewhere"):
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            connector = get_kv_transfer_group()
    phases = []
    worker_phases = []
    kv_events: list[list[dict[str, Any]]] = []
    held: list[list[int]] = []
    for phase in spec["phases"]:
        apply(phase.get("fault", {}))
        prompts = []
        for r in phase["requests"]:
            p: dict[str, Any] = {"prompt_token_ids": r["prompt"]}
            if r.get("cache_salt"):
                p["cache_salt"] = r["cache_salt"]
            prompts.append(p)
        abort = phase.get("abort")
        loras = [lora_request(r.get("lora")) for r in phase["requests"]]
        if abort is None:
            outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        else:
            outs = stepped(llm, prompts, params, abort["after_steps"], set(abort["requests"]))
        results = []
        for out in outs:
            c = out.outputs[0]
            lps = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
            results.append(
                {"tokens": list(c.token_ids), "logprobs": lps, "cached": out.num_cached_tokens}
            )
        phases.append(results)
        if connector is not None:
            # Saves run after their step: the next phase looks up a settled cache.
            connector.wait_for_saves()
            worker_phases.append(connector.stats())
        if spec.get("kv_events") and in_process:
            kv_events.append([event_json(e) for e in published])
            published.clear()
            engine = getattr(connector, "_engine", None)
            every = [r["prompt"] for ph in spec["phases"] for r in ph["requests"]]
            held.append([engine.lookup(p) if engine else 0 for p in every])
    apply({"inject": ["load_copy", "none"]} if in_process else {})
    kv = llm.llm_engine.vllm_config.kv_transfer_config
    result = {
        "phases": phases,
        "worker": worker_phases[-1] if worker_phases else None,
        "worker_phases": worker_phases,
        "preemptions": preemptions[0],
        "kv_connector": kv.kv_connector if kv else None,
        "kv_events": kv_events,
        "held": held,
    }
    print("XCONNECTOR_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
