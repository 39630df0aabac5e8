"""The disk tier from Python, across processes: a second process (or a restart) finds what the
first wrote; processes storing into one directory at once never corrupt it; every payload read
back is the one stored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import BLOCK, block_payload

from xconnector import Engine

BLOCK_BYTES = 256

WORKER = """
import json, sys
sys.path.insert(0, sys.argv[3])
from conftest import block_payload
from xconnector import Engine

disk, seed = sys.argv[1], int(sys.argv[2])
e = Engine(block_bytes=256, capacity_bytes=64 * 256, block_size=16, model="m",
           disk_path=disk, disk_capacity_bytes=10_000_000)
stored = checked = 0
for i in range(60):
    # Half the prompts are shared between the two processes, half are their own.
    toks = list(range((i % 30) * 1000, (i % 30) * 1000 + 64)) if i % 2 else \\
        list(range(seed * 10**6 + i * 1000, seed * 10**6 + i * 1000 + 64))
    stored += e.store(toks, block_payload(toks))
    out = bytearray(4 * 256)
    n = e.load(toks, out)
    assert bytes(out[: n // 16 * 256]) == block_payload(toks)[: n // 16 * 256], "wrong bytes"
    checked += n
assert e.flush(30)
print(json.dumps({"stored": stored, "checked": checked, "stats": e.stats()}))
"""


def engine(disk: Path, blocks: int = 64) -> Engine:
    return Engine(
        block_bytes=BLOCK_BYTES,
        capacity_bytes=blocks * BLOCK_BYTES,
        block_size=BLOCK,
        model="m",
        disk_path=str(disk),
        disk_capacity_bytes=10_000_000,
    )


def test_what_one_process_wrote_another_finds(tmp_path: Path) -> None:
    toks = list(range(5000, 5000 + 5 * BLOCK))
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from conftest import block_payload; "
        "from xconnector import Engine; "
        "e = Engine(block_bytes=256, capacity_bytes=64*256, block_size=16, model='m', "
        "disk_path=sys.argv[1], disk_capacity_bytes=10_000_000); "
        f"t = {toks!r}; e.store(t, block_payload(t)); assert e.flush(30)"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(Path(__file__).parent)], check=True
    )
    e = engine(tmp_path)
    assert e.lookup(toks) == 5 * BLOCK
    out = bytearray(5 * BLOCK_BYTES)
    assert e.load(toks, out) == 5 * BLOCK
    assert bytes(out) == block_payload(toks)
    stats = e.stats()
    assert stats["promoted_blocks"] == 5 and stats["disk_read_blocks"] == 5


def test_two_processes_share_a_directory_safely(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(seed), str(Path(__file__).parent)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    for r in results:
        assert r["checked"] > 0 and r["stats"]["disk_corrupt_blocks"] == 0
    # Nothing half-written is left, and a fresh reader finds every block either process wrote
    # (the shared prompts and each one's own), intact.
    assert not list(tmp_path.rglob(".tmp-*"))
    written = [list(range(i * 1000, i * 1000 + 64)) for i in range(1, 30, 2)]
    written += [
        list(range(seed * 10**6 + i * 1000, seed * 10**6 + i * 1000 + 64))
        for seed in (1, 2)
        for i in range(0, 60, 2)
    ]
    assert len(written) == 15 + 2 * 30
    e = engine(tmp_path, blocks=256)
    for toks in written:
        out = bytearray(4 * BLOCK_BYTES)
        n = e.load(toks, out)
        assert n == 64, f"prompt {toks[0]}: {n} of 64 tokens"
        assert bytes(out) == block_payload(toks), f"prompt {toks[0]}: wrong bytes"
    stats = e.stats()
    assert stats["disk_read_blocks"] == stats["promoted_blocks"] == 4 * len(written)
    assert stats["disk_corrupt_blocks"] == 0
