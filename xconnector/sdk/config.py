"""The SDK's configuration classes, as the SDK documents them (defined in `xconnector.config`)."""

from xconnector.config.schema import (
    AdapterConfig,
    AdapterType,
    IntegrationConfig,
    Mode,
    PerformanceConfig,
    SDKConfig,
)

__all__ = [
    "AdapterConfig",
    "AdapterType",
    "IntegrationConfig",
    "Mode",
    "PerformanceConfig",
    "SDKConfig",
]
