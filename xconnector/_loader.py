"""Loads `xconnector._native`, turning any failure into one clear `NativeModuleError`."""

from __future__ import annotations

import importlib
from types import ModuleType

from xconnector.exceptions import NativeModuleError


def load_native() -> ModuleType:
    """The extension (after the first call, from `sys.modules`)."""
    try:
        return importlib.import_module("xconnector._native")
    except ImportError as e:
        raise NativeModuleError(
            f"the XConnector native extension could not be loaded ({e}); reinstall the "
            "xconnector wheel for this Python and platform, or build it with `pip install .`"
        ) from e
