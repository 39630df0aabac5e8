"""The distributed adapter: who this worker is among Dynamo's workers (`namespace`,
`component`, `worker_id`), and where XConnector's peer events go (`nats_url`,
`kv_events_subject`; XConnector's own channel, not Dynamo's event plane): this worker's engine
publishes stored/removed blocks there, and its distributed handler reads the
other workers' events for prefix-overlap scoring."""

from __future__ import annotations

import os
import socket
from typing import Any, ClassVar

from xconnector._loader import load_native
from xconnector.adapters.base import Adapter
from xconnector.config.schema import AdapterConfig, SDKConfig


class DynamoAdapter(Adapter):
    name: ClassVar[str] = "dynamo"
    type: ClassVar[str] = "distributed"

    def __init__(self, config: AdapterConfig, sdk_config: SDKConfig) -> None:
        super().__init__(config, sdk_config)
        self.namespace: str = self.settings.get("namespace", "dynamo")
        self.component: str = self.settings.get("component", "VllmWorker")
        #: Unique among the deployment's workers; defaults to host and process.
        self.worker_id: str = self.settings.get("worker_id") or default_worker_id()
        #: Where peer events are published and read (NATS), if anywhere.
        self.nats_url: str | None = self.settings.get("nats_url")
        self.kv_events_subject: str = self.settings.get(
            "kv_events_subject", f"{self.namespace}.xconnector.kv_events"
        )

    def health(self) -> dict[str, Any]:
        out = super().health()
        out.update(
            namespace=self.namespace,
            component=self.component,
            worker_id=self.worker_id,
            # Health output is pasted into tickets: no password of the NATS URL.
            nats_url=None if self.nats_url is None else load_native().config_redact(self.nats_url),
            kv_events_subject=self.kv_events_subject,
        )
        return out


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
