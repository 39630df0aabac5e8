"""The namespace derivation (now the core's `kv_namespace`) pinned to what the Python adapter
computed before it moved: caches on disk and in Redis are keyed by these ids, so the v1 connector
(`vllm_kv_namespace`) and the v0 adapter (`VLLMAdapter.namespace`) must keep producing them."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pytest

from xconnector._native import Engine, EngineBlocks, kv_block_dim, lora_identity, vllm_kv_namespace
from xconnector.adapters import vllm as V
from xconnector.config.schema import AdapterConfig, SDKConfig
from xconnector.exceptions import InvalidInputError


class _HF:
    def __init__(self, d: dict[str, Any]) -> None:
        self.d = d

    def to_dict(self) -> dict[str, Any]:
        return dict(self.d)


def _cfg(
    model: str = "meta/llama",
    revision: str | None = None,
    quant: str | None = None,
    cache_dtype: str | None = "auto",
    hf: _HF | None = None,
    mml: int | None = 4096,
    tp: int = 1,
    pp: int = 1,
    text: bool = True,
) -> Any:
    m = NS(model=model, revision=revision, quantization=quant, max_model_len=mml)
    if hf is not None:
        setattr(m, "hf_text_config" if text else "hf_config", hf)
    return NS(
        model_config=m,
        parallel_config=NS(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        cache_config=NS(block_size=16, cache_dtype=cache_dtype),
    )


STD = [np.zeros((10, 2, 16, 8), np.float16) for _ in range(3)]
FA = [np.zeros((2, 7, 16, 2, 4), np.float32) for _ in range(2)] + [
    np.zeros((2, 7, 16, 4, 4), np.float32)
]
MLA = [np.zeros((5, 16, 12), np.uint8)]
HF1 = _HF(
    {
        "_name_or_path": "/x",
        "transformers_version": "4.5",
        "hidden_size": 64,
        "rope_theta": 1e-05,
        "torch_dtype": np.float16,
        "name": "llamä",
        "b": [1.5, None, True],
        "a": {"z": 1, "y": 2.0},
    }
)
HF2 = _HF(
    {
        "hidden_size": 64,
        "rope_scaling": {"type": "longrope", "factor": 4.0},
        "max_position_embeddings": 131072,
        "x": float("inf"),
    }
)
HF3 = _HF({"hidden_size": 64, "rope_scaling": {}, "k": 'q"\n\t\u2603\U0001f600'})

_BASE = {
    "model": "meta/llama",
    "revision": "",
    "dtype": "float16",
    "quantization": "",
    "tp_world_size": 1,
    "tp_rank": 0,
    "pp_world_size": 1,
    "pp_rank": 0,
}

# (config, tensors, ranks) -> (the namespace dict, the engine's namespace id), as computed by the
# Python adapter before the rules moved to the core.
V1_CASES: dict[str, tuple[Any, list[Any], dict[str, Any], dict[str, Any], int]] = {
    "plain_std": (
        _cfg(),
        STD,
        {"tp_rank": 0, "pp_rank": 0},
        {**_BASE, "extra": {"block_shape": "3x[2x16x8]"}},
        9048292221101280758,
    ),
    "fp8_fa_tp": (
        _cfg(cache_dtype="fp8", tp=2, pp=2, revision="abc", quant="awq"),
        FA,
        {"tp_rank": 1, "pp_rank": 1, "model_id": "my-model"},
        {
            **_BASE,
            "model": "my-model",
            "revision": "abc",
            "dtype": "fp8_e4m3",
            "quantization": "awq",
            "tp_world_size": 2,
            "tp_rank": 1,
            "pp_world_size": 2,
            "pp_rank": 1,
            "extra": {"block_shape": "3x[2x16x2x4,2x16x4x4]"},
        },
        13582244345445685358,
    ),
    "fp8e5_mla": (
        _cfg(cache_dtype="fp8_e5m2", hf=HF1),
        MLA,
        {"tp_rank": 0, "pp_rank": 0},
        {
            **_BASE,
            "dtype": "fp8_e5m2",
            "extra": {
                "block_shape": "1x[16x12]",
                "model_config": "fd196be2ae41573ad5ee48d0d311002e",
            },
        },
        12084191371545520108,
    ),
    "rope": (
        _cfg(hf=HF2, mml=8192),
        STD,
        {"tp_rank": 0, "pp_rank": 0},
        {
            **_BASE,
            "extra": {
                "block_shape": "3x[2x16x8]",
                "model_config": "38d3a7bc34a1fa8489520655a1a119fa",
            },
        },
        16211194440458794899,
    ),
    "rope_empty": (
        _cfg(hf=HF3, text=False),
        STD,
        {"tp_rank": 0, "pp_rank": 0},
        {
            **_BASE,
            "extra": {
                "block_shape": "3x[2x16x8]",
                "model_config": "ce0dda78c03a68a59d78babdd0997ba7",
            },
        },
        8933660831941963863,
    ),
    "no_cache_dtype": (
        _cfg(cache_dtype=None, hf=HF1, mml=None),
        FA,
        {"tp_rank": 0, "pp_rank": 0},
        {
            **_BASE,
            "dtype": "float32",
            "extra": {
                "block_shape": "3x[2x16x2x4,2x16x4x4]",
                "model_config": "fd196be2ae41573ad5ee48d0d311002e",
            },
        },
        2102249169127791124,
    ),
}


def _engine_id(ns: dict[str, Any], layout: str) -> int:
    kwargs = {"kv_layout": layout, **ns}
    return Engine(block_bytes=64, capacity_bytes=1 << 20, block_size=16, **kwargs).namespace


@pytest.mark.parametrize("case", sorted(V1_CASES))
def test_v1_namespace_is_unchanged(case: str) -> None:
    config, tensors, ranks, expected, ns_id = V1_CASES[case]
    ns = vllm_kv_namespace(config, tensors, **ranks)
    assert ns == expected
    # The connector's engine gets kv_layout from the block mover (`bind`).
    assert _engine_id(ns, "standard") == ns_id


@pytest.mark.parametrize(
    ("settings", "executable", "tensors", "layout", "ns_id"),
    [
        ({}, NS(config=NS(_name_or_path="org/m")), STD, "standard", 13626328736188652350),
        (
            {"model_id": "mine"},
            NS(config=NS(name_or_path="org/m")),
            FA,
            "flash_attn",
            11500566251965562651,
        ),
        ({}, NS(), MLA, "mla", 10800135992294070585),
    ],
)
def test_v0_namespace_is_unchanged(
    settings: dict[str, Any], executable: Any, tensors: list[Any], layout: str, ns_id: int
) -> None:
    adapter = V.VLLMAdapter(AdapterConfig(name="vllm", config=settings), SDKConfig())
    io = adapter.kv_io(tensors, 16)
    ns = adapter.namespace(executable, tensors, io)
    assert ns["kv_layout"] == layout
    assert _engine_id(ns, ns["kv_layout"]) == ns_id


def _old_lora_identity(path_str: str) -> str:
    """The Python adapter's rule before it moved to the core, kept as the reference."""
    path = Path(path_str)
    if not path.is_dir():
        return f"path:{path}"
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(f for f in path.iterdir() if f.is_file()):
        h.update(str(f).encode())
        h.update(f.read_bytes())
    return "content:" + h.hexdigest()


def test_lora_identity_is_unchanged(tmp_path: Path) -> None:
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00weights" * 1000)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "nested").mkdir()
    for spelling in (str(adapter), f"{adapter}/", f"{tmp_path}//./lora", "hub/org/x", "//a"):
        assert lora_identity(spelling) == _old_lora_identity(spelling), spelling
    request = NS(lora_path=str(adapter), lora_name="a")
    assert V.lora_identity(request) == _old_lora_identity(str(adapter))
    before = V.lora_identity(request)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x01weights" * 1001)
    assert V.lora_identity(request) != before
    assert V.lora_identity(NS(lora_path=None)).startswith("content:")  # "" is the cwd, as before


def test_engine_block_geometry_is_the_cores() -> None:
    blocks = EngineBlocks(16, 100, 64, 400)
    assert blocks.per == 4
    assert blocks.store_kv_blocks(130, 8) == 8
    assert blocks.loaded_kv_blocks(64, 2) == (2, 4)
    with pytest.raises(InvalidInputError, match="not a whole number of these KV blocks"):
        EngineBlocks(16, 100, 40, 250)
    with pytest.raises(InvalidInputError, match="block id"):
        blocks.store_kv_blocks(130, 7)
    assert [kv_block_dim(n) for n in ("flash_attn", "flashinfer", "standard", "mla")] == [
        1,
        0,
        0,
        0,
    ]
    with pytest.raises(InvalidInputError, match="unknown KV layout"):
        kv_block_dim("nhd")


def test_key_tokens_are_unchanged() -> None:
    tokens = list(range(100, 130))
    image = NS(identifier="img-1", mm_position=NS(offset=2, length=5))
    audio = NS(identifier=None, mm_hash="aud", mm_position=NS(offset=4, length=40))
    one = [100, 101, 3999278952, 3442948124, 3312135712, 2265095224, 2720938095]
    assert V.key_tokens(tokens, [image]) == one + tokens[7:]
    both = V.key_tokens(tokens, [image, audio])
    assert both[:7] == [100, 101, 3999278952, 3442948124, 4111517840, 2832717650, 3211413180]
    assert both[29] == 2765334213
    assert V.key_tokens(tokens, None) == tokens
    with pytest.raises(InvalidInputError, match="without a hash or position"):
        V.key_tokens(tokens, [NS(identifier="x", mm_position=None)])


@pytest.mark.torch
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="runs in .venv-vllm, which has torch"
)
def test_staged_and_host_paths_compose_engine_blocks_alike() -> None:
    """Engine blocks of two KV blocks: the device-staged store/load (torch, run on CPU) and the
    native one agree, ids map in order, and blocks before `first_block` are left alone."""
    import torch

    from xconnector._native import PagedKv
    from xconnector.adapters.vllm import StagedKv

    bs, n = 16, 12
    gen = torch.Generator().manual_seed(5)
    src = [torch.randn(n, 2, bs, 8, generator=gen) for _ in range(2)]
    host = PagedKv(src, bs)
    tokens = list(range(5 * bs))  # 2 full engine blocks of 2 KV blocks, and a partial one
    ids = [3, 9, 1, 6, 0]
    for io in (host, StagedKv(src, bs, None, staging_bytes=1 << 20)):
        engine = Engine(block_bytes=2 * host.block_bytes, capacity_bytes=1 << 22, block_size=2 * bs)
        assert io.store(engine, tokens, ids) == 2
        with pytest.raises(InvalidInputError, match="block id"):
            io.store(
                Engine(block_bytes=2 * host.block_bytes, capacity_bytes=1 << 22, block_size=2 * bs),
                tokens,
                ids[:3],
            )
        dst = [torch.zeros_like(t) for t in src]
        target = StagedKv(dst, bs, None, 1 << 20) if io is not host else PagedKv(dst, bs)
        assert target.load(engine, tokens, [4, 5, 6, 7, 8], first_block=1) == 4 * bs
        for s, d in zip(src, dst, strict=True):
            assert not d[4].any()  # before first_block: not written
            for x, y in zip(ids[1:4], [5, 6, 7], strict=True):
                assert torch.equal(s[x], d[y])
            assert not d[8].any()  # the partial engine block was never stored
