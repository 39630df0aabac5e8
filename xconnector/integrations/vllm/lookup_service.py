"""Scheduler-side lookups across processes.

With tensor parallelism every worker rank is a process of its own, holding its own shard of each
block's KV, while vLLM's scheduler (which asks "how many tokens can you load?") runs elsewhere.
Each rank's worker-side connector answers lookups on a Unix socket; the scheduler asks every rank
and takes the minimum, so it promises only what every rank can load (TP ranks that disagree on a
hit after an eviction would load different prefixes and corrupt the request). A rank that does
not answer counts as a miss. What still gets evicted between the lookup and the load is
reported as a load error, and vLLM recomputes it.

Wire format (little-endian): request `u32 n, n x u32 tokens, u16 len + lora name, u16 len +
cache salt, u16 len + lora id`; reply `u64` tokens hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import struct
import tempfile
import threading
from array import array
from collections.abc import Callable, Sequence

log = logging.getLogger("xconnector.vllm")

Lookup = Callable[["array[int]", "str | None", "str | None", "str | None"], int]

_MAX_TOKENS = 1 << 24


def socket_path(engine_id: str, rank: int) -> str:
    """Where rank `rank` of engine `engine_id` listens (`XCONNECTOR_SOCKET_DIR`, else the temp
    directory); short enough for the 108-byte limit of Unix socket paths."""
    base = os.environ.get("XCONNECTOR_SOCKET_DIR") or tempfile.gettempdir()
    digest = hashlib.sha256(engine_id.encode()).hexdigest()[:16]
    return os.path.join(base, f"xconnector-{digest}-{rank}.sock")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _text(conn: socket.socket) -> str | None:
    (n,) = struct.unpack("<H", _recv_exact(conn, 2))
    return _recv_exact(conn, n).decode() if n else None


def _encode(
    tokens: Sequence[int], lora_name: str | None, cache_salt: str | None, lora_id: str | None
) -> bytes:
    toks = array("I", tokens)
    parts = [struct.pack("<I", len(toks)), toks.tobytes()]
    for s in (lora_name, cache_salt, lora_id):
        raw = (s or "").encode()
        parts += [struct.pack("<H", len(raw)), raw]
    return b"".join(parts)


class LookupServer:
    """Answers lookups for one rank, on a Unix socket, from daemon threads."""

    def __init__(self, path: str, lookup: Lookup) -> None:
        self.path = path
        self._lookup = lookup
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket from a process that died
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._closed = False
        threading.Thread(target=self._accept, name="xconnector-lookup", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    (n,) = struct.unpack("<I", _recv_exact(conn, 4))
                    if n > _MAX_TOKENS:
                        return
                    tokens = array("I")
                    tokens.frombytes(_recv_exact(conn, 4 * n))
                    lora, salt, lora_id = _text(conn), _text(conn), _text(conn)
                except (ConnectionError, OSError, struct.error, UnicodeDecodeError):
                    return
                try:
                    hit = int(self._lookup(tokens, lora, salt, lora_id))
                except Exception as e:  # a failing lookup is a miss, never a dead server
                    log.debug("lookup failed: %s", e)
                    hit = 0
                try:
                    conn.sendall(struct.pack("<Q", hit))
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class LookupClient:
    """Asks every rank; the answer is the minimum. A rank that cannot be reached is a miss."""

    def __init__(self, paths: Sequence[str], timeout: float = 1.0) -> None:
        self.paths = list(paths)
        self.timeout = timeout
        self._conns: dict[str, socket.socket] = {}
        self._lock = threading.Lock()

    def _ask(self, path: str, request: bytes) -> int:
        conn = self._conns.get(path)
        if conn is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.settimeout(self.timeout)
                conn.connect(path)
            except BaseException:
                conn.close()
                raise
            self._conns[path] = conn
        try:
            conn.sendall(request)
            (hit,) = struct.unpack("<Q", _recv_exact(conn, 8))
            return int(hit)
        except BaseException:
            self._conns.pop(path, None)
            conn.close()
            raise

    def lookup(
        self,
        tokens: Sequence[int],
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_id: str | None = None,
    ) -> int:
        request = _encode(tokens, lora_name, cache_salt, lora_id)
        hits = []
        with self._lock:
            for path in self.paths:
                try:
                    hits.append(self._ask(path, request))
                except (OSError, ConnectionError, struct.error):
                    return 0
        return min(hits) if hits else 0

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()
