"""`XConnectorV1`: XConnector as a vLLM v1 KV connector (`KVConnectorBase_V1`, vLLM 0.32).
Usage, keys and KV events: `integrations/vllm/README.md`.

Scheduler side: `get_num_new_matched_tokens` looks the prompt up (side-effect free, never the
block of the last prompt token); the native `TransferPlanner` plans each step's loads into the
blocks vLLM allocated and the saves of prompts whose prefill is complete. Worker side: loads run
in `start_load_kv`, saves in `wait_for_save`, straight between vLLM's paged KV and the engine.

Never keeping wrong KV: a load that fails or comes up short is reported through
`get_block_ids_with_load_errors` (vLLM recomputes those blocks). Whatever is computed on top of
a load (on any rank, or by another request sharing the blocks through vLLM's prefix cache) is
saved only once the workers confirmed that load's step (`build_connector_worker_meta` ->
`update_connector_output`), or, with one worker, in the load's own step if none of its loads
failed; after a failure, only once vLLM has recomputed the prompt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_events import BlockStored
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from xconnector import switches
from xconnector._loader import load_native
from xconnector.adapters.vllm import key_tokens, lora_identity, vllm_namespace
from xconnector.config.discovery import check_this_machine
from xconnector.config.schema import SDKConfig
from xconnector.exceptions import ConfigError
from xconnector.integrations.vllm import lookup_service
from xconnector.integrations.vllm.kv_events import (
    RankAgreement,
    XConnectorKVEvents,
    events_for_vllm,
    vllm_names,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from xconnector._native import Engine, LookupClient, LookupServer, TransferPlanner
    from xconnector.adapters.vllm import KvIO
    from xconnector.sdk.xconnector_sdk import XConnectorSDK

log = logging.getLogger("xconnector.vllm")

#: Steps after which loads the workers never confirmed mean they never will: loads are turned off.
_UNCONFIRMED_STEPS = 256
#: Block changes a worker holds between two steps, and events the scheduler holds between two
#: publications, for vLLM's KV events; past these they are dropped (counted).
_EVENT_BLOCKS = 65536
_EVENTS_WAITING = 65536
#: Steps after which a worker whose events vLLM never took stops recording them.
_UNDRAINED_STEPS = 16


def _share_vllms_log_output() -> None:
    """XConnector's records go where vLLM's go (vLLM's handlers and level), unless the host set
    up logging for `xconnector` or the root logger itself: in a vLLM worker nothing else would
    show them, and an operator must be able to see the cache working."""
    ours = logging.getLogger("xconnector")
    if ours.handlers or logging.getLogger().handlers:
        return
    theirs = logging.getLogger("vllm")
    for handler in theirs.handlers:
        ours.addHandler(handler)
    if theirs.handlers and ours.level == logging.NOTSET:
        ours.setLevel(theirs.getEffectiveLevel())


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
    #: `lora_name`, `cache_salt`, `lora_id`: what besides the tokens keys the blocks.
    extras: dict[str, Any] = field(default_factory=dict)
    #: vLLM's names (block hashes, as its KV events carry them) of the blocks of `tokens`, for
    #: XConnector's KV events; None when vLLM has none at this block size.
    names: list[Any] | None = None
    first_block: int = 0
    #: A save planned in the step of a load it depends on (one worker only): done only if no
    #: load of that step failed.
    if_loads_ok: bool = False


@dataclass
class XConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    step: int = 0
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class XConnectorWorkerMetadata(KVConnectorWorkerMetadata):  # type: ignore[misc]
    """What the workers report after a step with loads: that the step ran, and which requests'
    loads failed on any rank."""

    steps: set[int] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, XConnectorWorkerMetadata):
            return XConnectorWorkerMetadata(self.steps | other.steps, self.failed | other.failed)
        return self


@dataclass
class _Key:
    """What a request's blocks are keyed by, fixed at its lookup."""

    tokens: list[int]
    extras: dict[str, Any]
    names: list[Any] | None = None

    def transfer(self, req_id: str, end: int, block_ids: list[int], named: int, **kw: Any) -> Any:
        names = self.names[:named] if self.names is not None else None
        return Transfer(req_id, self.tokens[:end], block_ids, self.extras, names, **kw)


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
    from xconnector.config.discovery import detect_config

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
        _share_vllms_log_output()
        self._vllm_config = vllm_config
        self._block_size: int = vllm_config.cache_config.block_size
        self._engine_id: str = str(self._kv_transfer_config.engine_id)
        self._tp: int = int(vllm_config.parallel_config.tensor_parallel_size)
        self._pp: int = int(vllm_config.parallel_config.pipeline_parallel_size)
        self._config: SDKConfig | None = None
        extra = dict(self._kv_transfer_config.kv_connector_extra_config)
        if switches.disabled():
            log.info("XConnector is off (XCONNECTOR_DISABLE/XCONNECTOR_ENABLED): plain vLLM")
        else:
            strict = switches.strict(section=extra.get("xconnector"))
            try:
                config = load_config(extra)
                self._config = config if config.enabled and config.enable_caching else None
                # The engine's process: what only this machine can tell, once, before serving.
                strict = strict or config.integration.strict
                if self._config is not None and not check_this_machine(
                    self._config.to_dict(), strict=strict
                ):
                    self._config = None
            except Exception as e:  # a bad config, or a broken install: never vLLM's failure
                if strict or getattr(e, "strict", False):
                    raise
                log.error("XConnector is off, vLLM runs without it: %s", e)
        # Tokens per engine block: LMCache's chunk_size, else vLLM's block size.
        chunk = None
        if self._config is not None:
            cache = self._config.adapter("lmcache")
            chunk = cache.config.get("chunk_size") if cache is not None else None
        self._engine_block = int(chunk or self._block_size)
        self._encoder_decoder = bool(getattr(vllm_config.model_config, "is_encoder_decoder", False))
        # vLLM publishes KV events (and `dynamo.vllm` relays them to Dynamo's router): report
        # what XConnector holds with them.
        # `"report_kv_events": false` in kv_connector_extra_config keeps XConnector out of them.
        events_config = getattr(vllm_config, "kv_events_config", None)
        self._report_events = (
            self._config is not None
            and bool(getattr(events_config, "enable_kv_cache_events", False))
            and extra.get("report_kv_events", True) is not False
        )
        # vLLM's names of the blocks XConnector reports (native `VllmBlockNames`).
        self._names: Any = load_native().VllmBlockNames() if self._report_events else None
        self._events: list[KVCacheEvent] = []
        self._events_dropped = 0
        # Scheduler side.
        # Keys per request, recorded at lookup: NewRequestData has no salt, and a block stored
        # under the wrong salt would be served across tenants.
        self._keys: dict[str, _Key] = {}
        self._world = self._tp * int(vllm_config.parallel_config.pipeline_parallel_size)
        self._agreement = RankAgreement(self._world)
        # What to load and save each step, and when a save must wait for the workers to confirm
        # a load (`xconnector_core::transfer_plan`); None when XConnector is off.
        self._planner: TransferPlanner | None = None
        if self._config is not None:
            try:
                self._planner = load_native().TransferPlanner(
                    self._block_size, self._engine_block, self._world, _UNCONFIRMED_STEPS
                )
            except Exception as e:
                self._config = None
                log.error("XConnector is off, vLLM runs without it: %s", e)
        self._skipped: dict[str, int] = {}
        self._client: LookupClient | None = None
        # Worker side.
        self._sdk: XConnectorSDK | None = None
        self._io: KvIO | None = None
        self._engine: Engine | None = None
        self._server: LookupServer | None = None
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._loaded_steps: set[int] = set()
        self._failed_steps: set[int] = set()
        self._steps_undrained = 0
        self._logged: set[str] = set()

    # -- common ---------------------------------------------------------------------------------

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a later miss, nothing more

    def _once(self, kind: str) -> bool:
        """True the first time `kind` happens: what a log line is said for."""
        seen = kind in self._logged
        self._logged.add(kind)
        return not seen

    def _count(self, name: str, n: int = 1) -> None:
        try:
            if self._sdk is not None:
                self._sdk.get_monitoring_handler().count(name, n)
        except Exception as e:  # bookkeeping: never vLLM's failure
            self._fail("metrics", e)

    def _step_wait(self, op: str, started: float) -> None:
        """A step with loads (saves) waited since `started` for them: the step-time histogram."""
        try:
            if self._sdk is not None:
                self._sdk.get_monitoring_handler().step_wait(op, time.perf_counter() - started)
        except Exception as e:  # bookkeeping: never vLLM's failure
            self._fail("metrics", e)

    def _fail(self, kind: str, e: BaseException) -> None:
        with contextlib.suppress(Exception):  # counting it must not fail in turn
            if self._sdk is not None:
                self._sdk.get_monitoring_handler().fallback(f"v1_{kind}")
        if self._once(kind):
            log.warning("XConnector %s failed, vLLM goes on without it: %s", kind, e)

    # -- scheduler side -------------------------------------------------------------------------

    def _lookup(self, key: _Key) -> int:
        engine = _engines.get(self._engine_id)
        if engine is not None:
            return int(engine.lookup(key.tokens, **key.extras))
        if self._client is None:
            # Every (tensor, pipeline) rank holds its own part of each block: ask them all.
            self._client = lookup_service.client(self._engine_id, self._tp * self._pp)
        return self._client.lookup(key.tokens, **key.extras)

    def _key(self, request: Request) -> _Key | None:
        """The request's key, or None (counted) when its KV cannot be keyed safely."""
        reason = None
        if self._encoder_decoder:
            reason = "encoder_decoder"
        elif getattr(request, "prompt_embeds", None) is not None:
            reason = "prompt_embeds"
        if reason is not None:
            self._skipped[reason] = self._skipped.get(reason, 0) + 1
            if self._once(reason):
                log.info("XConnector does not cache requests with %s", reason.replace("_", " "))
            return None
        tokens = key_tokens(request.prompt_token_ids or [], getattr(request, "mm_features", None))
        lora = getattr(request, "lora_request", None)
        extras = {
            "lora_name": lora.lora_name if lora is not None else None,
            "cache_salt": getattr(request, "cache_salt", None),
            "lora_id": lora_identity(lora) if lora is not None else None,
        }
        names = vllm_names(request, self._block_size) if self._report_events else None
        return _Key(tokens, extras, names)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        planner = self._planner
        if planner is None or planner.loads_off:
            return 0, False
        try:
            rid = request.request_id
            key = self._keys.get(rid) or self._key(request)
            if key is None or len(key.tokens) < 2:
                return 0, False
            self._keys[rid] = key
            hit = self._lookup(key)
            usable = load_native().usable_prefix(hit, len(key.tokens), self._engine_block)
            # Remember the local hit this answer was relative to, for update_state_after_alloc.
            planner.note_lookup(rid, num_computed_tokens)
            return max(0, usable - num_computed_tokens), False
        except Exception as e:
            self._fail("lookup", e)
            return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        rid, planner = request.request_id, self._planner
        if planner is None:
            return
        if num_external_tokens <= 0 or self._keys.get(rid) is None:
            planner.plan_load(rid, 0, [])  # nothing to load: drops a load planned before
            return
        planner.plan_load(rid, num_external_tokens, blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        planner = self._planner
        if planner is None:
            return XConnectorMetadata()
        step, unconfirmed = planner.begin_step()
        meta = XConnectorMetadata(step=step)
        if unconfirmed is not None:
            # The workers never report back (a vLLM without the worker-metadata channel):
            # nothing that depends on a load could ever be saved, so loads stop instead.
            log.error(
                "XConnector: the workers have not confirmed loads of %d steps ago (does this "
                "vLLM call build_connector_worker_meta?); loads are off, saves go on",
                unconfirmed,
            )
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            key = self._keys.get(new.req_id)
            if key is None:
                continue  # never looked up, or not cacheable: its key is unknown, not saved
            computed = new.num_computed_tokens + scheduled.get(new.req_id, 0)
            block_ids = new.block_ids[0] if new.block_ids else []
            planned = planner.schedule_new(new.req_id, len(key.tokens), block_ids, computed)
            self._add_transfers(meta, key, *planned)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            key = self._keys.get(req_id)
            if key is None:
                continue  # not tracked: the planner plans nothing for it
            new_ids = cached.new_block_ids[i]
            computed = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            resumed = req_id in cached.resumed_req_ids  # its new blocks replace its old ones
            planned = planner.schedule_cached(
                req_id, new_ids[0] if new_ids else None, resumed, computed
            )
            self._add_transfers(meta, key, *planned)
        return meta

    def _add_transfers(
        self,
        meta: XConnectorMetadata,
        key: _Key,
        load: tuple[str, int, list[int], int] | None,
        save: tuple[str, int, list[int], bool] | None,
    ) -> None:
        """The planner's load and save of one request, with its key up to the planned end."""
        if load is not None:
            rid, end, ids, first = load
            meta.loads.append(
                key.transfer(rid, end, ids, end // self._block_size, first_block=first)
            )
        if save is not None:
            rid, end, ids, ok = save
            meta.saves.append(key.transfer(rid, end, ids, len(ids), if_loads_ok=ok))

    def update_connector_output(self, connector_output: Any) -> None:
        events = getattr(connector_output, "kv_cache_events", None)
        if isinstance(events, XConnectorKVEvents):
            self._collect_events(events)
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(meta, XConnectorWorkerMetadata):
            return
        if self._planner is not None:
            # Confirmed steps; failed requests (a failed load, or a skipped conditional save):
            # vLLM recomputes from the first failed block, and the prompt is saved once that is
            # done, never before.
            self._planner.confirm(sorted(meta.steps), sorted(meta.failed))

    def _collect_events(self, events: XConnectorKVEvents) -> None:
        """What the workers reported this step, as the router should see it, for `take_events`.
        Removals are always kept (each names a block the router was told of, so they are
        bounded by what the tiers hold); stores past `_EVENTS_WAITING` are dropped, counted."""
        try:
            batches = events.batches()
            if len(batches) != self._world:
                # A rank reported nothing (its XConnector is off): no block is held by all.
                self._events_dropped += sum(len(b) for b in batches)
                return
            for event in self._agreement.merge(batches):
                if isinstance(event, BlockStored) and len(self._events) >= _EVENTS_WAITING:
                    self._events_dropped += 1
                    if self._once("events_dropped"):
                        log.warning("XConnector: KV events are not being published; dropping")
                    continue
                self._events.append(event)
        except Exception as e:
            self._fail("kv_events", e)

    def take_events(self) -> Iterable[KVCacheEvent]:
        events, self._events = self._events, []
        return events

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        if self._planner is not None:
            self._planner.finished(rid)
        self._keys.pop(rid, None)
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
            rank, pp_rank = _parallel_ranks()
            vllm_adapter = self._config.adapter("vllm")
            namespace = vllm_namespace(
                self._vllm_config,
                list(kv_caches.values()),
                tp_rank=rank,
                pp_rank=pp_rank,
                model_id=vllm_adapter.config.get("model_id") if vllm_adapter else None,
            )
            io, engine = sdk.get_kv_handler().bind(
                kv_caches, namespace=namespace, block_size=self._block_size
            )
            if self._report_events:
                engine.enable_block_events(_EVENT_BLOCKS)
            self._io, self._engine = io, engine
            with _engines_lock:
                _engines[self._engine_id] = engine
            # Off (logged) if its socket is refused: this worker still loads and saves.
            self._server = lookup_service.serve(engine, self._engine_id, pp_rank * self._tp + rank)
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
        meta, io, engine, sdk = self._get_connector_metadata(), self._io, self._engine, self._sdk
        if not isinstance(meta, XConnectorMetadata) or not meta.loads:
            return
        started = time.perf_counter()
        for t in meta.loads:
            self._name_blocks(t)
            loaded = 0
            if io is not None and engine is not None and sdk is not None:
                args = (io.load, engine, t.tokens, t.block_ids)
                done, _ = sdk.cache_call("load", *args, first_block=t.first_block, **t.extras)
                loaded = done or 0
            if loaded < len(t.tokens):
                # Evicted since the lookup, refused (not this block's KV) or failed: vLLM
                # recomputes these blocks, and the scheduler saves nothing of this request
                # until it has.
                start = max(loaded // self._block_size, t.first_block)
                self._load_errors.update(t.block_ids[start:])
                self._failed_reqs.add(t.req_id)
                self._failed_steps.add(meta.step)
                self._count("load_failures")
            self._count("loads")
            self._count("loaded_tokens", max(0, loaded - t.first_block * self._block_size))
        self._loaded_steps.add(meta.step)
        self._step_wait("load", started)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # every layer of a block is saved at once in wait_for_save

    def wait_for_save(self) -> None:
        if self._report_events and self._engine is not None:
            self._steps_undrained += 1
            if self._steps_undrained > _UNDRAINED_STEPS:
                # vLLM does not ask this connector for its events (it runs under vLLM's
                # MultiConnector, which does not pass them up): stop recording them.
                self._report_events = False
                self._engine.take_block_events()
                log.info("XConnector: vLLM does not take this connector's KV events; not reported")
        meta = self._get_connector_metadata()
        io, engine, sdk = self._io, self._engine, self._sdk
        if not isinstance(meta, XConnectorMetadata) or io is None or engine is None or sdk is None:
            return
        started = time.perf_counter()
        for t in meta.saves:
            if t.if_loads_ok and meta.step in self._failed_steps:
                self._failed_reqs.add(t.req_id)  # computed over a failed load: not kept
                continue
            self._name_blocks(t)
            stored, _ = sdk.cache_call("save", io.store, engine, t.tokens, t.block_ids, **t.extras)
            self._count("saved_blocks", stored or 0)
        if meta.saves:
            self._step_wait("save", started)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_kv_cache_events(self) -> XConnectorKVEvents | None:
        """What this worker's host memory and disk tier gained and lost since the last step.
        With vLLM's KV events on, a container every step, empty included: vLLM's aggregator counts
        the workers by the containers it gets."""
        if not self._report_events:
            return None
        self._steps_undrained = 0
        events: list[KVCacheEvent] = []
        try:
            if self._engine is not None:
                changes = self._engine.take_block_events()
                events = events_for_vllm(changes, self._block_size, self._engine_block, self._names)
        except Exception as e:
            self._fail("kv_events", e)
        return XConnectorKVEvents(events)

    def _name_blocks(self, t: Transfer) -> None:
        """Remembers vLLM's names for the blocks a transfer may add to a tier, for the events
        that report them (a router continues a GPU match into host memory by these names).
        Bookkeeping for events only: a failure here never touches the transfer."""
        if not self._report_events or t.names is None:
            return
        try:
            salt, lora = t.extras.get("cache_salt"), t.extras.get("lora_name")
            args = (self._engine_block, self._block_size, t.tokens, t.names)
            self._names.learn(*args, lora_name=lora, cache_salt=salt)
        except Exception as e:
            self._fail("kv_events", e)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._loaded_steps:
            return None
        meta = XConnectorWorkerMetadata(self._loaded_steps, self._failed_reqs)
        self._loaded_steps, self._failed_reqs, self._failed_steps = set(), set(), set()
        return meta

    def shutdown(self) -> None:
        if self._sdk is not None:
            # One line an operator (and the end-to-end tests) can read: what this worker did.
            log.info("XConnector worker summary: %s", json.dumps(self._worker_totals()))
        elif self._skipped or self._client is not None or self._events_dropped:
            summary: dict[str, Any] = {"skipped": self._skipped}
            if self._events_dropped:
                summary["kv_events_dropped"] = self._events_dropped
            if self._client is not None:  # the ranks' answers: answered, missed, and why
                summary["lookup_service"] = self._client.stats()
            log.info("XConnector scheduler summary: %s", json.dumps(summary, sort_keys=True))
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

    def _worker_totals(self) -> dict[str, Any]:
        """What this worker did: loads, loaded tokens, load failures, saved blocks, fallbacks,
        and the steps that waited for loads and saves, with the seconds they waited."""
        m = None if self._sdk is None else self._sdk.get_monitoring_handler()
        counts = {} if m is None else m.counters()
        names = ("load_failures", "loaded_tokens", "loads", "saved_blocks")
        out: dict[str, Any] = {k: counts.get(k, 0) for k in names}
        for op, (steps, seconds) in ({} if m is None else m.step_waits()).items():
            out[f"{op}_wait_steps"], out[f"{op}_wait_seconds"] = steps, seconds
        return {**out, "fallbacks": m.fallbacks() if m else {}}

    def stats(self) -> dict[str, Any]:
        out = {} if self._sdk is None else self._sdk.get_monitoring_handler().snapshot()
        if self._engine is not None and self._report_events:
            engine = self._engine.stats()
            out["block_events_reported"] = engine.get("block_events_reported", 0)
            out["block_events_dropped"] = engine.get("block_events_dropped", 0)
        return {**out, **self._worker_totals(), "skipped": dict(self._skipped)}


def _parallel_ranks() -> tuple[int, int]:
    """This worker's tensor- and pipeline-parallel ranks ((0, 0) in a single process)."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank()), int(get_pp_group().rank_in_group)
    except Exception:  # not initialized: a single process
        return 0, 0
