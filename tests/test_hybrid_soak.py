"""Hybrid-mode soak: two processes x four threads, each engine with a small memory tier, a small
disk tier and the shared Redis tier, storing and loading overlapping prompts for a bounded time.
Budgets are never exceeded, invariants hold, and every loaded byte is the byte stored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from services import RedisServer

SOAK = """
import json, random, sys, threading, time
sys.path.insert(0, sys.argv[4])
from conftest import block_payload
from xconnector import Engine

url, disk, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
e = Engine(block_bytes=256, capacity_bytes=48 * 256, block_size=16, model="soak",
           disk_path=disk, disk_capacity_bytes=120 * (256 + 48), redis_url=url)
prompts = [list(range(p * 1000, p * 1000 + 16 * random.Random(p).randint(1, 6)))
           for p in range(80)]
deadline = time.monotonic() + 4.0
counts = {"ops": 0, "loaded_blocks": 0, "bad": 0, "errors": 0, "over_budget": 0}
lock = threading.Lock()

def worker(tid):
    rng = random.Random(seed * 100 + tid)
    while time.monotonic() < deadline:
        toks = prompts[rng.randrange(len(prompts))]
        try:
            out = bytearray(len(toks) // 16 * 256)
            n = e.load(toks, out)
            good = bytes(out[: n // 16 * 256]) == block_payload(toks)[: n // 16 * 256]
            e.store(toks, block_payload(toks))
            s = e.stats()
            over = s["used_bytes"] > s["capacity_bytes"] or \\
                s.get("disk_used_bytes", 0) > s.get("disk_capacity_bytes", 1)
        except Exception as exc:
            with lock:
                counts["errors"] += 1
            continue
        with lock:
            counts["ops"] += 1
            counts["loaded_blocks"] += n // 16
            counts["bad"] += 0 if good else 1
            counts["over_budget"] += 1 if over else 0

threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
e.flush(30)
e._check_invariants()
print(json.dumps({**counts, "stats": e.stats()}))
"""


def test_two_processes_four_threads_hybrid(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    try:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SOAK,
                    redis.url,
                    str(tmp_path / f"disk-{seed}"),
                    str(seed),
                    str(Path(__file__).parent),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for seed in (1, 2)
        ]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        redis.stop()
    for r in results:
        s = r["stats"]
        assert r["errors"] == 0 and r["bad"] == 0 and r["over_budget"] == 0, r
        assert r["ops"] > 100 and r["loaded_blocks"] > 0
        assert s["used_bytes"] <= s["capacity_bytes"]
        assert s["disk_used_bytes"] <= s["disk_capacity_bytes"]
        assert s["evicted_blocks"] > 0 and s["promoted_blocks"] > 0  # the tiers were exercised
        assert s["redis_written_blocks"] > 0 and s["redis_foreign_values"] == 0
        assert s["disk_corrupt_blocks"] == 0
    # The processes shared blocks through Redis: each read blocks it had not stored itself.
    assert sum(r["stats"]["redis_hit_blocks"] for r in results) > 0
