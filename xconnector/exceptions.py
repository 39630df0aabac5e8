"""XConnector's exception hierarchy.

Pure Python on purpose: these names stay importable even when the native extension fails to load,
so callers (the autopatch above all) can catch and report that failure cleanly.
"""

from __future__ import annotations


class XConnectorError(Exception):
    """Base of every error XConnector raises on purpose."""


class ConfigError(XConnectorError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class InvalidInputError(XConnectorError, ValueError):
    """A call got arguments it cannot use: token ids, buffer sizes, dtypes, read-only buffers."""


class CacheError(XConnectorError):
    """A cache operation failed for a reason other than the caller's input."""


class InternalError(XConnectorError):
    """A bug inside XConnector, including a panic caught in the native core."""


class NativeModuleError(XConnectorError, ImportError):
    """The compiled extension `xconnector._native` could not be loaded."""


class StateError(XConnectorError, RuntimeError):
    """A call the SDK's lifecycle does not allow now: before `initialize()`, after `shutdown()`."""
