"""The cache adapter: XConnector's native engine, configured with the keys LMCache users know
(`chunk_size`, `local_cpu`, `max_local_cpu_size`, ...) and the design's (`storage_backend`,
`max_cache_size`).

Sizes: `max_cache_size` integers are MiB (the design's unit); `max_local_cpu_size` and
`max_local_disk_size` numbers are GB, as LMCache reads them; strings carry units everywhere.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from xconnector._loader import load_native
from xconnector._native import Engine
from xconnector.adapters.base import Adapter
from xconnector.config.schema import AdapterConfig, SDKConfig
from xconnector.exceptions import ConfigError


class LMCacheAdapter(Adapter):
    """Holds the engines, one per KV geometry and namespace. What each engine is (budgets,
    tiers, chunk size) and every rule across these settings are decided by the native core."""

    name: ClassVar[str] = "lmcache"
    type: ClassVar[str] = "cache"

    def __init__(self, config: AdapterConfig, sdk_config: SDKConfig) -> None:
        super().__init__(config, sdk_config)
        # The shared secret stays in the private section only: never logged or reported.
        self._config = dict(config.config)
        self.settings.pop("remote_auth_key", None)
        #: (NATS URL, subject, worker id) to publish peer events to; set by the SDK from the
        #: distributed adapter.
        self.events: tuple[str, str, str] | None = None
        # Validated in the section it runs in, as the validator checks a whole file (an adapter
        # loaded on its own into a running SDK gets the same rules).
        #: The engine settings (memory budget, disk and Redis tiers), redacted.
        self.engine_settings: dict[str, Any] = load_native().config_engine_settings(
            self._section(), source=f"adapters.{self.name}"
        )
        self.capacity_bytes: int = self.engine_settings["memory_bytes"]
        #: Tokens per cached block; None: one KV block (vLLM's block size).
        self.chunk_size: int | None = self.engine_settings["chunk_size"]
        disk = self.engine_settings["disk"] or {}
        self.disk_path: str | None = disk.get("path")
        self.disk_capacity_bytes: int | None = disk.get("capacity_bytes")
        self._engines: dict[tuple[Any, ...], Engine] = {}
        self._lock = threading.Lock()

    def _section(self) -> dict[str, Any]:
        """This adapter's settings in its SDK's section, with the peer events the SDK gave it."""
        adapters: list[dict[str, Any]] = [{"name": self.name, "config": self._config}]
        if self.events is not None:
            url, subject, worker = self.events
            events = {"nats_url": url, "kv_events_subject": subject, "worker_id": worker}
            adapters.append({"name": "dynamo", "config": events})
        return {
            "enabled": True,
            "mode": self.sdk_config.mode,
            "enable_distributed": self.sdk_config.enable_distributed,
            "adapters": adapters,
        }

    def engine_for(
        self,
        *,
        kv_block_size: int,
        kv_block_bytes: int,
        model: str,
        dtype: str,
        kv_layout: str,
        tp_world_size: int = 1,
        tp_rank: int = 0,
        extra: dict[str, str] | None = None,
        revision: str = "",
        quantization: str = "",
        pp_world_size: int = 1,
        pp_rank: int = 0,
    ) -> Engine:
        """The engine for one KV geometry and namespace, created on first use."""
        ns: dict[str, Any] = {
            "model": model,
            "revision": revision,
            "dtype": dtype,
            "quantization": quantization,
            "kv_layout": kv_layout,
            "tp_world_size": tp_world_size,
            "tp_rank": tp_rank,
            "pp_world_size": pp_world_size,
            "pp_rank": pp_rank,
            "extra": extra,
        }
        key = (kv_block_size, kv_block_bytes, *(str(v) for v in ns.values()))
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                if not self.started:
                    raise ConfigError(f"the {self.name} adapter is stopped")
                engine = Engine.from_config(
                    self._section(),
                    kv_block_size=kv_block_size,
                    kv_block_bytes=kv_block_bytes,
                    **ns,
                )
                self._engines[key] = engine
            return engine

    def engines(self) -> list[Engine]:
        with self._lock:
            return list(self._engines.values())

    def stop(self) -> None:
        with self._lock:
            self._engines.clear()
        super().stop()

    def health(self) -> dict[str, Any]:
        out = super().health()
        out["capacity_bytes"] = self.capacity_bytes
        out["disk_path"] = self.disk_path
        redis = self.engine_settings["redis"]
        out["remote"] = None if redis is None else redis["url"]
        out["engines"] = [e.stats() for e in self.engines()]
        return out
