"""vLLM v0's connector contract: find each prefill request's tokens and KV slots in a batch's
`model_input`, and rebuild the `model_input` so it covers only the tokens still to compute.

Fields read (DESIGN 3.2): `input_tokens`, `attn_metadata.{seq_lens, slot_mapping,
query_start_loc, num_prefills, num_prefill_tokens}`; rebuilt as well when present:
`input_positions`, `query_lens`, `attn_metadata.{context_lens_tensor, max_query_len}`,
`sampling_metadata.selected_token_indices`. Prefill requests come first in a v0 batch; only fresh
ones (query covering the whole sequence) can be served from the cache. The index arithmetic is
the core's (`v0_prefills`, `v0_skip`); this module reads the fields and writes the results back
in each field's own type (torch tensor on its device, numpy array, list).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from xconnector._native import v0_prefills, v0_skip
from xconnector.exceptions import InvalidInputError


@dataclass(frozen=True)
class PrefillRequest:
    """One prefill sequence of a batch: its tokens are `start:end` of the flattened input."""

    index: int
    start: int
    end: int
    tokens: list[int]
    slots: list[int]
    #: The query covers the whole sequence: nothing of it was computed before this step.
    fresh: bool


def _ints(x: Any) -> Any:
    """The Python int(s) of a tensor, array, sequence or number (None stays None)."""
    if x is None or isinstance(x, int):
        return x
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _like(x: Any, values: list[int] | int) -> Any:
    """`values` in x's type: dtype and device for a tensor or array; a count stays an int."""
    if isinstance(values, int):
        return values
    if hasattr(x, "new_tensor"):  # torch
        return x.new_tensor(values)
    if hasattr(x, "__array_interface__"):
        import numpy as np

        return np.asarray(values, dtype=x.dtype)
    return type(x)(values)


def prefill_requests(model_input: Any) -> list[PrefillRequest]:
    """The batch's prefill requests, in order."""
    attn = getattr(model_input, "attn_metadata", None)
    if attn is None or getattr(model_input, "input_tokens", None) is None:
        raise InvalidInputError("model_input has no input_tokens/attn_metadata (not a v0 batch)")
    tokens, slots = _ints(model_input.input_tokens), _ints(attn.slot_mapping)
    found = v0_prefills(
        len(tokens),
        len(slots),
        _ints(getattr(attn, "seq_lens", None) or []),
        num_prefills=_ints(getattr(attn, "num_prefills", None)),
        query_start_loc=_ints(getattr(attn, "query_start_loc", None)),
        query_lens=_ints(getattr(model_input, "query_lens", None)),
    )
    return [
        PrefillRequest(i, start, end, tokens[start:end], slots[start:end], fresh)
        for i, (start, end, fresh) in enumerate(found)
    ]


def _replace(obj: Any, **changes: Any) -> Any:
    """A copy of `obj` with the `changes` that are not None, to attributes it has (frozen
    dataclasses included)."""
    changes = {k: v for k, v in changes.items() if v is not None and hasattr(obj, k)}
    if not changes:
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        init = {f.name for f in dataclasses.fields(obj) if f.init}
        if set(changes) <= init:
            return dataclasses.replace(obj, **changes)
    new = copy.copy(obj)
    for k, v in changes.items():
        object.__setattr__(new, k, v)
    return new


# The fields the core rewrites (`v0_skip`), by the object that holds them.
_INPUT = ("input_tokens", "input_positions", "query_lens")
_ATTN = (
    "slot_mapping",
    "query_start_loc",
    "context_lens_tensor",
    "num_prefill_tokens",
    "max_query_len",
)


def rebuild_model_input(
    model_input: Any, requests: list[PrefillRequest], loaded: dict[int, int]
) -> Any:
    """`model_input` without the first `loaded[i]` tokens of prefill request i (their KV is in
    the cache blocks already). At least the last token of each request must remain."""
    attn = model_input.attn_metadata
    sampling = getattr(model_input, "sampling_metadata", None)
    old = {k: getattr(model_input, k, None) for k in _INPUT}
    old |= {k: getattr(attn, k, None) for k in _ATTN}
    old["selected_token_indices"] = getattr(sampling, "selected_token_indices", None)
    new = v0_skip(
        [(r.start, r.end, loaded.get(r.index, 0)) for r in requests],
        num_seqs=len(getattr(attn, "seq_lens", None) or []),
        fields={k: _ints(v) for k, v in old.items() if v is not None},
    )
    if new is None:  # nothing skipped
        return model_input
    out = {k: _like(old[k], v) for k, v in new.items()}
    return _replace(
        model_input,
        attn_metadata=_replace(attn, **{k: out.get(k) for k in _ATTN}),
        sampling_metadata=_replace(
            sampling, selected_token_indices=out.get("selected_token_indices")
        ),
        **{k: out.get(k) for k in _INPUT},
    )
