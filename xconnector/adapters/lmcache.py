"""The cache adapter: XConnector's native engine, configured with the keys LMCache users know
(`chunk_size`, `local_cpu`, `max_local_cpu_size`, ...) and the design's (`storage_backend`,
`max_cache_size`).

Sizes: `max_cache_size` integers are MiB (the design's unit); `max_local_cpu_size` and
`max_local_disk_size` numbers are GB, as LMCache reads them; strings carry units everywhere.
"""

from __future__ import annotations

import os
import threading
from typing import Any, ClassVar

from xconnector._loader import load_native
from xconnector._native import Engine
from xconnector.adapters.base import Adapter
from xconnector.config.schema import AdapterConfig, SDKConfig
from xconnector.exceptions import ConfigError

DEFAULT_CAPACITY = 2 << 30
DEFAULT_DISK_CAPACITY = 20 << 30
DEFAULT_REDIS_TIMEOUT_MS = 20


def _redis_auth_key(s: dict[str, Any], where: str, *, has_url: bool) -> str | None:
    """The Redis values' shared secret, from `remote_auth_key` or the environment variable that
    `remote_auth_key_env` names. Errors name the setting or the variable, never the secret."""
    key: str | None = s.get("remote_auth_key")
    env: str | None = s.get("remote_auth_key_env")
    if key is None and env is None:
        return None
    setting = "remote_auth_key" if env is None else "remote_auth_key_env"
    if key is not None and env is not None:
        raise ConfigError(
            f"{where}: remote_auth_key and remote_auth_key_env both give the Redis auth key; "
            "keep one (remote_auth_key_env keeps the secret out of the config)"
        )
    if not has_url:
        raise ConfigError(
            f"{where}.{setting}: the auth key is for the Redis tier; set remote_url too"
        )
    if env is not None:
        key = os.environ.get(env)
        if key is None:
            raise ConfigError(
                f"{where}.remote_auth_key_env: the environment variable {env} is not set; set it "
                "to the shared secret in every worker's environment"
            )
        if not key:
            raise ConfigError(
                f"{where}.remote_auth_key_env: the environment variable {env} is empty; set it "
                "to the shared secret (a long random string)"
            )
    return key


class LMCacheAdapter(Adapter):
    name: ClassVar[str] = "lmcache"
    type: ClassVar[str] = "cache"

    def __init__(self, config: AdapterConfig, sdk_config: SDKConfig) -> None:
        super().__init__(config, sdk_config)
        s = self.settings
        where = f"adapters.{self.name}.config"
        backend = s.get("storage_backend", "memory")
        local_disk = s.get("local_disk")
        #: The shared Redis tier's URL (hybrid mode), or None.
        self.redis_url: str | None = s.get("remote_url")
        #: PEM of the CA behind a rediss:// server with a private certificate.
        self.redis_ca_file: str | None = s.get("remote_ca_file")
        if backend in ("redis", "hybrid") and not self.redis_url:
            raise ConfigError(
                f"{where}.storage_backend: {backend} needs remote_url, the Redis server "
                '(e.g. remote_url: "redis://:password@redis.internal:6379")'
            )
        if self.redis_url and sdk_config.mode != "hybrid":
            raise ConfigError(
                f"{where}.remote_url: a shared Redis tier is hybrid mode; set `mode: hybrid` "
                "in the xconnector section (or remove remote_url for embedded mode)"
            )
        if self.redis_url and not sdk_config.enable_distributed:
            raise ConfigError(
                f"{where}.remote_url: enable_distributed is false, which turns the shared tier "
                "off; remove remote_url or set enable_distributed: true"
            )
        #: The most a request waits on Redis (ms); past it Redis is a miss and its breaker opens.
        self.redis_timeout_ms: int = s.get("remote_timeout_ms", DEFAULT_REDIS_TIMEOUT_MS)
        # The shared secret of the values' MAC: kept private, never logged or reported.
        self._redis_auth_key = _redis_auth_key(s, where, has_url=bool(self.redis_url))
        s.pop("remote_auth_key", None)
        if backend in ("disk", "hybrid") and not local_disk:
            raise ConfigError(
                f"{where}.storage_backend: {backend} needs local_disk, the disk tier's "
                'directory (e.g. local_disk: "/var/cache/xconnector")'
            )
        if s.get("max_local_disk_size") is not None and not local_disk:
            raise ConfigError(f"{where}.max_local_disk_size: set local_disk too, or remove it")
        if s.get("local_disk_shared") and not local_disk:
            raise ConfigError(f"{where}.local_disk_shared: set local_disk too, or remove it")
        #: Several users' workers share the disk directory on purpose (group-writable).
        self.disk_shared = bool(s.get("local_disk_shared", False))
        #: The disk tier's directory (LMCache writes it as "file:///path"), or None.
        self.disk_path: str | None = None
        if local_disk:
            self.disk_path = str(local_disk).removeprefix("file://")
        native = load_native()
        self.disk_capacity_bytes = (
            native.config_setting_bytes(self.name, "max_local_disk_size", s["max_local_disk_size"])
            if s.get("max_local_disk_size") is not None
            else DEFAULT_DISK_CAPACITY
        )
        if s.get("local_cpu") is False:
            raise ConfigError(
                f"{where}.local_cpu: false leaves no tier to cache in; XConnector always keeps a "
                "memory tier, so remove local_cpu or set it to true"
            )
        if "max_cache_size" in s and "max_local_cpu_size" in s:
            raise ConfigError(
                f"{where}: max_cache_size and max_local_cpu_size both set the memory budget; "
                "keep one"
            )
        self.capacity_bytes = DEFAULT_CAPACITY
        for key in ("max_cache_size", "max_local_cpu_size"):
            if key in s:
                self.capacity_bytes = native.config_setting_bytes(self.name, key, s[key])
        #: Tokens per cached block; None: one KV block (vLLM's block size).
        self.chunk_size: int | None = s.get("chunk_size")
        #: (NATS URL, subject, worker id) to publish peer events to; set by the SDK from the
        #: distributed adapter.
        self.events: tuple[str, str, str] | None = None
        self._engines: dict[tuple[Any, ...], Engine] = {}
        self._lock = threading.Lock()

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
        chunk = self.chunk_size or kv_block_size
        if chunk % kv_block_size:
            raise ConfigError(
                f"adapters.{self.name}.config.chunk_size: {chunk} is not a multiple of vLLM's "
                f"block size {kv_block_size}; use {kv_block_size * max(1, chunk // kv_block_size)}"
            )
        per = chunk // kv_block_size
        ns = {
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
        key = (chunk, kv_block_bytes, *(str(v) for v in ns.values()))
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                if not self.started:
                    raise ConfigError(f"the {self.name} adapter is stopped")
                engine = Engine(
                    block_bytes=per * kv_block_bytes,
                    capacity_bytes=self.capacity_bytes,
                    block_size=chunk,
                    **ns,  # type: ignore[arg-type]
                    disk_path=self.disk_path,
                    disk_capacity_bytes=self.disk_capacity_bytes,
                    disk_shared=self.disk_shared,
                    redis_url=self.redis_url,
                    redis_ca_file=self.redis_ca_file,
                    redis_timeout=self.redis_timeout_ms / 1000,
                    redis_auth_key=self._redis_auth_key,
                    **self._events_kwargs(),
                )
                self._engines[key] = engine
            return engine

    def _events_kwargs(self) -> dict[str, Any]:
        if self.events is None:
            return {}
        url, subject, worker = self.events
        return {"events_url": url, "events_subject": subject, "worker_id": worker}

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
        out["remote"] = (
            None if self.redis_url is None else load_native().config_redact(self.redis_url)
        )
        out["engines"] = [e.stats() for e in self.engines()]
        return out
