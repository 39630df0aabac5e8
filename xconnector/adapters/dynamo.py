"""The distributed adapter: who this worker is among Dynamo's workers (`namespace`,
`component`, `worker_id`), for prefix-overlap scoring and, with the shared tier, KV events."""

from __future__ import annotations

import os
import socket
from typing import Any, ClassVar

from xconnector.adapters.base import Adapter
from xconnector.sdk.config import AdapterConfig, SDKConfig


class DynamoAdapter(Adapter):
    name: ClassVar[str] = "dynamo"
    type: ClassVar[str] = "distributed"

    def __init__(self, config: AdapterConfig, sdk_config: SDKConfig) -> None:
        super().__init__(config, sdk_config)
        self.namespace: str = self.settings.get("namespace", "dynamo")
        self.component: str = self.settings.get("component", "VllmWorker")
        #: Unique among the deployment's workers; defaults to host and process.
        self.worker_id: str = self.settings.get("worker_id") or default_worker_id()

    def health(self) -> dict[str, Any]:
        out = super().health()
        out.update(namespace=self.namespace, component=self.component, worker_id=self.worker_id)
        return out


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
