"""`xconnector bench`: replays a seeded workload with shared prefixes (chat, RAG, agent loops,
see `xconnector.workload`) through the native engine, as a worker would use it: look the prompt
up, load the cached prefix it can use, store the rest. Prints hit rate, tokens saved, lookup
p50/p99 and store/load bandwidth; `--plot out.png` draws hit rate and lookup latency over the run.

What each figure is:

- hit rate: prompt tokens the lookups found cached, over all prompt tokens;
- tokens saved: prefill a worker skips. The block holding a prompt's last token is always
  recomputed (its logits are needed), so a request saves `min(hit, (len - 1) // 16 * 16)` tokens,
  and the replay loads only those blocks;
- store: bytes copied into the cache over the time of the stores that copied them (a store whose
  blocks are all cached copies nothing), and the same split into the stores made while the cache
  was filling (first touch of its memory: page faults) and once it was full (slots reused). Each
  store reads its payload from a ring of buffers larger than the last-level cache;
- load: not timed during the replay, where a prefix is often loaded right after it was stored or
  loaded and would come from the CPU caches, into a buffer the last load also used. After the
  replay, up to `COLD_LOADS` of the requests that loaded a prefix, spread over the run, reload what
  is still cached of it, each after reading twice the last-level cache, into a part of a ring
  larger than that cache: blocks and destination come from memory, as after a forward pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from xconnector.workload import requests

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from xconnector import Engine
    from xconnector.workload import Request

BLOCK = 16
COLD_LOADS = 200  # loads timed after the replay
_FALLBACK_LLC = 32 << 20


def _default_cache_mib() -> int:
    """An eighth of this machine's memory, capped at 512 MiB: under the default workload's working
    set, so eviction shows."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 << 30
    return int(min(ram // 8, 512 << 20) >> 20)


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of the CPU's last-level cache (Linux sysfs), 32 MiB where it cannot be read."""
    best_level, size = 0, 0
    try:
        for index in root.glob("index*"):
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            value = int(text.rstrip("KMG")) * unit
            if level > best_level or (level == best_level and value > size):
                best_level, size = level, value
    except (OSError, ValueError):
        return _FALLBACK_LLC
    return size or _FALLBACK_LLC


class _Ring:
    """A buffer handed out in consecutive slices: a slice's bytes come round again only after
    `len(buffer) - n` other bytes have been handed out."""

    def __init__(self, nbytes: int) -> None:
        import numpy as np

        self.buf: npt.NDArray[np.uint8] = np.empty(nbytes, np.uint8)
        self.buf.fill(1)  # touch every page now, not inside a timed copy
        self.offset = 0

    def take(self, n: int) -> npt.NDArray[np.uint8]:
        if self.offset + n > len(self.buf):
            self.offset = 0
        view = self.buf[self.offset : self.offset + n]
        self.offset += n
        return view


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


def saved_tokens(hit: int, prompt_len: int, block: int = BLOCK) -> int:
    """Prefill a worker skips for a prompt of `prompt_len` tokens whose first `hit` are cached:
    never the block holding the last token, which is recomputed for its logits."""
    return min(hit, (prompt_len - 1) // block * block) if prompt_len else 0


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
    longest = max(len(r.tokens) for r in reqs) // BLOCK * block_bytes
    llc = last_level_cache_bytes()
    sources, destinations = _Ring(2 * llc + longest), _Ring(2 * llc + longest)
    lookups_us: list[float] = []
    hit_rates: list[float] = []
    reused: list[int] = []  # requests that loaded a cached prefix
    prompt_tokens = hit_tokens = saved_total = 0
    copied = [0, 0]  # bytes copied by stores while the cache filled, and once it was full
    copy_s = [0.0, 0.0]
    copying = [0, 0]
    cache_full = False  # from the first eviction on
    for i, r in enumerate(reqs):
        toks = np.asarray(r.tokens, dtype=np.uint32)
        t0 = time.perf_counter()
        hit = engine.lookup(toks)
        lookups_us.append((time.perf_counter() - t0) * 1e6)
        saved = saved_tokens(hit, len(toks))
        if saved:
            # As a worker: only the blocks it will not recompute. Timed after the replay.
            engine.load(toks[:saved], destinations.take(saved // BLOCK * block_bytes))
            reused.append(i)
        blocks = len(toks) // BLOCK
        src = sources.take(blocks * block_bytes)
        t0 = time.perf_counter()
        new = engine.store(toks[: blocks * BLOCK], src)
        dt = time.perf_counter() - t0
        phase = 1 if cache_full else 0  # a full cache reuses evicted slots
        if new:
            copied[phase] += new * block_bytes
            copy_s[phase] += dt
            copying[phase] += 1
        if not cache_full:
            cache_full = bool(engine.stats()["evicted_blocks"])
        prompt_tokens += len(toks)
        hit_tokens += hit
        saved_total += saved
        hit_rates.append(hit / len(toks))
        if i % 50 == 0 or i == len(reqs) - 1:
            _progress(i + 1, len(reqs), err)
    stats = engine.stats()
    load_bytes, load_s, loads = _cold_loads(engine, reqs, reused, destinations, llc, block_bytes)
    p50 = statistics.median(lookups_us)
    p99 = sorted(lookups_us)[int(0.99 * (len(lookups_us) - 1))]
    print(
        f"workload      {len(reqs)} requests (seed {args.seed}), {prompt_tokens} prompt tokens",
        file=out,
    )
    print(f"cache         {args.cache_mib} MiB, {args.block_kib} KiB per 16-token block", file=out)
    print(f"hit rate      {hit_tokens / prompt_tokens:.1%}", file=out)
    print(
        f"tokens saved  {saved_total} ({saved_total / prompt_tokens:.1%} of prompt tokens; "
        "the block holding each prompt's last token is recomputed)",
        file=out,
    )
    print(f"lookup        p50 {p50:.1f} us, p99 {p99:.1f} us", file=out)
    if sum(copy_s):
        print(
            f"store         {sum(copied) / sum(copy_s) / 1e9:.2f} GB/s: "
            f"{sum(copied) / 1e9:.2f} GB copied into the cache, over the time of the "
            f"{sum(copying)} stores that copied",
            file=out,
        )
        if copy_s[0] and copy_s[1]:
            print(
                f"              {copied[0] / copy_s[0] / 1e9:.2f} GB/s while the cache filled "
                f"(first touch of its memory, {copying[0]} stores), "
                f"{copied[1] / copy_s[1] / 1e9:.2f} GB/s once full ({copying[1]} stores)",
                file=out,
            )
    if load_s:
        print(
            f"load          {load_bytes / load_s / 1e9:.2f} GB/s: {load_bytes / 1e9:.2f} GB "
            f"reloaded for {loads} earlier requests after the run, CPU caches swept before each",
            file=out,
        )
    print(f"evicted       {stats['evicted_blocks']} blocks", file=out)
    if args.plot:
        _plot(args.plot, hit_rates, lookups_us)
        print(f"plot          {args.plot}", file=out)
    return 0


def _cold_loads(
    engine: Engine,
    reqs: list[Request],
    reused: list[int],
    destinations: _Ring,
    llc: int,
    block_bytes: int,
) -> tuple[int, float, int]:
    """Times loads as a worker sees them: up to `COLD_LOADS` of the requests that loaded a prefix,
    evenly spread over the run, each reloading what is still cached of that prefix (never the
    block holding the last token) after a read of twice the last-level cache, so neither its
    blocks nor its destination are still in the CPU caches. Returns (bytes, seconds, loads)."""
    import numpy as np

    sweep = np.ones(2 * llc // 8, np.uint64)
    step = max(1, -(-len(reused) // COLD_LOADS))
    nbytes, seconds, loads = 0, 0.0, 0
    for i in reused[::step]:
        toks = np.asarray(reqs[i].tokens, dtype=np.uint32)
        saved = saved_tokens(engine.lookup(toks), len(toks))
        if not saved:
            continue  # evicted since
        dst = destinations.take(saved // BLOCK * block_bytes)
        sweep.max()
        t0 = time.perf_counter()
        got = engine.load(toks[:saved], dst)
        seconds += time.perf_counter() - t0
        nbytes += got // BLOCK * block_bytes
        loads += 1
    return nbytes, seconds, loads


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
