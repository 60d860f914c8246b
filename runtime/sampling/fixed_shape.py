"""Evaluate a denoiser at one fixed batch shape, so a row's result never depends on its batch.

Compiled networks pick kernels (GEMM blocking, convolution algorithms) by the shapes they are
called with, so the same image row can come out a last bit different at batch 1 and at batch 64,
and after uint8 quantisation about one image in a thousand differs by one level somewhere.
`FixedShapeDenoiser` always calls the wrapped denoiser with exactly `rows` rows: a larger batch
is cut into chunks of `rows`, the last chunk padded with copies of its last row (finite values,
so padding can never produce NaN), and the padding discarded. With it, the same seed gives the
same image at any batch size, and a resumed run equals an uninterrupted one whatever its
batches. It costs the padded rows: nothing when the batch is a multiple of `rows`.

`BucketedDenoiser` is the general form: the network sees only the batch sizes in a set of
shapes, each batch padded to the smallest that holds it (the serving engine pads only to the
shapes at which a start-up check found a row's result unchanged, `runtime.serving.determinism`).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ..core.contract import DelegatingDenoiser
from ..core.errors import InputError, check_int
from ..core.xp import concatenate, library_of


def pad_rows(a: Any, rows: int) -> Any:
    """`a` extended to `rows` rows by repeating its last row, in its own array library."""
    missing = rows - a.shape[0]
    if missing == 0:
        return a
    last = a[-1:]
    if library_of(a) == "torch":
        return concatenate([a, last.expand(missing, *a.shape[1:])])
    return concatenate([a, last.repeat(missing, axis=0)])  # NumPy and CuPy arrays alike


class BucketedDenoiser(DelegatingDenoiser):
    """`den` evaluated only at the batch sizes in `shapes`: a batch is padded to the smallest shape
    that holds it, one above the largest cut into chunks of the largest; all else delegated."""

    def __init__(self, den: Any, shapes: Iterable[int]):
        super().__init__(den)
        self.shapes = tuple(sorted({check_int(r, "fixed_batch", lo=1) for r in shapes}))
        if not self.shapes:
            raise InputError("a bucketed denoiser needs at least one batch shape", param="fixed_batch")
        if self.den.max_batch is not None and self.shapes[-1] > self.den.max_batch:
            raise InputError(f"fixed_batch {self.shapes[-1]} exceeds the model's batch limit {self.den.max_batch}",
                             param="fixed_batch")
        self.max_batch = None  # any batch: it is cut into chunks here

    def shape_for(self, rows: int) -> int:
        """The batch size the network runs `rows` (at most the largest shape) at."""
        return next(s for s in self.shapes if s >= rows)

    def padding(self, batch: int) -> int:
        """Rows of padding a call of `batch` rows costs."""
        rest = batch % self.shapes[-1]
        return self.shape_for(rest) - rest if rest else 0

    def describe(self) -> str:
        return f"{self.den.describe()}, batch shapes {', '.join(map(str, self.shapes))}"

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        batch = int(x.shape[0])
        sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
        if sigma.size == 1:
            sigma = np.full(batch, sigma.item())
        parts = []
        for lo in range(0, batch, self.shapes[-1]):
            hi = min(lo + self.shapes[-1], batch)
            rows = self.shape_for(hi - lo)
            labels = None if class_labels is None else pad_rows(class_labels[lo:hi], rows)
            out = self.den(pad_rows(x[lo:hi], rows), pad_rows(sigma[lo:hi], rows), labels)
            parts.append(out[: hi - lo])
        return parts[0] if len(parts) == 1 else concatenate(parts)


class FixedShapeDenoiser(BucketedDenoiser):
    """`den` evaluated only ever at batch size `rows` (split and padded); all else delegated."""

    def __init__(self, den: Any, rows: int):
        super().__init__(den, (rows,))
        self.rows = self.shapes[0]

    def describe(self) -> str:
        return f"{self.den.describe()}, fixed batch {self.rows}"


def fixed_shape(den: Any, rows: Any) -> Any:
    """`den` itself when `rows` is None, else `den` at that one batch shape (`sample --fixed-batch`, `serve`)."""
    return den if den is None or rows is None else FixedShapeDenoiser(den, rows)
