"""The few array operations the adapters need, for torch tensors and numpy arrays alike (vLLM
hands torch tensors; tests and tools may use numpy), without importing either up front."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def to_list(x: Any) -> list[Any]:
    """Python values of a 1-D array, tensor or sequence."""
    if hasattr(x, "tolist"):
        out: list[Any] = x.tolist()
        return out
    return list(x)


def take(x: Any, indices: Sequence[int]) -> Any:
    """`x[indices]` in x's own library (and on its device)."""
    if is_torch(x):
        import torch

        return x[torch.as_tensor(list(indices), dtype=torch.long, device=x.device)]
    if hasattr(x, "__array_interface__"):
        import numpy as np

        return x[np.asarray(list(indices), dtype=np.int64)]
    return type(x)(x[i] for i in indices)


def like(x: Any, values: Sequence[int]) -> Any:
    """A 1-D array of `values` with x's type, dtype and device."""
    if is_torch(x):
        import torch

        return torch.as_tensor(list(values), dtype=x.dtype, device=x.device)
    if hasattr(x, "__array_interface__"):
        import numpy as np

        return np.asarray(list(values), dtype=x.dtype)
    return type(x)(values)


def dtype_name(x: Any) -> str:
    """`bfloat16`, `float16`, ... for a tensor or array."""
    return str(getattr(x, "dtype", type(x).__name__)).removeprefix("torch.")
