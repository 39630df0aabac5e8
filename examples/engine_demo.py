"""Demo of the native engine on the embedded default: a prompt's KV is stored once, and a repeat of
the prompt (or a prompt sharing its prefix) is served from the cache instead of being recomputed.

The KV here is random bytes shaped like a small Llama's (8 layers x 8 KV heads x 128 dims, fp16),
since no model runs in this demo; the engine treats payloads as opaque bytes either way.

Run: `python examples/engine_demo.py` (see README).
"""

from __future__ import annotations

import argparse
import random
import time
from array import array

from xconnector import Engine

BLOCK_SIZE = 16
LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES = 8, 8, 128, 2
# K and V for every layer of one block of tokens.
BLOCK_BYTES = 2 * LAYERS * KV_HEADS * HEAD_DIM * DTYPE_BYTES * BLOCK_SIZE


def fake_prefill(tokens: array[int]) -> bytes:
    """Stands in for the model: KV bytes for the full blocks of `tokens`, each block's derived
    from its whole prefix, as real KV is."""
    ends = range(BLOCK_SIZE, len(tokens) + 1, BLOCK_SIZE)
    return b"".join(random.Random(hash(tuple(tokens[:end]))).randbytes(BLOCK_BYTES) for end in ends)


def serve(engine: Engine, name: str, tokens: array[int]) -> None:
    """One request: look up its prefix, load the hit, prefill (store) the rest."""
    hit = engine.lookup(tokens)
    line = f"{name:<28} {len(tokens):>6} tokens  hit {hit:>6} ({hit / len(tokens):6.1%})"
    if hit:
        out = bytearray(hit // BLOCK_SIZE * BLOCK_BYTES)
        engine.load(tokens, out)  # first touch of `out` pages is not the engine's cost
        t0 = time.perf_counter()
        loaded = engine.load(tokens, out)
        dt = time.perf_counter() - t0
        assert loaded == hit
        assert out == fake_prefill(tokens[:hit]), "loaded KV differs from stored KV"
        mib = len(out) / 2**20
        line += f"  loaded {mib:6.1f} MiB in {dt * 1e3:6.2f} ms ({len(out) / dt / 1e9:5.1f} GB/s)"
    # Prefill computes only the tokens after the hit (at least the last token, for its logits).
    print(f"{line}  -> prefill {len(tokens) - min(hit, len(tokens) - 1)} tokens")
    engine.store(tokens, fake_prefill(tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description="XConnector engine demo")
    ap.add_argument("--cache-mib", type=int, default=512, help="memory tier budget (MiB)")
    args = ap.parse_args()
    engine = Engine(
        block_size=BLOCK_SIZE,
        block_bytes=BLOCK_BYTES,
        capacity_bytes=args.cache_mib * 2**20,
        model="demo-llama-8l",
        dtype="float16",
        kv_layout="NHD",
    )
    print(f"engine: {engine!r}")
    print(f"block: {BLOCK_SIZE} tokens = {BLOCK_BYTES // 1024} KiB of KV\n")
    rng = random.Random(0)
    system, question_a, question_b = (
        array("I", (rng.randrange(32_000) for _ in range(n))) for n in (3_000, 200, 150)
    )
    serve(engine, "1. system + question A", system + question_a)
    serve(engine, "2. same request again", system + question_a)
    serve(engine, "3. system + question B", system + question_b)
    s = engine.stats()
    print(
        f"\nstats: {s['lookups']} lookups, hit rate {s['hit_rate']:.1%}, "
        f"{s['hit_tokens']} tokens served from cache, {s['stored_blocks']} blocks stored "
        f"({s['used_bytes'] / 2**20:.0f} of {s['capacity_bytes'] / 2**20:.0f} MiB), "
        f"{s['evicted_blocks']} evicted"
    )


if __name__ == "__main__":
    main()
