"""Worker ranks for the lookup-service tests: each a real process with its own engine, serving
lookups on its Unix socket (the native `LookupServer`), driven over its stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

PROMPT = list(range(1000, 1000 + 128))

RANK = """
import json, sys
from xconnector import Engine
from xconnector.integrations.vllm import lookup_service

engine_id, rank, io_timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
prompt = list(range(1000, 1000 + 128))
engine = Engine(block_bytes=64, capacity_bytes=4096, block_size=32, tp_world_size=8, tp_rank=rank)
from xconnector import native
server = native().LookupServer(engine, lookup_service.socket_path(engine_id, rank),
                               io_timeout=io_timeout)
print("ready", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "store":
        n = int(arg)
        engine.store(prompt[:n], bytes(64 * (n // 32)))
        print("stored", flush=True)
    elif cmd == "stats":
        print(json.dumps(server.stats()), flush=True)
"""


class Rank:
    """Rank `rank` of engine `engine_id`, with the socket directory of `env`."""

    def __init__(
        self, engine_id: str, rank: int, env: dict[str, str], io_timeout: float = 2.0
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RANK, engine_id, str(rank), str(io_timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._reply() == "ready"

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _send(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def store(self, n: int) -> None:
        assert self._send(f"store {n}") == "stored"

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self._send("stats"))
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def socket_env(socket_dir: str) -> dict[str, str]:
    """This process's environment with the lookup sockets in `socket_dir`."""
    return {**os.environ, "XCONNECTOR_SOCKET_DIR": socket_dir}
