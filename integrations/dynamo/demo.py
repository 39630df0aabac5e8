"""Starts the example worker (`components/worker.py`) the way `dynamo serve` starts a worker
process, and sends it three requests: a long prompt, the same prompt again, and a prompt sharing
its system prompt. XConnector is on because the YAML says so; `XCONNECTOR_DISABLE=1` turns it off.

`dynamo serve graphs.agg:Frontend -f configs/agg.yaml` hands every process it starts the whole
YAML as one JSON object in `DYNAMO_SERVICE_CONFIG`, and starts the worker with
`--service-name VllmWorker`; this script does the same for one worker, in-process.

Run: `python integrations/dynamo/demo.py [--config integrations/dynamo/configs/agg.yaml]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "configs" / "agg.yaml"))
    ap.add_argument("--system-tokens", type=int, default=3000)
    args = ap.parse_args()

    from xconnector import native

    # What `dynamo serve` does for each process it starts.
    os.environ["DYNAMO_SERVICE_CONFIG"] = json.dumps(native().config_read_document(args.config))
    sys.argv[1:] = ["--service-name", "VllmWorker"]
    sys.path.insert(0, str(HERE))

    import numpy as np
    from components.worker import VllmWorker  # its first line is the autopatch import

    rng = np.random.default_rng(7)
    system = rng.integers(1, 32000, args.system_tokens).tolist()
    question_a = rng.integers(1, 32000, 200).tolist()
    question_b = rng.integers(1, 32000, 150).tolist()
    requests = [
        ("1. system prompt + question A", system + question_a),
        ("2. the same request again", system + question_a),
        ("3. system prompt + question B", system + question_b),
    ]

    on = "XCONNECTOR_DISABLE" not in os.environ
    print(f"config: {args.config} (XConnector {'on' if on else 'off: XCONNECTOR_DISABLE is set'})")
    worker = VllmWorker()
    results = []
    for name, prompt in requests:
        r = asyncio.run(worker.generate(prompt))
        results.append(r)
        cached, computed = len(prompt) - r["computed"], r["computed"]
        print(
            f"{name:<32} {len(prompt):>5} tokens  from cache {cached:>5}  computed {computed:>5}"
            f"  {r['seconds'] * 1000:8.1f} ms   next token {r['next_token']}"
        )
    same = results[0]["next_token"] == results[1]["next_token"]
    speedup = results[0]["seconds"] / results[1]["seconds"]
    first, repeat = results[0]["computed"], results[1]["computed"]
    answer = f"same next token: {'yes' if same else 'NO'}"
    if repeat < first:
        print(
            f"\nthe repeat computed {repeat} token(s) instead of {first}: "
            f"{speedup:.1f}x faster, {answer}"
        )
    else:
        why = "XConnector is off" if not on else "nothing was served from the cache"
        print(f"\nthe repeat computed all {repeat} tokens again ({why}), {answer}")
    from xconnector.integrations.dynamo import minimal_sdk

    stats = minimal_sdk.stats()
    if stats:
        c = stats["counters"]
        prompt_tokens, stored = c.get("prompt_tokens", 0), c.get("stored_blocks", 0)
        print(
            f"XConnector: hit rate {stats['hit_rate']:.1%} of {prompt_tokens} prompt tokens, "
            f"{stored} blocks stored, fallbacks {stats['fallbacks'] or 'none'}"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
