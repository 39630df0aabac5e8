"""The README's main job and the benchmark script run and say what they should."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs a command (a script of the repository) to completion; it must succeed."""
    r = subprocess.run(
        list(cmd),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r


def test_main_job_dynamo_worker_demo_hits_through_the_autopatch() -> None:
    r = run("bash", str(ROOT / "scripts" / "demo.sh"))
    lines = r.stdout.splitlines()
    first = next(ln for ln in lines if ln.startswith("1."))
    again = next(ln for ln in lines if ln.startswith("2."))
    prefix = next(ln for ln in lines if ln.startswith("3."))
    assert "from cache     0  computed  3200" in first
    # 3200 = 200 blocks of 16: the block holding the last token is recomputed.
    assert "from cache  3184  computed    16" in again
    # Question B shares the 3000-token system prompt: 187 full blocks of 16 = 2992 tokens.
    assert "from cache  2992  computed   158" in prefix
    assert "same next token: yes" in r.stdout and "fallbacks none" in r.stdout


def test_main_job_demo_with_the_kill_switch_computes_everything() -> None:
    r = run(
        sys.executable,
        str(ROOT / "integrations" / "dynamo" / "demo.py"),
        env={"XCONNECTOR_DISABLE": "1"},
    )
    assert r.stdout.count("from cache     0") == 3 and "XConnector: hit rate" not in r.stdout
    # The summary says what happened, not a speedup the cache did not give.
    assert "computed all 3200 tokens again (XConnector is off)" in r.stdout, r.stdout
    assert "faster" not in r.stdout


def test_engine_demo_shows_a_full_hit_and_a_prefix_hit() -> None:
    r = run(sys.executable, str(ROOT / "examples" / "engine_demo.py"), "--cache-mib", "256")
    lines = r.stdout.splitlines()
    first = next(ln for ln in lines if ln.startswith("1."))
    again = next(ln for ln in lines if ln.startswith("2."))
    prefix = next(ln for ln in lines if ln.startswith("3."))
    assert "hit      0" in first and "prefill 3200 tokens" in first
    assert "(100.0%)" in again and "prefill 1 tokens" in again and "GB/s" in again
    # Question B shares the 3000-token system prompt: 187 full blocks of 16 = 2992 tokens.
    assert "hit   2992" in prefix
    assert re.search(r"hit rate \d+\.\d%", r.stdout)


def test_benchmark_quick_run_prints_every_section() -> None:
    r = run(sys.executable, str(ROOT / "benchmarks" / "engine_bench.py"), "--quick")
    for needle in (
        "blocks cached: numpy",
        "python sha256 chain",
        "ratio",
        "engine store",
        "engine load",
        "memoryview copy",
    ):
        assert needle in r.stdout, r.stdout


def test_kv_layout_benchmark_quick_run() -> None:
    r = run(sys.executable, str(ROOT / "benchmarks" / "kv_layout_bench.py"), "--quick")
    for needle in (
        "store  native gather",
        "numpy per-block copies to a buffer + Engine.store",
        "numpy take(out=) per layer",
        "of the ceiling",
        "load   native scatter",
        "numpy fancy-index scatter per layer",
        "Engine.views + numpy per-block copies",
        "equal the stored ones (native and numpy paths)",
    ):
        assert needle in r.stdout, r.stdout
    assert r.stdout.count("ratio native/best numpy") == 2, r.stdout


def test_redis_benchmark_quick_run() -> None:
    r = run(sys.executable, str(ROOT / "benchmarks" / "redis_bench.py"), "--quick")
    lines = r.stdout.splitlines()
    rows = [ln for ln in lines if "redis-benchmark" in ln and "ratio" in ln]
    # Two sizes, store and load, on one server and on a cluster.
    assert [ln.split()[0] for ln in rows] == ["server"] * 4 + ["cluster"] * 4, r.stdout
    # The one-server baselines over distinct keys, for both sizes.
    assert sum("distinct keys: SET of new keys" in ln for ln in lines) == 2, r.stdout


def test_fleet_benchmark_quick_run() -> None:
    r = run(sys.executable, str(ROOT / "benchmarks" / "fleet.py"), "--quick")
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(("| alone", "| shared"))]
    assert len(rows) == 2 and "shared vs alone: hit rate" in r.stdout, r.stdout


def test_usable_prefix_never_includes_the_block_holding_the_last_token() -> None:
    from xconnector._native import usable_prefix

    for block in (1, 16, 32):
        for length in range(0, 3 * block + 2):
            for hit in range(0, length + 1, block):
                # The rule, computed here: the last token's block is recomputed for its logits.
                rule = min(hit, (length - 1) // block * block) if length else 0
                assert usable_prefix(hit, length, block) == rule, (hit, length, block)


def test_bench_reads_the_last_level_cache_size(tmp_path: Path) -> None:
    from xconnector._native import last_level_cache_bytes

    caches = (("index0", 1, 32 << 10), ("index2", 2, 1 << 20), ("index3", 3, 16 << 20))
    for index, level, size in caches:
        (tmp_path / index).mkdir()
        (tmp_path / index / "level").write_text(f"{level}\n")
        (tmp_path / index / "size").write_text(f"{size >> 10}K\n")
    assert last_level_cache_bytes(str(tmp_path)) == max(caches, key=lambda c: c[1:])[2]
    assert last_level_cache_bytes(str(tmp_path / "missing")) == 32 << 20  # the fallback
    assert last_level_cache_bytes() > 0


def test_bench_replay_reports_progress_and_consistent_figures() -> None:
    from xconnector._native import last_level_cache_bytes, replay

    calls: list[tuple[int, int]] = []
    r = replay(300, 3, 2 << 20, 1 << 10, lambda done, total: calls.append((done, total)))
    assert calls[-1] == (300, 300) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert r["requests"] == len(r["hit_rates"]) == len(r["lookup_us"]) == 300
    assert 0 < r["hit_tokens"] < r["prompt_tokens"]
    assert r["saved_tokens"] <= r["hit_tokens"]  # never the last token's block
    assert all(0 <= h <= 1 for h in r["hit_rates"]) and min(r["lookup_us"]) >= 0
    fill, full = r["store_filling"], r["store_full"]
    assert r["store"]["bytes"] == fill["bytes"] + full["bytes"] > 0
    assert r["evicted_blocks"] > 0 and full["count"] > 0  # 2 MiB is far under the working set
    assert 0 < r["load"]["count"] <= 200 and r["llc_bytes"] == last_level_cache_bytes()
    # Seeded: the same run counts the same tokens.
    again = replay(300, 3, 2 << 20, 1 << 10)
    assert (again["hit_tokens"], again["saved_tokens"]) == (r["hit_tokens"], r["saved_tokens"])


def test_bench_replay_stops_when_its_progress_callback_raises() -> None:
    from xconnector._native import replay

    class Stop(Exception):
        pass

    def progress(done: int, total: int) -> None:
        raise Stop(done)

    with pytest.raises(Stop):
        replay(200, 0, 8 << 20, 1 << 10, progress)
