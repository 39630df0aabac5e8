"""What every adapter has: its validated config, a start/stop lifecycle, and a health report."""

from __future__ import annotations

from typing import Any, ClassVar

from xconnector.config.schema import AdapterConfig, SDKConfig


class Adapter:
    """Base of the built-in adapters. Settings were validated by the config schema already."""

    name: ClassVar[str]
    type: ClassVar[str]

    def __init__(self, config: AdapterConfig, sdk_config: SDKConfig) -> None:
        self.config = config
        self.sdk_config = sdk_config
        self.settings: dict[str, Any] = dict(config.config)
        self.started = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        """Releases what the adapter holds; safe to call twice."""
        self.started = False

    def health(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "started": self.started}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, started={self.started})"
