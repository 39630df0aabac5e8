"""The one SDK a patched worker process uses: configured by the autopatch, created on the first
KV call (never at import, so processes that never run a worker pay nothing), shut down at exit,
and re-created in a forked child (the parent's may hold locks that the fork copied locked)."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from xconnector.config.schema import SDKConfig
from xconnector.sdk.xconnector_sdk import XConnectorSDK

log = logging.getLogger("xconnector.autopatch")

_lock = threading.Lock()
_config: SDKConfig | None = None
_sdk: XConnectorSDK | None = None
_failed = False
# SDKs inherited from a parent process: never used again, never freed (freeing may take a lock).
_inherited: list[XConnectorSDK] = []


def configure(config: SDKConfig | None) -> None:
    """Sets the config the SDK will be created with (None: no SDK)."""
    global _config, _failed
    with _lock:
        _config = config
        _failed = False


def configured() -> SDKConfig | None:
    """The config the autopatch set (None: XConnector is off in this process)."""
    return _config


def get_sdk() -> XConnectorSDK | None:
    """The process's SDK, created on first use; None when unconfigured or when creating it
    failed (logged once; the worker then runs unpatched behaviour)."""
    global _sdk, _failed
    sdk = _sdk
    if sdk is not None or _failed or _config is None:
        return sdk
    with _lock:
        if _sdk is None and not _failed and _config is not None:
            try:
                created = XConnectorSDK(_config)
                created.initialize()
                _sdk = created
            except Exception as e:
                _failed = True
                log.error("XConnector is off in this process: its SDK could not start (%s)", e)
        return _sdk


def stats() -> dict[str, Any]:
    """The SDK's monitoring snapshot ({} before it exists)."""
    sdk = _sdk
    return {} if sdk is None else sdk.get_monitoring_handler().snapshot()


def shutdown() -> None:
    global _sdk
    with _lock:
        sdk, _sdk = _sdk, None
    if sdk is not None:
        sdk.shutdown()


def _after_fork_in_child() -> None:
    global _sdk, _lock
    if _sdk is not None:
        _inherited.append(_sdk)
    _sdk = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(shutdown)
