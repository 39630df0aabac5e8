"""The XConnector configuration, as dataclasses.

The schema lives in the native core (one definition, strict, every problem reported at once);
these classes mirror it for Python users. Every way of building one validates it:
`SDKConfig(...)`, `SDKConfig.from_dict(...)`, `SDKConfig.from_yaml(...)`. An invalid config raises
`ConfigError` naming the source, the key path and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from xconnector._loader import load_native

__all__ = [
    "AdapterConfig",
    "AdapterType",
    "IntegrationConfig",
    "Mode",
    "PerformanceConfig",
    "SDKConfig",
]

Mode = Literal["embedded", "hybrid"]
AdapterType = Literal["cache", "inference", "distributed"]

_T = TypeVar("_T")


def _build(cls: type[_T], values: Mapping[str, Any]) -> _T:
    """An instance from already-normalized values, without validating them a second time."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        object.__setattr__(obj, f.name, values[f.name])
    return obj


def _assign(obj: object, values: Mapping[str, Any]) -> None:
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        object.__setattr__(obj, f.name, values[f.name])


@dataclass
class AdapterConfig:
    """One adapter: `lmcache` (cache), `vllm` (inference) or `dynamo` (distributed)."""

    name: str
    #: Inferred from `name` when left empty; a mismatch is an error.
    type: str = ""
    #: Adapter settings (each adapter checks its own keys when it is loaded).
    config: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True
    #: Lower runs first.
    priority: int = 0

    def __repr__(self) -> str:
        # Settings may hold secrets (remote_url's password, remote_auth_key): shown redacted.
        shown = load_native().config_redact(self.config)
        return (
            f"AdapterConfig(name={self.name!r}, type={self.type!r}, config={shown!r}, "
            f"enabled={self.enabled!r}, priority={self.priority!r})"
        )

    def __post_init__(self) -> None:
        normalized = load_native().config_normalize_adapter(
            self._raw(), source=f"AdapterConfig(name={self.name!r})"
        )
        _assign(self, normalized)

    def _raw(self) -> dict[str, Any]:
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not raw["type"]:
            del raw["type"]
        return raw

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> AdapterConfig:
        return _build(cls, load_native().config_normalize_adapter(data, source=source))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "config": dict(self.config),
            "enabled": self.enabled,
            "priority": self.priority,
        }


@dataclass
class IntegrationConfig:
    """What the autopatch patches, and in which Dynamo services it acts."""

    targets: list[str] = field(
        default_factory=lambda: [
            "components.worker:VllmWorker",
            "components.prefill_worker:PrefillWorker",
        ]
    )
    services: list[str] = field(default_factory=lambda: ["VllmWorker", "PrefillWorker"])
    #: Raise at startup on a configuration error instead of leaving the worker unpatched.
    strict: bool = False

    def __post_init__(self) -> None:
        section = {"enabled": False, "integration": self.to_dict()}
        normalized = load_native().config_normalize(section, source="IntegrationConfig(...)")
        _assign(self, normalized["integration"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "services": list(self.services),
            "strict": self.strict,
        }


@dataclass
class PerformanceConfig:
    """Block size, background threads, pinning, batch sizes, and an optional metrics port."""

    block_size: int = 16
    #: Background I/O threads; 0 picks a default from the machine.
    worker_threads: int = 0
    pin_memory: bool = False
    batch_size: int = 64
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        section = {"enabled": False, "performance": self.to_dict()}
        normalized = load_native().config_normalize(section, source="PerformanceConfig(...)")
        _assign(self, normalized["performance"])

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class SDKConfig:
    """The `xconnector:` section. Defaults match DESIGN section 2; `enabled` is off by default."""

    enabled: bool = False
    mode: Mode = "embedded"
    enable_distributed: bool = True
    #: False: patch nothing but still export metrics.
    enable_caching: bool = True
    #: A list of `AdapterConfig` (or dicts), or a mapping name -> settings.
    adapters: list[AdapterConfig] = field(default_factory=list)
    integration: IntegrationConfig = field(default_factory=IntegrationConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)

    def __post_init__(self) -> None:
        normalized = load_native().config_normalize(self._raw(), source="SDKConfig(...)")
        _assign(self, vars(SDKConfig.from_normalized(normalized)))

    def _raw(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return v.to_dict() if hasattr(v, "to_dict") else v

        # Users may pass a mapping name -> settings, as in YAML, despite the annotation.
        adapters: Any = self.adapters
        if isinstance(adapters, Mapping):
            adapters = {k: plain(v) for k, v in adapters.items()}
        elif isinstance(adapters, (list, tuple)):
            adapters = [plain(a) for a in adapters]
        return {
            "enabled": self.enabled,
            "mode": self.mode,
            "enable_distributed": self.enable_distributed,
            "enable_caching": self.enable_caching,
            "adapters": adapters,
            "integration": plain(self.integration),
            "performance": plain(self.performance),
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "<dict>", path: str = ""
    ) -> SDKConfig:
        """Validates an `xconnector` section. `source` and `path` (e.g. `Common.xconnector`)
        only make error messages point at where `data` came from."""
        return cls.from_normalized(load_native().config_normalize(data, source=source, path=path))

    @classmethod
    def from_normalized(cls, normalized: Mapping[str, Any]) -> SDKConfig:
        """An instance from the native validator's output, without validating it again."""
        out = dict(normalized)
        out["adapters"] = [_build(AdapterConfig, a) for a in normalized["adapters"]]
        out["integration"] = _build(IntegrationConfig, normalized["integration"])
        out["performance"] = _build(PerformanceConfig, normalized["performance"])
        return _build(cls, out)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, service: str | None = None) -> SDKConfig:
        """Reads a YAML or JSON file: a Dynamo config (`Common.xconnector`, overlaid by
        `<service>.xconnector`), a file with a top-level `xconnector:` key, or the section itself.
        A Dynamo config without a section gives the default, disabled config."""
        found = load_native().config_load_file(os.fspath(path), service)
        return cls.from_normalized(found["config"])

    def to_dict(self) -> dict[str, Any]:
        """The normalized section: every key, adapters as a list sorted by priority."""
        return {
            "enabled": self.enabled,
            "mode": self.mode,
            "enable_distributed": self.enable_distributed,
            "enable_caching": self.enable_caching,
            "adapters": [a.to_dict() for a in self.adapters],
            "integration": self.integration.to_dict(),
            "performance": self.performance.to_dict(),
        }

    def adapter(self, name: str) -> AdapterConfig | None:
        """The adapter configured under `name`, if any."""
        return next((a for a in self.adapters if a.name == name), None)
