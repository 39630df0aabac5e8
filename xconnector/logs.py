"""Logging helpers. Native (Rust) log records arrive on loggers under `xconnector`."""

from __future__ import annotations

import logging


def set_level(level: int | str, name: str = "xconnector") -> None:
    """Sets an `xconnector` logger's level so that the native side notices at once: its bridge
    caches logger levels (disabled levels never take the GIL) until the cache is reset."""
    logging.getLogger(name).setLevel(level)
    from xconnector._loader import load_native

    load_native().reset_log_cache()
