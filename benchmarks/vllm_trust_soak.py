"""The longer version of tests/test_vllm_trust.py: on the real vLLM engine (CPU build, fp32 tiny
Llama, greedy, logprobs), several seeded shared-prefix workloads each run with XConnector under
faults (loads failing for a phase with junk in the block they tore, disk block files corrupted,
Redis values swapped, Redis flushed: each between a lookup's promise and the load), then without
faults, and are compared token for token and logprob for logprob with the same workload without
XConnector.

Run in the vLLM environment: `PYTHONPATH=. .venv-vllm/bin/python benchmarks/vllm_trust_soak.py
[--seeds 5] [--prompts 12]` (needs redis-server; scripts/services.sh). Prints one row per seed
and exits 1 if any output differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from services import RedisServer  # noqa: E402
from vllm_harness import make_model, run, workload  # noqa: E402


def compare(a: dict, b: dict) -> tuple[int, float]:
    """Requests whose tokens differ, and the largest logprob difference."""
    differ, worst = 0, 0.0
    for pa, pb in zip(a["phases"], b["phases"], strict=True):
        for x, y in zip(pa, pb, strict=True):
            differ += x["tokens"] != y["tokens"]
            if x["tokens"] == y["tokens"]:
                pairs = zip(x["logprobs"], y["logprobs"], strict=True)
                worst = max([worst, *(abs(p - q) for p, q in pairs)])
    return differ, worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=12)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xconnector-soak-"))
    model = make_model(tmp / "model")
    print(
        f"{'seed':>4} {'requests':>8} {'loaded tok':>10} {'failed loads':>12} "
        f"{'differ':>6} {'max |dlogprob|':>14}"
    )
    bad = 0
    for seed in range(args.seeds):
        work = tmp / f"seed-{seed}"
        work.mkdir()
        redis = RedisServer(work)
        try:
            requests = [
                {"prompt": p} for p in workload(1000 + seed, n=args.prompts, tail=(20, 200))
            ]
            faults = [
                {"inject": ["load_copy", "garbage"]},
                {"inject": ["load_copy", "none"], "corrupt_disk": str(work / "disk")},
                {"redis_swap": redis.url},
                {"redis": [redis.url, "FLUSHALL"]},
                {"inject": ["load_copy", "none"]},
            ]
            phases = [{"requests": requests}] + [{"requests": requests, "fault": f} for f in faults]
            section = {
                "mode": "hybrid",
                "adapters": [
                    {
                        "name": "lmcache",
                        "config": {
                            "max_cache_size": "512KiB",
                            "storage_backend": "hybrid",
                            "local_disk": str(work / "disk"),
                            "max_local_disk_size": "64MiB",
                            "remote_url": redis.url,
                        },
                    }
                ],
            }
            plain = run(model, {"xconnector": None, "phases": phases}, work)
            xc = run(model, {"xconnector": section, "phases": phases}, work)
        finally:
            redis.stop()
        differ, worst = compare(xc, plain)
        bad += differ or worst > 1e-4
        w = xc["worker"]
        n = sum(len(p) for p in xc["phases"])
        print(
            f"{seed:>4} {n:>8} {w['loaded_tokens']:>10} {w['load_failures']:>12} "
            f"{differ:>6} {worst:>14.2e}"
        )
    print("identical outputs under faults: " + ("yes" if not bad else f"NO ({bad} seeds differ)"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
