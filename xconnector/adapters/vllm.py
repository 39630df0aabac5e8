"""The inference adapter: vLLM's paged KV caches.

It detects the layout of the KV tensors (DESIGN 3.2: flash_attn, flashinfer, the standardized
0.32/CPU view, MLA) from their shapes, and moves a request's blocks between those tensors and
the engine: host tensors (CPU torch, numpy) in one native strided copy per block; CUDA tensors
gathered on the device and copied in parts through a bounded pinned host buffer.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from xconnector._native import (
    Engine,
    EngineBlocks,
    PagedKv,
    config_engine_settings,
    detect_kv_layout,
    kv_block_dim,
    v0_kv_namespace,
)
from xconnector._native import key_tokens as _key_tokens
from xconnector._native import lora_identity as _lora_identity
from xconnector.adapters.base import Adapter
from xconnector.config.schema import AdapterConfig, SDKConfig
from xconnector.exceptions import InvalidInputError


def layer_tensors(kv_caches: Any) -> list[Any]:
    """Per-layer KV tensors from a list (v0) or a `{layer_name: tensor}` mapping (v1)."""
    tensors = list(kv_caches.values()) if isinstance(kv_caches, Mapping) else list(kv_caches)
    if not tensors:
        raise InvalidInputError("kv_caches is empty; expected one KV tensor per layer")
    return tensors


class StagedKv:
    """KV caches on a GPU (torch). A request's blocks move in parts through one pinned host
    buffer (pageable memory reaches about a third of PCIe bandwidth) that never grows past
    `staging_bytes` (one engine block at least); each part is gathered or scattered on the device
    one layer at a time, so the extra device memory stays within the same bound. Blocks the cache
    holds already are not copied. Payload bytes are `PagedKv`'s: per block, each layer's block in
    logical order, layers back to back."""

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
        self._layer_bytes = [t.numel() // self.num_blocks * t.element_size() for t in tensors]
        self.block_bytes = sum(self._layer_bytes)
        self._device = first.device
        self.staging_bytes = staging_bytes
        #: The host buffer, as large as the largest part so far (pinned for a GPU).
        self.staging: Any = None
        self._lock = threading.Lock()
        self._torch = torch

    def _parts(self, engine: Engine, first: int, end: int) -> Iterator[tuple[int, int, Any]]:
        """Engine blocks `first..end` in parts `(a, b, host buffer for blocks a..b)`: a part's
        device copy plus one layer's two temporaries fit `staging_bytes`."""
        layers = len(self._tensors)
        step = max(1, self.staging_bytes * layers // ((layers + 2) * engine.block_bytes))
        need = min(step, max(0, end - first)) * engine.block_bytes
        if self.staging is None or self.staging.numel() < need:
            pin = self._device.type == "cuda"
            self.staging = self._torch.empty(need, dtype=self._torch.uint8, pin_memory=pin)
        for a in range(first, end, step):
            b = min(end, a + step)
            yield a, b, self.staging[: (b - a) * engine.block_bytes]

    def _ids(self, block_ids: Sequence[int]) -> Any:
        ids = self._torch.as_tensor(list(block_ids), dtype=self._torch.long, device=self._device)
        if len(block_ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise InvalidInputError(
                f"block ids out of range: the KV cache has {self.num_blocks} blocks"
            )
        return ids

    def _gather(self, block_ids: Sequence[int], host: Any) -> None:
        ids, n, u8 = self._ids(block_ids), len(block_ids), self._torch.uint8
        dev = self._torch.empty((n, self.block_bytes), dtype=u8, device=self._device)
        col = 0
        for t, nbytes in zip(self._tensors, self._layer_bytes, strict=True):
            part = t.index_select(self.block_dim, ids).movedim(self.block_dim, 0).contiguous()
            dev[:, col : col + nbytes] = part.view(u8).reshape(n, nbytes)
            col += nbytes
        host.view(n, self.block_bytes).copy_(dev)

    def _scatter(self, block_ids: Sequence[int], host: Any) -> None:
        ids, n = self._ids(block_ids), len(block_ids)
        dev, col = host.view(n, self.block_bytes).to(self._device), 0
        for t, nbytes in zip(self._tensors, self._layer_bytes, strict=True):
            part = dev[:, col : col + nbytes].contiguous().view(t.dtype)
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
        blocks, tokens, ids = self._blocks(engine), list(tokens), list(block_ids)
        blocks.store_kv_blocks(len(tokens), len(ids))  # raises when the ids do not cover them
        per, ebs, full = blocks.per, engine.block_size, blocks.full_engine_blocks(len(tokens))

        def copy_from(have: int) -> int:
            stored = 0
            for a, b, host in self._parts(engine, have, full):
                self._gather(ids[a * per : b * per], host)
                stored += engine.store(tokens[: b * ebs], host, first_block=a, **extras)
            return stored

        with self._lock:
            have = engine.lookup(tokens, **extras) // ebs  # cached already: not copied
            # A part stores nothing when the blocks before it are cached only below memory
            # (disk, Redis): then all of it is copied.
            return copy_from(have) or (copy_from(0) if have and have < full else 0)

    def load(
        self,
        engine: Engine,
        tokens: Any,
        block_ids: Sequence[int],
        first_block: int = 0,
        **extras: str | None,
    ) -> int:
        blocks, tokens, ids = self._blocks(engine), list(tokens), list(block_ids)
        per, bs, bb = blocks.per, self.block_size, self.block_bytes
        loaded = first_block * bs  # held by vLLM already
        with self._lock:
            end = blocks.load_engine_blocks(len(ids))
            for a, b, host in self._parts(engine, first_block // per, end):
                loaded = engine.load(tokens, host, first_block=a, **extras)
                start, stop = max(a * per, first_block), min(loaded // bs, b * per)
                if stop > start:
                    at = a * per
                    self._scatter(ids[start:stop], host[(start - at) * bb : (stop - at) * bb])
                if loaded < b * engine.block_size:
                    break  # the cached prefix ends in this part
        return loaded


#: Moves blocks between a model's KV caches and an engine: host tensors natively, CUDA ones staged.
KvIO = PagedKv | StagedKv


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
        # The core's reading of these settings (units, defaults): `EngineSettings.vllm`.
        section = {"enabled": True, "adapters": [{"name": self.name, "config": self.settings}]}
        vllm = config_engine_settings(section, f"adapters.{self.name}")["vllm"]
        self.kv_layout: str | None = vllm["kv_layout"]
        self.enable_prefix_caching: bool = vllm["enable_prefix_caching"]
        self.staging_bytes: int = vllm["staging_buffer_bytes"]
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
        world, rank = _tp_world_and_rank()
        ns = v0_kv_namespace(
            model_executable,
            layer_tensors(kv_caches),
            block_size=io.block_size,
            layout=io.layout,
            model_id=self.settings.get("model_id"),
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
