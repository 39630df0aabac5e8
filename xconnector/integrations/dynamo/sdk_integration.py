"""`DynamoXConnectorIntegration`: XConnector for one worker *instance*, from a Dynamo config dict,
for code that builds its worker itself rather than relying on the import hook."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xconnector.config.discovery import resolve_dynamo_config
from xconnector.integrations.dynamo.worker_injector import WORKER_METHODS
from xconnector.integrations.dynamo.worker_wrapper import wrap_methods
from xconnector.patching import is_wrapper
from xconnector.sdk.xconnector_sdk import XConnectorSDK


class DynamoXConnectorIntegration:
    def __init__(self, dynamo_config: Mapping[str, Any], service: str | None = None) -> None:
        self.config = dynamo_config
        self.service = service
        self.sdk: XConnectorSDK | None = None

    def setup(self) -> bool:
        """Reads `Common.xconnector` (overlaid by the service's) and starts the SDK. False when
        the config does not enable XConnector. A bad config raises `ConfigError`."""
        found = resolve_dynamo_config(self.config, service=self.service, source="dynamo_config")
        if found.enabled and self.sdk is None:
            sdk = XConnectorSDK(found.config)
            sdk.initialize()
            self.sdk = sdk
        return found.enabled

    async def asetup(self) -> bool:
        return self.setup()

    def inject_into_worker(self, worker_instance: Any) -> bool:
        """Gives the worker the SDK (`worker.xconnector_sdk`) and wraps its KV methods."""
        if self.sdk is None and not self.setup():
            return False
        worker_instance.xconnector_sdk = self.sdk
        return self.wrap_kv_methods(worker_instance)

    def wrap_kv_methods(self, worker_instance: Any) -> bool:
        """Wraps this instance's `recv_kv_caches`/`send_kv_caches` (the class stays as it is).
        Idempotent; False if the worker has neither method."""
        return wrap_methods(worker_instance, worker_instance, lambda: self.sdk)

    def unwrap(self, worker_instance: Any) -> None:
        """Removes the instance-level wrappers."""
        for name in WORKER_METHODS:
            if is_wrapper(worker_instance.__dict__.get(name)):
                delattr(worker_instance, name)

    def shutdown(self) -> None:
        if self.sdk is not None:
            self.sdk.shutdown()
