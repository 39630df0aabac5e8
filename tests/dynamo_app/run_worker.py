"""Runs a Dynamo-style worker process the way the autopatch tests need, and prints what happened
as one JSON line. Knobs (environment):

  ORDER     before | after | twice | none   where `import ...autopatch` goes relative to the
            worker module's import ("twice": before, then re-executed after)
  WORKER    worker (async VllmWorker) | prefill (sync PrefillWorker) | frontend |
            self (a VllmWorker module whose first line is the import)
  FAULT     native:<point>:<kind> | adapter | none      injected after imports
  FORK      1: after one request in the parent, run the requests in a forked child
  UNPATCH   1: call unpatch() at the end and report whether the originals are back
  LOG_INFO  1: log at INFO to stderr
  BLOCK_TABLE_SEED  seed of the block allocator

argv is passed through, so `--service-name X` reaches the autopatch as Dynamo passes it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from typing import Any

if os.environ.get("LOG_INFO") == "1":
    import logging

    logging.basicConfig(level=logging.INFO)

ORDER = os.environ.get("ORDER", "before")
WORKER = os.environ.get("WORKER", "worker")

if ORDER in ("before", "twice"):
    import xconnector.integrations.dynamo.autopatch

module_name = {
    "worker": "components.worker",
    "prefill": "components.prefill_worker",
    "self": "components.self_worker",
}.get(WORKER, "components.frontend")
module = importlib.import_module(module_name)
cls_name = {"worker": "VllmWorker", "prefill": "PrefillWorker", "self": "VllmWorker"}.get(
    WORKER, "Frontend"
)
cls = getattr(module, cls_name).inner
originals = {n: cls.__dict__.get(n) for n in ("recv_kv_caches", "send_kv_caches")}

if ORDER == "after":
    import xconnector.integrations.dynamo.autopatch  # noqa: F401
if ORDER == "twice":
    importlib.reload(sys.modules["xconnector.integrations.dynamo.autopatch"])
    from xconnector.integrations.dynamo.worker_injector import install

    install()


def depth(fn: Any) -> int:
    """How many XConnector wrappers are stacked on `fn`."""
    n = 0
    while getattr(fn, "_xconnector_patch", False):
        n += 1
        fn = fn.__wrapped__
    return n


def inject_fault() -> None:
    fault = os.environ.get("FAULT", "none")
    if fault.startswith("native:"):
        _, point, kind = fault.split(":")
        from xconnector import native

        native()._inject_fault(point, kind)
    elif fault == "adapter":
        from xconnector.adapters import vllm

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("adapter exploded")

        vllm.VLLMAdapter.kv_io = broken  # type: ignore[method-assign]


def prompts() -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(1234)
    system = rng.integers(1, 32000, 48).tolist()
    return [
        system + rng.integers(1, 32000, 13).tolist(),  # first request
        None,  # the same again
        system + rng.integers(1, 32000, 21).tolist(),  # shares the 48-token system prompt
    ]  # type: ignore[list-item]


def run(worker: Any) -> dict[str, Any]:
    first, _, third = prompts()
    computed, outputs = [], []
    for p in (first, first, third):
        before = worker.model.computed_tokens
        if hasattr(worker, "prefill_sync"):
            worker.prefill_sync([p])
        else:
            asyncio.run(worker.prefill([p]))
        computed.append(worker.model.computed_tokens - before)
        outputs.append(worker.output([p]))
        worker.finish()
    return {"computed": computed, "outputs": outputs}


def report(extra: dict[str, Any]) -> None:
    from xconnector.integrations.dynamo import minimal_sdk, worker_wrapper

    stats = minimal_sdk.stats()
    out = {
        "pid": os.getpid(),
        "patched": {n: depth(cls.__dict__.get(n)) for n in originals},
        "fallbacks": stats.get("fallbacks", {}),
        "hit_tokens": stats.get("counters", {}).get("hit_tokens", 0),
        "guard_errors": worker_wrapper.errors(),
        **extra,
    }
    if os.environ.get("UNPATCH") == "1":
        from xconnector.integrations.dynamo.worker_injector import unpatch

        wrapped = {n: getattr(cls.__dict__.get(n), "__wrapped__", None) for n in originals}
        unpatch()
        out["restored"] = {
            n: cls.__dict__.get(n) is (wrapped[n] or originals[n])
            and depth(cls.__dict__.get(n)) == 0
            for n in originals
        }
    print(json.dumps(out))


def main() -> None:
    if WORKER == "frontend":
        report({"has_kv_methods": False})
        return
    seed = int(os.environ.get("BLOCK_TABLE_SEED", "0"))
    worker = cls({"num_blocks": 64, "seed": seed})
    inject_fault()
    if os.environ.get("FORK") == "1":
        run(worker)  # the parent stores, so the child inherits a warm parent SDK it must not use
        pid = os.fork()
        if pid == 0:
            child = cls({"num_blocks": 64, "seed": seed})
            report({"child": True, **run(child)})
            sys.stdout.flush()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    result = run(worker)
    result["recv_calls"] = getattr(worker, "recv_calls", 0)
    result["send_calls"] = getattr(worker, "send_calls", 0)
    report(result)


if __name__ == "__main__":
    main()
