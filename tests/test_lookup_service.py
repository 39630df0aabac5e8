"""The scheduler-side lookup across processes (tensor parallel > 1): two worker-rank processes,
each with its own engine answering on its Unix socket, and this process as the scheduler. The
answer is the smallest hit over the ranks, and a rank that does not answer is a miss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lookup_ranks import PROMPT, Rank, socket_env

from xconnector import native
from xconnector.exceptions import InvalidInputError
from xconnector.integrations.vllm import lookup_service

#: Long enough that a busy test machine never turns an answer into a miss.
PATIENT = 10.0


@pytest.fixture
def ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[Rank]]]:
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(tmp_path))
    engine_id = "engine-under-test"
    started = [Rank(engine_id, r, socket_env(str(tmp_path))) for r in (0, 1)]
    try:
        yield engine_id, started
    finally:
        for r in started:
            r.kill()


def test_the_scheduler_gets_the_smallest_hit_over_ranks(ranks: tuple[str, list[Rank]]) -> None:
    engine_id, (rank0, rank1) = ranks
    client = lookup_service.client(engine_id, 2, timeout=PATIENT)
    assert client.lookup(PROMPT) == 0
    rank0.store(96)
    rank1.store(64)
    assert client.lookup(PROMPT) == 64  # rank 1 cannot load the third block: not promised
    rank1.store(128)
    rank0.store(128)
    assert client.lookup(PROMPT) == 128
    assert client.lookup(PROMPT, cache_salt="tenant-b") == 0  # salts are part of the key
    assert client.lookup(PROMPT, lora_name="sql") == 0  # and so are LoRAs
    assert client.lookup(PROMPT[:40]) == 32
    assert rank0.stats()["requests"] == rank1.stats()["requests"] == 6
    rank1.kill()
    assert client.lookup(PROMPT) == 0  # a rank that does not answer is a miss
    stats = client.stats()
    assert (stats["lookups"], stats["answered"], stats["missed"]) == (7, 6, 1), stats
    client.close()


def test_no_server_is_a_miss_not_an_error(tmp_path: Path) -> None:
    client = native().LookupClient([str(tmp_path / "nobody.sock")], timeout=0.2)
    assert client.lookup(PROMPT) == 0
    assert client.stats()["unreachable"] == 1
    gone = native().LookupClient([str(tmp_path / "no-such-dir" / "x.sock")])
    assert gone.lookup(PROMPT) == 0 and gone.stats()["unreachable"] == 1


def test_socket_paths_are_short_and_in_a_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XCONNECTOR_SOCKET_DIR", raising=False)
    path = lookup_service.socket_path("x" * 500, 3)
    assert path.endswith("-3.sock") and len(path) < 108, path
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert Path(lookup_service.socket_path("e", 0)).parent == runtime / "xconnector"
    runtime.chmod(0o755)  # not a usable runtime directory: the temp directory instead
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert (
        Path(lookup_service.socket_path("e", 0)).parent == tmp_path / f"xconnector-{os.geteuid()}"
    )
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(tmp_path / "mine"))
    assert Path(lookup_service.socket_path("e", 0)).parent == tmp_path / "mine"


def test_a_server_creates_its_private_directory_and_removes_its_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(tmp_path / "socks"))
    engine = native().Engine(block_bytes=64, capacity_bytes=4096, block_size=32)
    server = lookup_service.serve(engine, "e", 0)
    assert server is not None
    path = Path(server.path)
    assert path.exists() and (tmp_path / "socks").stat().st_mode & 0o777 == 0o700
    engine.store(PROMPT[:64], bytes(128))
    client = lookup_service.client("e", 1, timeout=PATIENT)
    assert client.lookup(PROMPT) == 64
    with pytest.raises(InvalidInputError, match="at most"):
        client.lookup(PROMPT, cache_salt="s" * 70000)  # over the wire format's bound
    server.close()
    server.close()
    assert not path.exists()
    assert client.lookup(PROMPT) == 0


FORK = """
import json, os, sys
from xconnector import native
from xconnector.integrations.vllm import lookup_service
prompt = list(range(1000, 1128))
engine = native().Engine(block_bytes=64, capacity_bytes=4096, block_size=32)
engine.store(prompt[:64], bytes(128))
server = lookup_service.serve(engine, "e", 0)
client = lookup_service.client("e", 1, timeout=10.0)
out = {"before": client.lookup(prompt)}
pid = os.fork()
if pid == 0:  # the child: its own connection, and its close leaves the parent's server alone
    hit = client.lookup(prompt)
    server.close()
    os._exit(0 if hit == 64 else 1)
_, status = os.waitpid(pid, 0)
out["child_ok"] = os.waitstatus_to_exitcode(status) == 0
out["after"] = client.lookup(prompt)
out["socket_kept"] = os.path.exists(server.path)
out["requests"] = server.stats()["requests"]
print(json.dumps(out))
"""


def test_a_forked_child_neither_shares_connections_nor_closes_the_parents_server(
    tmp_path: Path,
) -> None:
    env = socket_env(str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-c", FORK], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {
        "before": 64,
        "child_ok": True,
        "after": 64,
        "socket_kept": True,
        "requests": 3,
    }, (out, r.stderr)
