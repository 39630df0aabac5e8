"""Finds the XConnector config the way a worker process (Dynamo or vLLM) sees it: from
`XCONNECTOR_CONFIG`, `DYNAMO_SERVICE_CONFIG` (`Common.xconnector` overlaid by the service's),
`DYN_DEPLOYMENT_CONFIG` or `-f FILE` on argv, first set wins (DESIGN section 2); none: off.
The reading, overlaying and validation run in the native core.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xconnector._loader import load_native
from xconnector.config.schema import SDKConfig

__all__ = [
    "DetectedConfig",
    "detect_config",
    "load_config_file",
    "load_config_from_dynamo",
    "resolve_dynamo_config",
]


@dataclass(frozen=True)
class DetectedConfig:
    """A config and where it came from."""

    config: SDKConfig
    #: The channel read: `XCONNECTOR_CONFIG=<path>`, `DYNAMO_SERVICE_CONFIG`, `-f <path>`, a file
    #: path, or `none`.
    source: str
    #: The key path(s) read (`Common.xconnector + VllmWorker.xconnector`), or None when the
    #: source has no `xconnector` section.
    section: str | None
    #: Every effective value's key path -> where it was set (`<source>: <key path>`) or `default`.
    origins: dict[str, str] = field(default_factory=dict)
    #: Every effective value by key path (`adapters[0].config.max_cache_size` -> 2048).
    values: dict[str, Any] = field(default_factory=dict)
    #: Valid but risky things in the document, e.g. `xconnector` in a service's common-configs.
    warnings: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.section is not None

    @property
    def enabled(self) -> bool:
        return self.found and self.config.enabled

    def describe(self) -> str:
        """One line for logs: `enabled, source: DYNAMO_SERVICE_CONFIG (Common.xconnector)`."""
        state = "enabled" if self.enabled else "not enabled"
        where = f"{self.source} ({self.section})" if self.section else self.source
        if not self.found and self.source != "none":
            where += " (no xconnector section)"
        return f"{state}, source: {where}"

    @classmethod
    def from_native(cls, found: Mapping[str, Any]) -> DetectedConfig:
        return cls(
            config=SDKConfig.from_normalized(found["config"]),
            source=found["source"],
            section=found["section"],
            origins={path: origin for path, _, origin in found["origins"]},
            values={path: value for path, value, _ in found["origins"]},
            warnings=list(found["warnings"]),
        )


def detect_config(
    environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
) -> DetectedConfig:
    """The config this process would use (defaults: `os.environ`, `sys.argv`). Raises
    `ConfigError` when a channel is set but unreadable or invalid."""
    native, env = load_native(), os.environ if environ is None else environ
    wanted = {k: env[k] for k in native.config_env_vars() if k in env}
    found = native.config_discover(wanted, list(sys.argv if argv is None else argv))
    return DetectedConfig.from_native(found)


def load_config_file(
    path: str | os.PathLike[str],
    *,
    service: str | None = None,
    argv: Sequence[str] | None = None,
) -> DetectedConfig:
    """Reads one YAML/JSON file the way `xconnector check-config` does; `argv`, the worker's
    command line, gives the block size the settings must fit (`--block-size`)."""
    args = None if argv is None else list(argv)
    return DetectedConfig.from_native(
        load_native().config_load_file(os.fspath(path), service, args)
    )


def resolve_dynamo_config(
    dynamo_config: Mapping[str, Any],
    *,
    service: str | None = None,
    source: str = "<dynamo config>",
) -> DetectedConfig:
    """Reads the section out of a Dynamo config given as a dict (the whole YAML)."""
    found = load_native().config_resolve_document(dynamo_config, source, service, False)
    return DetectedConfig.from_native(found)


def load_config_from_dynamo(
    dynamo_config: Mapping[str, Any], *, service: str | None = None
) -> SDKConfig:
    """`Common.xconnector` of a Dynamo config dict, overlaid by `<service>.xconnector`; the
    default (disabled) config when it has none."""
    return resolve_dynamo_config(dynamo_config, service=service).config
