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
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

from xconnector._loader import load_native
from xconnector._native import Router
from xconnector.adapters import adapter_class
from xconnector.adapters.base import Adapter
from xconnector.adapters.dynamo import DynamoAdapter, default_worker_id
from xconnector.adapters.lmcache import LMCacheAdapter
from xconnector.adapters.vllm import VLLMAdapter
from xconnector.config.schema import AdapterConfig, SDKConfig
from xconnector.exceptions import ConfigError, StateError
from xconnector.sdk.handlers.distributed import DistributedHandler
from xconnector.sdk.handlers.kv_cache import KVCacheHandler, KVReceiveResult, KVSendResult
from xconnector.sdk.handlers.monitoring import MonitoringHandler

log = logging.getLogger("xconnector.sdk")

_T = TypeVar("_T")
_P = ParamSpec("_P")


def coerce_config(
    config: SDKConfig | Mapping[str, Any] | None, *, force: bool = False, **keys: Any
) -> SDKConfig:
    """`config` as an `SDKConfig`, with `keys` set (a different value already there is an error
    unless `force`). An SDK built in code is meant to be on: a dict without `enabled` means
    enabled (a config *file* must say `enabled:` explicitly, see the schema)."""
    if isinstance(config, SDKConfig):
        if not keys:
            return config
        config = config.to_dict()
    return SDKConfig.from_normalized(load_native().config_coerce(config, keys, force))


def _off_loop(fn: Callable[_P, _T]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    async def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    run.__doc__ = f"`{fn.__name__}` in a thread, off the event loop."
    return run


class XConnectorSDK:
    """The SDK. `initialize()` loads the configured adapters (plus the `lmcache` cache and `vllm`
    inference adapters with defaults when none of that type is configured)."""

    def __init__(
        self, config: SDKConfig | Mapping[str, Any] | None = None, *, router: Router | None = None
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
            self._load(self.config.adapters, initial=True)
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
            return self._load(adapter_configs)

    def _load(
        self, configs: Iterable[AdapterConfig | Mapping[str, Any]], initial: bool = False
    ) -> list[Adapter]:
        """Starts and registers the adapters the native rules pick from `configs`
        (`sdk_adapters_to_load`: with `initial`, the enabled ones plus defaults for the missing
        types; one adapter per name) and rebuilds the handlers over them; on any error, the
        adapters started here are stopped and unregistered again."""
        entries = [c.to_dict() if isinstance(c, AdapterConfig) else c for c in configs]
        plan = load_native().sdk_adapters_to_load(entries, list(self.adapters), initial)
        loaded: list[Adapter] = []
        try:
            for cfg in map(AdapterConfig.from_normalized, plan):
                adapter = adapter_class(cfg.name)(cfg, self.config)
                adapter.start()
                loaded.append(adapter)
                self.router.add_adapter(cfg.name, cfg.type, cfg.priority)
                self.adapters[cfg.name] = adapter
            self._build_handlers()
        except BaseException:
            self._stop_adapters(loaded)
            raise
        return loaded

    def _of_type(self, kind: str) -> Adapter | None:
        # One adapter per name, and each built-in adapter has its own type (`sdk_plan`).
        return next((a for a in self.adapters.values() if a.type == kind), None)

    def _build_handlers(self) -> None:
        cache, inference = self._of_type("cache"), self._of_type("inference")
        assert isinstance(cache, LMCacheAdapter) and isinstance(inference, VLLMAdapter)
        block_size = self.config.performance.block_size
        kv = self._kv
        if kv is None or kv.cache is not cache or kv.inference is not inference:
            # Keep the handler (and its engines) when loading adds only other adapters.
            kv = KVCacheHandler(cache, inference, block_size=block_size, monitoring=self.monitoring)
            self._kv = kv
        dynamo = self._of_type("distributed")
        worker = dynamo.worker_id if isinstance(dynamo, DynamoAdapter) else default_worker_id()
        if not self.config.enable_distributed:
            return
        if self._distributed is None or self._distributed.worker_id != worker:
            self._distributed = DistributedHandler(worker, kv, block_size)
        if isinstance(dynamo, DynamoAdapter) and dynamo.nats_url:
            # This worker's engines publish its blocks; its handler follows everyone's.
            cache.pool.set_events(dynamo.nats_url, dynamo.kv_events_subject, worker)
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

    def _stop_adapters(self, adapters: Iterable[Adapter] | None = None) -> None:
        """Stops and unregisters `adapters` (all by default), last loaded first."""
        for adapter in reversed(list(self.adapters.values() if adapters is None else adapters)):
            self.adapters.pop(adapter.name, None)
            self.router.remove(adapter.name)
            try:
                adapter.stop()
            except Exception:
                log.exception("adapter %s failed to stop", adapter.name)

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
            if self._distributed is not None:
                self._distributed.stop_following()
            self._kv = self._distributed = None
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
        return cache.pool.engines() if isinstance(cache, LMCacheAdapter) else []

    def _monitoring_sources(self) -> dict[str, Any]:
        return {
            "adapters": {n: a.health() for n, a in list(self.adapters.items())},
            "router": self.router.status(),
        }

    # -- worker-facing KV calls ----------------------------------------------------------------

    def cache_call(
        self, kind: str, fn: Callable[..., _T], *args: Any, **kwargs: Any
    ) -> tuple[_T | None, str | None]:
        """Runs `fn(*args, **kwargs)`, the cache operation `kind` (`receive`, `load`, ...), the
        way every worker-facing call fails open, v0 and v1 alike (native `fail_open_call`):
        skipped while the cache adapter backs off after failures; an error is counted, logged
        once per reason, reported to the router and never raised. Returns `(result, None)`, or
        `(None, why it fell back)`."""
        if self._state != "initialized":
            return None, "not_initialized"
        if not (self.config.enabled and self.config.enable_caching):
            return None, "caching_disabled"
        call = load_native().fail_open_call
        return call(self.router, self.monitoring.stats, kind, fn, *args, **kwargs)  # type: ignore[no-any-return]

    def handle_kv_receive_sync(
        self, model_executable: Any, model_input: Any, kv_caches: Any
    ) -> KVReceiveResult:
        """Serves a v0 batch's cached prefixes. Never raises for a failure inside XConnector."""
        self._require("handle_kv_receive")
        assert self._kv is not None
        args = (model_executable, model_input, kv_caches)
        result, why = self.cache_call("receive", self._kv.receive, *args)
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
        assert self._kv is not None
        args = (model_executable, model_input, kv_caches, hidden_or_intermediate_states)
        result, why = self.cache_call("send", self._kv.send, *args)
        return result or KVSendResult(0, 0, fallback_reason=why)

    # Async forms, in a thread off the event loop (initializing may wait on disk or Redis; the
    # KV copies release the GIL).
    handle_kv_receive = _off_loop(handle_kv_receive_sync)
    handle_kv_send = _off_loop(handle_kv_send_sync)
    ainitialize = _off_loop(initialize)
    aload_adapters = _off_loop(load_adapters)
    ashutdown = _off_loop(shutdown)

    def __enter__(self) -> XConnectorSDK:
        self.initialize()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    async def __aenter__(self) -> XConnectorSDK:
        await self.ainitialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.ashutdown()

    def __repr__(self) -> str:
        return f"XConnectorSDK(state={self._state!r}, adapters={list(self.adapters)})"
