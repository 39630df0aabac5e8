"""`XConnectorV1`: XConnector as a vLLM v1 KV connector (`KVConnectorBase_V1`, vLLM 0.32).
Usage, keys and KV events: `integrations/vllm/README.md`.

Scheduler side: `get_num_new_matched_tokens` looks the prompt up (side-effect free, never the
block of the last prompt token); the native `TransferPlanner` plans each step's loads into the
blocks vLLM allocated and the saves of prompts whose prefill is complete. Worker side (native
`V1Worker`): loads start in `start_load_kv` and into host KV run layer by layer beside the
forward pass, each attention layer waiting for its own (`wait_for_layer_load`); saves are queued
in `wait_for_save` and, from host KV, run after the step on a save thread, straight from vLLM's
paged KV into the engine. A finished request with a save planned keeps its blocks
(`request_finished` says so) until `get_finished` reports its saves done; a step that preempts
(its blocks reused at once) waits for the saves first (`handle_preemptions`).

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
import os
import sys
import threading
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
from xconnector.adapters.vllm import key_tokens, lora_identity
from xconnector.config.schema import SDKConfig
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

    from xconnector._native import Engine, LookupClient, LookupServer, TransferPlanner, V1Worker
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
    #: vLLM preempted requests this step: their blocks are reused at once, so the saves in
    #: flight must finish before the forward pass.
    flush: bool = False
    #: The scheduler holds a finished request's blocks until the workers report its saves done
    #: (`get_finished`), so saves from host KV may run after their step.
    hold: bool = False


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
        self._engine_block: int = self._block_size
        extra = dict(self._kv_transfer_config.kv_connector_extra_config)
        if switches.disabled():
            log.info("XConnector is off (XCONNECTOR_DISABLE/XCONNECTOR_ENABLED): plain vLLM")
        else:
            # `kv_connector_extra_config.xconnector` (a section or a file), else discovery, else
            # the defaults; checked on this machine once, before serving (native). Tokens per
            # engine block: LMCache's chunk_size, else vLLM's block size.
            section = extra.get("xconnector")
            strict = switches.strict(section=section)
            try:
                found = load_native().config_for_vllm_connector(
                    section, strict, dict(os.environ), list(sys.argv), self._block_size
                )
                if found is not None:
                    self._config = SDKConfig.from_normalized(found[0])
                    self._engine_block = found[1]
            except Exception as e:  # a bad config, or a broken install: never vLLM's failure
                if strict or getattr(e, "strict", False):
                    raise
                log.error("XConnector is off, vLLM runs without it: %s", e)
        self._encoder_decoder = bool(getattr(vllm_config.model_config, "is_encoder_decoder", False))
        if role == KVConnectorRole.SCHEDULER and self._config is not None:
            load_native().warn_on_failing_loads(self._kv_transfer_config)
        # vLLM publishes KV events (dynamo.vllm relays them to Dynamo's router): report what we
        # hold with them, unless kv_connector_extra_config says `"report_kv_events": false`.
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
        self._world = self._tp * int(vllm_config.parallel_config.pipeline_parallel_size)
        self._agreement = RankAgreement(self._world)
        # What to load and save each step, and when a save must wait for the workers to confirm
        # a load (`xconnector_core::transfer_plan`); None when XConnector is off. It keeps each
        # request's key from its lookup on: NewRequestData has no salt, and a block stored under
        # the wrong salt would be served across tenants.
        self._planner: TransferPlanner | None = None
        if self._config is not None:
            try:
                self._planner = load_native().TransferPlanner(
                    self._block_size,
                    self._engine_block,
                    self._world,
                    _UNCONFIRMED_STEPS,
                    transfer=Transfer,
                )
            except Exception as e:
                self._config = None
                log.error("XConnector is off, vLLM runs without it: %s", e)
        # Saves from host KV (vLLM's CPU backend) run after their step unless told otherwise:
        # finished requests then keep their blocks until the workers saved them.
        device = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
        on_host = device == "cpu" and extra.get("async_saves", True) is not False
        self._hold = self._planner is not None and on_host
        # Loads into host KV go layer by layer beside the forward pass unless told otherwise.
        self._layerwise = extra.get("layerwise_loads", True) is not False
        self._skipped: dict[str, int] = {}
        self._client: LookupClient | None = None
        # Worker side: each step's loads and saves, and what they did (unbound: every load
        # fails, so vLLM recomputes what the scheduler promised).
        self._worker: V1Worker = load_native().V1Worker(self._block_size, self._engine_block)
        self._sdk: XConnectorSDK | None = None
        self._engine: Engine | None = None
        self._server: LookupServer | None = None
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

    def _fail(self, kind: str, e: BaseException) -> None:
        with contextlib.suppress(Exception):  # counting it must not fail in turn
            if self._sdk is not None:
                self._sdk.get_monitoring_handler().fallback(f"v1_{kind}")
        if self._once(kind):
            log.warning("XConnector %s failed, vLLM goes on without it: %s", kind, e)

    # -- scheduler side -------------------------------------------------------------------------

    def _lookup(self, tokens: list[int], extras: dict[str, Any]) -> int:
        engine = _engines.get(self._engine_id)
        if engine is not None:
            return int(engine.lookup(tokens, **extras))
        if self._client is None:
            # Every (tensor, pipeline) rank holds its own part of each block: ask them all.
            self._client = lookup_service.client(self._engine_id, self._tp * self._pp)
        return self._client.lookup(tokens, **extras)

    def _track(self, planner: TransferPlanner, request: Request) -> Any:
        """The request's `(tokens, extras)`, kept by the planner from now on; None (counted)
        when its KV cannot be keyed safely."""
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
        return planner.track(request.request_id, tokens, extras, names)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        planner = self._planner
        if planner is None or planner.loads_off:
            return 0, False
        try:
            rid = request.request_id
            key = planner.key(rid) or self._track(planner, request)
            if key is None or len(key[0]) < 2:
                return 0, False
            hit = self._lookup(*key)
            usable = load_native().usable_prefix(hit, len(key[0]), self._engine_block)
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
        if num_external_tokens <= 0 or planner.key(rid) is None:
            planner.plan_load(rid, 0, [])  # nothing to load: drops a load planned before
            return
        planner.plan_load(rid, num_external_tokens, blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        planner = self._planner
        if planner is None:
            return XConnectorMetadata()
        step, unconfirmed = planner.begin_step()
        preempted = getattr(scheduler_output, "preempted_req_ids", None)
        meta = XConnectorMetadata(step=step, flush=bool(preempted), hold=self._hold)
        if unconfirmed is not None:
            # The workers never report back (a vLLM without the worker-metadata channel):
            # nothing that depends on a load could ever be saved, so loads stop instead.
            log.error(
                "XConnector: the workers have not confirmed loads of %d steps ago (does this "
                "vLLM call build_connector_worker_meta?); loads are off, saves go on",
                unconfirmed,
            )
        planner.schedule(scheduler_output, meta.loads, meta.saves)
        return meta

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
        # A request with a save planned keeps its blocks until the workers saved them.
        saved = self._planner is not None and self._planner.finished(request.request_id)
        return self._hold and saved, None

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
            namespace = load_native().vllm_kv_namespace(
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
            self._engine = engine
            self._worker = load_native().V1Worker(
                self._block_size,
                self._engine_block,
                io=io,
                engine=engine,
                router=sdk.router,
                stats=sdk.monitoring.stats,
                names=self._names,
                layers=list(kv_caches),
                layerwise=self._layerwise,
            )
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
            self._engine = None
            self._fail("register_kv_caches", e)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if isinstance(kv_connector_metadata, XConnectorMetadata) and kv_connector_metadata.flush:
            self._worker.flush()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, XConnectorMetadata) and meta.loads:
            self._worker.load(meta.step, meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_layer(layer_name)

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
        if isinstance(meta, XConnectorMetadata) and meta.saves:
            self._worker.save(meta.step, meta.saves, meta.hold)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
        # Saves run after the step; vLLM frees a finished request's blocks once they ran.
        return set(self._worker.finished(list(finished_req_ids))) or None, None

    def wait_for_saves(self) -> None:
        """Waits until this worker's saves queued so far have run (as shutdown does), for a
        settled cache: what a lookup or the stats see afterwards includes them."""
        self._worker.flush()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set(self._worker.load_errors())

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

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report = self._worker.report()
        return None if report is None else XConnectorWorkerMetadata(set(report[0]), set(report[1]))

    def shutdown(self) -> None:
        self._worker.close()  # the saves in flight first: they read vLLM's KV tensors
        if self._sdk is not None:
            # One line an operator (and the end-to-end tests) can read: what this worker did.
            log.info("XConnector worker summary: %s", json.dumps(self._worker.totals()))
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

    def stats(self) -> dict[str, Any]:
        out = {} if self._sdk is None else self._sdk.get_monitoring_handler().snapshot()
        if self._engine is not None and self._report_events:
            engine = self._engine.stats()
            out["block_events_reported"] = engine.get("block_events_reported", 0)
            out["block_events_dropped"] = engine.get("block_events_dropped", 0)
        return {**out, **self._worker.totals(), "skipped": dict(self._skipped)}


def _parallel_ranks() -> tuple[int, int]:
    """This worker's tensor- and pipeline-parallel ranks ((0, 0) in a single process)."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank()), int(get_pp_group().rank_in_group)
    except Exception:  # not initialized: a single process
        return 0, 0
