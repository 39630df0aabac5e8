"""Embedded XConnector against the same engine behind an HTTP service in another process.

The earlier prototype ran XConnector as a separate service that the worker called over HTTP.
This runs the same work both ways, on the demo worker's KV geometry
(`integrations/dynamo/components/worker.py`: 4 layers, flash-attn layout, 16-token blocks):

- embedded: the SDK's KV handler in-process, as a patched worker calls it (`lookup`, `store`
  and `load` between the paged KV caches and the engine, one native copy);
- service: an engine of the same size in a child process serving `ThreadingHTTPServer` on
  127.0.0.1 (keep-alive, TCP_NODELAY); token ids travel as JSON, KV payloads as the request or
  response body, packed from and unpacked into the same paged KV blocks on the worker's side.

Printed: each operation's time per request for both paths (mean, p50, p99, service/embedded),
then the demo's time to first token for a repeated 3200-token request, embedded against the same
worker code whose `recv_kv_caches`/`send_kv_caches` call the service instead.

Run: `.venv/bin/python benchmarks/service_vs_embedded.py` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from xconnector import Engine, native

DEMO = Path(__file__).resolve().parents[1] / "integrations" / "dynamo"
CONFIG = DEMO / "configs" / "agg.yaml"
SYSTEM_TOKENS, QUESTION_TOKENS = 3000, 200  # the demo's scenario: 3200 tokens

# -- the service (child process) -------------------------------------------------------------


def serve(block_size: int, block_bytes: int, capacity_bytes: int) -> None:
    """Serves one engine on 127.0.0.1 (a free port, printed first); exits when stdin closes."""
    engine = Engine(
        block_size=block_size, block_bytes=block_bytes, capacity_bytes=capacity_bytes, model="svc"
    )

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection per worker
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def reply(self, body: bytes | memoryview, **headers: str) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            split = int(self.headers.get("X-Json-Bytes", len(body)))
            tokens = json.loads(body[:split])["tokens"]
            if self.path == "/lookup":
                self.reply(json.dumps({"tokens": engine.lookup(tokens)}).encode())
            elif self.path == "/store":
                blocks = engine.store(tokens, memoryview(body)[split:])
                self.reply(json.dumps({"blocks": blocks}).encode())
            elif self.path == "/load":
                out = bytearray(len(tokens) // block_size * block_bytes)
                n = engine.load(tokens, out)
                self.reply(memoryview(out)[: n // block_size * block_bytes], X_Tokens=str(n))
            else:
                self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()  # EOF: the benchmark ended or died
    os._exit(0)


class ServiceClient:
    """The worker's side of the service: one persistent connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.connect()
        assert self.conn.sock is not None
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _post(self, path: str, tokens: list[int], payload: bytes = b"") -> tuple[bytes, Any]:
        head = json.dumps({"tokens": tokens}).encode()
        headers = {"X-Json-Bytes": str(len(head)), "Content-Length": str(len(head) + len(payload))}
        self.conn.request("POST", path, body=iter((head, payload)), headers=headers)  # no copy
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"service {path}: HTTP {resp.status}")
        return body, resp.headers

    def lookup(self, tokens: list[int]) -> int:
        return int(json.loads(self._post("/lookup", tokens)[0])["tokens"])

    def store(self, tokens: list[int], payload: bytes) -> int:
        return int(json.loads(self._post("/store", tokens, payload)[0])["blocks"])

    def load(self, tokens: list[int]) -> tuple[int, bytes]:
        body, headers = self._post("/load", tokens)
        return int(headers["X-Tokens"]), body


@contextmanager
def service(engine: Engine) -> Iterator[ServiceClient]:
    """Starts the service in a child process with `engine`'s geometry; always stops it."""
    cmd = [sys.executable, __file__, "--serve"]
    cmd += [str(engine.block_size), str(engine.block_bytes), str(engine.capacity_bytes)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], 30)[0]:
            raise RuntimeError("the service did not start within 30 s")
        line = proc.stdout.readline()
        if not line.strip():
            raise RuntimeError(f"the service exited (status {proc.wait()})")
        yield ServiceClient(int(line))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- per-request overhead --------------------------------------------------------------------


def summary(ms: list[float]) -> tuple[float, float, float]:
    p99 = statistics.quantiles(ms, n=100)[98] if len(ms) > 1 else ms[0]
    return statistics.fmean(ms), statistics.median(ms), p99


def print_rows(name: str, embedded: list[float], svc: list[float]) -> None:
    e, s = summary(embedded), summary(svc)
    print(f"  {name:<16} embedded {e[0]:8.3f} {e[1]:8.3f} {e[2]:8.3f}")
    print(
        f"  {'':<16} service  {s[0]:8.3f} {s[1]:8.3f} {s[2]:8.3f}"
        f"   ratio {s[0] / e[0]:6.1f}x mean, {s[1] / e[1]:6.1f}x p50"
    )


def bench_ops(
    kv_handler: Any, worker: Any, client: ServiceClient, requests: int, full: bool
) -> None:
    """Stores, looks up and loads fresh prompts both ways, alternating who goes first:
    `requests` while the caches fill and, with `full`, `requests` more once both evict."""
    kv, model, bs = worker.kv_caches, worker.model, kv_handler.engine.block_size
    paged = native().PagedKv(kv, bs)
    rng = np.random.default_rng(1)
    for layer in kv:
        layer[...] = rng.standard_normal(layer.shape, dtype=np.float32)
    n = SYSTEM_TOKENS + QUESTION_TOKENS
    blocks = n // bs
    src, dst_e, dst_s = (list(range(k * blocks, (k + 1) * blocks)) for k in range(3))

    def embedded_ops(tokens: list[int]) -> list[float]:
        t0 = time.perf_counter()
        assert kv_handler.store(tokens, kv, src, model) == blocks
        t1 = time.perf_counter()
        assert kv_handler.lookup(tokens) == n
        t2 = time.perf_counter()
        assert kv_handler.load(tokens, kv, dst_e, model) == n
        return [t1 - t0, t2 - t1, time.perf_counter() - t2]

    def service_ops(tokens: list[int]) -> list[float]:
        t0 = time.perf_counter()
        assert client.store(tokens, paged.pack(src)) == blocks
        t1 = time.perf_counter()
        assert client.lookup(tokens) == n
        t2 = time.perf_counter()
        got, payload = client.load(tokens)
        paged.unpack(dst_s[: got // bs], payload)
        assert got == n
        return [t1 - t0, t2 - t1, time.perf_counter() - t2]

    # Both engines have the same capacity and see the same stores, so they fill up together.
    times: dict[str, dict[str, list[list[float]]]] = {
        phase: {"embedded": [], "service": []} for phase in ("filling", "full")
    }
    wanted = {"filling": requests, "full": requests if full else 0}
    for i in itertools.count():
        phase = "full" if kv_handler.engine.stats()["evicted_blocks"] else "filling"
        if all(len(times[p]["service"]) >= wanted[p] for p in wanted) or (
            phase == "full" and not full
        ):
            break
        tokens = rng.integers(1, 32000, n).tolist()
        order = [("embedded", embedded_ops), ("service", service_ops)]
        for path, ops in order if i % 2 == 0 else order[::-1]:
            t = ops(tokens)
            if i >= 3 and len(times[phase][path]) < wanted[phase]:  # 3 warm-ups
                times[phase][path].append(t)
        if i == 0:
            for layer in kv:  # both paths moved the same bytes into the right blocks
                assert np.array_equal(layer[:, dst_e], layer[:, src])
                assert np.array_equal(layer[:, dst_s], layer[:, src])
    mib = blocks * paged.block_bytes / 2**20
    print(
        f"per-request overhead: {n}-token request = {blocks} blocks x "
        f"{paged.block_bytes // 1024} KiB = {mib:.2f} MiB of KV, {requests} requests"
        f"{' while the caches fill and as many once they are full' if full else ''}, "
        "milliseconds"
    )
    print(f"  {'op':<16} {'path':<8} {'mean':>8} {'p50':>8} {'p99':>8}")
    every = {path: times["filling"][path] + times["full"][path] for path in ("embedded", "service")}
    rows = [("store, filling", 0, times["filling"])]
    if full:
        rows.append(("store, full", 0, times["full"]))
    rows += [("lookup", 1, every), ("load", 2, every)]
    for name, k, got in rows:
        e = [t[k] * 1e3 for t in got["embedded"]]
        s = [t[k] * 1e3 for t in got["service"]]
        print_rows(name, e, s)
    if full:
        print(
            "  (filling: stores write fresh cache memory, which the kernel first has to map; "
            "full: they reuse evicted blocks' slots)"
        )


# -- time to first token ---------------------------------------------------------------------


class ServiceKv:
    """The KV handler's receive/send steps (`xconnector.sdk.handlers.kv_cache`) with the
    engine's calls going to the service: per fresh prefill request, look up, load the usable
    prefix (never the last token) and unpack it into the request's blocks; after the forward
    pass, store the full blocks unless the service holds them all already."""

    def __init__(self, client: ServiceClient, block_size: int) -> None:
        self.client, self.bs = client, block_size
        self.pending: dict[int, tuple[Any, list[Any]]] = {}
        self.paged: Any = None

    def receive(self, model_input: Any, kv_caches: Any) -> tuple[None, bool, Any]:
        from xconnector.adapters.vllm_v0 import prefill_requests, rebuild_model_input

        if self.paged is None:
            self.paged = native().PagedKv(list(kv_caches), self.bs)
        requests, loaded, bs = prefill_requests(model_input), {}, self.bs
        for r in requests:
            if not r.fresh:
                continue
            usable = min(self.client.lookup(r.tokens), (len(r.tokens) - 1) // bs * bs)
            if usable <= 0:
                continue
            n, payload = self.client.load(r.tokens[:usable])
            if n:
                self.paged.unpack(native().block_ids_from_slots(r.slots[:n], bs), payload)
                loaded[r.index] = n
        new = rebuild_model_input(model_input, requests, loaded) if loaded else model_input
        self.pending[id(new)] = (new, requests)
        return None, False, new

    def send(self, model_input: Any) -> None:
        _, requests = self.pending.pop(id(model_input))
        for r in requests:
            full = len(r.tokens) // self.bs * self.bs
            if not r.fresh or full == 0 or self.client.lookup(r.tokens[:full]) == full:
                continue
            ids = native().block_ids_from_slots(r.slots[:full], self.bs)
            self.client.store(r.tokens[:full], self.paged.pack(ids))


def service_worker(base: type, service_kv: ServiceKv) -> Any:
    """The demo's worker class with its KV methods calling the service (off the event loop, as
    the embedded wrappers run XConnector)."""

    class ServiceWorker(base):  # type: ignore[valid-type, misc]
        async def recv_kv_caches(self, executable: Any, model_input: Any, kv: Any) -> Any:
            return await asyncio.to_thread(service_kv.receive, model_input, kv)

        async def send_kv_caches(self, executable: Any, model_input: Any, *rest: Any) -> None:
            await asyncio.to_thread(service_kv.send, model_input)

    return ServiceWorker()


def timed(worker: Any) -> dict[str, float]:
    """Times the worker's receive and send (the send starts once the first token exists)."""
    marks: dict[str, float] = {}
    recv, send = worker.recv_kv_caches, worker.send_kv_caches

    def wrap(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        async def timed_call(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = await fn(*args)
            marks[key] = time.perf_counter() - t0
            return out

        return timed_call

    worker.recv_kv_caches, worker.send_kv_caches = wrap(recv, "receive"), wrap(send, "store")
    return marks


def bench_ttft(workers: dict[str, Any], trials: int) -> None:
    marks = {arm: timed(w) for arm, w in workers.items()}
    rows: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {
        (arm, request): [] for arm in workers for request in ("first", "repeat")
    }
    for trial in range(trials + 1):  # trial 0 warms up
        rng = np.random.default_rng(100 + trial)
        prompt = rng.integers(1, 32000, SYSTEM_TOKENS + QUESTION_TOKENS).tolist()
        arms = list(workers) if trial % 2 == 0 else list(workers)[::-1]
        next_tokens = set()
        for arm in arms:
            for request in ("first", "repeat"):
                r = asyncio.run(workers[arm].generate(prompt))
                m = marks[arm]
                ttft = r["seconds"] - m["store"]
                if trial:
                    rows[arm, request].append((ttft, m["receive"], m["store"], r["computed"]))
                next_tokens.add(r["next_token"])
        if len(next_tokens) != 1:
            raise SystemExit(f"prompt {trial}: the requests' next tokens differ: {next_tokens}")
    print(
        f"\ntime to first token: the demo's worker and model, a {SYSTEM_TOKENS}-token system "
        f"prompt + {QUESTION_TOKENS}-token question sent twice, {trials} prompts, milliseconds"
    )
    print(
        "  service: the same worker code, its recv_kv_caches/send_kv_caches doing the same "
        "lookup and load\n  through the service (the KV bytes cross the process boundary and "
        "are unpacked into the same\n  paged blocks); TTFT ends when the first token exists, "
        "the store runs after it"
    )
    print(
        f"  {'arm':<9} {'request':<7} {'computed':>8} {'TTFT mean':>10} {'p50':>8} {'p99':>8}"
        f" {'receive':>8} {'store':>8}"
    )
    for (arm, request), got in rows.items():
        t = summary([g[0] * 1e3 for g in got])
        recv = statistics.fmean(g[1] for g in got) * 1e3
        store = statistics.fmean(g[2] for g in got) * 1e3
        computed = round(statistics.fmean(g[3] for g in got))
        print(
            f"  {arm:<9} {request:<7} {computed:>8} {t[0]:10.2f} {t[1]:8.2f} {t[2]:8.2f}"
            f" {recv:8.2f} {store:8.2f}"
        )
    for arm in workers:
        if rows[arm, "repeat"][0][3] == SYSTEM_TOKENS + QUESTION_TOKENS:
            raise SystemExit(f"{arm}: the repeat was not served from the cache (XConnector off?)")
    ttft = {k: summary([g[0] for g in v]) for k, v in rows.items()}
    e, s = ttft[("embedded", "repeat")], ttft[("service", "repeat")]
    print(
        f"  repeat TTFT, service/embedded: {s[0] / e[0]:.2f}x mean, {s[1] / e[1]:.2f}x p50 "
        f"(+{(s[0] - e[0]) * 1e3:.2f} ms per request); repeat vs first request: embedded "
        f"{ttft[('embedded', 'first')][0] / e[0]:.1f}x faster, "
        f"service {ttft[('service', 'first')][0] / s[0]:.1f}x faster"
    )
    print("  same next token for every request of a prompt, on both paths: yes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few requests: checks the script runs")
    ap.add_argument("--serve", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    requests, trials = (40, 10) if args.quick else (150, 50)

    # What `dynamo serve` gives a worker process (as integrations/dynamo/demo.py does): the
    # worker module's first line, the autopatch import, then patches VllmWorker.
    os.environ["DYNAMO_SERVICE_CONFIG"] = json.dumps(native().config_read_document(str(CONFIG)))
    sys.argv[1:] = ["--service-name", "VllmWorker"]
    sys.path.insert(0, str(DEMO))
    from components.worker import VllmWorker

    from xconnector.sdk.config import SDKConfig
    from xconnector.sdk.xconnector_sdk import XConnectorSDK

    sdk = XConnectorSDK(SDKConfig.from_yaml(str(CONFIG), service="VllmWorker"))
    sdk.initialize()
    try:
        worker = VllmWorker()
        kv_handler = sdk.get_kv_handler()
        _, engine = kv_handler.bind(worker.kv_caches, worker.model)
        print(
            f"config: {CONFIG.relative_to(DEMO.parents[1])}; engine: block {engine.block_size} "
            f"tokens, {engine.block_bytes // 1024} KiB, {engine.capacity_bytes >> 20} MiB; "
            f"service: another process, 127.0.0.1, HTTP/1.1 keep-alive\n"
        )
        with service(engine) as client:
            bench_ops(kv_handler, worker, client, requests, full=not args.quick)
    finally:
        sdk.shutdown()
    with service(engine) as client:  # a fresh one, as the embedded worker's engine is
        svc = service_worker(VllmWorker, ServiceKv(client, engine.block_size))
        bench_ttft({"embedded": VllmWorker(), "service": svc}, trials)


if __name__ == "__main__":
    main()
