"""The few array operations the samplers need, for NumPy, CuPy and torch arrays alike.

The sampler state is only ever combined with Python floats (`x * t`, `x + h * d`), which every
array library supports with the same syntax; what differs is casting and moving host noise onto
the state's device. Keeping that here lets one sampler drive a NumPy state on the host or a CuPy
or torch state on a GPU without a host round trip per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def library_of(x: Any) -> str:
    """'numpy', 'cupy' or 'torch', from the array's type (no import of the library needed)."""
    module = type(x).__module__.split(".")[0]
    if module in ("numpy", "cupy", "torch"):
        return module
    return "numpy"


def to_float64(x: Any) -> Any:
    """x as float64 in its own library and device (no copy when it already is)."""
    if library_of(x) == "torch":
        import torch

        return x.to(torch.float64)
    if isinstance(x, (np.ndarray, np.generic)) or library_of(x) == "cupy":
        return x.astype("float64", copy=False)
    return np.asarray(x, dtype=np.float64)


def from_host(arr: np.ndarray, like: Any) -> Any:
    """Place a host NumPy array in `like`'s library and device."""
    lib = library_of(like)
    if lib == "numpy":
        return arr
    if lib == "cupy":
        import cupy

        return cupy.asarray(arr)
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr)).to(like.device)


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of any supported array."""
    lib = library_of(x)
    if lib == "cupy":
        return x.get()
    if lib == "torch":
        return x.detach().cpu().numpy()
    return np.asarray(x)


def all_finite_rows(x: Any) -> np.ndarray:
    """Host bool [B]: which batch rows hold only finite values."""
    lib = library_of(x)
    if lib == "torch":
        import torch

        return torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1).cpu().numpy()
    if lib == "cupy":
        import cupy

        return cupy.isfinite(x).reshape(x.shape[0], -1).all(axis=1).get()
    return np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)


def concatenate(parts: list) -> Any:
    """Join arrays along the batch dimension in their own library."""
    lib = library_of(parts[0])
    if lib == "torch":
        import torch

        return torch.cat(parts)
    if lib == "cupy":
        import cupy

        return cupy.concatenate(parts)
    return np.concatenate(parts)


def where_rows(mask: np.ndarray, a: Any, b: Any) -> Any:
    """Row-wise choice: row i of `a` where host bool `mask[i]`, else row i of `b` (same library)."""
    lib = library_of(a)
    shape = (-1,) + (1,) * (a.ndim - 1)
    if lib == "torch":
        import torch

        return torch.where(torch.from_numpy(mask.reshape(shape)).to(a.device), a, b)
    if lib == "cupy":
        import cupy

        return cupy.where(cupy.asarray(mask.reshape(shape)), a, b)
    return np.where(mask.reshape(shape), a, b)
