"""Config discovery as Dynamo workers use it (defined in `xconnector.config.discovery`)."""

from xconnector.config.discovery import (
    DetectedConfig,
    detect_config,
    load_config_file,
    load_config_from_dynamo,
    resolve_dynamo_config,
)

__all__ = [
    "DetectedConfig",
    "detect_config",
    "load_config_file",
    "load_config_from_dynamo",
    "resolve_dynamo_config",
]
