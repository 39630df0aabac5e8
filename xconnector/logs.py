"""Logging helpers. Native (Rust) log records arrive on loggers under `xconnector`."""

from __future__ import annotations

import logging

LOGGER_NAME = "xconnector"


def set_level(level: int | str, name: str = LOGGER_NAME) -> None:
    """Set an `xconnector` logger's level and make the native side notice at once.

    The native bridge caches logger levels so that disabled levels never take the GIL; changing a
    level with `logging` directly takes effect for native records only after this is called.
    """
    logging.getLogger(name).setLevel(level)
    from xconnector._loader import load_native

    load_native().reset_log_cache()
