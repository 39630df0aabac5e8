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
from typing import Any, ClassVar, Literal, TypeVar

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
_M = TypeVar("_M", bound="_Mirror")


class _Mirror:
    """What the mirrors share: the native validator's output assigned as is (never validated a
    second time), and `to_dict`, the plain form the validator reads."""

    #: The key of a nested section (`integration`, `performance`), validated inside a section.
    _key: ClassVar[str] = ""

    @classmethod
    def from_normalized(cls: type[_M], values: Mapping[str, Any]) -> _M:
        """An instance from the native validator's output, without validating it again."""
        obj = object.__new__(cls)
        vars(obj).update(values)
        return obj

    def __post_init__(self) -> None:
        section = {"enabled": False, self._key: self.to_dict()}
        normalized = load_native().config_normalize(section, source=f"{type(self).__name__}(...)")
        vars(self).update(normalized[self._key])

    def to_dict(self) -> dict[str, Any]:
        # Nested mirrors, and dicts or lists of them (as users may pass them), become plain.
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass
class AdapterConfig(_Mirror):
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
        shown = {**vars(self), "config": load_native().config_redact(self.config)}
        return f"AdapterConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __post_init__(self) -> None:
        raw = {k: v for k, v in self.to_dict().items() if k != "type" or v}
        source = f"AdapterConfig(name={self.name!r})"
        vars(self).update(load_native().config_normalize_adapter(raw, source=source))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> AdapterConfig:
        return cls.from_normalized(load_native().config_normalize_adapter(data, source=source))


@dataclass
class IntegrationConfig(_Mirror):
    """What the autopatch patches, and in which Dynamo services it acts."""

    _key: ClassVar[str] = "integration"

    targets: list[str] = field(
        default_factory=lambda: [
            "components.worker:VllmWorker",
            "components.prefill_worker:PrefillWorker",
        ]
    )
    services: list[str] = field(default_factory=lambda: ["VllmWorker", "PrefillWorker"])
    #: Raise at startup on a configuration error instead of leaving the worker unpatched.
    strict: bool = False


@dataclass
class PerformanceConfig(_Mirror):
    """Block size, background threads, pinning, batch sizes, and an optional metrics port."""

    _key: ClassVar[str] = "performance"

    block_size: int = 16
    #: Background I/O threads; 0 picks a default from the machine.
    worker_threads: int = 0
    pin_memory: bool = False
    batch_size: int = 64
    metrics_port: int | None = None


@dataclass
class SDKConfig(_Mirror):
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
        normalized = load_native().config_normalize(self.to_dict(), source="SDKConfig(...)")
        vars(self).update(vars(SDKConfig.from_normalized(normalized)))

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "<dict>", path: str = ""
    ) -> SDKConfig:
        """Validates an `xconnector` section. `source` and `path` (e.g. `Common.xconnector`)
        only make error messages point at where `data` came from."""
        return cls.from_normalized(load_native().config_normalize(data, source=source, path=path))

    @classmethod
    def from_normalized(cls, values: Mapping[str, Any]) -> SDKConfig:
        return super().from_normalized(
            {
                **values,
                "adapters": [AdapterConfig.from_normalized(a) for a in values["adapters"]],
                "integration": IntegrationConfig.from_normalized(values["integration"]),
                "performance": PerformanceConfig.from_normalized(values["performance"]),
            }
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, service: str | None = None) -> SDKConfig:
        """Reads a YAML or JSON file: a Dynamo config (`Common.xconnector`, overlaid by
        `<service>.xconnector`), a file with a top-level `xconnector:` key, or the section itself.
        A Dynamo config without a section gives the default, disabled config."""
        found = load_native().config_load_file(os.fspath(path), service)
        return cls.from_normalized(found["config"])

    def adapter(self, name: str) -> AdapterConfig | None:
        """The adapter configured under `name`, if any."""
        return next((a for a in self.adapters if a.name == name), None)
