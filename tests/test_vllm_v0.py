"""vLLM v0 batches: the prefill requests found in a mixed batch (a fresh prefill, a chunked
prefill, a decode) and the batch rebuilt without a loaded prefix, every index field shifted and
every field kept in its own type (numpy, torch on CPU, lists; frozen dataclasses and plain
objects). The arithmetic is the core's (`v0_batch.rs`); this checks the fields around it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from xconnector._native import v0_skip
from xconnector.adapters.vllm_v0 import prefill_requests, rebuild_model_input
from xconnector.exceptions import InvalidInputError


@dataclass(frozen=True)
class Attn:
    seq_lens: list[int]
    slot_mapping: Any
    query_start_loc: Any
    num_prefills: int
    num_prefill_tokens: int
    context_lens_tensor: Any
    max_query_len: int


@dataclass(frozen=True)
class Sampling:
    selected_token_indices: Any


@dataclass(frozen=True)
class Input:
    input_tokens: Any
    input_positions: Any
    attn_metadata: Attn
    sampling_metadata: Sampling
    query_lens: list[int]


# A fresh prefill of 40 tokens (blocks 7, 2, 5), a chunked prefill computing 8 of 20 tokens
# (positions 12..20 in block 9 and 4), and a decode at position 29 (block 1).
TOKENS = list(range(100, 140)) + list(range(200, 208)) + [300]
POSITIONS = list(range(40)) + list(range(12, 20)) + [29]
SLOTS = [[7, 2, 5][p // 16] * 16 + p % 16 for p in range(40)]
SLOTS += [(9 if p < 16 else 4) * 16 + p % 16 for p in range(12, 20)] + [1 * 16 + 29 % 16]


def batch(
    arr: Callable[[list[int], str], Any], *, with_qsl: bool = True, frozen: bool = True
) -> Any:
    attn = dict(
        seq_lens=[40, 20, 30],
        slot_mapping=arr(SLOTS, "int64"),
        query_start_loc=arr([0, 40, 48, 49], "int32") if with_qsl else None,
        num_prefills=2,
        num_prefill_tokens=48,
        context_lens_tensor=arr([0, 12, 29], "int32"),
        max_query_len=40,
    )
    fields = dict(
        input_tokens=arr(TOKENS, "int64"),
        input_positions=arr(POSITIONS, "int64"),
        sampling_metadata=Sampling(arr([39, 47, 48], "int64")),
        query_lens=[40, 8, 1],
    )
    if frozen:
        return Input(attn_metadata=Attn(**attn), **fields)
    return SimpleNamespace(attn_metadata=SimpleNamespace(**attn), **fields)


def check_rebuilt(mi: Any, new: Any, ints: Callable[[Any], list[int]]) -> None:
    """32 tokens of the first prefill loaded: 8 of it remain, then the chunk and the decode."""
    a = new.attn_metadata
    assert ints(new.input_tokens) == TOKENS[32:]
    assert ints(new.input_positions) == POSITIONS[32:]
    assert ints(a.slot_mapping) == SLOTS[32:]
    if mi.attn_metadata.query_start_loc is not None:
        assert ints(a.query_start_loc) == [0, 8, 16, 17]
        assert a.query_start_loc.dtype == mi.attn_metadata.query_start_loc.dtype
    assert ints(a.context_lens_tensor) == [32, 12, 29]
    assert a.context_lens_tensor.dtype == mi.attn_metadata.context_lens_tensor.dtype
    assert (a.num_prefill_tokens, a.max_query_len, new.query_lens) == (16, 8, [8, 8, 1])
    # Each sequence's last token is still the one sampled.
    assert ints(new.sampling_metadata.selected_token_indices) == [7, 15, 16]
    assert a.seq_lens == [40, 20, 30] and a.num_prefills == 2
    # The original batch is untouched.
    assert ints(mi.input_tokens) == TOKENS and mi.attn_metadata.num_prefill_tokens == 48


def np_arr(values: list[int], dtype: str) -> Any:
    return np.asarray(values, dtype=dtype)


@pytest.mark.parametrize(("with_qsl", "frozen"), [(True, True), (False, True), (True, False)])
def test_prefills_of_a_mixed_batch_and_the_batch_without_a_loaded_prefix(
    with_qsl: bool, frozen: bool
) -> None:
    mi = batch(np_arr, with_qsl=with_qsl, frozen=frozen)
    fresh, chunk = prefill_requests(mi)
    assert (fresh.index, fresh.start, fresh.end, fresh.fresh) == (0, 0, 40, True)
    assert (fresh.tokens, fresh.slots) == (TOKENS[:40], SLOTS[:40])
    assert (chunk.index, chunk.start, chunk.end, chunk.fresh) == (1, 40, 48, False)
    new = rebuild_model_input(mi, [fresh, chunk], {0: 32})
    check_rebuilt(mi, new, lambda x: x.tolist() if hasattr(x, "tolist") else list(x))
    assert rebuild_model_input(mi, [fresh, chunk], {}) is mi


def test_lists_stay_lists_and_bad_batches_are_invalid_input() -> None:
    mi = batch(lambda v, _: list(v))
    requests = prefill_requests(mi)
    new = rebuild_model_input(mi, requests, {0: 16})
    assert new.input_tokens == TOKENS[16:] and new.attn_metadata.query_start_loc == [0, 24, 32, 33]
    with pytest.raises(InvalidInputError, match="cannot skip 40 of 40 tokens of request 0"):
        rebuild_model_input(mi, requests, {0: 40})  # the last token is always computed
    with pytest.raises(InvalidInputError, match="not a v0 batch"):
        prefill_requests(SimpleNamespace(input_tokens=[1]))
    with pytest.raises(InvalidInputError, match="unknown v0 batch field bogus"):
        v0_skip([(0, 2, 1)], num_seqs=1, fields={"input_tokens": [1, 2], "bogus": [0]})
    with pytest.raises(InvalidInputError, match="slot_mapping has 1 entries for 2 input tokens"):
        v0_skip([(0, 2, 1)], num_seqs=1, fields={"input_tokens": [1, 2], "slot_mapping": [0]})
    short = SimpleNamespace(**{**vars(mi), "input_tokens": TOKENS[:-1]})
    with pytest.raises(InvalidInputError, match="slot_mapping has 49 entries for 48"):
        prefill_requests(short)


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="runs in .venv-vllm")
def test_torch_fields_keep_their_dtype_and_device() -> None:
    import torch

    dtypes = {"int64": torch.int64, "int32": torch.int32}
    mi = batch(lambda v, d: torch.tensor(v, dtype=dtypes[d]))
    new = rebuild_model_input(mi, prefill_requests(mi), {0: 32})
    check_rebuilt(mi, new, lambda x: x.tolist() if hasattr(x, "tolist") else list(x))
    assert isinstance(new.input_tokens, torch.Tensor)
    assert new.attn_metadata.slot_mapping.device == mi.attn_metadata.slot_mapping.device
