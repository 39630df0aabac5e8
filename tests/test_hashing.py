"""Dynamo-compatible hashes through the Python surface, for every accepted token container."""

from __future__ import annotations

import array

import numpy as np
import pytest

from xconnector import local_block_hashes, sequence_hashes
from xconnector.exceptions import InvalidInputError, XConnectorError

LOCAL = [0xEA06FC71A5EE6E88, 0x1FBF39BD106BE0B5, 0xA8562FE663B7A097, 0x4BAD57D34048B86A]
SEQ = [0xEA06FC71A5EE6E88, 0xAD01835A37DD294C, 0x0D55E56C2BCCBD1A, 0x445502A8048D6688]

CONTAINERS = {
    "list": lambda n: list(range(1, n + 1)),
    "tuple": lambda n: tuple(range(1, n + 1)),
    "range": lambda n: range(1, n + 1),
    "array-I": lambda n: array.array("I", range(1, n + 1)),
    "array-q": lambda n: array.array("q", range(1, n + 1)),
    "numpy-uint32": lambda n: np.arange(1, n + 1, dtype=np.uint32),
    "numpy-int64": lambda n: np.arange(1, n + 1, dtype=np.int64),
    "numpy-int32": lambda n: np.arange(1, n + 1, dtype=np.int32),
    "numpy-uint16": lambda n: np.arange(1, n + 1, dtype=np.uint16),
    "memoryview": lambda n: memoryview(array.array("I", range(1, n + 1))),
}


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_dynamo_vectors_for_every_container(kind: str) -> None:
    tokens = CONTAINERS[kind](64)
    assert local_block_hashes(tokens, 16) == LOCAL
    assert sequence_hashes(tokens, 16) == SEQ


def test_partial_block_is_dropped() -> None:
    assert sequence_hashes(list(range(1, 36)), 16) == SEQ[:2]
    assert sequence_hashes(list(range(1, 16)), 16) == []
    assert sequence_hashes([], 16) == []


def test_lora_and_salt_change_hashes_deterministically() -> None:
    toks = list(range(1, 65))
    lora = sequence_hashes(toks, lora_name="adapter")
    salt = sequence_hashes(toks, cache_salt="tenant-1")
    assert lora != SEQ and salt != SEQ and lora != salt
    assert lora == sequence_hashes(toks, lora_name="adapter")
    # Empty strings count as absent, as in Dynamo.
    assert sequence_hashes(toks, lora_name="", cache_salt="") == SEQ


def test_non_contiguous_numpy_is_rejected_clearly() -> None:
    a = np.arange(128, dtype=np.uint32)[::2]
    with pytest.raises(InvalidInputError, match="contiguous"):
        sequence_hashes(a)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([1, 2, -3], "token id -3 at index 2 is negative"),
        (np.array([1, -1], dtype=np.int64), "token id -1 at index 1 is negative"),
        ([2**32], "does not fit in 32 bits"),
        (np.array([2**40], dtype=np.uint64), "does not fit in 32 bits"),
        (np.array([1.0, 2.0]), "format 'd'"),
        ([1, 2.5], "item 1 is float"),
        (["a"], "item 0 is str"),
        ("hello", "not str"),
        (b"\x01\x02", "not bytes"),
        (42, "got int"),
        (np.zeros((2, 2), dtype=np.uint32), "1-D"),
    ],
)
def test_bad_token_ids_name_the_problem(bad: object, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as exc:
        sequence_hashes(bad)
    assert isinstance(exc.value, XConnectorError) and isinstance(exc.value, ValueError)


def test_zero_block_size_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="block_size"):
        sequence_hashes([1, 2, 3], 0)
