"""The XConnector SDK: exceptions now; the SDK facade, config and handlers build on the engine."""

from xconnector.sdk.exceptions import (
    CacheError,
    ConfigError,
    InternalError,
    InvalidInputError,
    NativeModuleError,
    XConnectorError,
)

__all__ = [
    "CacheError",
    "ConfigError",
    "InternalError",
    "InvalidInputError",
    "NativeModuleError",
    "XConnectorError",
]
