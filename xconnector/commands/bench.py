"""`xconnector bench`: the native replay of seeded chat, RAG and agent traffic (`replay.rs` in the
core says what each figure means), with its arguments, progress bar, summary and optional plot."""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any, TextIO


def _default_cache_mib() -> int:
    """An eighth of this machine's memory, at most 512 MiB: under the default workload's working
    set, so eviction shows."""
    try:
        return min(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 23, 512)
    except (ValueError, OSError, AttributeError):  # no sysconf: assume 8 GiB
        return 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=1500, help="requests to replay (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (%(default)s)")
    p.add_argument("--cache-mib", type=int, default=_default_cache_mib(), help="memory budget, MiB")
    p.add_argument(
        "--block-kib", type=int, default=32, help="KV bytes per 16-token block, KiB (%(default)s)"
    )
    p.add_argument("--plot", metavar="PNG", help="draw hit rate and lookup latency to this file")


def _bar(err: TextIO, done: int, total: int, width: int = 30) -> None:
    filled = width * done // total
    err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}" + "\n" * (done == total))
    err.flush()


def _gbps(c: dict[str, Any]) -> str:
    return f"{c['bytes'] / c['seconds'] / 1e9:.2f} GB/s"


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from xconnector._native import replay

    bar = functools.partial(_bar, err)
    r = replay(args.requests, args.seed, args.cache_mib << 20, args.block_kib << 10, bar)
    prompt, saved = r["prompt_tokens"], r["saved_tokens"]
    store, fill, full, load = r["store"], r["store_filling"], r["store_full"], r["load"]
    lines = [
        f"workload      {r['requests']} requests (seed {args.seed}), {prompt} prompt tokens",
        f"cache         {args.cache_mib} MiB, {args.block_kib} KiB per 16-token block",
        f"hit rate      {r['hit_tokens'] / prompt:.1%}",
        f"tokens saved  {saved} ({saved / prompt:.1%} of prompt tokens; "
        "the block holding each prompt's last token is recomputed)",
        f"lookup        p50 {r['lookup_p50_us']:.1f} us, p99 {r['lookup_p99_us']:.1f} us",
    ]
    if store["seconds"]:
        lines.append(
            f"store         {_gbps(store)}: {store['bytes'] / 1e9:.2f} GB copied into the cache, "
            f"over the time of the {store['count']} stores that copied"
        )
    if fill["seconds"] and full["seconds"]:
        lines.append(
            f"              {_gbps(fill)} while the cache filled (first touch of its memory, "
            f"{fill['count']} stores), {_gbps(full)} once full ({full['count']} stores)"
        )
    if load["seconds"]:
        lines.append(
            f"load          {_gbps(load)}: {load['bytes'] / 1e9:.2f} GB reloaded for "
            f"{load['count']} earlier requests after the run, CPU caches swept before each"
        )
    lines.append(f"evicted       {r['evicted_blocks']} blocks")
    if args.plot:
        _plot(args.plot, r)
        lines.append(f"plot          {args.plot}")
    print("\n".join(lines), file=out)
    return 0


def _plot(path: str, r: dict[str, Any]) -> None:
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to manage

    hit_rates, p99 = r["hit_rates"], r["lookup_p99_us"]
    window = max(1, len(hit_rates) // 40)
    rolling = np.convolve(hit_rates, np.ones(window) / window, mode="valid") * 100
    fig = Figure(figsize=(9, 6), dpi=120)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(np.arange(len(rolling)) + window - 1, rolling, color="#1f77b4")
    title = f"xconnector bench: prefix hit rate (rolling over {window} requests)"
    top.set(ylabel="hit rate, %", ylim=(0, 100), title=title)
    bottom.plot(r["lookup_us"], ".", markersize=2, color="#ff7f0e", alpha=0.6, label="lookup")
    bottom.axhline(p99, color="#d62728", linewidth=1, label=f"p99 {p99:.0f} us")
    bottom.set(ylabel="lookup, us", xlabel="request", yscale="log")
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
