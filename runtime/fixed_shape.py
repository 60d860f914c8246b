"""Evaluate a denoiser at one fixed batch shape, so a row's result never depends on its batch.

Compiled networks pick kernels (GEMM blocking, convolution algorithms) by the shapes they are
called with, so the same image row can come out a last bit different at batch 1 and at batch 64,
and after uint8 quantisation about one image in a thousand differs by one level somewhere.
`FixedShapeDenoiser` always calls the wrapped denoiser with exactly `rows` rows: a larger batch
is cut into chunks of `rows`, the last chunk padded with copies of its last row (finite values,
so padding can never produce NaN), and the padding discarded. With it, the same seed gives the
same image at any batch size, and a resumed run equals an uninterrupted one whatever its
batches. It costs the padded rows: nothing when the batch is a multiple of `rows`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edm_deploy.runtime.contract import DelegatingDenoiser
from edm_deploy.runtime.errors import InputError, check_int
from edm_deploy.runtime.xp import concatenate, library_of


def _pad_rows(a: Any, rows: int) -> Any:
    """`a` extended to `rows` rows by repeating its last row, in its own array library."""
    missing = rows - a.shape[0]
    if missing == 0:
        return a
    last = a[-1:]
    if library_of(a) == "torch":
        return concatenate([a, last.expand(missing, *a.shape[1:])])
    return concatenate([a, last.repeat(missing, axis=0)])  # NumPy and CuPy arrays alike


class FixedShapeDenoiser(DelegatingDenoiser):
    """`den` evaluated only ever at batch size `rows` (split and padded); all else delegated."""

    def __init__(self, den: Any, rows: int):
        super().__init__(den)
        rows = check_int(rows, "fixed_batch", lo=1)
        if self.den.max_batch is not None and rows > self.den.max_batch:
            raise InputError(f"fixed_batch {rows} exceeds the model's batch limit {self.den.max_batch}", param="fixed_batch")
        self.rows = int(rows)
        self.max_batch = None  # any batch: it is cut into chunks here

    def describe(self) -> str:
        return f"{self.den.describe()}, fixed batch {self.rows}"

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        batch = int(x.shape[0])
        sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
        if sigma.size == 1:
            sigma = np.full(batch, sigma.item())
        parts = []
        for lo in range(0, batch, self.rows):
            hi = min(lo + self.rows, batch)
            labels = None if class_labels is None else _pad_rows(class_labels[lo:hi], self.rows)
            out = self.den(_pad_rows(x[lo:hi], self.rows), _pad_rows(sigma[lo:hi], self.rows), labels)
            parts.append(out[: hi - lo])
        return parts[0] if len(parts) == 1 else concatenate(parts)
