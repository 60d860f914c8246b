"""Which batch shapes give a row the same result, checked once at start-up, and what is padded.

A compiled network may pick its kernels by batch shape, so a row's result can differ in its last
bits between a call of 7 rows and one of 64. Padding every call to one shape (`fixed_batch`)
removes that at the price of the padded rows. The engine does better: at start-up it evaluates
the same probe rows at every batch size it may use (or, above `EXHAUSTIVE_UP_TO`, at powers of
two), compares each row with its result in a call of the full batch limit N, and afterwards
pads a call only up to the next size that matched. If every size matched, nothing is padded.
Either way a row's result equals its result in a call of N rows, so a served image equals
`sample --fixed-batch N` for the same seed and settings (and, when every size matched, `sample`
at any batch). The check reads bits, not tolerances.

Kernel choice depends on the shapes, not the values, which is why probe rows stand for any
rows; the probe also moves each row to another position in its batch. A network whose output
changes between two identical calls (nondeterministic kernels) gets no guarantee, and is said so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..core.xp import to_host
from ..sampling.fixed_shape import BucketedDenoiser
from ..sampling.noise import one_hot

EXHAUSTIVE_UP_TO = 64          # check every batch size up to this limit, powers of two above it
PROBE_SIGMA = 1.0              # one noise level for the probe; kernels are chosen by shape


@dataclass(frozen=True)
class Determinism:
    """The guarantee the engine's network calls give an image, and the batch shapes they use.

    ``kind`` is one of "batch-invariant" (no padding; checked at ``checked``), "padded" (each call
    padded to the next of ``shapes``), "fixed" (every call ``shapes[0]`` rows, as asked),
    "nondeterministic" (identical calls differ), "pending" (checked before the first call) or
    "unchecked" (the engine was told not to look).
    """

    kind: str
    shapes: tuple[int, ...] = ()        # the batch sizes the network is called with; () = any
    checked: tuple[int, ...] = ()
    reference: Optional[int] = None     # the batch size every row's result equals its result at

    def __str__(self) -> str:
        checked = _ranges(self.checked)
        if self.kind == "batch-invariant":
            return f"batch-invariant (checked at batch sizes {checked})"
        if self.kind == "padded":
            return (f"padded to batch sizes {_ranges(self.shapes)} (the sizes whose rows matched a call of "
                    f"{self.reference}, checked at {checked})")
        if self.kind == "fixed":
            return f"fixed batch {self.shapes[0]}"
        if self.kind == "nondeterministic":
            return "none: two identical calls of the network differ, so an image may differ between runs"
        if self.kind == "pending":
            return "pending: the batch shapes are checked before the first network call"
        return "unchecked: an image may depend on the shape of the call it was evaluated in"

    @property
    def pads(self) -> bool:
        return bool(self.shapes)


def candidate_shapes(limit: int) -> list[int]:
    """Every batch size up to `limit` when that is cheap enough to check, else powers of two and `limit`."""
    if limit <= EXHAUSTIVE_UP_TO:
        return list(range(1, limit + 1))
    return sorted({2**k for k in range(limit.bit_length()) if 2**k <= limit} | {limit})


def probe_rows(den: Any, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Distinct float32 rows at the probe noise level (classes cycling through the labels)."""
    rng = np.random.default_rng(seed)
    shape = (rows, den.img_channels, den.img_resolution, den.img_resolution)
    x = (rng.standard_normal(shape) * np.sqrt(1.0 + PROBE_SIGMA**2)).astype(np.float32)
    sigma = np.full(rows, PROBE_SIGMA)
    labels = None if not den.label_dim else one_hot(np.arange(rows) % den.label_dim, int(den.label_dim))
    return x, sigma, labels


def matching_shapes(den: Any, limit: int, shapes: list[int]) -> Optional[list[int]]:
    """The sizes in `shapes` at which every probe row equals its result in a call of `limit` rows.

    Each size s evaluates the last s probe rows, so a row also moves to another position. None
    when two identical calls of `limit` rows differ.
    """
    x, sigma, labels = probe_rows(den, limit)

    def call(lo: int) -> np.ndarray:
        return np.asarray(to_host(den(x[lo:], sigma[lo:], None if labels is None else labels[lo:])))

    reference = call(0)
    if not np.array_equal(reference, call(0), equal_nan=True):
        return None
    return [s for s in shapes if s == limit or np.array_equal(call(limit - s), reference[limit - s:], equal_nan=True)]


def settle_shapes(den: Any, limit: int, fixed_batch: Optional[int], check: bool) -> tuple[Determinism, Any]:
    """The guarantee for `den` called with up to `limit` rows, and `den` wrapped to pad where it must."""
    if fixed_batch is not None:
        return Determinism("fixed", (fixed_batch,), reference=fixed_batch), BucketedDenoiser(den, (fixed_batch,))
    if not check:
        return Determinism("unchecked"), den
    shapes = candidate_shapes(limit)
    good = matching_shapes(den, limit, shapes)
    if good is None:
        return Determinism("nondeterministic", checked=tuple(shapes)), den
    if good == list(range(1, limit + 1)):
        return Determinism("batch-invariant", checked=tuple(shapes), reference=limit), den
    return (Determinism("padded", tuple(good), tuple(shapes), reference=limit), BucketedDenoiser(den, good))


def combine(model: Determinism, guide: Optional[Determinism]) -> Determinism:
    """The weaker of the model's and the guide's guarantees (the guide's calls count too)."""
    if guide is None:
        return model
    order = ("fixed", "batch-invariant", "padded", "pending", "unchecked", "nondeterministic")
    return max(model, guide, key=lambda d: order.index(d.kind))


def _ranges(sizes: tuple[int, ...]) -> str:
    """1-8, 16, 32: runs of consecutive sizes written as ranges."""
    out, run = [], []
    for s in sizes:
        if run and s != run[-1] + 1:
            out.append(_run(run))
            run = []
        run.append(s)
    if run:
        out.append(_run(run))
    return ", ".join(out)


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
