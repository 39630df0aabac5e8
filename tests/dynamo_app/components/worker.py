"""A Dynamo-style aggregated worker: async KV hooks with the v0 connector signatures."""

from __future__ import annotations

from typing import Any

from dynamo_service import service
from v0_worker import VLLMWorker as _Base


@service
class VllmWorker(_Base):
    async def recv_kv_caches(self, model_executable: Any, model_input: Any, kv_caches: Any) -> Any:
        self.recv_calls = getattr(self, "recv_calls", 0) + 1
        if getattr(self, "raise_in_recv", False):
            raise RuntimeError("the worker's own recv failed")
        return None, False, model_input

    async def send_kv_caches(
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Any,
        hidden_or_intermediate_states: Any,
    ) -> None:
        self.send_calls = getattr(self, "send_calls", 0) + 1
