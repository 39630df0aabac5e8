"""The inference adapter: vLLM's paged KV caches.

It detects the layout of the KV tensors (DESIGN 3.2: flash_attn, flashinfer, the standardized
0.32/CPU view, MLA) from their shapes, and moves a request's blocks between those tensors and
the engine: host tensors (CPU torch, numpy) in one native strided copy per block; CUDA tensors
gathered on the device and copied through a pinned host staging buffer.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from xconnector._native import (
    Engine,
    EngineBlocks,
    PagedKv,
    config_setting_bytes,
    detect_kv_layout,
    kv_block_dim,
    kv_namespace,
)
from xconnector._native import key_tokens as _key_tokens
from xconnector._native import lora_identity as _lora_identity
from xconnector.adapters.base import Adapter
from xconnector.config.schema import AdapterConfig, SDKConfig
from xconnector.exceptions import InvalidInputError

DEFAULT_STAGING_BYTES = 256 << 20


def layer_tensors(kv_caches: Any) -> list[Any]:
    """Per-layer KV tensors from a list (v0) or a `{layer_name: tensor}` mapping (v1)."""
    tensors = list(kv_caches.values()) if isinstance(kv_caches, Mapping) else list(kv_caches)
    if not tensors:
        raise InvalidInputError("kv_caches is empty; expected one KV tensor per layer")
    return tensors


class StagedKv:
    """KV caches on a GPU (torch): blocks are gathered/scattered on the device with
    `index_select`/`index_copy_` and cross PCIe through one pinned host buffer, so the copy runs
    at full bandwidth (pageable memory reaches about a third of it). Payload bytes are the same
    as `PagedKv`'s: per block, each layer's block in logical order, layers back to back."""

    def __init__(
        self, tensors: list[Any], block_size: int, layout: str | None, staging_bytes: int
    ) -> None:
        import torch

        first = tensors[0]
        self.layout = layout or detect_kv_layout(list(first.shape), block_size)
        self.block_dim = kv_block_dim(self.layout)
        self.block_size = block_size
        self.num_blocks = int(first.shape[self.block_dim])
        self._tensors = tensors
        self._layer_bytes = [
            t.numel() // int(t.shape[self.block_dim]) * t.element_size() for t in tensors
        ]
        self.block_bytes = sum(self._layer_bytes)
        self._device = first.device
        self._staging_bytes = max(staging_bytes, self.block_bytes)
        self._staging: Any = None
        self._lock = threading.Lock()
        self._torch = torch

    def _host(self, nbytes: int) -> Any:
        if self._staging is None or self._staging.numel() < nbytes:
            size, pin = max(nbytes, self._staging_bytes), self._device.type == "cuda"
            self._staging = self._torch.empty(size, dtype=self._torch.uint8, pin_memory=pin)
        return self._staging[:nbytes]

    def _ids(self, block_ids: Sequence[int]) -> Any:
        ids = self._torch.as_tensor(list(block_ids), dtype=self._torch.long, device=self._device)
        if len(block_ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise InvalidInputError(
                f"block ids out of range: the KV cache has {self.num_blocks} blocks"
            )
        return ids

    def pack_device(self, block_ids: Sequence[int]) -> Any:
        ids, n, u8 = self._ids(block_ids), len(block_ids), self._torch.uint8
        parts = [
            t.index_select(self.block_dim, ids).movedim(self.block_dim, 0).contiguous().view(u8)
            for t in self._tensors
        ]
        return self._torch.cat([p.reshape(n, -1) for p in parts], dim=1)

    def unpack_device(self, block_ids: Sequence[int], data: Any) -> None:
        ids, n, col = self._ids(block_ids), len(block_ids), 0
        for t, nbytes in zip(self._tensors, self._layer_bytes, strict=True):
            part = data[:, col : col + nbytes].contiguous().view(t.dtype)
            rest = [int(d) for i, d in enumerate(t.shape) if i != self.block_dim]
            t.index_copy_(self.block_dim, ids, part.reshape(n, *rest).movedim(0, self.block_dim))
            col += nbytes

    def _blocks(self, engine: Engine) -> EngineBlocks:
        """How these KV blocks compose the engine's (the core's rule; raises if they do not)."""
        return EngineBlocks(
            self.block_size, self.block_bytes, engine.block_size, engine.block_bytes
        )

    def store(
        self, engine: Engine, tokens: Any, block_ids: Sequence[int], **extras: str | None
    ) -> int:
        blocks, tokens = self._blocks(engine), list(tokens)
        full = blocks.full_engine_blocks(len(tokens))
        if full <= engine.lookup(tokens, **extras) // engine.block_size:
            return 0
        n = blocks.store_kv_blocks(len(tokens), len(block_ids))
        with self._lock:
            dev = self.pack_device(list(block_ids)[:n])
            host = self._host(dev.numel()).view(n, self.block_bytes)
            host.copy_(dev)
            return engine.store(tokens[: full * engine.block_size], host, **extras)

    def load(
        self,
        engine: Engine,
        tokens: Any,
        block_ids: Sequence[int],
        first_block: int = 0,
        **extras: str | None,
    ) -> int:
        blocks = self._blocks(engine)
        with self._lock:
            host = self._host(blocks.load_engine_blocks(len(block_ids)) * engine.block_bytes)
            loaded = engine.load(list(tokens), host, **extras)
            start, stop = blocks.loaded_kv_blocks(loaded, first_block)
            if stop > start:
                data = host[start * self.block_bytes : stop * self.block_bytes]
                data = data.view(stop - start, self.block_bytes).to(self._device)
                self.unpack_device(list(block_ids)[start:stop], data)
            return loaded


#: Moves blocks between a model's KV caches and an engine: host tensors natively, CUDA ones staged.
KvIO = PagedKv | StagedKv


def _namespace(model: Any, tensors: list[Any], **worker: Any) -> dict[str, Any]:
    """The core's namespace (`kv_namespace`) of these KV tensors and what the worker reports."""
    dtype = str(getattr(tensors[0], "dtype", type(tensors[0]).__name__))
    shapes = [[int(d) for d in t.shape] for t in tensors]
    return kv_namespace(
        model=str(model), tensor_dtype=dtype.removeprefix("torch."), layer_shapes=shapes, **worker
    )


def lora_identity(lora_request: Any) -> str:
    """What a LoRA adapter's KV depends on beyond its name: the content of its files, or its path
    when it is not a local directory (the core's rule)."""
    return _lora_identity(str(getattr(lora_request, "lora_path", "") or ""))


def key_tokens(tokens: Sequence[int], mm_features: Sequence[Any] | None) -> list[int]:
    """The token ids a request's blocks are keyed by: each multimodal item's placeholder
    positions replaced by ids derived from the item's hash (the core's rule), so the same text
    with another image never shares a block past the first placeholder."""
    items = []
    for feature in mm_features or ():
        identifier = getattr(feature, "identifier", None) or getattr(feature, "mm_hash", None)
        pos = getattr(feature, "mm_position", None)
        if identifier is None or pos is None:
            raise InvalidInputError("a multimodal item without a hash or position cannot be keyed")
        items.append((str(identifier), int(pos.offset), int(pos.length)))
    return _key_tokens(list(tokens), items)


class VLLMAdapter(Adapter):
    name: ClassVar[str] = "vllm"
    type: ClassVar[str] = "inference"

    def __init__(self, config: AdapterConfig, sdk_config: SDKConfig) -> None:
        super().__init__(config, sdk_config)
        layout = self.settings.get("kv_layout", "auto")
        self.kv_layout: str | None = None if layout == "auto" else layout
        self.enable_prefix_caching: bool = self.settings.get("enable_prefix_caching", True)
        staging = self.settings.get("staging_buffer_size")
        self.staging_bytes = (
            DEFAULT_STAGING_BYTES
            if staging is None
            else config_setting_bytes(self.name, "staging_buffer_size", staging)
        )
        self._io: dict[tuple[Any, ...], KvIO] = {}
        self._lock = threading.Lock()

    def kv_io(self, kv_caches: Any, block_size: int) -> KvIO:
        """The block mover for these KV caches, detected once and reused while they live."""
        tensors = layer_tensors(kv_caches)
        key = (block_size, *(_address(t) for t in tensors))
        with self._lock:
            io = self._io.get(key)
            if io is None:
                first = tensors[0]
                if type(first).__module__.startswith("torch") and first.device.type != "cpu":
                    io = StagedKv(tensors, block_size, self.kv_layout, self.staging_bytes)
                else:
                    io = PagedKv(tensors, block_size, layout=self.kv_layout)
                self._io[key] = io
            return io

    def namespace(self, model_executable: Any, kv_caches: Any, io: KvIO) -> dict[str, Any]:
        """What makes KV bytes incompatible: the model, dtype, layout and per-block shape, and
        the tensor-parallel rank (derived by the core, as for v1)."""
        config = getattr(model_executable, "config", None)
        model = (
            getattr(config, "_name_or_path", None)
            or getattr(config, "name_or_path", None)
            or type(model_executable).__qualname__
        )
        world, rank = _tp_world_and_rank()
        ns = _namespace(
            model,
            layer_tensors(kv_caches),
            model_id=self.settings.get("model_id"),
            block_size=io.block_size,
            layout=io.layout,
            tp_world_size=world,
            tp_rank=rank,
        )
        return {**ns, "kv_layout": io.layout}

    def stop(self) -> None:
        with self._lock:
            self._io.clear()
        super().stop()


def _address(t: Any) -> int:
    return int(t.data_ptr() if hasattr(t, "data_ptr") else t.__array_interface__["data"][0])


def _tp_world_and_rank() -> tuple[int, int]:
    """Tensor-parallel size and rank when torch.distributed runs, else (1, 0). Never imports
    torch just to ask."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size()), int(dist.get_rank())
    except Exception:  # a half-initialized process group: the single-process default is safe
        pass
    return 1, 0
