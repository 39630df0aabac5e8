"""A worker module with the import line as its own first line, as the design shows it: the
autopatch runs while this module is still executing, before the class exists."""

import xconnector.integrations.dynamo.autopatch  # noqa: F401, I001

from typing import Any

from dynamo_service import service
from v0_worker import VLLMWorker as _Base


@service
class VllmWorker(_Base):
    async def recv_kv_caches(self, model_executable: Any, model_input: Any, kv_caches: Any) -> Any:
        self.recv_calls = getattr(self, "recv_calls", 0) + 1
        return None, False, model_input

    async def send_kv_caches(
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Any,
        hidden_or_intermediate_states: Any,
    ) -> None:
        self.send_calls = getattr(self, "send_calls", 0) + 1
