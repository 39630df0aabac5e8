"""Redis tier throughput over loopback, against raw SET/GET of the same sizes measured by
`redis-benchmark` in the same run (pipelines of 64, like the tier's batches): on one server (one
connection), then on a 3-primary Redis Cluster (a connection to each primary).

- store: `Engine.store` of a request's blocks plus `flush()` (the write-behind batches reach
  Redis), on an engine whose only lower tier is Redis;
- load: `Engine.load` on an engine without them in memory: the blocks come from Redis
  (pipelined GETs), are checked (header and XXH3) and promoted into memory.

On one server it also measures raw SET and GET over as many distinct keys as the tier uses
(`distinct_keys_gbs`): redis-benchmark's SET/GET reuse one key, so Redis never allocates memory
for a new value and the value it sends stays in cache, neither of which holds for the tier.

Each number is the best of 3 runs after a warm-up run (engines in a worker are warm).
Run: `.venv/bin/python benchmarks/redis_bench.py` (`--quick` for a smoke run). Needs
redis-server and redis-benchmark (scripts/services.sh).
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xconnector import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from services import RedisCluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            "2gb",
            "--maxmemory-policy",
            "allkeys-lru",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(500):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.01)
    raise RuntimeError("redis-server did not start")


def redis_benchmark(port: int, size: int, n: int, *args: str) -> dict[str, float]:
    """GB/s of the SET and GET tests redis-benchmark runs (`-P 64`, `n` requests, `size`-byte
    values), as "set" and "get" (its other output, a cluster's node list, skipped)."""
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-n",
            str(n),
            "-d",
            str(size),
            "-P",
            "64",
            "--csv",
            "-q",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [r for r in csv.reader(io.StringIO(out)) if r and r[0] in ("SET", "GET")]
    return {r[0].lower(): float(r[1]) * size / 1e9 for r in rows}


def raw_gbs(port: int, size: int, n: int, masters: int = 0) -> dict[str, float]:
    """GB/s of SET and GET of `size`-byte values, as redis-benchmark measures them (on a cluster
    of `masters` primaries: one pipelining connection to each)."""
    cluster = ["--cluster", "-c", str(masters)] if masters else ["-c", "1"]
    return redis_benchmark(port, size, n, "-t", "set,get", *cluster)


def distinct_keys_gbs(port: int, size: int, n: int) -> dict[str, float]:
    """GB/s of raw SET and GET over as many distinct keys as the tier writes and reads: SETs of
    new random keys (Redis allocates memory for each, as for the tier's blocks), and GETs of
    random keys among `n` stored ones (values not in cache, as the tier's are). redis-benchmark's
    own SET/GET above reuse one key, whose value stays hot."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        value = b"v" * size
        for base in range(0, n, 64):
            batch = range(base, min(base + 64, n))
            s.sendall(
                b"".join(
                    b"*3\r\n$3\r\nSET\r\n$16\r\nkey:%012d\r\n$%d\r\n%s\r\n" % (i, size, value)
                    for i in batch
                )
            )
            got = b""
            while got.count(b"\r\n") < len(batch):
                got += s.recv(1 << 16)
    # -r draws each command's key:NNNNNNNNNNNN at random from 0..r-1.
    return {
        "set": redis_benchmark(port, size, n, "-c", "1", "-t", "set", "-r", "1000000000")["set"],
        "get": redis_benchmark(port, size, n, "-c", "1", "-t", "get", "-r", str(n))["get"],
    }


def tier_gbs(url: str, block_bytes: int, blocks: int, runs: int) -> dict[str, float]:
    """Best of `runs` after one warm-up: engines in a worker are warm (arena pages touched,
    connections open), and first-touch page faults would otherwise dominate."""
    total = blocks * block_bytes
    writer = Engine(
        block_bytes=block_bytes,
        capacity_bytes=total,
        block_size=16,
        redis_url=url,
        redis_queue_blocks=blocks + 1,
        redis_timeout=10.0,
    )
    reader = Engine(
        block_bytes=block_bytes,
        capacity_bytes=total,
        block_size=16,
        redis_url=url,
        redis_timeout=10.0,
    )
    out = np.empty(total, np.uint8)
    best = {"set": 0.0, "get": 0.0}
    for run in range(runs + 1):
        tokens = np.arange(run * 10_000_000, run * 10_000_000 + blocks * 16, dtype=np.uint32)
        payload = np.random.default_rng(run).integers(0, 256, total, dtype=np.uint8)
        t0 = time.perf_counter()
        assert writer.store(tokens, payload) == blocks
        assert writer.flush(120)
        t_store = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert reader.load(tokens, out) == blocks * 16
        t_load = time.perf_counter() - t0
        assert np.array_equal(out, payload)
        if run > 0:  # run 0 warms up
            best["set"] = max(best["set"], total / t_store / 1e9)
            best["get"] = max(best["get"], total / t_load / 1e9)
    return best


def compare(where: str, url: str, port: int, masters: int, total: int, runs: int) -> None:
    for size in (1 << 20, 64 << 10):
        blocks = total // size
        best_tier = tier_gbs(url, size, blocks, runs)
        raw = raw_gbs(port, size, blocks, masters)
        label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        for op, name in (("set", "store"), ("get", "load")):
            print(
                f"{where:>7} {label:>7} blocks, {name}: tier {best_tier[op]:5.2f} GB/s | "
                f"redis-benchmark {op.upper()} {raw[op]:5.2f} GB/s | "
                f"ratio {best_tier[op] / raw[op]:4.2f}x"
            )
        if not masters:
            keys = distinct_keys_gbs(port, size, blocks)
            print(
                f"{'':>7} {label:>7} over {blocks} distinct keys: SET of new keys "
                f"{keys['set']:5.2f} GB/s (tier {best_tier['set'] / keys['set']:4.2f}x), GET "
                f"{keys['get']:5.2f} GB/s (tier {best_tier['get'] / keys['get']:4.2f}x)"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        raise SystemExit("needs redis-server and redis-benchmark: bash scripts/services.sh")
    total = (16 if args.quick else 256) << 20
    runs = 1 if args.quick else 3
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = start_redis(port, workdir)
        try:
            compare("server", f"redis://127.0.0.1:{port}", port, 0, total, runs)
        finally:
            proc.terminate()
            proc.wait()
        # A 3-primary cluster (no replicas: both sides would pay for replication alike).
        (Path(workdir) / "cluster").mkdir()
        cluster = RedisCluster(Path(workdir) / "cluster", masters=3, replicas=0)
        for node in cluster.nodes:
            node.cli("CONFIG", "SET", "maxmemory", "2gb", "maxmemory-policy", "allkeys-lru")
        try:
            compare("cluster", cluster.url, cluster.nodes[0].port, 3, total, runs)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
