"""Staged (GPU) transfer benchmark: a long request saved from, and restored into, a paged KV cache
on the device through XConnector's bounded staging path (`StagedKv`), against plain pinned-host
copies of the same bytes measured in the same run.

The cache has a Llama-3-8B shape (32 layers, 8 KV heads, head_dim 128, bf16, vLLM's flash-attn
layout, 16-token blocks): 128 KiB of KV per token, 4 GiB for the default 32k-token request. The
request's blocks are scattered over the cache. Measured, best of --repeat runs:

  save     StagedKv.store into a fresh engine (device gather -> pinned part -> engine), GB/s;
  restore  StagedKv.load from the engine into other blocks (engine -> pinned part -> device
           scatter), GB/s, the restored bytes checked against the saved ones;
  baseline one device->host and one host->device copy of the whole request's bytes between a
           contiguous device buffer and pinned host memory (`cudaMemcpy`), GB/s;
  memory   the peak device memory the save and the restore allocated beyond the cache, against
           the staging bound (`staging_buffer_size`, --chunk-mib).

Run on a machine with a GPU, in an environment with torch and XConnector:

    PYTHONPATH=. python benchmarks/gpu_bench.py [--tokens 32768] [--chunk-mib 256] [--repeat 3]

Without a GPU, `--device cpu` runs the same code path on CPU tensors (no pinned memory, no device
memory to report): a check that the path works, not a measurement of PCIe.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Any, device: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    import torch

    from xconnector import Engine
    from xconnector.adapters.vllm import StagedKv

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk-mib", type=int, default=256, help="staging_buffer_size, MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n_blocks = args.tokens // BLOCK
    cache_blocks = 2 * n_blocks + 8  # room to restore into other blocks
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (2, cache_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    kv = [
        torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
        for _ in range(LAYERS)
    ]
    src_ids = list(range(0, 2 * n_blocks, 2))  # scattered: every other block
    dst_ids = list(range(1, 2 * n_blocks, 2))
    tokens = list(range(args.tokens))
    chunk = args.chunk_mib << 20
    io = StagedKv(kv, BLOCK, None, staging_bytes=chunk)
    request_bytes = n_blocks * io.block_bytes
    print(
        f"{args.tokens} tokens, {LAYERS} layers x {KV_HEADS} KV heads x {HEAD_DIM} bf16 "
        f"({io.layout}): {request_bytes / 2**30:.2f} GiB; staging bound {args.chunk_mib} MiB; "
        f"device {device}"
    )

    def engine() -> Any:
        return Engine(block_bytes=io.block_bytes, capacity_bytes=request_bytes, block_size=BLOCK)

    # Save: into a fresh engine each run (a cached block would be skipped, not copied).
    engines: list[Any] = []

    def save() -> None:
        engines.append(engine())
        assert io.store(engines[-1], tokens, src_ids) == n_blocks

    base = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    save_s = best_seconds(save, device, args.repeat)
    save_peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    full = engines[-1]
    del engines[:-1]

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    restore_s = best_seconds(lambda: io.load(full, tokens, dst_ids), device, args.repeat)
    restore_peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    for layer in (0, LAYERS - 1):
        for a, b in ((src_ids[0], dst_ids[0]), (src_ids[-1], dst_ids[-1])):
            assert torch.equal(kv[layer][:, a], kv[layer][:, b]), "restored bytes differ"

    # Baseline: the same bytes, contiguous, between the device and pinned host memory.
    dev = torch.empty(request_bytes, dtype=torch.uint8, device=device)
    host = torch.empty(request_bytes, dtype=torch.uint8, pin_memory=cuda)
    d2h_s = best_seconds(lambda: host.copy_(dev), device, args.repeat)
    h2d_s = best_seconds(lambda: dev.copy_(host), device, args.repeat)

    def gbs(seconds: float) -> float:
        return request_bytes / seconds / 1e9

    print(f"\n{'what':<10}{'GB/s':>8}{'pinned memcpy GB/s':>20}{'ratio':>8}")
    print(f"{'save':<10}{gbs(save_s):>8.2f}{gbs(d2h_s):>20.2f}{d2h_s / save_s:>7.2f}x")
    print(f"{'restore':<10}{gbs(restore_s):>8.2f}{gbs(h2d_s):>20.2f}{h2d_s / restore_s:>7.2f}x")
    if cuda:
        for what, peak in (("save", save_peak), ("restore", restore_peak)):
            assert peak is not None
            print(
                f"peak extra device memory, {what}: {peak / 2**20:.0f} MiB "
                f"(bound {args.chunk_mib} MiB: {'within' if peak <= chunk else 'OVER'})"
            )
    else:
        print("(CPU tensors: the code path only; no pinned memory or device memory to measure)")


if __name__ == "__main__":
    main()
