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
        s = self.settings
        self.namespace: str = s.get("namespace", "dynamo")
        self.component: str = s.get("component", "VllmWorker")
        #: Unique among the deployment's workers; defaults to host and process.
        self.worker_id: str = s.get("worker_id") or default_worker_id()
        #: Where peer events are published and read (NATS), if anywhere.
        self.nats_url: str | None = s.get("nats_url")
        subject = s.get("kv_events_subject", f"{self.namespace}.xconnector.kv_events")
        self.kv_events_subject: str = subject

    def health(self) -> dict[str, Any]:
        # Health output is pasted into tickets: no password of the NATS URL.
        nats = None if self.nats_url is None else load_native().config_redact(self.nats_url)
        return super().health() | {
            "namespace": self.namespace,
            "component": self.component,
            "worker_id": self.worker_id,
            "nats_url": nats,
            "kv_events_subject": self.kv_events_subject,
        }


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
