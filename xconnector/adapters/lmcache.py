"""The cache adapter: XConnector's native engine, configured with the keys LMCache users know
(`chunk_size`, `local_cpu`, `max_local_cpu_size`, ...) and the design's (`storage_backend`,
`max_cache_size`).

Sizes: `max_cache_size` integers are MiB (the design's unit); `max_local_cpu_size` and
`max_local_disk_size` numbers are GB, as LMCache reads them; strings carry units everywhere.
"""

from __future__ import annotations

from typing import Any, ClassVar

from xconnector._native import EnginePool
from xconnector.adapters.base import Adapter
from xconnector.config.schema import AdapterConfig, SDKConfig


class LMCacheAdapter(Adapter):
    """Holds the engines, one per KV geometry and namespace (`EnginePool`). What each engine is
    (budgets, tiers, chunk size) and every rule across these settings are decided natively."""

    name: ClassVar[str] = "lmcache"
    type: ClassVar[str] = "cache"

    def __init__(self, config: AdapterConfig, sdk_config: SDKConfig) -> None:
        super().__init__(config, sdk_config)
        # The shared secret stays in the pool only: never logged or reported.
        self.settings.pop("remote_auth_key", None)
        # Validated in the section it runs in, as the validator checks a whole file (an adapter
        # loaded on its own into a running SDK gets the same rules).
        section = {
            "enabled": True,
            "mode": sdk_config.mode,
            "enable_distributed": sdk_config.enable_distributed,
            "adapters": [{"name": self.name, "config": dict(config.config)}],
        }
        #: The engines; those built after `pool.set_events(...)` (the SDK calls it when a
        #: distributed adapter gives a NATS URL) announce their blocks to peers.
        self.pool = EnginePool(section, source=f"adapters.{self.name}", name=self.name)
        #: The engines' settings, decided natively and redacted: `memory_bytes`, `chunk_size`
        #: (tokens per cached block; None: one KV block), `disk` and `redis` tiers, `events`.
        self.engine_settings: dict[str, Any] = self.pool.settings
        #: The engine for one KV geometry and namespace, built on first use.
        self.engine_for = self.pool.engine_for

    def start(self) -> None:
        self.pool.start()
        super().start()

    def stop(self) -> None:
        self.pool.stop()
        super().stop()

    def health(self) -> dict[str, Any]:
        disk, redis = self.engine_settings["disk"], self.engine_settings["redis"]
        return super().health() | {
            "capacity_bytes": self.engine_settings["memory_bytes"],
            "disk_path": None if disk is None else disk["path"],
            "remote": None if redis is None else redis["url"],
            "engines": [e.stats() for e in self.pool.engines()],
        }
