"""`XConnector`: the facade the earlier prototype exposed (`load_adapter`, `get_adapter`,
`route`, start/stop), kept for code written against it. Everything is delegated to an
`XConnectorSDK`; this is not a second implementation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xconnector.adapters.base import Adapter
from xconnector.config.schema import AdapterConfig, SDKConfig
from xconnector.exceptions import CacheError, InvalidInputError
from xconnector.sdk.xconnector_sdk import XConnectorSDK

__all__ = ["XConnector"]


class XConnector:
    def __init__(
        self,
        config: SDKConfig | Mapping[str, Any] | None = None,
        *,
        sdk: XConnectorSDK | None = None,
    ) -> None:
        self.sdk = sdk if sdk is not None else XConnectorSDK(config)

    def start(self) -> None:
        self.sdk.initialize()

    def stop(self) -> None:
        self.sdk.shutdown()

    def __enter__(self) -> XConnector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def load_adapter(self, config: AdapterConfig | Mapping[str, Any]) -> Adapter:
        if not self.sdk.initialized:
            self.sdk.initialize()
        return self.sdk.load_adapters([config])[0]

    def get_adapter(self, name: str) -> Adapter | None:
        return self.sdk.get_adapter(name)

    def list_adapters(self) -> dict[str, dict[str, Any]]:
        return {name: a.health() for name, a in self.sdk.adapters.items()}

    def route(self, selector: str, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Calls `operation(*args, **kwargs)` on the adapter named `selector`, or on the
        adapters of type `selector` in router order until one succeeds. A target that raises is
        reported to the router, which skips it for a backoff period."""
        router, last = self.sdk.router, None
        for name in router.candidates(selector):  # raises while none is available
            fn = getattr(self.sdk.adapters[name], operation, None)
            if not callable(fn):
                raise InvalidInputError(f"adapter {name!r} has no operation {operation!r}")
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                router.report_failure(name)
                last = e
                continue
            router.report_success(name)
            return result
        raise CacheError(f"every {selector!r} target failed; last error: {last}") from last
