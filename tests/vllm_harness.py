"""Shared by the real-vLLM test modules: the tiny local model, running `vllm_app/run_workload.py`
in a fresh process, seeded workloads, and the comparisons against the same run without
XConnector."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

APP = Path(__file__).resolve().parent / "vllm_app"
ROOT = APP.parents[1]


def make_model(path: Path) -> str:
    subprocess.run(
        [sys.executable, str(APP / "make_model.py"), str(path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return str(path)


def workload(seed: int, n: int = 6, tail: tuple[int, int] = (20, 90)) -> list[list[int]]:
    """Prompts over two shared system prompts and a shared document, of varied lengths."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 500) for _ in range(96)] for _ in range(2)]
    doc = [rng.randrange(1, 500) for _ in range(64)]
    prompts = []
    for i in range(n):
        rest = [rng.randrange(1, 500) for _ in range(rng.randrange(*tail))]
        prompts.append(systems[i % 2] + (doc if i % 3 == 0 else []) + rest)
    return prompts


def run_app(script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs a `vllm_app` script in a fresh process (without the caller's XCONNECTOR_/DYNAMO_
    variables) and returns its `XCONNECTOR_RESULT` line, with its stderr and all its logs."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("XCONNECTOR_", "DYNAMO_"))}
    full["PYTHONPATH"] = str(ROOT)
    full.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(APP / script), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("XCONNECTOR_RESULT "))
    out: dict[str, Any] = json.loads(line.removeprefix("XCONNECTOR_RESULT "))
    # vLLM's own log lines (and, in its worker processes, XConnector's) go to stdout.
    out["stderr"] = proc.stderr
    out["logs"] = proc.stdout + proc.stderr
    return out


def run(model: str, spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """`run_workload.py` on a spec (see there)."""
    spec_file = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.json"
    spec_file.write_text(json.dumps(spec))
    return run_app("run_workload.py", model, str(spec_file), env=spec.get("env"))


def assert_same_outputs(a: dict[str, Any], b: dict[str, Any]) -> None:
    for pa, pb in zip(a["phases"], b["phases"], strict=True):
        for x, y in zip(pa, pb, strict=True):
            assert x["tokens"] == y["tokens"]
            assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-4)


def no_xconnector_errors(stderr: str) -> None:
    bad = [ln for ln in stderr.splitlines() if "XConnector" in ln and "failed" in ln]
    assert bad == [], bad


def phase_counts(out: dict[str, Any], key: str) -> list[int]:
    """The connector's count `key` in each phase (its totals are cumulative)."""
    totals = [int(w[key]) for w in out["worker_phases"]]
    return [b - a for a, b in zip([0, *totals], totals, strict=False)]


def distinct_blocks(prompts: list[list[int]], block: int) -> int:
    """Full blocks of these prompts, a block shared by several prompts counted once."""
    return len({tuple(p[:end]) for p in prompts for end in range(block, len(p) + 1, block)})


def worker_summaries(stderr: str) -> list[dict[str, Any]]:
    """The one-line summary each worker process's connector logs at shutdown."""
    marker = "XConnector worker summary: "
    return [json.loads(ln.split(marker, 1)[1]) for ln in stderr.splitlines() if marker in ln]


def make_lora(path: Path, seed: int, rank: int = 8) -> str:
    """A PEFT LoRA adapter for the tiny Llama's q/v projections, with random nonzero weights
    (so two adapters give different KV)."""
    code = f"""
import json, sys, torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed({seed})
tensors = {{}}
for layer in range(2):
    for proj, out in (("q_proj", 128), ("v_proj", 64)):
        key = f"base_model.model.model.layers.{{layer}}.self_attn.{{proj}}"
        tensors[key + ".lora_A.weight"] = torch.randn({rank}, 128, generator=g) * 0.1
        tensors[key + ".lora_B.weight"] = torch.randn(out, {rank}, generator=g) * 0.1
save_file(tensors, sys.argv[1] + "/adapter_model.safetensors")
json.dump({{"peft_type": "LORA", "r": {rank}, "lora_alpha": {2 * rank}, "lora_dropout": 0.0,
           "target_modules": ["q_proj", "v_proj"], "bias": "none",
           "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM"}},
          open(sys.argv[1] + "/adapter_config.json", "w"))
"""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)
    return str(path)
