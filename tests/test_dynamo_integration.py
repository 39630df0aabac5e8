"""The pieces the autopatch is built from, used directly: `VLLMWorkerWrapper`,
`DynamoXConnectorIntegration`, `minimal_sdk`, and the patching of vLLM v0 `KVConnectorBase`
subclasses (vLLM's v0 KV connectors were removed in vLLM 0.11 and the installable vLLM here is
0.32, so a module tree with v0's path and class shapes stands in for it, in a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from v0_worker import BLOCK, SyncVLLMWorker, VLLMWorker, build_model_input, expected_kv

from xconnector.integrations.dynamo.sdk_integration import DynamoXConnectorIntegration
from xconnector.integrations.dynamo.worker_wrapper import VLLMWorkerWrapper, make_recv_wrapper
from xconnector.patching import is_wrapper
from xconnector.sdk import ConfigError, XConnectorSDK

TESTS = Path(__file__).resolve().parent


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 30000, n).tolist()


def test_worker_wrapper_keeps_sync_and_async_and_serves_hits() -> None:
    with XConnectorSDK() as sdk:
        p = prompt(3 * BLOCK + 2, 1)
        # Async worker through the wrapper: the wrapper's methods are awaitable.
        inner = VLLMWorker({"num_blocks": 32})
        wrapped = VLLMWorkerWrapper(inner, sdk)
        assert asyncio.iscoroutinefunction(wrapped.recv_kv_caches) and wrapped.num_blocks == 32
        inner.recv_kv_caches = wrapped.recv_kv_caches  # type: ignore[method-assign]
        inner.send_kv_caches = wrapped.send_kv_caches  # type: ignore[method-assign]
        asyncio.run(inner.prefill([p]))
        inner.finish()
        before = inner.model.computed_tokens
        asyncio.run(inner.prefill([p]))
        assert inner.model.computed_tokens - before == 2
        # Sync worker: plain calls, same cache (same SDK).
        sync = SyncVLLMWorker({"num_blocks": 32, "seed": 5})
        w2 = VLLMWorkerWrapper(sync, sdk)
        assert not asyncio.iscoroutinefunction(w2.recv_kv_caches)
        sync.recv_kv_caches = w2.recv_kv_caches  # type: ignore[method-assign]
        sync.send_kv_caches = w2.send_kv_caches  # type: ignore[method-assign]
        sync.prefill_sync([p])
        assert sync.model.computed_tokens == 2
        for got, want in zip(sync.kv_of(p, sync.last_tables[0]), expected_kv(p), strict=True):
            assert np.array_equal(got, want)


def test_renamed_parameters_called_by_keyword_get_the_rebuilt_model_input() -> None:
    with XConnectorSDK() as sdk:
        p = prompt(3 * BLOCK + 2, 3)
        worker = SyncVLLMWorker({"num_blocks": 32})
        w = VLLMWorkerWrapper(worker, sdk)
        worker.send_kv_caches = w.send_kv_caches  # type: ignore[method-assign]
        worker.prefill_sync([p])
        worker.finish()
        seen = []

        def recv(mx: object, mi: object, kv: object) -> tuple[None, bool, object]:
            seen.append(mi)  # the arguments found by position, whatever their names
            return None, False, mi

        tables = [worker.allocator.allocate(4)]
        full = build_model_input([p], tables)
        wrapped = make_recv_wrapper(recv, lambda: sdk)
        assert wrapped(kv=worker.kv_caches, mi=full, mx=worker.model)[2] is seen[0]
        assert seen[0] is not full and len(seen[0].input_tokens) == 2  # only the uncached rest
        worker.model(seen[0], worker.kv_caches, [p], tables)  # the loaded prefix is p's KV
        assert worker.model.computed_tokens == len(p) + 2


def test_wrapper_without_an_sdk_is_the_worker_itself() -> None:
    worker = SyncVLLMWorker({"num_blocks": 8})
    w = VLLMWorkerWrapper(worker, None)
    mi = object()
    assert w.recv_kv_caches(None, mi, []) == (None, False, mi)


def test_sdk_integration_injects_into_an_instance() -> None:
    dynamo_config = {
        "Common": {"model": "m", "xconnector": {"enabled": True}},
        "VllmWorker": {"common-configs": ["model"]},
    }
    integration = DynamoXConnectorIntegration(dynamo_config, service="VllmWorker")
    assert asyncio.run(integration.asetup()) is True
    worker = VLLMWorker({"num_blocks": 32})
    assert integration.inject_into_worker(worker) is True
    assert worker.xconnector_sdk is integration.sdk  # type: ignore[attr-defined]
    assert is_wrapper(worker.recv_kv_caches) and integration.wrap_kv_methods(worker)  # idempotent
    assert not is_wrapper(worker.recv_kv_caches.__wrapped__)
    p = prompt(2 * BLOCK + 3, 2)
    asyncio.run(worker.prefill([p]))
    worker.finish()
    asyncio.run(worker.prefill([p]))
    assert worker.model.computed_tokens == len(p) + 3
    integration.unwrap(worker)
    assert not is_wrapper(worker.recv_kv_caches)
    integration.shutdown()
    assert DynamoXConnectorIntegration({"Common": {"model": "m"}}).setup() is False
    with pytest.raises(
        ConfigError, match=r"(?s)dynamo_config: invalid .*Common\.xconnector\.enabled"
    ):
        DynamoXConnectorIntegration({"Common": {"xconnector": {"enabled": "on"}}}).setup()
    assert DynamoXConnectorIntegration({}).inject_into_worker(worker) is False


V0_BASE = """
from abc import ABC, abstractmethod

class KVConnectorBase(ABC):
    @abstractmethod
    def recv_kv_caches_and_hidden_states(self, model_executable, model_input, kv_caches): ...
    @abstractmethod
    def send_kv_caches_and_hidden_states(self, model_executable, model_input, kv_caches,
                                         hidden_or_intermediate_states): ...
"""

V0_DRIVER = """
import json, sys
import xconnector.integrations.dynamo.autopatch
from vllm.distributed.kv_transfer.kv_connector.base import KVConnectorBase
from v0_worker import SyncVLLMWorker

class EarlyConnector(KVConnectorBase):  # defined right after the base module loads
    def recv_kv_caches_and_hidden_states(self, model_executable, model_input, kv_caches):
        return None, False, model_input
    def send_kv_caches_and_hidden_states(self, model_executable, model_input, kv_caches, hidden):
        return None

class Derived(EarlyConnector):  # inherits the patched methods: nothing more to wrap
    pass

class Worker(SyncVLLMWorker):
    def __init__(self, config, connector):
        super().__init__(config)
        self.connector = connector
    def recv_kv_caches(self, mx, mi, kv):
        return self.connector.recv_kv_caches_and_hidden_states(mx, mi, kv)
    def send_kv_caches(self, mx, mi, kv, hidden):
        return self.connector.send_kv_caches_and_hidden_states(mx, mi, kv, hidden)

def depth(fn):
    n = 0
    while getattr(fn, "_xconnector_patch", False):
        n, fn = n + 1, fn.__wrapped__
    return n

w = Worker({"num_blocks": 32}, Derived())
p = list(range(7, 7 + 50))
w.prefill_sync([p]); w.finish(); w.prefill_sync([p])
print(json.dumps({
    "early": depth(EarlyConnector.__dict__["recv_kv_caches_and_hidden_states"]),
    "derived_own": "recv_kv_caches_and_hidden_states" in Derived.__dict__,
    "computed": w.model.computed_tokens,
}))
"""


def test_vllm_v0_connector_subclasses_are_patched(tmp_path: Path) -> None:
    pkg = tmp_path / "vllm" / "distributed" / "kv_transfer" / "kv_connector"
    pkg.mkdir(parents=True)
    for d in [tmp_path / "vllm", *list(pkg.parents)[:3], pkg]:
        (d / "__init__.py").write_text("")
    (pkg / "base.py").write_text(textwrap.dedent(V0_BASE))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS)]),
        "XCONNECTOR_CONFIG": json.dumps({"enabled": True}),
        "XCONNECTOR_SERVICE": "VllmWorker",
    }
    proc = subprocess.run(
        [sys.executable, "-c", V0_DRIVER],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {"early": 1, "derived_own": False, "computed": 50 + 2}


def test_v1_engines_get_the_connector_or_a_multiconnector() -> None:
    from xconnector.integrations.vllm.engine_config import v1_transfer_config

    section = {"enabled": True, "mode": "embedded"}
    ours = v1_transfer_config(None, section)
    assert ours == {
        "kv_connector": "XConnectorV1",
        "kv_connector_module_path": "xconnector.integrations.vllm.connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"xconnector": section},
        "kv_load_failure_policy": "recompute",
    }
    nixl = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cuda"}
    multi = v1_transfer_config(nixl, section)
    assert multi is not None and multi["kv_connector"] == "MultiConnector"
    children = multi["kv_connector_extra_config"]["connectors"]
    assert [c["kv_connector"] for c in children] == ["NixlConnector", "XConnectorV1"]
    assert children[0]["kv_buffer_device"] == "cuda"  # the user's connector keeps its settings
    assert v1_transfer_config({"kv_connector": "XConnectorV1"}, section) is None
    assert v1_transfer_config(multi, section) is None  # never composed twice
    assert v1_transfer_config({"kv_connector": None}, section) == ours
