"""`xconnector stats` against a live worker process serving its metrics port, and
`xconnector version`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services import free_port

TESTS = Path(__file__).resolve().parent
CLI = Path(sys.executable).with_name("xconnector")

WORKER = """
import sys
sys.path.insert(0, sys.argv[2])
from v0_worker import BLOCK, build_model_input, new_kv_caches
from xconnector.sdk import XConnectorSDK

port = int(sys.argv[1])
sdk = XConnectorSDK({"performance": {"metrics_port": port}})
sdk.initialize()
caches = new_kv_caches(16)
prompt = list(range(1, 3 * BLOCK + 2))
first = build_model_input([prompt], [[1, 2, 3, 4]])
sdk.handle_kv_receive_sync(None, first, caches)
sdk.handle_kv_send_sync(None, first, caches, None)
sdk.handle_kv_receive_sync(None, build_model_input([prompt], [[5, 6, 7, 8]]), caches)
print("ready", flush=True)
sys.stdin.readline()
sdk.shutdown()
"""


def test_stats_reads_a_live_worker() -> None:
    port = free_port()
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(port), str(TESTS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        r = subprocess.run(
            [str(CLI), "stats", f"http://127.0.0.1:{port}/metrics"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        lines = {ln.split()[0]: ln for ln in r.stdout.splitlines()[1:]}
        # 49-token prompt: 0 of 49 cached, then 48 of 49 (the last token is computed).
        assert "hit rate     49.0% of 98 looked-up tokens" in r.stdout, r.stdout
        assert lines["served"].endswith("48 prompt tokens")
        assert lines["stored"].endswith("3 blocks, 9.0 KiB"), r.stdout  # 3 layers x 3 KiB per block
        assert "tier memory" in r.stdout and "fallbacks    none" in r.stdout
        assert "store speed" in r.stdout and "load speed" in r.stdout and "GB/s" in r.stdout
    finally:
        assert worker.stdin is not None
        worker.stdin.write("\n")
        worker.stdin.close()
        worker.wait(timeout=30)
        assert worker.stdout is not None
        worker.stdout.close()


def test_stats_on_an_endpoint_that_is_not_there() -> None:
    r = subprocess.run(
        [str(CLI), "stats", f"http://127.0.0.1:{free_port()}/metrics"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1 and r.stderr.startswith("error: cannot read http://127.0.0.1:")
    assert "Traceback" not in r.stderr


def test_version_names_every_component() -> None:
    r = subprocess.run(
        [str(CLI), "version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ},
    )
    names = [ln.split()[0] for ln in r.stdout.splitlines()]
    assert names[:2] == ["xconnector", "native"] and "vllm" in names and "dynamo" in names
    assert "1.0.0" in r.stdout.splitlines()[0]


def test_bench_reports_and_plots(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    r = subprocess.run(
        [str(CLI), "bench", "--requests", "200", "--cache-mib", "32", "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    fields = {ln.split()[0]: ln for ln in r.stdout.splitlines()}
    for key in ("workload", "hit", "tokens", "lookup", "store", "load", "evicted", "plot"):
        assert key in fields, r.stdout
    rate = float(fields["hit"].split()[-1].rstrip("%"))
    assert 0 < rate < 100  # shared prefixes hit; first sights and evictions miss
    assert "p50" in fields["lookup"] and "p99" in fields["lookup"]
    assert "/200" in r.stderr  # the progress bar
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1080, 720)
    # Seeded: the same run reports the same hit rate.
    again = subprocess.run(
        [str(CLI), "bench", "--requests", "200", "--cache-mib", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert fields["hit"] in again.stdout
