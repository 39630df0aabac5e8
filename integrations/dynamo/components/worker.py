import xconnector.integrations.dynamo.autopatch  # noqa: F401  XConnector: the one line

# ruff: noqa: E402  (the line above comes first on purpose)

"""An example Dynamo worker with XConnector: the first line above is all a deployment adds to its
`components/worker.py`; the `xconnector:` section under `Common:` in the YAML turns it on.

Dynamo's vLLM-v0-era workers receive and send KV through methods with these signatures:

    recv_kv_caches(model_executable, model_input, kv_caches)
        -> (hidden, bypass_model_exec, model_input)
    send_kv_caches(model_executable, model_input, kv_caches, hidden_or_intermediate_states)

This file is runnable without Dynamo, vLLM or a GPU: the worker below has those methods, a paged
KV cache per layer in vLLM's flash-attn layout, a block allocator, and a small numpy model whose
KV for each token depends on the whole prefix (as a transformer's does), so serving a cached
prefix wrongly would change its output. `integrations/dynamo/demo.py` runs it.
"""

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:  # in a Dynamo deployment the class is a Dynamo service
    from dynamo.sdk import service  # type: ignore[import-not-found]
except ImportError:

    def service(cls: type) -> type:
        return cls


LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, VOCAB = 4, 2, 32, 16, 32000
HIDDEN = KV_HEADS * HEAD_DIM


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
class ModelInput:
    """The fields of vLLM v0's ModelInputForGPU that a KV connector reads."""

    input_tokens: np.ndarray
    input_positions: np.ndarray
    attn_metadata: AttentionMetadata
    query_lens: list[int] = field(default_factory=list)


class ToyModel:
    """Per layer, h[t] = tanh(W h[t-1] + x[t]); K stores h, V a projection of it. Continuing a
    sequence reads h at the last cached position from the KV cache, so the cached prefix's KV is
    exactly what the continuation depends on."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.embed = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32)
        self.w = [
            (rng.standard_normal((HIDDEN, HIDDEN)) / 8).astype(np.float32) for _ in range(LAYERS)
        ]
        self.wv = [
            (rng.standard_normal((HIDDEN, HIDDEN)) / 8).astype(np.float32) for _ in range(LAYERS)
        ]
        self.config = type("Config", (), {"_name_or_path": "xconnector-example/toy-4l"})()

    def __call__(
        self, model_input: ModelInput, kv_caches: list[np.ndarray], tables: list[list[int]]
    ) -> list[int]:
        tokens = model_input.input_tokens.tolist()
        positions = model_input.input_positions.tolist()
        starts = model_input.attn_metadata.query_start_loc.tolist()
        next_tokens = []
        for seq, table in enumerate(tables):
            first = positions[starts[seq]]
            h = [np.zeros(HIDDEN, np.float32) for _ in range(LAYERS)]
            if first > 0:  # continue from the cached prefix
                block, off = table[(first - 1) // BLOCK_SIZE], (first - 1) % BLOCK_SIZE
                h = [kv[0, block, off].reshape(HIDDEN).copy() for kv in kv_caches]
            for i in range(starts[seq], starts[seq + 1]):
                x = self.embed[tokens[i]]
                block, off = table[positions[i] // BLOCK_SIZE], positions[i] % BLOCK_SIZE
                for layer, kv in enumerate(kv_caches):
                    h[layer] = np.tanh(self.w[layer] @ h[layer] + x)
                    kv[0, block, off] = h[layer].reshape(KV_HEADS, HEAD_DIM)
                    kv[1, block, off] = (self.wv[layer] @ h[layer]).reshape(KV_HEADS, HEAD_DIM)
                    x = h[layer]
            next_tokens.append(int(np.argmax(self.embed @ h[-1])))
        return next_tokens


@service
class VllmWorker:
    def __init__(self, num_blocks: int = 1024) -> None:
        self.model = ToyModel()
        self.kv_caches = [
            np.zeros((2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM), np.float32)
            for _ in range(LAYERS)
        ]
        self.free_blocks = list(range(num_blocks))

    async def recv_kv_caches(self, model_executable: Any, model_input: Any, kv_caches: Any) -> Any:
        return None, False, model_input  # no remote KV in this example: compute everything

    async def send_kv_caches(
        self,
        model_executable: Any,
        model_input: Any,
        kv_caches: Any,
        hidden_or_intermediate_states: Any,
    ) -> None:
        return None

    async def generate(self, prompt: list[int]) -> dict[str, Any]:
        """Prefill one prompt; returns the next token, the tokens computed, and the time taken."""
        table = [self.free_blocks.pop() for _ in range(-(-len(prompt) // BLOCK_SIZE))]
        try:
            t0 = time.perf_counter()
            model_input = _model_input(prompt, table)
            _, bypass, model_input = await self.recv_kv_caches(
                self.model, model_input, self.kv_caches
            )
            out = None if bypass else self.model(model_input, self.kv_caches, [table])
            await self.send_kv_caches(self.model, model_input, self.kv_caches, out)
            return {
                "next_token": out[0] if out else None,
                "computed": int(model_input.input_tokens.size),
                "seconds": time.perf_counter() - t0,
            }
        finally:
            self.free_blocks.extend(table)  # the request finished: its blocks go back


def _model_input(prompt: list[int], table: list[int]) -> ModelInput:
    n = len(prompt)
    slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n)]
    attn = AttentionMetadata(
        seq_lens=[n],
        slot_mapping=np.asarray(slots, np.int64),
        query_start_loc=np.asarray([0, n], np.int32),
        num_prefills=1,
        num_prefill_tokens=n,
        context_lens_tensor=np.zeros(1, np.int32),
        max_query_len=n,
    )
    return ModelInput(
        input_tokens=np.asarray(prompt, np.int64),
        input_positions=np.arange(n, dtype=np.int64),
        attn_metadata=attn,
        query_lens=[n],
    )
