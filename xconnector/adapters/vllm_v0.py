"""vLLM v0's connector contract: find each prefill request's tokens and KV slots in a batch's
`model_input`, and rebuild the `model_input` so it covers only the tokens still to compute.

Fields read (DESIGN 3.2): `input_tokens`, `attn_metadata.{seq_lens, slot_mapping,
query_start_loc, num_prefills, num_prefill_tokens}`; rebuilt as well when present:
`input_positions`, `query_lens`, `attn_metadata.{context_lens_tensor, max_query_len,
max_prefill_seq_len}`, `sampling_metadata.selected_token_indices`. Prefill requests come first in
a v0 batch; only fresh ones (query covering the whole sequence) can be served from the cache.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from xconnector.adapters._arrays import like, take, to_list
from xconnector.exceptions import InvalidInputError


@dataclass(frozen=True)
class PrefillRequest:
    """One prefill sequence of a batch."""

    index: int
    #: Offsets of its tokens in the batch's flattened input.
    start: int
    end: int
    tokens: list[int]
    slots: list[int]
    #: The query covers the whole sequence: nothing of it was computed before this step.
    fresh: bool


def _starts(model_input: Any, attn: Any, num_seqs: int, seq_lens: list[int]) -> list[int]:
    qsl = getattr(attn, "query_start_loc", None)
    if qsl is not None:
        return [int(v) for v in to_list(qsl)]
    lens = getattr(model_input, "query_lens", None) or seq_lens
    starts = [0]
    for n in lens[:num_seqs]:
        starts.append(starts[-1] + int(n))
    return starts


def prefill_requests(model_input: Any) -> list[PrefillRequest]:
    """The batch's prefill requests, in order."""
    attn = getattr(model_input, "attn_metadata", None)
    if attn is None or getattr(model_input, "input_tokens", None) is None:
        raise InvalidInputError("model_input has no input_tokens/attn_metadata (not a v0 batch)")
    tokens = [int(t) for t in to_list(model_input.input_tokens)]
    slots = [int(s) for s in to_list(attn.slot_mapping)]
    if len(slots) != len(tokens):
        raise InvalidInputError(
            f"slot_mapping has {len(slots)} entries for {len(tokens)} input tokens"
        )
    seq_lens = [int(n) for n in (getattr(attn, "seq_lens", None) or [])]
    num_prefills = getattr(attn, "num_prefills", None)
    num_prefills = len(seq_lens) if num_prefills is None else int(num_prefills)
    starts = _starts(model_input, attn, len(seq_lens), seq_lens)
    if len(starts) < num_prefills + 1 or len(seq_lens) < num_prefills:
        raise InvalidInputError(
            f"attn_metadata describes {len(seq_lens)} sequences / {len(starts) - 1} query ranges "
            f"for {num_prefills} prefills"
        )
    out = []
    for i in range(num_prefills):
        start, end = starts[i], starts[i + 1]
        if not 0 <= start <= end <= len(tokens):
            raise InvalidInputError(
                f"query range {start}..{end} of sequence {i} is out of the batch"
            )
        out.append(
            PrefillRequest(
                index=i,
                start=start,
                end=end,
                tokens=tokens[start:end],
                slots=slots[start:end],
                fresh=end - start == seq_lens[i],
            )
        )
    return out


def _replace(obj: Any, **changes: Any) -> Any:
    """A copy of `obj` with `changes` (only attributes it has), frozen dataclasses included."""
    changes = {k: v for k, v in changes.items() if hasattr(obj, k)}
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


def rebuild_model_input(
    model_input: Any, requests: list[PrefillRequest], loaded: dict[int, int]
) -> Any:
    """`model_input` without the first `loaded[i]` tokens of prefill request i (their KV is in
    the cache blocks already). At least the last token of each request must remain."""
    removed: list[int] = []
    for r in requests:
        n = loaded.get(r.index, 0)
        if not 0 <= n < r.end - r.start:
            raise InvalidInputError(
                f"cannot skip {n} of {r.end - r.start} tokens of request {r.index}"
            )
        removed.extend(range(r.start, r.start + n))
    if not removed:
        return model_input
    attn = model_input.attn_metadata
    total = len(to_list(model_input.input_tokens))
    gone = set(removed)
    keep = [i for i in range(total) if i not in gone]

    def shift(pos: int) -> int:
        return pos - bisect.bisect_left(removed, pos)

    attn_changes: dict[str, Any] = {"slot_mapping": take(attn.slot_mapping, keep)}
    qsl = getattr(attn, "query_start_loc", None)
    if qsl is not None:
        attn_changes["query_start_loc"] = like(qsl, [shift(int(p)) for p in to_list(qsl)])
    if getattr(attn, "num_prefill_tokens", None) is not None:
        attn_changes["num_prefill_tokens"] = int(attn.num_prefill_tokens) - len(removed)
    new_query = [r.end - r.start - loaded.get(r.index, 0) for r in requests]
    if getattr(attn, "max_query_len", None) is not None and new_query:
        decode_max = 1 if len(new_query) < len(getattr(attn, "seq_lens", None) or []) else 0
        attn_changes["max_query_len"] = max([*new_query, decode_max])
    ctx = getattr(attn, "context_lens_tensor", None)
    if ctx is not None:
        values = [int(v) for v in to_list(ctx)]
        for r in requests:
            values[r.index] += loaded.get(r.index, 0)
        attn_changes["context_lens_tensor"] = like(ctx, values)

    changes: dict[str, Any] = {
        "input_tokens": take(model_input.input_tokens, keep),
        "attn_metadata": _replace(attn, **attn_changes),
    }
    if getattr(model_input, "input_positions", None) is not None:
        changes["input_positions"] = take(model_input.input_positions, keep)
    query_lens = getattr(model_input, "query_lens", None)
    if query_lens is not None:
        changes["query_lens"] = [*new_query, *list(query_lens)[len(new_query) :]]
    sampling = getattr(model_input, "sampling_metadata", None)
    selected = getattr(sampling, "selected_token_indices", None)
    if selected is not None:
        moved = like(selected, [shift(int(i)) for i in to_list(selected)])
        changes["sampling_metadata"] = _replace(sampling, selected_token_indices=moved)
    return _replace(model_input, **changes)
