"""`xconnector bench`: replays a seeded workload with shared prefixes (chat, RAG, agent loops,
see `xconnector.workload`) through the native engine, as a worker would use it: look the prompt
up, load the cached prefix, store the rest. Prints hit rate, tokens saved, lookup p50/p99 and
store/load bandwidth; `--plot out.png` draws hit rate and lookup latency over the run."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import TextIO

from xconnector.workload import requests

BLOCK = 16


def _default_cache_mib() -> int:
    """An eighth of this machine's memory, capped at 512 MiB: under the default workload's working
    set, so eviction shows."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 << 30
    return int(min(ram // 8, 512 << 20) >> 20)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=1500, help="requests to replay (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (%(default)s)")
    p.add_argument("--cache-mib", type=int, default=_default_cache_mib(), help="memory budget, MiB")
    p.add_argument(
        "--block-kib", type=int, default=32, help="KV bytes per 16-token block, KiB (%(default)s)"
    )
    p.add_argument("--plot", metavar="PNG", help="draw hit rate and lookup latency to this file")


def _progress(done: int, total: int, err: TextIO) -> None:
    width = 30
    filled = width * done // total
    err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        err.write("\n")
    err.flush()


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import numpy as np

    from xconnector import Engine

    block_bytes = args.block_kib << 10
    engine = Engine(
        block_bytes=block_bytes,
        capacity_bytes=args.cache_mib << 20,
        block_size=BLOCK,
        model="xconnector-bench",
    )
    reqs = list(requests(args.requests, seed=args.seed))
    longest = max(len(r.tokens) for r in reqs) // BLOCK
    kv = np.random.default_rng(args.seed).integers(0, 256, longest * block_bytes, dtype=np.uint8)
    out_buf = np.empty(longest * block_bytes, np.uint8)
    lookups_us: list[float] = []
    hit_rates: list[float] = []
    prompt_tokens = hit_tokens = loaded_bytes = stored_bytes = 0
    load_s = store_s = 0.0
    for i, r in enumerate(reqs):
        toks = np.asarray(r.tokens, dtype=np.uint32)
        t0 = time.perf_counter()
        hit = engine.lookup(toks)
        lookups_us.append((time.perf_counter() - t0) * 1e6)
        if hit:
            t0 = time.perf_counter()
            got = engine.load(toks, out_buf[: hit // BLOCK * block_bytes])
            load_s += time.perf_counter() - t0
            loaded_bytes += got // BLOCK * block_bytes
        full = len(toks) // BLOCK
        t0 = time.perf_counter()
        new = engine.store(toks[: full * BLOCK], kv[: full * block_bytes])
        store_s += time.perf_counter() - t0
        stored_bytes += new * block_bytes
        prompt_tokens += len(toks)
        hit_tokens += hit
        hit_rates.append(hit / len(toks))
        if i % 50 == 0 or i == len(reqs) - 1:
            _progress(i + 1, len(reqs), err)
    p50 = statistics.median(lookups_us)
    p99 = sorted(lookups_us)[int(0.99 * (len(lookups_us) - 1))]
    stats = engine.stats()
    print(
        f"workload      {len(reqs)} requests (seed {args.seed}), {prompt_tokens} prompt tokens",
        file=out,
    )
    print(f"cache         {args.cache_mib} MiB, {args.block_kib} KiB per 16-token block", file=out)
    print(f"hit rate      {hit_tokens / prompt_tokens:.1%}", file=out)
    print(f"tokens saved  {hit_tokens} (prefill skipped)", file=out)
    print(f"lookup        p50 {p50:.1f} us, p99 {p99:.1f} us", file=out)
    if store_s:
        print(f"store         {stored_bytes / store_s / 1e9:.2f} GB/s", file=out)
    if load_s:
        print(f"load          {loaded_bytes / load_s / 1e9:.2f} GB/s", file=out)
    print(f"evicted       {stats['evicted_blocks']} blocks", file=out)
    if args.plot:
        _plot(args.plot, hit_rates, lookups_us)
        print(f"plot          {args.plot}", file=out)
    return 0


def _plot(path: str, hit_rates: list[float], lookups_us: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    window = max(1, len(hit_rates) // 40)
    kernel = np.ones(window) / window
    rolling = np.convolve(hit_rates, kernel, mode="valid") * 100
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, dpi=120)
    top.plot(np.arange(len(rolling)) + window - 1, rolling, color="#1f77b4")
    top.set_ylabel("hit rate, %")
    top.set_ylim(0, 100)
    top.set_title(f"xconnector bench: prefix hit rate (rolling over {window} requests)")
    top.grid(alpha=0.3)
    bottom.plot(lookups_us, ".", markersize=2, color="#ff7f0e", alpha=0.6, label="lookup")
    p99 = float(np.percentile(lookups_us, 99))
    bottom.axhline(p99, color="#d62728", linewidth=1, label=f"p99 {p99:.0f} us")
    bottom.set_ylabel("lookup, us")
    bottom.set_xlabel("request")
    bottom.set_yscale("log")
    bottom.legend(loc="upper right")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:  # pragma: no cover - `xconnector bench` is the entry point
    p = argparse.ArgumentParser(prog="xconnector bench")
    add_arguments(p)
    return run(p.parse_args(), sys.stdout, sys.stderr)
