"""XConnector's exceptions, as the SDK documents them (defined in `xconnector.exceptions`)."""

from xconnector.exceptions import (
    CacheError,
    ConfigError,
    InternalError,
    InvalidInputError,
    NativeModuleError,
    StateError,
    XConnectorError,
)

__all__ = [
    "CacheError",
    "ConfigError",
    "InternalError",
    "InvalidInputError",
    "NativeModuleError",
    "StateError",
    "XConnectorError",
]
