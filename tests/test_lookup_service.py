"""The scheduler-side lookup across processes (tensor parallel > 1): two worker-rank processes,
each with its own engine answering on its Unix socket, and this process as the scheduler. The
answer is the smallest hit over the ranks, and a rank that does not answer is a miss."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xconnector.integrations.vllm.lookup_service import LookupClient, socket_path

PROMPT = list(range(1000, 1000 + 128))

RANK = """
import sys
from xconnector import Engine
from xconnector.integrations.vllm.lookup_service import LookupServer, socket_path

engine_id, rank = sys.argv[1], int(sys.argv[2])
prompt = list(range(1000, 1000 + 128))
engine = Engine(block_bytes=64, capacity_bytes=4096, block_size=32, tp_world_size=2, tp_rank=rank)
server = LookupServer(socket_path(engine_id, rank),
                      lambda t, lora, salt, lora_id: engine.lookup(
                          t, lora_name=lora, cache_salt=salt, lora_id=lora_id))
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    engine.store(prompt[:n], bytes(64 * (n // 32)))
    print("stored", flush=True)
"""


class Rank:
    def __init__(self, engine_id: str, rank: int, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RANK, engine_id, str(rank)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def store(self, n: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "stored"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def ranks(tmp_path: Path) -> Iterator[tuple[str, list[Rank]]]:
    env = {**os.environ, "XCONNECTOR_SOCKET_DIR": str(tmp_path)}
    os.environ["XCONNECTOR_SOCKET_DIR"] = str(tmp_path)
    engine_id = "engine-under-test"
    started = [Rank(engine_id, r, env) for r in (0, 1)]
    try:
        yield engine_id, started
    finally:
        for r in started:
            r.kill()
        del os.environ["XCONNECTOR_SOCKET_DIR"]


def test_the_scheduler_gets_the_smallest_hit_over_ranks(ranks: tuple[str, list[Rank]]) -> None:
    engine_id, (rank0, rank1) = ranks
    client = LookupClient([socket_path(engine_id, r) for r in (0, 1)])
    assert client.lookup(PROMPT) == 0
    rank0.store(96)
    rank1.store(64)
    assert client.lookup(PROMPT) == 64  # rank 1 cannot load the third block: not promised
    rank1.store(128)
    rank0.store(128)
    assert client.lookup(PROMPT) == 128
    assert client.lookup(PROMPT, cache_salt="tenant-b") == 0  # salts are part of the key
    assert client.lookup(PROMPT[:40]) == 32
    rank1.kill()
    assert client.lookup(PROMPT) == 0  # a rank that does not answer is a miss
    client.close()


def test_no_server_is_a_miss_not_an_error(tmp_path: Path) -> None:
    client = LookupClient([str(tmp_path / "nobody.sock")], timeout=0.2)
    assert client.lookup(PROMPT) == 0
    assert socket_path("x" * 500, 3).endswith("-3.sock") and len(socket_path("x" * 500, 3)) < 108
