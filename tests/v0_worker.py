"""A vLLM-v0-shaped worker for tests, on numpy.

vLLM's v0 engine (what Dynamo 0.1-0.3 workers ran) was removed in vLLM 0.11 and cannot run
here, so this reproduces the parts XConnector touches, with the real shapes: a paged KV cache
per layer in flash-attn layout `(2, num_blocks, block_size, kv_heads, head_dim)`, a block
allocator that hands out scattered physical blocks, a frozen `model_input` with
`input_tokens`/`input_positions`/`attn_metadata` (`seq_lens`, `slot_mapping`, `query_start_loc`,
`num_prefills`, `num_prefill_tokens`, `context_lens_tensor`, `max_query_len`) and
`sampling_metadata.selected_token_indices`, and a model whose KV for a token is a deterministic
function of the whole prefix up to it (as real attention KV is). The worker's
`recv_kv_caches`/`send_kv_caches` have the v0 connector signatures.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LAYERS = 3
HEADS = 2
HEAD_DIM = 8
BLOCK = 16


@dataclass(frozen=True)
class AttentionMetadata:
    seq_lens: list[int]
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    num_prefills: int
    num_prefill_tokens: int
    context_lens_tensor: np.ndarray
    max_query_len: int


@dataclass(frozen=True)
class SamplingMetadata:
    selected_token_indices: np.ndarray


@dataclass(frozen=True)
class ModelInput:
    input_tokens: np.ndarray
    input_positions: np.ndarray
    attn_metadata: AttentionMetadata
    sampling_metadata: SamplingMetadata
    query_lens: list[int] = field(default_factory=list)


def token_kv(prefix: list[int], layer: int) -> np.ndarray:
    """K and V of the last token of `prefix` at `layer`: shape (2, HEADS, HEAD_DIM), float16."""
    digest = hashlib.sha256(repr((layer, prefix)).encode()).digest()
    raw = np.frombuffer((digest * 4)[: 2 * HEADS * HEAD_DIM], dtype=np.uint8)
    return (raw.astype(np.float16) / 7).reshape(2, HEADS, HEAD_DIM)


class TinyModel:
    """Computes KV for the tokens a `model_input` covers, at their positions, into the cache.
    Raises if a token's earlier context is missing from the cache (what a wrong load would
    cause in a real model: wrong attention)."""

    def __init__(self) -> None:
        self.computed_tokens = 0

    def __call__(
        self,
        model_input: ModelInput,
        kv_caches: list[np.ndarray],
        prompts: list[list[int]],
        tables: list[list[int]],
    ) -> list[int]:
        attn = model_input.attn_metadata
        tokens = model_input.input_tokens.tolist()
        positions = model_input.input_positions.tolist()
        slots = attn.slot_mapping.tolist()
        starts = attn.query_start_loc.tolist()
        for seq, (prompt, table) in enumerate(zip(prompts, tables, strict=True)):
            first = positions[starts[seq]]
            # Attention reads the context's KV: it must be exactly the prefix's.
            for pos in range(first):
                for layer, kv in enumerate(kv_caches):
                    got = kv[:, table[pos // BLOCK], pos % BLOCK]
                    if not np.array_equal(got, token_kv(prompt[: pos + 1], layer)):
                        raise AssertionError(f"wrong cached KV at position {pos}, layer {layer}")
            for i in range(starts[seq], starts[seq + 1]):
                pos = positions[i]
                assert tokens[i] == prompt[pos], "input token does not match its position"
                for layer, kv in enumerate(kv_caches):
                    block, off = divmod(slots[i], BLOCK)
                    kv[:, block, off] = token_kv(prompt[: pos + 1], layer)
            self.computed_tokens += starts[seq + 1] - starts[seq]
        # "Logits": the last token of each sequence, which must be the prompt's last token.
        picked = [tokens[i] for i in model_input.sampling_metadata.selected_token_indices.tolist()]
        assert picked == [p[-1] for p in prompts]
        return picked


class BlockAllocator:
    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def allocate(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        return out

    def release(self, blocks: list[int]) -> None:
        self.free.extend(blocks)


def new_kv_caches(num_blocks: int) -> list[np.ndarray]:
    return [np.zeros((2, num_blocks, BLOCK, HEADS, HEAD_DIM), np.float16) for _ in range(LAYERS)]


def build_model_input(prompts: list[list[int]], tables: list[list[int]]) -> ModelInput:
    tokens, positions, slots, starts = [], [], [], [0]
    for prompt, table in zip(prompts, tables, strict=True):
        for pos, tok in enumerate(prompt):
            tokens.append(tok)
            positions.append(pos)
            slots.append(table[pos // BLOCK] * BLOCK + pos % BLOCK)
        starts.append(len(tokens))
    attn = AttentionMetadata(
        seq_lens=[len(p) for p in prompts],
        slot_mapping=np.asarray(slots, np.int64),
        query_start_loc=np.asarray(starts, np.int32),
        num_prefills=len(prompts),
        num_prefill_tokens=len(tokens),
        context_lens_tensor=np.zeros(len(prompts), np.int32),
        max_query_len=max(len(p) for p in prompts),
    )
    return ModelInput(
        input_tokens=np.asarray(tokens, np.int64),
        input_positions=np.asarray(positions, np.int64),
        attn_metadata=attn,
        sampling_metadata=SamplingMetadata(np.asarray([s - 1 for s in starts[1:]], np.int64)),
        query_lens=[len(p) for p in prompts],
    )


class VLLMWorker:
    """A Dynamo-style worker: async hooks, prefill of a batch of prompts per step."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.num_blocks = config.get("num_blocks", 64)
        self.kv_caches = new_kv_caches(self.num_blocks)
        self.allocator = BlockAllocator(self.num_blocks, seed=config.get("seed", 0))
        self.model = TinyModel()
        self.last_tables: list[list[int]] = []

    async def recv_kv_caches(
        self, model_executable: Any, model_input: Any, kv_caches: Any
    ) -> tuple[Any, bool, Any]:
        return None, False, model_input

    async def send_kv_caches(
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Any,
        hidden_or_intermediate_states: Any,
    ) -> None:
        return None

    async def prefill(self, prompts: list[list[int]]) -> ModelInput:
        """One step: allocate blocks, receive cached KV, run the model on what is left, send."""
        tables = [self.allocator.allocate(-(-len(p) // BLOCK)) for p in prompts]
        self.last_tables = tables
        model_input = build_model_input(prompts, tables)
        hidden, bypass, model_input = await self.recv_kv_caches(
            self.model, model_input, self.kv_caches
        )
        if not bypass:
            hidden = self.model(model_input, self.kv_caches, prompts, tables)
        await self.send_kv_caches(self.model, model_input, self.kv_caches, hidden)
        return model_input

    def output(self, prompts: list[list[int]]) -> str:
        """A digest of the KV the last step left for `prompts` (what decoding would attend to)."""
        h = hashlib.sha256()
        for prompt, table in zip(prompts, self.last_tables, strict=True):
            for layer in self.kv_of(prompt, table):
                h.update(layer.tobytes())
        return h.hexdigest()[:16]

    def finish(self) -> None:
        for table in self.last_tables:
            self.allocator.release(table)
        self.last_tables = []

    def kv_of(self, prompt: list[int], table: list[int]) -> list[np.ndarray]:
        """The cached KV of `prompt`'s tokens per layer, read through its block table."""
        out = []
        for kv in self.kv_caches:
            rows = [kv[:, table[p // BLOCK], p % BLOCK] for p in range(len(prompt))]
            out.append(np.stack(rows, axis=1))
        return out


def expected_kv(prompt: list[int]) -> list[np.ndarray]:
    return [
        np.stack([token_kv(prompt[: p + 1], layer) for p in range(len(prompt))], axis=1)
        for layer in range(LAYERS)
    ]


class SyncVLLMWorker(VLLMWorker):
    """The same worker with synchronous hooks, as vLLM calls its connector."""

    def recv_kv_caches(self, model_executable: Any, model_input: Any, kv_caches: Any) -> Any:  # type: ignore[override]
        return None, False, model_input

    def send_kv_caches(  # type: ignore[override]
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Any,
        hidden_or_intermediate_states: Any,
    ) -> None:
        return None

    def prefill_sync(self, prompts: list[list[int]]) -> ModelInput:
        tables = [self.allocator.allocate(-(-len(p) // BLOCK)) for p in prompts]
        self.last_tables = tables
        model_input = build_model_input(prompts, tables)
        hidden, bypass, model_input = self.recv_kv_caches(self.model, model_input, self.kv_caches)
        if not bypass:
            hidden = self.model(model_input, self.kv_caches, prompts, tables)
        self.send_kv_caches(self.model, model_input, self.kv_caches, hidden)
        return model_input
