"""KV-cache work for a worker: lookup, store and load of a request's blocks, and the vLLM-v0
shaped receive/send that serve a batch's cached prefixes and store what it computed."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xconnector._native import Engine, v0_load, v0_store
from xconnector.adapters.lmcache import LMCacheAdapter
from xconnector.adapters.vllm import KvIO, VLLMAdapter
from xconnector.adapters.vllm_v0 import PrefillRequest, prefill_requests, rebuild_model_input
from xconnector.sdk.handlers.monitoring import MonitoringHandler

# Receives remembered until their send, keyed by the rebuilt model_input's id (the worker hands
# the same object back). Bounded: a batch whose send never comes is forgotten, not leaked.
_PENDING_MAX = 256


@dataclass
class KVReceiveResult:
    """What `recv_kv_caches` should do."""

    cache_hit: bool
    #: Prompt tokens whose KV was loaded, all requests together.
    hit_tokens: int
    #: Prompt tokens of the batch's fresh prefill requests.
    prompt_tokens: int
    #: The batch to run: the original, or one that skips the loaded tokens.
    model_input: Any
    #: Why the cache was not used, when an error made the call fall back.
    fallback_reason: str | None = None

    @property
    def data(self) -> tuple[Any, bool, Any]:
        """`recv_kv_caches`' return value `(hidden_or_None, bypass_model_exec, model_input)`:
        the model always runs, for the tokens not loaded (the last one at least)."""
        return (None, False, self.model_input)


@dataclass
class KVSendResult:
    stored_blocks: int
    #: Fresh prefill requests with a full block to store.
    requests: int
    fallback_reason: str | None = None


class KVCacheHandler:
    """Lookup/store/load of requests' KV over the cache adapter's engine, with the inference
    adapter moving blocks in and out of the model's paged KV caches."""

    def __init__(
        self,
        cache: LMCacheAdapter,
        inference: VLLMAdapter,
        *,
        block_size: int,
        monitoring: MonitoringHandler,
    ) -> None:
        self.cache = cache
        self.inference = inference
        self.block_size = block_size
        self.monitoring = monitoring
        #: The engine of the KV caches seen last (None before any).
        self.engine: Engine | None = None
        self._pending: OrderedDict[int, tuple[Any, list[PrefillRequest]]] = OrderedDict()
        self._lock = threading.Lock()

    def bind(
        self,
        kv_caches: Any,
        model_executable: Any = None,
        *,
        namespace: dict[str, Any] | None = None,
        block_size: int | None = None,
    ) -> tuple[KvIO, Engine]:
        """The block mover and the engine for these KV caches (created on first use). The
        namespace (model, dtype, TP rank, ...) comes from `model_executable` unless given."""
        io = self.inference.kv_io(kv_caches, block_size or self.block_size)
        if namespace is None:
            namespace = self.inference.namespace(model_executable, kv_caches, io)
        ns = {"kv_layout": io.layout, **namespace}
        self.engine = self.cache.engine_for(
            kv_block_size=io.block_size, kv_block_bytes=io.block_bytes, **ns
        )
        return io, self.engine

    # -- per request -------------------------------------------------------------------------

    def lookup(self, tokens: Any) -> int:
        """Leading tokens of `tokens` whose KV is cached (0 before any KV caches were seen)."""
        return 0 if self.engine is None else self.engine.lookup(tokens)

    def store(
        self, tokens: Any, kv_caches: Any, block_ids: Sequence[int], model_executable: Any = None
    ) -> int:
        """Stores the full blocks of `tokens` from cache blocks `block_ids`; returns blocks
        newly stored."""
        io, engine = self.bind(kv_caches, model_executable)
        stored = io.store(engine, tokens, list(block_ids))
        self.monitoring.count("stored_blocks", stored)
        return stored

    def load(
        self, tokens: Any, kv_caches: Any, block_ids: Sequence[int], model_executable: Any = None
    ) -> int:
        """Loads the cached prefix of `tokens` into cache blocks `block_ids`; returns tokens
        loaded."""
        io, engine = self.bind(kv_caches, model_executable)
        loaded = io.load(engine, tokens, list(block_ids))
        self.monitoring.count("loaded_tokens", loaded)
        return loaded

    # -- vLLM v0 shaped batches ----------------------------------------------------------------

    def receive(self, model_executable: Any, model_input: Any, kv_caches: Any) -> KVReceiveResult:
        """Loads each fresh prefill request's cached prefix (never its last token, whose logits
        are needed) and returns the batch rebuilt to compute only the rest."""
        if getattr(model_input, "lora_requests", None):
            # LoRA KV differs per adapter and v0 batches mix them: never serve it from the cache.
            self.monitoring.count("skipped_lora_batches")
            return KVReceiveResult(False, 0, 0, model_input)
        requests = prefill_requests(model_input)
        loaded, prompt_tokens = v0_load(*self.bind(kv_caches, model_executable), requests)
        new_input = rebuild_model_input(model_input, requests, loaded) if loaded else model_input
        with self._lock:
            self._pending[id(new_input)] = (new_input, requests)
            while len(self._pending) > _PENDING_MAX:
                self._pending.popitem(last=False)
        hit = sum(loaded.values())
        self.monitoring.count("receives")
        self.monitoring.count("prompt_tokens", prompt_tokens)
        self.monitoring.count("hit_tokens", hit)
        self.monitoring.count("hit_requests", len(loaded))
        return KVReceiveResult(hit > 0, hit, prompt_tokens, new_input)

    def send(
        self, model_executable: Any, model_input: Any, kv_caches: Any, hidden_states: Any = None
    ) -> KVSendResult:
        """Stores the full blocks of every fresh prefill request of the batch just computed
        (blocks already cached are not copied again)."""
        with self._lock:
            entry = self._pending.pop(id(model_input), None)
        if entry is not None and entry[0] is model_input:
            requests = entry[1]
        elif getattr(model_input, "lora_requests", None):
            return KVSendResult(0, 0)
        else:
            requests = prefill_requests(model_input)
        stored, handled = v0_store(*self.bind(kv_caches, model_executable), requests)
        self.monitoring.count("sends")
        self.monitoring.count("stored_blocks", stored)
        return KVSendResult(stored_blocks=stored, requests=handled)
