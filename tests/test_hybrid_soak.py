"""Hybrid-mode soak: two processes x four threads, each engine with a small memory tier, a small
disk tier and the shared Redis tier, storing and loading overlapping prompts for a fixed number
of operations. Budgets are never exceeded, invariants hold, and every loaded byte is the byte
stored. Then each process reads the prompts only the other one wrote: it finds exactly those the
other stored, in full, through Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from services import RedisServer

OPS_PER_THREAD = 800

SOAK = """
import json, random, sys, threading
sys.path.insert(0, sys.argv[4])
from conftest import block_payload
from xconnector import Engine

url, disk, seed, ops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
other = 3 - seed
e = Engine(block_bytes=256, capacity_bytes=48 * 256, block_size=16, model="soak",
           disk_path=disk, disk_capacity_bytes=120 * (256 + 48), redis_url=url, redis_timeout=10)
prompts = [list(range(p * 1000, p * 1000 + 16 * random.Random(p).randint(1, 6)))
           for p in range(80)]
# Prompt p is written by process p % 3 (1 or 2), or by both (0); any process loads any prompt.
writes = lambda p: p % 3 in (0, seed)
counts = {"ops": 0, "loaded_blocks": 0, "bad": 0, "errors": 0, "over_budget": 0}
stored = set()
lock = threading.Lock()

def worker(tid):
    rng = random.Random(seed * 100 + tid)
    for _ in range(ops):
        p = rng.randrange(len(prompts))
        toks = prompts[p]
        try:
            out = bytearray(len(toks) // 16 * 256)
            n = e.load(toks, out)
            good = bytes(out[: n // 16 * 256]) == block_payload(toks)[: n // 16 * 256]
            if writes(p):
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
            if writes(p):
                stored.add(p)

# Both processes start the soak together (the test says when).
print("started", flush=True)
assert sys.stdin.readline().strip() == "start"
threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
flushed = e.flush(30)
e._check_invariants()
soak = e.stats()

# Both processes are done writing (the test waits for both before saying go): read what only the
# other one writes.
print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
cross = {}
for p in range(80):
    if p % 3 == other:
        out = bytearray(len(prompts[p]) // 16 * 256)
        n = e.load(prompts[p], out)
        good = bytes(out[: n // 16 * 256]) == block_payload(prompts[p])[: n // 16 * 256]
        cross[p] = [n, len(prompts[p]), good]
print(json.dumps({**counts, "flushed": flushed, "stats": soak, "stored": sorted(stored),
                  "cross": cross}))
"""


def test_two_processes_four_threads_hybrid(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    procs = []
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
                    str(OPS_PER_THREAD),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for seed in (1, 2)
        ]
        for step, reply in (("started", "start"), ("ready", None)):
            for p in procs:
                assert p.stdout is not None and p.stdin is not None
                line = p.stdout.readline()  # pytest-timeout bounds a hang
                assert line == f"{step}\n", (line, p.communicate(timeout=60)[1])
            for p in procs:
                if reply:
                    p.stdin.write(f"{reply}\n")
                    p.stdin.flush()
        results: list[dict[str, Any]] = []
        for p in procs:
            out, err = p.communicate("go\n", timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        redis.stop()
    for r in results:
        s = r["stats"]
        assert r["errors"] == 0 and r["bad"] == 0 and r["over_budget"] == 0, r
        assert r["ops"] == 4 * OPS_PER_THREAD and r["loaded_blocks"] > 0 and r["flushed"]
        assert s["used_bytes"] <= s["capacity_bytes"]
        assert s["disk_used_bytes"] <= s["disk_capacity_bytes"]
        assert s["evicted_blocks"] > 0 and s["promoted_blocks"] > 0  # the tiers were exercised
        assert s["redis_written_blocks"] > 0 and s["redis_foreign_values"] == 0
        assert s["redis_dropped_blocks"] == 0 and s["redis_errors"] == 0
        assert s["disk_corrupt_blocks"] == 0
    # Shared through Redis: each process finds, in full and byte for byte, exactly the prompts
    # that only the other process wrote (one it never stored is found nowhere).
    for me, other in ((results[0], results[1]), (results[1], results[0])):
        cross = {int(p): v for p, v in me["cross"].items()}
        assert cross, "no prompt is written by the other process only"
        theirs = set(other["stored"]) & set(cross)
        assert theirs, "the other process stored none of its own prompts"
        for p, (loaded, length, good) in cross.items():
            assert good, p
            assert loaded == (length if p in theirs else 0), (p, loaded, length)
