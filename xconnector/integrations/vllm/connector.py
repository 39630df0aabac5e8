"""`XConnectorV1`: XConnector as a vLLM v1 KV connector (`KVConnectorBase_V1`, vLLM 0.32).

    --kv-transfer-config '{"kv_connector": "XConnectorV1",
                           "kv_connector_module_path": "xconnector.integrations.vllm.connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"xconnector": {...}}}'

`kv_connector_extra_config` carries the XConnector section inline (`"xconnector": {...}`), or a
path to a YAML file (`"xconnector": "/etc/xconnector.yaml"`); without either, the usual discovery
(`XCONNECTOR_CONFIG`, `DYNAMO_SERVICE_CONFIG`, ...) applies, and with nothing found the connector
runs with defaults: naming it is opting in.

Scheduler side: `get_num_new_matched_tokens` looks the prompt up (no side effects on the cache,
cheap, at most the last whole block before the final prompt token); `update_state_after_alloc`
plans the load into the blocks vLLM allocated; `build_connector_meta` hands the worker the
step's loads and the saves of prompts whose prefill completes in this step. Worker side: loads
run in `start_load_kv` (synchronously, before the forward pass), saves in `wait_for_save` (after
it), straight between vLLM's paged KV tensors and the engine. A load that fails or comes up short
is reported through `get_block_ids_with_load_errors`, so vLLM recomputes those blocks (set
`kv_load_failure_policy: recompute`). Stores are best effort (`requires_kv_delivery` is False).

With tensor parallelism > 1 the scheduler runs in another process than the workers: it asks
every rank over a Unix socket (`lookup_service`) and uses the smallest answer.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from xconnector.integrations.vllm.lookup_service import LookupClient, LookupServer, socket_path
from xconnector.sdk.config import SDKConfig
from xconnector.sdk.exceptions import ConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from xconnector._native import Engine
    from xconnector.adapters.vllm import KvIO
    from xconnector.sdk.xconnector_sdk import XConnectorSDK

log = logging.getLogger("xconnector.vllm")

# Same-process sharing (tensor parallel size 1: scheduler and worker in one process):
# vLLM's engine id -> the worker's engine.
_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


@dataclass
class Transfer:
    """Blocks of one request to load or save: `tokens` cover exactly `block_ids` (whole KV
    blocks); KV blocks before `first_block` are not loaded (vLLM holds them already)."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    first_block: int = 0
    lora_name: str | None = None
    cache_salt: str | None = None

    def extras(self) -> dict[str, str | None]:
        return {"lora_name": self.lora_name, "cache_salt": self.cache_salt}


@dataclass
class XConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class _Tracked:
    tokens: list[int]
    block_ids: list[int]
    lora_name: str | None
    cache_salt: str | None
    saved: bool = False


def load_config(extra: dict[str, Any]) -> SDKConfig:
    """The XConnector config from `kv_connector_extra_config`, else from discovery, else the
    defaults (enabled: the user named this connector)."""
    section = extra.get("xconnector")
    if isinstance(section, str):
        return SDKConfig.from_yaml(section)
    if isinstance(section, dict):
        return SDKConfig.from_dict(
            {"enabled": True, **section}, source="kv_connector_extra_config.xconnector"
        )
    if section is not None:
        raise ConfigError(
            "kv_connector_extra_config.xconnector must be the XConnector section (a mapping) "
            f"or the path of a YAML file, not {type(section).__name__}"
        )
    from xconnector.integrations.dynamo.config_detector import detect_config

    found = detect_config()
    return found.config if found.found else SDKConfig(enabled=True)


class XConnectorV1(KVConnectorBase_V1):  # type: ignore[misc]
    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: Any = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._vllm_config = vllm_config
        self._block_size: int = vllm_config.cache_config.block_size
        self._engine_id: str = str(self._kv_transfer_config.engine_id)
        self._tp: int = int(vllm_config.parallel_config.tensor_parallel_size)
        self._config: SDKConfig | None = None
        try:
            if _kill_switch():
                raise _Disabled
            config = load_config(dict(self._kv_transfer_config.kv_connector_extra_config))
            self._config = config if config.enabled and config.enable_caching else None
        except _Disabled:
            log.info("XConnector is off (XCONNECTOR_DISABLE/XCONNECTOR_ENABLED): plain vLLM")
        except ConfigError as e:
            if _strict(extra=self._kv_transfer_config.kv_connector_extra_config):
                raise
            log.error("XConnector is off, vLLM runs without it: %s", e)
        # Tokens per engine block: LMCache's chunk_size, else vLLM's block size.
        chunk = None
        if self._config is not None:
            cache = self._config.adapter("lmcache")
            chunk = cache.config.get("chunk_size") if cache is not None else None
        self._engine_block = int(chunk or self._block_size)
        # Scheduler side.
        self._tracked: dict[str, _Tracked] = {}
        self._pending_loads: dict[str, Transfer] = {}
        self._local_hits: dict[str, int] = {}
        # (lora name, cache salt) per request, recorded at lookup: NewRequestData has no salt,
        # and a block stored under the wrong salt would be served across tenants.
        self._req_extras: dict[str, tuple[str | None, str | None]] = {}
        self._client: LookupClient | None = None
        # Worker side.
        self._sdk: XConnectorSDK | None = None
        self._io: KvIO | None = None
        self._engine: Engine | None = None
        self._server: LookupServer | None = None
        self._load_errors: set[int] = set()
        self._logged: set[str] = set()

    # -- common ---------------------------------------------------------------------------------

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a later miss, nothing more

    def _fail(self, kind: str, e: BaseException) -> None:
        if self._sdk is not None:
            self._sdk.get_monitoring_handler().fallback(f"v1_{kind}")
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("XConnector %s failed, vLLM goes on without it: %s", kind, e)

    # -- scheduler side -------------------------------------------------------------------------

    def _lookup(self, tokens: list[int], lora: str | None, salt: str | None) -> int:
        engine = _engines.get(self._engine_id)
        if engine is not None:
            return int(engine.lookup(tokens, lora_name=lora, cache_salt=salt))
        if self._client is None:
            self._client = LookupClient([socket_path(self._engine_id, r) for r in range(self._tp)])
        return self._client.lookup(tokens, lora, salt)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if self._config is None:
            return 0, False
        try:
            tokens = list(request.prompt_token_ids or [])
            if len(tokens) < 2:
                return 0, False
            lora, salt = _extras(request)
            self._req_extras[request.request_id] = (lora, salt)
            hit = self._lookup(tokens, lora, salt)
            ebs = self._engine_block
            usable = min(hit, (len(tokens) - 1) // ebs * ebs)
            # Remember the local hit this answer was relative to, for update_state_after_alloc.
            self._local_hits[request.request_id] = num_computed_tokens
            return max(0, usable - num_computed_tokens), False
        except Exception as e:
            self._fail("lookup", e)
            return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            self._pending_loads.pop(request.request_id, None)
            return
        bs = self._block_size
        local = self._local_hits.get(request.request_id, 0)
        total = local + num_external_tokens
        lora, salt = _extras(request)
        block_ids = list(blocks.get_block_ids()[0])
        self._pending_loads[request.request_id] = Transfer(
            req_id=request.request_id,
            tokens=list(request.prompt_token_ids or [])[:total],
            block_ids=block_ids[: total // bs],
            first_block=local // bs,
            lora_name=lora,
            cache_salt=salt,
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = XConnectorMetadata()
        if self._config is None:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id not in self._req_extras:
                continue  # never looked up (nothing to load); its salt is unknown: not saved
            lora, salt = self._req_extras[new.req_id]
            self._tracked[new.req_id] = _Tracked(
                tokens=list(new.prompt_token_ids or []),
                block_ids=list(new.block_ids[0]) if new.block_ids else [],
                lora_name=lora,
                cache_salt=salt,
            )
            self._plan(new.req_id, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                tracked.block_ids.extend(new_ids[0])
            self._plan(req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta)
        return meta

    def _plan(self, req_id: str, computed_after_step: int, meta: XConnectorMetadata) -> None:
        load = self._pending_loads.pop(req_id, None)
        if load is not None:
            meta.loads.append(load)
        tracked = self._tracked[req_id]
        if tracked.saved or computed_after_step < len(tracked.tokens):
            return
        # The prefill completes in this step: save its whole engine blocks after the forward pass.
        tracked.saved = True
        full = len(tracked.tokens) // self._engine_block * self._engine_block
        if full and len(tracked.block_ids) >= full // self._block_size:
            meta.saves.append(
                Transfer(
                    req_id=req_id,
                    tokens=tracked.tokens[:full],
                    block_ids=tracked.block_ids[: full // self._block_size],
                    lora_name=tracked.lora_name,
                    cache_salt=tracked.cache_salt,
                )
            )

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._tracked.pop(rid, None)
        self._pending_loads.pop(rid, None)
        self._local_hits.pop(rid, None)
        self._req_extras.pop(rid, None)
        return False, None

    # -- worker side ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if self._config is None:
            return
        try:
            from xconnector.sdk.xconnector_sdk import XConnectorSDK

            sdk = XConnectorSDK(self._config)
            sdk.initialize()
            self._sdk = sdk
            rank = _tp_rank()
            model = self._vllm_config.model_config
            first = next(iter(kv_caches.values()))
            namespace = {
                "model": str(model.model),
                "dtype": str(first.dtype).removeprefix("torch."),
                "tp_world_size": self._tp,
                "tp_rank": rank,
                "extra": {"kv_shape": f"{len(kv_caches)}x{'x'.join(map(str, first.shape))}"},
            }
            io, engine = sdk.get_kv_handler().bind(
                kv_caches, namespace=namespace, block_size=self._block_size
            )
            self._io, self._engine = io, engine
            with _engines_lock:
                _engines[self._engine_id] = engine
            self._server = LookupServer(
                socket_path(self._engine_id, rank),
                lambda toks, lora, salt: engine.lookup(toks, lora_name=lora, cache_salt=salt),
            )
            log.info(
                "XConnector: %d layers of %s KV, %d bytes per block, rank %d",
                len(kv_caches),
                io.layout,
                io.block_bytes,
                rank,
            )
        except Exception as e:
            self._io = self._engine = None
            self._fail("register_kv_caches", e)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, XConnectorMetadata):
            return
        for t in meta.loads:
            loaded = 0
            try:
                if self._io is not None and self._engine is not None:
                    loaded = self._io.load(
                        self._engine, t.tokens, t.block_ids, t.first_block, **t.extras()
                    )
            except Exception as e:
                self._fail("load", e)
            if loaded < len(t.tokens):
                # Evicted since the lookup, or failed: vLLM recomputes these blocks.
                start = max(loaded // self._block_size, t.first_block)
                self._load_errors.update(t.block_ids[start:])
            if self._sdk is not None:
                self._sdk.get_monitoring_handler().count("v1_loaded_tokens", loaded)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # every layer of a block is saved at once in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, XConnectorMetadata) or self._io is None or self._engine is None:
            return
        for t in meta.saves:
            try:
                stored = self._io.store(self._engine, t.tokens, t.block_ids, **t.extras())
                if self._sdk is not None:
                    self._sdk.get_monitoring_handler().count("v1_stored_blocks", stored)
            except Exception as e:
                self._fail("save", e)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._client is not None:
            self._client.close()
        with _engines_lock:
            if self._engine is not None and _engines.get(self._engine_id) is self._engine:
                del _engines[self._engine_id]
        if self._sdk is not None:
            self._sdk.shutdown()

    # -- for tests and tools ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {} if self._sdk is None else self._sdk.get_monitoring_handler().snapshot()


class _Disabled(Exception):
    pass


def _kill_switch() -> bool:
    import os

    disable = os.environ.get("XCONNECTOR_DISABLE", "").strip().lower() in ("1", "true")
    enabled = os.environ.get("XCONNECTOR_ENABLED", "").strip().lower() not in ("0", "false")
    return disable or not enabled


def _extras(request: Any) -> tuple[str | None, str | None]:
    lora = getattr(request, "lora_request", None)
    return (lora.lora_name if lora is not None else None), getattr(request, "cache_salt", None)


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # not initialized: a single process
        return 0


def _strict(extra: dict[str, Any]) -> bool:
    import os

    section = extra.get("xconnector")
    strict_cfg = isinstance(section, dict) and bool(section.get("integration", {}).get("strict"))
    return strict_cfg or os.environ.get("XCONNECTOR_STRICT", "").strip().lower() in ("1", "true")
