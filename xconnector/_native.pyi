"""Typed surface of the compiled extension (checked against it by `mypy.stubtest`)."""

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeAlias, final

from typing_extensions import Buffer, Self

__all__ = [
    "HASH_VERSION",
    "BlockView",
    "Engine",
    "EngineBlocks",
    "EnginePool",
    "EventSubscriber",
    "LookupClient",
    "LookupServer",
    "OverlapIndex",
    "PagedKv",
    "PeerOverlap",
    "Router",
    "SdkStats",
    "TransferPlanner",
    "V1Worker",
    "VllmBlockNames",
    "VllmRankAgreement",
    "__version__",
    "_inject_fault",
    "block_ids_from_slots",
    "cli_main",
    "config_coerce",
    "config_discover",
    "config_engine_settings",
    "config_env_vars",
    "config_for_vllm_connector",
    "config_load_file",
    "config_normalize",
    "config_normalize_adapter",
    "config_read_document",
    "config_redact",
    "config_resolve_document",
    "config_worker_patches",
    "detect_kv_layout",
    "fail_open_call",
    "key_tokens",
    "kv_block_dim",
    "kv_namespace",
    "last_level_cache_bytes",
    "local_block_hashes",
    "lookup_socket_path",
    "lora_identity",
    "merge_expositions",
    "replay",
    "reset_log_cache",
    "sdk_adapters_to_load",
    "sequence_hashes",
    "usable_prefix",
    "v0_kv_namespace",
    "v0_load",
    "v0_prefills",
    "v0_skip",
    "v0_store",
    "vllm_kv_namespace",
    "vllm_transfer_config",
    "warn_on_failing_loads",
]

__version__: str
HASH_VERSION: int

# Token ids: a list/tuple of ints, array('I'), an integer numpy array, any integer buffer,
# a CPU torch tensor, or any iterable of ints. Each id must be in 0..2**32.
_Tokens: TypeAlias = Iterable[int] | Buffer | Any

@final
class Engine:
    """The native KV engine: block hashing, the memory tier and its eviction, for one namespace."""

    def __new__(
        cls,
        *,
        block_bytes: int,
        capacity_bytes: int,
        block_size: int = 16,
        model: str = "",
        dtype: str = "",
        kv_layout: str = "",
        tp_world_size: int = 1,
        tp_rank: int = 0,
        extra: dict[str, str] | None = None,
        revision: str = "",
        quantization: str = "",
        pp_world_size: int = 1,
        pp_rank: int = 0,
        disk_path: str | None = None,
        disk_capacity_bytes: int = 0,
        disk_queue_blocks: int = 1024,
        disk_shared: bool = False,
        redis_url: str | None = None,
        redis_key_prefix: str = "xconnector",
        redis_queue_blocks: int = 4096,
        redis_batch_blocks: int = 64,
        redis_timeout: float = 0.02,
        redis_ca_file: str | None = None,
        redis_auth_key: str | None = None,
        redis_ttl_s: int | None = None,
        events_url: str | None = None,
        events_subject: str = "xconnector.kv_events",
        worker_id: str = "",
        events_queue: int = 65536,
    ) -> Self: ...
    @staticmethod
    def from_config(
        section: Mapping[str, Any],
        *,
        kv_block_size: int,
        kv_block_bytes: int,
        model: str = "",
        dtype: str = "",
        kv_layout: str = "",
        tp_world_size: int = 1,
        tp_rank: int = 0,
        extra: dict[str, str] | None = None,
        revision: str = "",
        quantization: str = "",
        pp_world_size: int = 1,
        pp_rank: int = 0,
    ) -> Engine: ...
    def flush(self, timeout: float = 10.0) -> bool: ...
    def tiers(self) -> list[dict[str, Any]]: ...
    def prometheus(self, labels: dict[str, str] | None = None) -> str: ...
    def lookup(
        self,
        tokens: _Tokens,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_id: str | None = None,
    ) -> int: ...
    def store(
        self,
        tokens: _Tokens,
        payload: Buffer | Any,
        *,
        first_block: int = 0,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_id: str | None = None,
    ) -> int: ...
    def load(
        self,
        tokens: _Tokens,
        out: Buffer | Any,
        *,
        first_block: int = 0,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_id: str | None = None,
    ) -> int: ...
    def views(
        self,
        tokens: _Tokens,
        *,
        max_blocks: int | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_id: str | None = None,
    ) -> list[BlockView]: ...
    def enable_block_events(self, capacity: int = 65536) -> None: ...
    def take_block_events(
        self,
    ) -> list[tuple[str, str, int | None, list[int], list[int], str | None, str | None]]: ...
    def stats(self) -> dict[str, int | float | bool]: ...
    def _check_invariants(self) -> None: ...
    @property
    def block_size(self) -> int: ...
    @property
    def block_bytes(self) -> int: ...
    @property
    def capacity_bytes(self) -> int: ...
    @property
    def namespace(self) -> int: ...

@final
class BlockView:
    """A read-only, zero-copy view of one cached block (buffer protocol). It pins the block until
    the view and everything made from it (memoryviews, arrays, tensors) are gone; `release()`
    stops new exports."""

    def __len__(self) -> int: ...
    if sys.version_info >= (3, 12):
        def __buffer__(self, flags: int, /) -> memoryview: ...

    def release(self) -> None: ...
    @property
    def released(self) -> bool: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class EngineBlocks:
    """How KV blocks compose an engine's blocks (a whole number of them, in tokens and bytes)."""

    def __new__(
        cls,
        kv_block_size: int,
        kv_block_bytes: int,
        engine_block_size: int,
        engine_block_bytes: int,
    ) -> Self: ...
    @property
    def per(self) -> int: ...
    def full_engine_blocks(self, n_tokens: int) -> int: ...
    def store_kv_blocks(self, n_tokens: int, n_ids: int) -> int: ...
    def load_engine_blocks(self, n_ids: int) -> int: ...
    def loaded_kv_blocks(self, loaded_tokens: int, first_block: int) -> tuple[int, int]: ...

@final
class PagedKv:
    """A model's paged KV caches (torch CPU tensors or writable numpy arrays, one per layer, one
    layout), packed to and unpacked from per-block payloads."""

    def __new__(
        cls,
        tensors: list[Any],
        block_size: int,
        *,
        layout: str | None = None,
        num_blocks: int | None = None,
    ) -> Self: ...
    @property
    def layout(self) -> str: ...
    @property
    def block_size(self) -> int: ...
    @property
    def block_bytes(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    def pack(self, block_ids: list[int] | Any, out: Buffer | Any | None = None) -> bytes | None: ...
    def unpack(self, block_ids: list[int] | Any, payload: Buffer | Any) -> None: ...
    def store(
        self,
        engine: Engine,
        tokens: _Tokens,
        block_ids: list[int] | Any,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_id: str | None = None,
    ) -> int: ...
    def load(
        self,
        engine: Engine,
        tokens: _Tokens,
        block_ids: list[int] | Any,
        *,
        first_block: int = 0,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_id: str | None = None,
    ) -> int: ...

@final
class Router:
    """Routes operations to targets by name, kind and priority, with per-target failure backoff."""

    def __new__(
        cls, *, base_backoff: float = 0.1, max_backoff: float = 30.0, manual_clock: bool = False
    ) -> Self: ...
    def add(
        self, name: str, kind: str, priority: int = 0, policy: str = "write_through"
    ) -> None: ...
    def add_adapter(self, name: str, kind: str, priority: int = 0) -> None: ...
    def remove(self, name: str) -> bool: ...
    def order(self, kind: str | None = None) -> list[str]: ...
    def write_plan(self, kind: str | None = None) -> list[tuple[str, str]]: ...
    def route(self, selector: str) -> str: ...
    def candidates(self, selector: str) -> list[str]: ...
    def settle(self, name: str, failure: str | None = None) -> bool: ...
    def report_success(self, name: str) -> None: ...
    def report_failure(self, name: str) -> None: ...
    def status(self) -> list[dict[str, Any]]: ...
    def advance(self, seconds_: float) -> None: ...

@final
class EventSubscriber:
    """Stored/removed KV block events from NATS, batch by batch."""

    def __new__(
        cls, url: str, subject: str = "xconnector.kv_events", timeout: float = 5.0
    ) -> Self: ...
    def next(self, timeout: float = 1.0) -> dict[str, Any] | None: ...

@final
class OverlapIndex:
    """Which workers hold how many leading blocks of a request."""

    def __new__(cls) -> Self: ...
    def stored(self, worker: str, hashes: list[int]) -> None: ...
    def removed(self, worker: str, hashes: list[int]) -> None: ...
    def clear_worker(self, worker: str) -> None: ...
    def score(self, hashes: list[int]) -> list[tuple[str, int]]: ...
    def workers(self) -> list[tuple[str, int]]: ...

@final
class SdkStats:
    """Named counters and fallbacks by reason; each bump returns the total after it."""

    def __new__(cls) -> Self: ...
    def count(self, name: str, n: int = 1) -> int: ...
    def fallback(self, reason: str) -> int: ...
    def counters(self) -> dict[str, int]: ...
    def fallbacks(self) -> dict[str, int]: ...
    def hit_rate(self) -> float: ...
    def step_wait(self, op: str, seconds: float) -> None: ...
    def step_waits(self) -> dict[str, tuple[int, float]]: ...
    def prometheus(self) -> str: ...

@final
class PeerOverlap:
    """Peers' announced blocks plus this worker's own overlap, ranked in tokens; fed by hand or
    by following other workers' peer events on NATS in a native thread."""

    def __new__(cls, me: str) -> Self: ...
    @property
    def me(self) -> str: ...
    @property
    def events_applied(self) -> int: ...
    def follow(self, url: str, subject: str, timeout: float = 5.0) -> None: ...
    def stop_following(self) -> None: ...
    def stored(self, worker: str, hashes: list[int]) -> bool: ...
    def removed(self, worker: str, hashes: list[int]) -> bool: ...
    def forget(self, worker: str) -> None: ...
    def peers(self) -> list[tuple[str, int]]: ...
    def score(
        self, hashes: list[int], block_size: int, local_tokens: int = 0
    ) -> list[tuple[str, int]]: ...
    def best(
        self,
        hashes: list[int],
        block_size: int,
        local_tokens: int = 0,
        candidates: list[str] | None = None,
    ) -> str | None: ...

@final
class LookupServer:
    """Answers lookups for one rank with `engine`, on a Unix socket at `path`, from native threads.
    Raises `PermissionError` if the socket's directory is not private to this user, or something
    else is at `path`."""

    def __new__(
        cls,
        engine: Engine,
        path: str | os.PathLike[str],
        *,
        max_connections: int = 32,
        io_timeout: float = 2.0,
        idle_timeout: float = 300.0,
    ) -> Self: ...
    @property
    def path(self) -> str: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class LookupClient:
    """Asks every rank's server at once; the answer is the smallest hit, or 0 unless all answered
    within `timeout` seconds."""

    def __new__(
        cls,
        paths: Sequence[str | os.PathLike[str]],
        *,
        timeout: float = 0.1,
        retry_after: float = 1.0,
    ) -> Self: ...
    @property
    def paths(self) -> list[str]: ...
    def lookup(
        self,
        tokens: _Tokens,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_id: str | None = None,
    ) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...

# vLLM's KV events (`xconnector.integrations.vllm.kv_events`). A block name is vLLM's block hash
# (bytes, or an int of 64 bits) or XConnector's (an int).
_Name: TypeAlias = int | bytes
# (kind "stored"/"removed", XConnector's medium "memory"/"disk", parent, sequence hashes, tokens,
# lora_name, cache_salt), as `Engine.take_block_events` returns it.
_Change: TypeAlias = tuple[str, str, int | None, list[int], list[int], str | None, str | None]
# (kind, vLLM's medium, names, parent, token ids, lora_name, extra_keys).
_VllmEvent: TypeAlias = tuple[
    str, str, list[_Name], _Name | None, list[int], str | None, list[tuple[str, ...] | None] | None
]

@final
class VllmBlockNames:
    """vLLM's names for XConnector's blocks: learnt from the transfers that store or load them,
    kept for a reported block until its removal."""

    def __new__(cls, capacity: int | None = None) -> Self: ...
    def learn(
        self,
        engine_block: int,
        block_size: int,
        tokens: _Tokens,
        names: Iterable[_Name],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> None: ...
    def of(self, h: int, k: int, medium: str | None = None) -> list[_Name]: ...
    def events(
        self, changes: Sequence[_Change], block_size: int, engine_block: int
    ) -> list[_VllmEvent]: ...
    def vllm_events(
        self,
        changes: Sequence[_Change],
        block_size: int,
        engine_block: int,
        stored: Callable[..., Any],
        removed: Callable[..., Any],
    ) -> list[Any]: ...

@final
class VllmRankAgreement:
    """What the router should be told given every rank's events: a block is announced once all
    `world` ranks hold it, removed once the first drops it."""

    def __new__(cls, world: int) -> Self: ...
    @property
    def world(self) -> int: ...
    def stored(
        self, rank: int, medium: str | None, names: Iterable[_Name]
    ) -> list[tuple[int, int]]: ...
    def removed(self, rank: int, medium: str | None, names: Iterable[_Name]) -> list[_Name]: ...
    def merge(
        self, batches: list[list[Any]], stored: type[Any], removed: type[Any]
    ) -> list[Any]: ...

# The scheduler side of the vLLM v1 connector (`xconnector.integrations.vllm.connector`).
# (req_id, tokens, block_ids, first_block): load tokens [0, tokens) into block_ids from first_block.
_Load: TypeAlias = tuple[str, int, list[int], int]
# (req_id, tokens, block_ids, if_loads_ok): save tokens [0, tokens), whole engine blocks.
_Save: TypeAlias = tuple[str, int, list[int], bool]

@final
class V1Worker:
    """The worker side of the vLLM v1 connector: each step's loads and saves through the block
    mover, the blocks vLLM must recompute and the report for the scheduler. Unbound (no `io`),
    every load fails and nothing is saved."""

    def __new__(
        cls,
        block_size: int,
        engine_block: int,
        *,
        io: Any = None,
        engine: Any = None,
        router: Router | None = None,
        stats: SdkStats | None = None,
        names: VllmBlockNames | None = None,
        layers: list[str] | None = None,
        layerwise: bool = False,
    ) -> Self: ...
    def load(self, step: int, loads: list[Any]) -> None: ...
    def wait_layer(self, layer_name: str) -> None: ...
    def totals(self) -> dict[str, Any]: ...
    def save(self, step: int, saves: list[Any], hold: bool = False) -> None: ...
    def finished(self, finished: list[str]) -> list[str]: ...
    @property
    def saves_in_flight(self) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def load_errors(self) -> list[int]: ...
    def report(self) -> tuple[list[int], list[str]] | None: ...

def fail_open_call(
    router: Router, stats: SdkStats, kind: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> tuple[Any, str | None]: ...

@final
class TransferPlanner:
    """Which blocks of which request to load and save in each step: whole engine blocks only,
    never unconditionally over the blocks of an unconfirmed load."""

    def __new__(
        cls,
        block_size: int,
        engine_block: int,
        world: int,
        unconfirmed_steps: int,
        *,
        transfer: Callable[..., Any] | None = None,
    ) -> Self: ...
    @property
    def step(self) -> int: ...
    @property
    def loads_off(self) -> bool: ...
    def note_lookup(self, req_id: str, local_hit: int) -> None: ...
    def plan_load(self, req_id: str, external_tokens: int, block_ids: Sequence[int]) -> None: ...
    def begin_step(self) -> tuple[int, int | None]: ...
    def schedule_new(
        self, req_id: str, num_tokens: int, block_ids: Sequence[int], computed: int
    ) -> tuple[_Load | None, _Save | None]: ...
    def schedule_cached(
        self, req_id: str, new_block_ids: Sequence[int] | None, resumed: bool, computed: int
    ) -> tuple[_Load | None, _Save | None]: ...
    def confirm(self, steps: Sequence[int], failed: Sequence[str]) -> None: ...
    def finished(self, req_id: str) -> bool: ...
    def track(
        self,
        req_id: str,
        tokens: list[int],
        extras: dict[str, Any],
        names: list[Any] | None = None,
    ) -> tuple[list[int], dict[str, Any]]: ...
    def key(self, req_id: str) -> tuple[list[int], dict[str, Any]] | None: ...
    def schedule(self, output: Any, loads: list[Any], saves: list[Any]) -> None: ...

def lookup_socket_path(engine_id: str, rank: int) -> str: ...

# vLLM v1's kv_transfer_config with XConnector in it, and an inline auth key to put in the
# environment (`xconnector.integrations.vllm.engine_config`).
def vllm_transfer_config(
    existing: Mapping[str, Any] | None, section: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str | None]: ...
def warn_on_failing_loads(kv_transfer_config: Any) -> None: ...
def detect_kv_layout(shape: list[int], block_size: int, num_blocks: int | None = None) -> str: ...
def kv_block_dim(layout: str) -> int: ...

# vLLM v0 batches (`xconnector.adapters.vllm_v0`): the index arithmetic, done by the core.
def v0_prefills(
    num_tokens: int,
    num_slots: int,
    seq_lens: list[int],
    *,
    num_prefills: int | None = None,
    query_start_loc: list[int] | None = None,
    query_lens: list[int] | None = None,
) -> list[tuple[int, int, bool]]: ...
def v0_load(io: Any, engine: Engine, requests: Sequence[Any]) -> tuple[dict[int, int], int]: ...
def v0_store(io: Any, engine: Engine, requests: Sequence[Any]) -> tuple[int, int]: ...
def v0_skip(
    prefills: list[tuple[int, int, int]],
    *,
    num_seqs: int,
    fields: Mapping[str, list[int] | int],
) -> dict[str, list[int] | int] | None: ...
def kv_namespace(
    *,
    model: str,
    layer_shapes: list[list[int]],
    block_size: int,
    tensor_dtype: str,
    model_id: str | None = None,
    revision: str = "",
    quantization: str = "",
    cache_dtype: str | None = None,
    layout: str | None = None,
    tp_world_size: int = 1,
    tp_rank: int = 0,
    pp_world_size: int = 1,
    pp_rank: int = 0,
    model_config: list[tuple[str, str]] | None = None,
    max_model_len: int | None = None,
) -> dict[str, Any]: ...
def lora_identity(path: str) -> str: ...
def key_tokens(tokens: _Tokens, items: list[tuple[str, int, int]]) -> list[int]: ...
def v0_kv_namespace(
    model_executable: Any,
    tensors: list[Any],
    *,
    block_size: int,
    layout: str,
    model_id: str | None = None,
    tp_world_size: int = 1,
    tp_rank: int = 0,
) -> dict[str, Any]: ...
def vllm_kv_namespace(
    vllm_config: Any,
    tensors: list[Any],
    *,
    tp_rank: int,
    pp_rank: int,
    model_id: str | None = None,
) -> dict[str, Any]: ...
def block_ids_from_slots(slots: list[int] | Any, block_size: int) -> list[int]: ...
def sequence_hashes(
    tokens: _Tokens,
    block_size: int = 16,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> list[int]: ...
def local_block_hashes(
    tokens: _Tokens,
    block_size: int = 16,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> list[int]: ...
def reset_log_cache() -> None: ...
def _inject_fault(point: str, fault: str) -> None: ...

# `xconnector bench` and the usable-prefix rule (a worker never skips the block holding the
# prompt's last token).
def usable_prefix(hit: int, prompt_len: int, block_size: int) -> int: ...
def last_level_cache_bytes(root: str | None = None) -> int: ...
def replay(
    requests: int,
    seed: int,
    cache_bytes: int,
    block_bytes: int,
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, Any]: ...

# The `xconnector` command (`xconnector.cli`): argv without the program name; output written
# through `out` and `err` (text streams: `write(str)` and `flush()`, e.g. sys.stdout); the
# package versions only Python can read; `plot(path, hit_rates, lookup_us, lookup_p99_us)` for
# `bench --plot`. Returns the exit code; an exception from a callback or a stream propagates.
_TextStream: TypeAlias = Any

def cli_main(
    argv: list[str],
    out: _TextStream,
    err: _TextStream,
    versions: Callable[[], list[tuple[str, str | None]]],
    plot: Callable[[str, list[float], list[float], float], object],
) -> int: ...

# Config (DESIGN section 2). Normalized sections are plain dicts; `xconnector.sdk.config` wraps
# them in dataclasses. Every function raises `ConfigError` on an invalid or unreadable config.
_Resolved: TypeAlias = dict[str, Any]

def config_normalize(
    section: Mapping[str, Any] | Any, source: str = "<dict>", path: str = ""
) -> dict[str, Any]: ...
def config_normalize_adapter(
    adapter: Mapping[str, Any] | Any, source: str = "<dict>", path: str = ""
) -> dict[str, Any]: ...
def config_resolve_document(
    document_: Mapping[str, Any] | Any,
    source: str = "<dict>",
    service: str | None = None,
    bare: bool = False,
) -> _Resolved: ...
def config_load_file(
    path: str, service: str | None = None, argv: list[str] | None = None
) -> _Resolved: ...
def config_engine_settings(
    section: Mapping[str, Any], source: str = "<section>"
) -> dict[str, Any]: ...
def config_for_vllm_connector(
    section: Any, strict: bool, environ: Mapping[str, str], argv: list[str], block_size: int
) -> tuple[dict[str, Any], int] | None: ...
def config_worker_patches(
    config: Mapping[str, Any], section: bool, source: str, service: str | None, strict: bool
) -> bool: ...
def config_discover(environ: Mapping[str, str], argv: list[str]) -> _Resolved: ...
def config_env_vars() -> list[str]: ...
def config_read_document(path: str) -> Any: ...
def config_redact(value: Any, key: str = "") -> Any: ...

# The cache adapter's engines, the SDK's metrics and its adapter rules (xconnector_core::
def config_coerce(
    config: Mapping[str, Any] | None, keys: Mapping[str, Any], force: bool = False
) -> dict[str, Any]: ...

# engine_pool, ::exposition, ::sdk_plan).
@final
class EnginePool:
    """The engines of one cache adapter, one per KV geometry and namespace, built on first use
    from its settings in a validated section."""

    def __new__(
        cls, section: Mapping[str, Any], source: str = "<section>", name: str = "lmcache"
    ) -> Self: ...
    @property
    def settings(self) -> dict[str, Any]: ...
    def set_events(self, nats_url: str, subject: str, worker_id: str) -> None: ...
    def engine_for(
        self,
        *,
        kv_block_size: int,
        kv_block_bytes: int,
        model: str = "",
        dtype: str = "",
        kv_layout: str = "",
        tp_world_size: int = 1,
        tp_rank: int = 0,
        extra: dict[str, str] | None = None,
        revision: str = "",
        quantization: str = "",
        pp_world_size: int = 1,
        pp_rank: int = 0,
    ) -> Engine: ...
    def engines(self) -> list[Engine]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...

def merge_expositions(texts: list[str]) -> str: ...
def sdk_adapters_to_load(
    adapters: Sequence[Mapping[str, Any]],
    loaded: list[str],
    initial: bool = False,
    source: str = "<dict>",
) -> list[dict[str, Any]]: ...
