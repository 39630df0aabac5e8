"""A fleet of workers sharing one Redis Cluster, against the same workers each alone.

Four worker processes, each with the SDK (`XConnectorSDK`, its KV handler moving blocks between
numpy KV caches and its engine) and a memory tier too small for the working set, serve one
seeded multi-tenant workload, routed as a load balancer without prefix awareness routes it (at
random):

- RAG: a tenant's system prompt, one of its documents (Zipf-popular), a fresh question;
- chat: a session's history (system prompt and every earlier turn) plus a new turn.

Each request looks up and loads its cached prefix (the part a worker would not compute), then
"computes" and stores the rest: every block's KV is a function of its token prefix, so a load is
checked byte for byte (a wrong block aborts the run). The fleet steps in lockstep (each worker
takes one request per step, then its writes are flushed), so both arms see the same order.

Arms: `alone` (memory only), `shared` (memory plus a 3-primary Redis Cluster on loopback).
Printed: the fleet's hit rate (tokens loaded / prompt tokens), tokens saved, and the time per
request spent in lookup + load, p50/p99, with the shared tier's added latency as the difference.

Run: `.venv/bin/python benchmarks/fleet.py` (`--quick` for a smoke run). Needs redis-server and
redis-cli (scripts/services.sh).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

WORKERS = 4
BLOCK = 16
LAYERS, HEADS, HEAD_DIM = 4, 4, 64  # 64 KiB of fp16 KV per 16-token block
SYSTEM, DOC, QUESTION, TURN = 256, 512, 32, 96  # tokens
TENANTS, DOCS, SESSIONS = 6, 12, 24
MEMORY_MIB = 24  # per worker: 384 blocks, about a tenth of the working set


def workload(requests: int, seed: int) -> list[list[int]]:
    """The fleet's requests (token lists), in arrival order."""
    rng = np.random.default_rng(seed)
    vocab = 32000
    system = [rng.integers(0, vocab, SYSTEM).tolist() for _ in range(TENANTS)]
    docs = [[rng.integers(0, vocab, DOC).tolist() for _ in range(DOCS)] for _ in range(TENANTS)]
    popularity = 1.0 / np.arange(1, DOCS + 1) ** 1.1
    popularity /= popularity.sum()
    sessions = [(int(rng.integers(TENANTS)), list[int]()) for _ in range(SESSIONS)]
    out = []
    for _ in range(requests):
        if rng.random() < 0.6:
            t = int(rng.integers(TENANTS))
            d = int(rng.choice(DOCS, p=popularity))
            out.append(system[t] + docs[t][d] + rng.integers(0, vocab, QUESTION).tolist())
        else:
            s = int(rng.integers(SESSIONS))
            tenant, history = sessions[s]
            if len(history) > 8 * TURN:  # a finished conversation; a new one starts
                history.clear()
            history += rng.integers(0, vocab, TURN).tolist()
            out.append(system[tenant] + list(history))
    return out


def block_value(prefix: list[int]) -> np.float16:
    """The KV of a block is a function of its token prefix: a load can be checked exactly."""
    return np.float16((zlib.crc32(np.asarray(prefix, np.int64).tobytes()) % 2000) / 7.0)


def worker(
    rank: int, url: str | None, requests: list[list[int]], barrier: Any, results: Any
) -> None:
    from xconnector.sdk import XConnectorSDK

    lmcache: dict[str, Any] = {"max_cache_size": MEMORY_MIB, "storage_backend": "memory"}
    if url:
        lmcache.update(storage_backend="redis", remote_url=url, remote_timeout_ms=1000)
    config = {"mode": "hybrid" if url else "embedded"}
    config["adapters"] = [{"name": "lmcache", "config": lmcache}]  # type: ignore[assignment]
    longest = max(len(r) for r in requests) // BLOCK + 1
    caches = [np.zeros((2, longest, BLOCK, HEADS, HEAD_DIM), np.float16) for _ in range(LAYERS)]
    ids = list(range(longest))
    times, loaded, prompt = [], 0, 0
    with XConnectorSDK(config) as sdk:
        kv = sdk.get_kv_handler()
        engine = kv.bind(caches)[1]
        for i in range(0, len(requests), WORKERS):
            step = requests[i : i + WORKERS]
            if rank < len(step):
                toks = step[rank]
                full = len(toks) // BLOCK
                t0 = time.perf_counter()
                hit = kv.lookup(toks)
                got = kv.load(toks, caches, ids[: hit // BLOCK]) if hit else 0
                times.append(time.perf_counter() - t0)
                for b in range(got // BLOCK):
                    want = block_value(toks[: (b + 1) * BLOCK])
                    if not all((c[:, b] == want).all() for c in caches):
                        raise SystemExit(f"worker {rank}: wrong KV in block {b} of a request")
                for b in range(got // BLOCK, full):  # the rest is "computed"
                    for c in caches:
                        c[:, b] = block_value(toks[: (b + 1) * BLOCK])
                kv.store(toks, caches, ids[:full])
                loaded, prompt = loaded + got, prompt + len(toks)
            engine.flush(60)  # this step's blocks reach Redis before the next step's lookups
            barrier.wait()
        stats = engine.stats()
    results.put((rank, loaded, prompt, times, stats.get("redis_hit_blocks", 0)))


def run_arm(url: str | None, reqs: list[list[int]]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(r, url, reqs, barrier, results)) for r in range(WORKERS)
    ]
    for p in procs:
        p.start()
    rows = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a worker failed (exit {p.exitcode})")
    times = np.concatenate([np.asarray(r[3]) for r in rows]) * 1e3
    loaded, prompt = sum(r[1] for r in rows), sum(r[2] for r in rows)
    return {
        "hit": loaded / prompt,
        "saved": loaded,
        "p50": float(np.percentile(times, 50)),
        "p99": float(np.percentile(times, 99)),
        "redis_blocks": sum(r[4] for r in rows),
    }


def main() -> None:
    from services import RedisCluster

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--seed", type=int, default=17)
    args = ap.parse_args()
    reqs = workload(80 if args.quick else args.requests, args.seed)
    print(
        f"{len(reqs)} requests, {sum(map(len, reqs))} prompt tokens, {WORKERS} workers "
        f"with {MEMORY_MIB} MiB of memory each, KV 64 KiB per 16-token block"
    )
    with tempfile.TemporaryDirectory() as d:
        cluster = RedisCluster(Path(d), masters=3)
        for node in cluster.nodes:  # as the README says to run it: a limit, evicting LRU
            node.cli("CONFIG", "SET", "maxmemory", "2gb", "maxmemory-policy", "allkeys-lru")
        try:
            arms = {"alone": run_arm(None, reqs), "shared": run_arm(cluster.url, reqs)}
        finally:
            cluster.stop()
    print("| arm | fleet hit rate | tokens saved | lookup+load p50 | p99 | blocks from Redis |")
    print("|---|---|---|---|---|---|")
    for name, a in arms.items():
        print(
            f"| {name} | {a['hit']:.1%} | {a['saved']} | {a['p50']:.2f} ms | {a['p99']:.2f} ms | "
            f"{a['redis_blocks']} |"
        )
    alone, shared = arms["alone"], arms["shared"]
    print(
        f"shared vs alone: hit rate {shared['hit'] / max(alone['hit'], 1e-9):.2f}x, "
        f"tokens saved {shared['saved'] / max(alone['saved'], 1):.2f}x; "
        f"added latency p50 {shared['p50'] - alone['p50']:+.2f} ms, "
        f"p99 {shared['p99'] - alone['p99']:+.2f} ms per request"
    )


if __name__ == "__main__":
    main()
