"""`xconnector stats [URL]`: reads a running worker's Prometheus endpoint and prints what
XConnector is doing there: hit rate, bytes, tiers, fallbacks."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections import defaultdict
from typing import TextIO

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """`name -> [(labels, value)]` of the `xconnector_` samples of a text exposition."""
    out: Samples = defaultdict(list)
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None or not m.group(1).startswith("xconnector_"):
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            out[m.group(1)].append((labels, float(m.group(3))))
        except ValueError:
            continue
    return out


def _sum(s: Samples, name: str, **match: str) -> float:
    return sum(
        v for labels, v in s.get(name, []) if all(labels.get(k) == x for k, x in match.items())
    )


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def report(s: Samples, out: TextIO) -> None:
    hit, miss = _sum(s, "xconnector_hit_tokens_total"), _sum(s, "xconnector_miss_tokens_total")
    asked = hit + miss
    rate = f"{hit / asked:.1%} of {int(asked)} looked-up tokens" if asked else "no lookups yet"
    print(f"  lookups      {int(_sum(s, 'xconnector_lookup_total'))}", file=out)
    print(f"  hit rate     {rate}", file=out)
    print(
        f"  served       {int(_sum(s, 'xconnector_served_tokens_total'))} prompt tokens", file=out
    )
    stored_blocks = int(_sum(s, "xconnector_blocks_stored_total"))
    stored_bytes = _bytes(_sum(s, "xconnector_bytes_stored_total"))
    print(f"  stored       {stored_blocks} blocks, {stored_bytes}", file=out)
    loaded = _bytes(_sum(s, "xconnector_bytes_loaded_total"))
    print(
        f"  loaded       {int(_sum(s, 'xconnector_blocks_loaded_total'))} blocks, {loaded}",
        file=out,
    )
    for op, name in (("store", "stored"), ("load", "loaded")):
        seconds = _sum(s, f"xconnector_{op}_duration_seconds_sum")
        if seconds > 0:
            gbs = _sum(s, f"xconnector_bytes_{name}_total") / seconds / 1e9
            print(f"  {op} speed  {gbs:.2f} GB/s (bytes over time spent in {op}s)", file=out)
    tiers = sorted({labels["tier"] for labels, _ in s.get("xconnector_tier_bytes", [])})
    for tier in tiers:
        used = _sum(s, "xconnector_tier_bytes", tier=tier)
        cap = _sum(s, "xconnector_tier_capacity_bytes", tier=tier)
        entries = int(_sum(s, "xconnector_tier_entries", tier=tier))
        evicted = int(_sum(s, "xconnector_evictions_total", tier=tier))
        print(
            f"  tier {tier:<7} {_bytes(used)} of {_bytes(cap)}, {entries} blocks, "
            f"{evicted} evicted",
            file=out,
        )
    if "xconnector_redis_up" in s:
        up = "up" if _sum(s, "xconnector_redis_up") else "DOWN"
        print(
            f"  redis        {up}, errors {int(_sum(s, 'xconnector_redis_errors_total'))}", file=out
        )
    fallbacks = {
        labels.get("reason", "?"): int(v)
        for labels, v in s.get("xconnector_fallbacks_total", [])
        if v
    }
    shown = ", ".join(f"{r} {n}" for r, n in sorted(fallbacks.items())) or "none"
    print(f"  fallbacks    {shown}", file=out)


def run(url: str, out: TextIO, err: TextIO, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"error: cannot read {url}: {reason}", file=err)
        return 1
    samples = parse(text)
    if not samples:
        print(
            f"error: {url} serves no xconnector_ metrics; is XConnector on in that worker?",
            file=err,
        )
        return 1
    print(f"XConnector at {url}", file=out)
    report(samples, out)
    return 0
