"""`XConnectorSDK`: the adapters, the router and the handlers of one worker, with a lifecycle.

Worker-facing calls (`handle_kv_receive`, `handle_kv_send`) never raise for a failure inside
XConnector: they return a miss saying why (`fallback_reason`), count it, and log it once per
kind, so the worker runs as if XConnector were not there. Lifecycle misuse (a call before
`initialize()` or after `shutdown()`) raises `StateError`: that is a bug in the integration.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from xconnector._native import Router
from xconnector.adapters import adapter_class
from xconnector.adapters.base import Adapter
from xconnector.adapters.dynamo import DynamoAdapter, default_worker_id
from xconnector.adapters.lmcache import LMCacheAdapter
from xconnector.adapters.vllm import VLLMAdapter
from xconnector.config.schema import AdapterConfig, SDKConfig
from xconnector.exceptions import (
    CacheError,
    ConfigError,
    InternalError,
    InvalidInputError,
    StateError,
)
from xconnector.sdk.handlers.distributed import DistributedHandler
from xconnector.sdk.handlers.kv_cache import KVCacheHandler, KVReceiveResult, KVSendResult
from xconnector.sdk.handlers.monitoring import MonitoringHandler

log = logging.getLogger("xconnector.sdk")

_T = TypeVar("_T")


def coerce_config(config: SDKConfig | Mapping[str, Any] | None) -> SDKConfig:
    """An SDK built in code is meant to be on: a dict without `enabled` means enabled (a config
    *file* must say `enabled:` explicitly, see the schema)."""
    if config is None:
        return SDKConfig(enabled=True)
    if isinstance(config, SDKConfig):
        return config
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be an SDKConfig or a dict, not {type(config).__name__}")
    data = dict(config)
    data.setdefault("enabled", True)
    return SDKConfig.from_dict(data, source="XConnectorSDK(config=...)")


# Why a worker-facing call fell back, by the error's class (the first match counts).
_REASONS: dict[type[BaseException], str] = {
    InvalidInputError: "invalid_input",
    InternalError: "internal_error",
    CacheError: "cache_error",
    ConfigError: "config_error",
}


class XConnectorSDK:
    """The SDK. `initialize()` loads the configured adapters (plus the `lmcache` cache and `vllm`
    inference adapters with defaults when none of that type is configured)."""

    def __init__(
        self,
        config: SDKConfig | Mapping[str, Any] | None = None,
        *,
        router: Router | None = None,
    ) -> None:
        self.config = coerce_config(config)
        self.router = router if router is not None else Router()
        self.adapters: dict[str, Adapter] = {}
        self.monitoring = MonitoringHandler(self._monitoring_sources, self._engines)
        self._kv: KVCacheHandler | None = None
        self._distributed: DistributedHandler | None = None
        self._state = "created"
        self._lock = threading.RLock()
        self._metrics_server: Any = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self._state == "initialized"

    @property
    def state(self) -> str:
        """`created`, `initialized` or `shutdown`."""
        return self._state

    def _require(self, what: str) -> None:
        if self._state == "created":
            raise StateError(
                f"XConnectorSDK.{what}() called before initialize(); call sdk.initialize() first "
                "(create_xconnector_sdk() returns an initialized SDK)"
            )
        if self._state == "shutdown":
            raise StateError(
                f"XConnectorSDK.{what}() called after shutdown(); create a new XConnectorSDK"
            )

    def initialize(self) -> bool:
        """Loads adapters and builds the handlers. Idempotent; raises `ConfigError` on a bad
        config (nothing stays loaded then)."""
        with self._lock:
            if self._state == "initialized":
                return True
            if self._state == "shutdown":
                raise StateError("XConnectorSDK.initialize() after shutdown(); create a new SDK")
            wanted = [a for a in self.config.adapters if a.enabled]
            types = {a.type for a in wanted}
            if "cache" not in types:
                wanted.append(AdapterConfig(name="lmcache"))
            if "inference" not in types:
                wanted.append(AdapterConfig(name="vllm"))
            try:
                self._load(wanted)
                self._build_handlers()
            except BaseException:
                self._stop_adapters()
                raise
            self._state = "initialized"
            self._serve_metrics()
            log.debug("initialized with adapters %s", list(self.adapters))
            return True

    def load_adapters(
        self, adapter_configs: Iterable[AdapterConfig | Mapping[str, Any]]
    ) -> list[Adapter]:
        """Loads more adapters into an initialized SDK. An adapter already loaded is a
        `ConfigError` (one adapter per name)."""
        with self._lock:
            self._require("load_adapters")
            configs = [
                a if isinstance(a, AdapterConfig) else AdapterConfig.from_dict(a)
                for a in adapter_configs
            ]
            loaded = self._load(configs)
            self._build_handlers()
            return loaded

    def _load(self, configs: list[AdapterConfig]) -> list[Adapter]:
        loaded: list[Adapter] = []
        for cfg in configs:
            if cfg.name in self.adapters or any(a.name == cfg.name for a in loaded):
                raise ConfigError(
                    f"adapter {cfg.name!r} is configured twice; each adapter is loaded once "
                    "(merge the two entries' settings)"
                )
        try:
            for cfg in configs:
                adapter = adapter_class(cfg.name)(cfg, self.config)
                adapter.start()
                self.router.add_adapter(cfg.name, cfg.type, cfg.priority)
                self.adapters[cfg.name] = adapter
                loaded.append(adapter)
        except BaseException:
            for adapter in loaded:
                adapter.stop()
                self.router.remove(adapter.name)
                self.adapters.pop(adapter.name, None)
            raise
        return loaded

    def _first(self, kind: str) -> Adapter | None:
        for name in self.router.order(kind):
            return self.adapters[name]
        return next((a for a in self.adapters.values() if a.type == kind), None)

    def _build_handlers(self) -> None:
        cache = self._first("cache")
        inference = self._first("inference")
        assert isinstance(cache, LMCacheAdapter) and isinstance(inference, VLLMAdapter)
        block_size = self.config.performance.block_size
        kv = self._kv
        if kv is None or kv.cache is not cache or kv.inference is not inference:
            # Keep the handler (and its engines) when loading adds only other adapters.
            kv = KVCacheHandler(cache, inference, block_size=block_size, monitoring=self.monitoring)
            self._kv = kv
        dynamo = self._first("distributed")
        worker = dynamo.worker_id if isinstance(dynamo, DynamoAdapter) else default_worker_id()
        current = self._distributed
        if self.config.enable_distributed and (current is None or current.worker_id != worker):
            self._distributed = DistributedHandler(worker, kv, block_size)
        if (
            self.config.enable_distributed
            and isinstance(dynamo, DynamoAdapter)
            and dynamo.nats_url
            and self._distributed is not None
        ):
            # This worker's engines publish its blocks; its handler follows everyone's.
            cache.events = (dynamo.nats_url, dynamo.kv_events_subject, worker)
            self._distributed.follow_events(dynamo.nats_url, dynamo.kv_events_subject)

    def _serve_metrics(self) -> None:
        """`performance.metrics_port`: XConnector's metrics on a port of their own (besides the
        collector a worker can register on its own /metrics). Fails open."""
        port = self.config.performance.metrics_port
        if not port or self._metrics_server is not None:
            return
        try:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry()
            registry.register(self.monitoring.collector())
            self._metrics_server, _ = start_http_server(port, registry=registry)
            log.info("XConnector metrics on :%d/metrics", port)
        except Exception as e:  # no prometheus_client, port taken: metrics only, never the worker
            log.error("XConnector metrics port %d not served: %s", port, e)

    def _stop_adapters(self) -> None:
        for name in reversed(list(self.adapters)):
            adapter = self.adapters.pop(name)
            self.router.remove(name)
            try:
                adapter.stop()
            except Exception:
                log.exception("adapter %s failed to stop", name)

    def shutdown(self) -> None:
        """Flushes and stops every adapter. Idempotent."""
        with self._lock:
            if self._state == "shutdown":
                return
            self._stop_adapters()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
                self._metrics_server = None
            self._kv = None
            if self._distributed is not None:
                self._distributed.stop_following()
            self._distributed = None
            self._state = "shutdown"

    # -- handlers ------------------------------------------------------------------------------

    def get_kv_handler(self) -> KVCacheHandler:
        self._require("get_kv_handler")
        assert self._kv is not None
        return self._kv

    def get_distributed_handler(self) -> DistributedHandler:
        self._require("get_distributed_handler")
        if self._distributed is None:
            raise ConfigError(
                "enable_distributed is false in this SDK's config, so it has no distributed handler"
            )
        return self._distributed

    def get_monitoring_handler(self) -> MonitoringHandler:
        return self.monitoring

    def get_adapter(self, name: str) -> Adapter | None:
        return self.adapters.get(name)

    def _engines(self) -> list[Any]:
        cache = self.adapters.get("lmcache")
        return cache.engines() if isinstance(cache, LMCacheAdapter) else []

    def _monitoring_sources(self) -> dict[str, Any]:
        return {
            "adapters": {n: a.health() for n, a in list(self.adapters.items())},
            "router": self.router.status(),
        }

    # -- worker-facing KV calls ----------------------------------------------------------------

    def _fallback(self, e: BaseException, kind: str) -> str:
        """Counts the fallback; logs a warning the first time for each reason."""
        reason = next((r for c, r in _REASONS.items() if isinstance(e, c)), "unexpected_error")
        first = self.monitoring.fallback(reason) == 1
        say = log.warning if first else log.debug
        say("XConnector %s fell back to the worker's path (%s): %s", kind, reason, e)
        return reason

    def cache_call(
        self, kind: str, fn: Callable[..., _T], *args: Any, **kwargs: Any
    ) -> tuple[_T | None, str | None]:
        """Runs `fn(*args, **kwargs)`, the cache operation `kind` (`receive`, `load`, ...), the
        way every worker-facing call fails open, v0 and v1 alike: skipped while the cache adapter
        backs off after failures; an error is counted, logged once per reason, reported to the
        router (which backs off when it is the target's fault, `Router.settle`) and never raised.
        Returns `(result, None)`, or `(None, why it fell back)`."""
        if self._state != "initialized":
            return None, "not_initialized"
        if not (self.config.enabled and self.config.enable_caching):
            return None, "caching_disabled"
        try:
            target = self.router.route("cache")
        except (CacheError, ConfigError):  # backing off after failures
            self.monitoring.fallback("cache_backoff")
            return None, "cache_backoff"
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            reason = self._fallback(e, kind)
            self.router.settle(target, reason)
            return None, reason
        self.router.settle(target)
        return result, None

    def handle_kv_receive_sync(
        self, model_executable: Any, model_input: Any, kv_caches: Any
    ) -> KVReceiveResult:
        """Serves a v0 batch's cached prefixes. Never raises for a failure inside XConnector."""
        self._require("handle_kv_receive")
        kv = self._kv
        assert kv is not None
        result, why = self.cache_call(
            "receive", kv.receive, model_executable, model_input, kv_caches
        )
        return result or KVReceiveResult(False, 0, 0, model_input, fallback_reason=why)

    def handle_kv_send_sync(
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Any,
        hidden_or_intermediate_states: Any = None,
    ) -> KVSendResult:
        """Stores what a v0 batch computed. Never raises for a failure inside XConnector."""
        self._require("handle_kv_send")
        kv = self._kv
        assert kv is not None
        result, why = self.cache_call(
            "send", kv.send, model_executable, model_input, kv_caches, hidden_or_intermediate_states
        )
        return result or KVSendResult(0, 0, fallback_reason=why)

    async def handle_kv_receive(
        self, model_executable: Any, model_input: Any, kv_caches: Any
    ) -> KVReceiveResult:
        """`handle_kv_receive_sync` off the event loop (the copies release the GIL)."""
        self._require("handle_kv_receive")
        return await asyncio.to_thread(
            self.handle_kv_receive_sync, model_executable, model_input, kv_caches
        )

    async def handle_kv_send(
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Any,
        hidden_or_intermediate_states: Any = None,
    ) -> KVSendResult:
        self._require("handle_kv_send")
        return await asyncio.to_thread(
            self.handle_kv_send_sync,
            model_executable,
            model_input,
            kv_caches,
            hidden_or_intermediate_states,
        )

    # -- async lifecycle and context managers -------------------------------------------------

    async def ainitialize(self) -> bool:
        return self.initialize()

    async def aload_adapters(
        self, adapter_configs: Iterable[AdapterConfig | Mapping[str, Any]]
    ) -> list[Adapter]:
        return self.load_adapters(adapter_configs)

    async def ashutdown(self) -> None:
        self.shutdown()

    def __enter__(self) -> XConnectorSDK:
        self.initialize()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    async def __aenter__(self) -> XConnectorSDK:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"XConnectorSDK(state={self._state!r}, adapters={list(self.adapters)})"
