"""Loads `xconnector._native`, turning any failure into one clear `NativeModuleError`."""

from __future__ import annotations

import importlib
from types import ModuleType

from xconnector.exceptions import NativeModuleError

_module: ModuleType | None = None


def load_native() -> ModuleType:
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("xconnector._native")
        except ImportError as e:
            raise NativeModuleError(
                f"the XConnector native extension could not be loaded ({e}); reinstall the "
                "xconnector wheel for this Python and platform, or build it with `pip install .`"
            ) from e
    return _module
