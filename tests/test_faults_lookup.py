"""Fault matrix, TP lookup service: a hostile or broken neighbour around the scheduler's lookups.

Real sockets and processes only: a socket directory another user controls, a server or a client
running as another user (uid 65534, a child that drops root), ranks that hang (SIGSTOP, or a
listener that never replies), garbage and oversized requests. What every fault must give: the
scheduler promises nothing it cannot load (the lookup answers 0), nothing is sent to a stranger,
the right counter moves, one clear log line; hangs fail through a watchdog, never a timed assert.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from lookup_ranks import PROMPT, Rank, socket_env
from watchdog import returns

from xconnector import native
from xconnector.integrations.vllm import lookup_service

if TYPE_CHECKING:
    from xconnector._native import Engine, LookupClient

NOBODY = 65534
PATIENT = 10.0  # a timeout for lookups that must be answered, even on a busy machine
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def timed_lookup(client: LookupClient, tokens: list[int], what: str) -> tuple[int, float]:
    """(hit, seconds the lookup took), under a watchdog."""

    def timed() -> tuple[int, float]:
        t0 = time.perf_counter()
        hit = client.lookup(tokens)
        return hit, time.perf_counter() - t0

    return returns(timed, what)


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """Warnings and errors mentioning `text`."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory under the system temp dir (pytest's own is closed to other users)."""
    d = Path(tempfile.mkdtemp(prefix="xc-lookup-faults-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def engine() -> Engine:
    e: Engine = native().Engine(block_bytes=64, capacity_bytes=4096, block_size=32)
    return e


def as_nobody(code: str, *args: str) -> subprocess.Popen[str]:
    """A real process of another user: starts as root (to run this Python), drops to 65534."""
    prelude = (
        "import json, os, select, socket, sys\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def refused_dir(d: Path, logs: pytest.LogCaptureFixture, found: str) -> None:
    """With the sockets in `d`: the worker's service is off (one error naming `d`, what was
    found and the fix) while its engine works; the scheduler's lookup answers 0, logged once."""
    e = engine()
    assert lookup_service.serve(e, "e", 0) is None
    off = said(logs, "lookup service is off")
    assert len(off) == 1 and off[0].levelno == logging.ERROR, logs.text
    msg = off[0].getMessage()
    assert str(d) in msg and found in msg and "XCONNECTOR_SOCKET_DIR" in msg, msg
    e.store(PROMPT[:64], bytes(128))
    assert e.lookup(PROMPT) == 64
    client = lookup_service.client("e", 1)
    assert [client.lookup(PROMPT) for _ in range(3)] == [0, 0, 0]
    s = client.stats()
    assert s["unsafe_dirs"] == 1 and s["backing_off"] == 2 and s["answered"] == 0, s
    assert len(said(logs, f"refusing the lookup socket directory {d}")) == 2, logs.text  # 1 each


# -- 1. the socket directory -----------------------------------------------------------------------


def test_an_open_socket_directory_is_refused_even_with_a_live_server_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    private, open_dir = tmp_path / "private", tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    # A live server of this user, answering 64, reachable at the rank's path in the open directory
    # (a hard link to its socket): only the directory check stands between it and the scheduler.
    e = engine()
    e.store(PROMPT[:64], bytes(128))
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(private))
    live = lookup_service.serve(e, "e", 0)
    assert live is not None and lookup_service.client("e", 1, PATIENT).lookup(PROMPT) == 64
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(open_dir))
    os.link(live.path, lookup_service.socket_path("e", 0))
    refused_dir(open_dir, logs, "mode 0777")
    assert live.stats()["requests"] == 1  # only the private lookup above reached it
    live.close()


def test_a_symlinked_socket_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "socks"
    link.symlink_to(target)
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(link))
    refused_dir(link, logs, "a symbolic link")


@root_only
def test_a_socket_directory_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "socks"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(d))
    refused_dir(d, logs, f"uid {NOBODY}")


@root_only
def test_another_user_squatting_the_default_directory_turns_only_the_service_off(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    # The attack the issue reproduced, on the default path: another user creates
    # <tmp>/xconnector-<our uid> before any worker starts.
    shared_tmp.chmod(0o1777)
    monkeypatch.delenv("XCONNECTOR_SOCKET_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    squat = shared_tmp / f"xconnector-{os.geteuid()}"
    p = as_nobody("os.mkdir(sys.argv[1], 0o777); os.chmod(sys.argv[1], 0o777)", str(squat))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (out, err)
    assert squat.stat().st_uid == NOBODY
    assert Path(lookup_service.socket_path("e", 0)).parent == squat
    refused_dir(squat, logs, f"uid {NOBODY}")


# -- 2. the peer's uid ---------------------------------------------------------------------------

FOREIGN_SERVER = """
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1])
srv.listen(8)
print("ready", flush=True)
got, accepted = b"", False
if select.select([srv], [], [], 20)[0]:
    conn, _ = srv.accept()
    accepted = True
    conn.settimeout(5)
    try:
        while chunk := conn.recv(1 << 16):
            got += chunk
            if len(got) >= 16:  # a request: promise every token, whatever it is
                n = int.from_bytes(got[12:16], "little")
                conn.sendall(b"XCL1" + got[4:12] + n.to_bytes(8, "little"))
    except OSError:
        pass
print(json.dumps({"accepted": accepted, "received": len(got)}), flush=True)
"""


@root_only
def test_the_scheduler_sends_nothing_to_a_server_of_another_user(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    shared_tmp.chmod(0o711)
    d = shared_tmp / "socks"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(d))
    path = lookup_service.socket_path("e", 0)
    # Another user gets a listening socket bound at the rank's path (the directory is opened to
    # it just long enough), then the directory is private again: only SO_PEERCRED can tell.
    d.chmod(0o777)
    squatter = as_nobody(FOREIGN_SERVER, path)
    assert squatter.stdout is not None and squatter.stdout.readline().strip() == "ready"
    d.chmod(0o700)
    assert os.stat(path).st_uid == NOBODY
    client = lookup_service.client("e", 1, PATIENT)
    assert returns(lambda: client.lookup(PROMPT, cache_salt="tenant-secret"), "lookup") == 0
    out, err = squatter.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"accepted": True, "received": 0}, (report, err)
    s = client.stats()
    assert s["foreign_servers"] == 1 and s["answered"] == 0, s
    refusal = said(logs, f"refusing the lookup server at {path}")
    assert len(refusal) == 1 and f"uid {NOBODY}" in refusal[0].getMessage(), logs.text
    # Its socket file stays behind: a worker does not replace another user's file, it says so.
    assert lookup_service.serve(engine(), "e", 0) is None
    assert len(said(logs, f"socket owned by uid {NOBODY}")) == 1, logs.text


FOREIGN_CLIENT = """
out = {"connected": False, "reply": 0}
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
    out["connected"] = True
    s.sendall(b"XCL1" + (7).to_bytes(8, "little") + (128).to_bytes(4, "little")
              + b"".join(t.to_bytes(4, "little") for t in range(1000, 1128)) + bytes(6))
    while chunk := s.recv(64):
        out["reply"] += len(chunk)
except OSError as e:
    out["error"] = type(e).__name__
print(json.dumps(out), flush=True)
"""


@root_only
def test_the_server_drops_a_client_of_another_user(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    d = shared_tmp / "socks"
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(d))
    e = engine()
    e.store(PROMPT, bytes(256))
    server = lookup_service.serve(e, "e", 0)
    assert server is not None
    # Opened after the server started, as a misconfiguration (or a bind mount) might.
    shared_tmp.chmod(0o711)
    d.chmod(0o711)
    os.chmod(server.path, 0o666)
    p = as_nobody(FOREIGN_CLIENT, server.path)
    out, err = p.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["connected"] and report["reply"] == 0, (report, err)
    s = server.stats()
    assert s["foreign_clients"] == 1 and s["requests"] == 0, s
    dropped = said(logs, "dropped a connection from uid")
    assert len(dropped) == 1 and f"uid {NOBODY}" in dropped[0].getMessage(), logs.text
    d.chmod(0o700)  # (the client, too, asks only through a private directory)
    assert lookup_service.client("e", 1, PATIENT).lookup(PROMPT) == 128  # this user: served
    server.close()


# -- 3. ranks that hang, and asking all ranks at once ---------------------------------------------


class FakeRank:
    """A listener at a rank's path, in this process, that speaks the wire format: it reads each
    request in full, then calls `answer(request_tokens)`; None means never reply."""

    def __init__(self, path: str, answer: Callable[[int], int | None]) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)
        self.answer = answer
        self.requests = 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _conn(self, conn: socket.socket) -> None:
        try:
            while True:
                head = self._read(conn, 16)
                n = struct.unpack("<I", head[12:16])[0]
                self._read(conn, 4 * n)
                for _ in range(3):
                    self._read(conn, struct.unpack("<H", self._read(conn, 2))[0])
                self.requests += 1
                hit = self.answer(n)
                if hit is not None:
                    conn.sendall(head[:12] + struct.pack("<Q", hit))
        except OSError:
            return

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept; close alone would not
        self.sock.close()
        os.unlink(self.path)
        for c in self.conns:
            c.close()


def test_a_hung_rank_makes_the_answer_0_without_waiting_per_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(tmp_path))
    env = socket_env(str(tmp_path))
    real = [Rank("e", 0, env), Rank("e", 1, env)]
    try:
        hung_then_healthy(real, env, logs)
    finally:
        os.kill(real[1].proc.pid, signal.SIGCONT)
        for r in real:
            r.kill()


def hung_then_healthy(
    real: list[Rank], env: dict[str, str], logs: pytest.LogCaptureFixture
) -> None:
    for r in real:
        r.store(128)
    # Rank 1 is stopped (a real process that no longer runs: the kernel still queues the
    # connection); ranks 2-4 accept, read the request and never reply.
    os.kill(real[1].proc.pid, signal.SIGSTOP)
    hung = [FakeRank(lookup_service.socket_path("e", r), lambda n: None) for r in (2, 3, 4)]
    timeout = 1.0
    client = lookup_service.client("e", 5, timeout=timeout)
    hit, first = timed_lookup(client, PROMPT, "a lookup with four hung ranks")
    assert hit == 0
    assert [h.requests for h in hung] == [1, 1, 1]  # each was asked, in this one lookup
    s = client.stats()
    assert s["timeouts"] == 4 and s["missed"] == 1, s
    hit, again = timed_lookup(client, PROMPT, "a lookup while the hung ranks back off")
    assert hit == 0 and client.stats()["backing_off"] == 1
    print(
        f"\nlookup over 5 ranks, 4 hung, timeout {timeout}s: {first * 1e3:.0f} ms "
        f"(per-rank timeouts would add up to {4 * timeout:.0f} s); next: {again * 1e6:.0f} us"
    )
    # That the ranks are asked at once, under one deadline, is proven without a clock by the
    # barrier test (ranks that answer only once all of them hold the request).
    assert len(said(logs, "did not answer within")) == 1, logs.text
    os.kill(real[1].proc.pid, signal.SIGCONT)
    # Back to health: the stopped rank runs again, the silent ones are replaced by real ranks.
    for h in hung:
        h.close()
    real += [Rank("e", r, env) for r in (2, 3, 4)]
    for r in real[2:]:
        r.store(96)
    deadline = time.monotonic() + 30
    while client.lookup(PROMPT) != 96:  # reconnected lazily, after retry_after
        assert time.monotonic() < deadline, client.stats()
        time.sleep(0.1)


def test_all_ranks_are_asked_before_any_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each rank replies only once every rank holds the request (a barrier): a client asking one
    # rank after another could never complete this lookup.
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(tmp_path))
    n = 6
    barrier = threading.Barrier(n, timeout=PATIENT)
    hits = [96, 64, 128, 96, 32, 128]

    def answer(rank: int) -> Callable[[int], int | None]:
        return lambda _: barrier.wait() * 0 + hits[rank]

    ranks = [FakeRank(lookup_service.socket_path("e", r), answer(r)) for r in range(n)]
    client = lookup_service.client("e", n, timeout=PATIENT)
    hit, took = timed_lookup(client, PROMPT, f"a lookup over {n} ranks")
    print(f"\nlookup over {n} ranks replying together: {took * 1e3:.1f} ms")
    assert hit == 32 and client.stats()["answered"] == 1
    assert [r.requests for r in ranks] == [1] * n
    for r in ranks:
        r.close()


def test_a_reply_that_does_not_match_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(tmp_path))
    liar = FakeRank(lookup_service.socket_path("e", 0), lambda n: n + 1)  # more than it was asked
    client = lookup_service.client("e", 1, timeout=PATIENT)
    assert client.lookup(PROMPT) == 0
    assert client.stats()["mismatches"] == 1
    assert len(said(logs, "does not match the request")) == 1, logs.text
    liar.close()


# -- 4. garbage, oversized and stalled requests ------------------------------------------------


def closed_by_server(conn: socket.socket) -> bool:
    conn.settimeout(30)
    try:
        return conn.recv(64) == b""
    except ConnectionResetError:
        return True


def test_garbage_huge_and_stalled_requests_do_not_crash_or_pin_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XCONNECTOR_SOCKET_DIR", str(tmp_path))
    rank = Rank("e", 0, socket_env(str(tmp_path)), io_timeout=0.5)
    rank.store(128)
    path = lookup_service.socket_path("e", 0)

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        return s

    junk = connect()
    junk.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" + os.urandom(4096))
    assert closed_by_server(junk)
    huge = connect()  # claims 16M + 1 tokens
    huge.sendall(b"XCL1" + struct.pack("<QI", 1, (1 << 24) + 1))
    assert closed_by_server(huge)
    stalled = connect()  # claims 16M tokens, sends 100 bytes of them, then nothing
    stalled.sendall(b"XCL1" + struct.pack("<QI", 2, 1 << 24) + bytes(100))
    assert returns(lambda: closed_by_server(stalled), "the server dropping a stalled request")
    # More idle connections than the server serves at once: the rest are closed at once.
    idle = [connect() for _ in range(40)]
    deadline = time.monotonic() + 30
    while (s := rank.stats())["refused_busy"] < 8:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    assert s["active"] == 32 and s["refused_busy"] == 8, s
    for c in (junk, huge, stalled, *idle):
        c.close()
    # The largest request allowed is answered, and the server is intact.
    client = lookup_service.client("e", 1, timeout=PATIENT)
    big = PROMPT + [7] * ((1 << 22) - len(PROMPT))
    hit, took = timed_lookup(client, big, "a 4M-token lookup")
    print(f"\n4M-token lookup (16 MiB request): {took * 1e3:.0f} ms")
    assert hit == 128 and client.lookup(PROMPT) == 128
    s = rank.stats()
    assert rank.alive() and s["bad_requests"] == 2 and s["timeouts"] == 1, s
    rank.kill()
