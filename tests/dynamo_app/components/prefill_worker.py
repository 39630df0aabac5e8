"""A Dynamo-style prefill worker with synchronous KV hooks."""

from __future__ import annotations

from typing import Any

from dynamo_service import service
from v0_worker import SyncVLLMWorker


@service
class PrefillWorker(SyncVLLMWorker):
    def recv_kv_caches(self, model_executable: Any, model_input: Any, kv_caches: Any) -> Any:
        self.recv_calls = getattr(self, "recv_calls", 0) + 1
        return None, False, model_input

    def send_kv_caches(
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Any,
        hidden_or_intermediate_states: Any,
    ) -> None:
        self.send_calls = getattr(self, "send_calls", 0) + 1
