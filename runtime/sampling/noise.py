"""Per-seed random streams, so an image depends on its seed and never on its batch.

Like the reference `StackedRandomGenerator`, every image owns one generator seeded by its seed
(mod 2^32) and draws, in this order: its latent (float32 N(0, I) of the image shape), its class
label when the model is conditional (one integer in [0, label_dim)), then one float64 normal of
the image shape per sampler step that adds noise. Streams come from NumPy's PCG64, so they are
reproducible on any machine; they are not torch's CUDA Philox streams, which is why every sampler
also accepts externally supplied latents and a `randn_like` callable.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..core.errors import InputError
from .seeds import check_seeds


class StackedRandomGenerator:
    """One independent NumPy generator per seed, stacked along the batch dimension."""

    def __init__(self, seeds: Iterable[int]):
        # The one seed check (`seeds.check_seeds`): whole numbers in [0, 2^32), so 1.9, "01" or
        # 2^32 (which would repeat seed 0's stream) never become another seed's image.
        self.seeds = check_seeds(seeds, unique=False)
        self.generators = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype=np.float32) -> np.ndarray:
        """A [B, *shape] standard-normal array, row b drawn from seed b's stream."""
        out = np.empty((len(self.generators), *shape), dtype=dtype)
        for row, gen in zip(out, self.generators):
            row[...] = gen.standard_normal(tuple(shape), dtype=dtype)
        return out

    def randn_like(self, x) -> np.ndarray:
        """float64 noise with x's shape (first dimension = batch), as a host NumPy array.

        Device backends copy it over themselves; it is only drawn for steps that add noise.
        """
        if x.shape[0] != len(self.generators):
            raise InputError(f"noise for a batch of {x.shape[0]} requested from {len(self.generators)} seeds")
        return self.randn(tuple(x.shape[1:]), dtype=np.float64)

    def randint(self, high: int) -> np.ndarray:
        """One integer in [0, high) per seed (int64 [B])."""
        return np.array([gen.integers(high) for gen in self.generators], dtype=np.int64)


def one_hot(labels: np.ndarray, label_dim: int) -> np.ndarray:
    """float32 [B, label_dim] one-hot rows for integer class labels."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= label_dim):
        raise InputError(f"class labels must lie in [0, {label_dim - 1}], got {labels.min()}..{labels.max()}")
    out = np.zeros((labels.size, label_dim), dtype=np.float32)  # not np.eye: that is label_dim^2 floats
    out[np.arange(labels.size), labels] = 1.0
    return out


def check_class(class_idx: Any, label_dim: int, count: Optional[int] = None) -> Any:
    """A forced class must exist: None, one class for all images, or (with ``count``) one per image.

    Returns None, an int, or a tuple of ints. A value of the wrong type (the text ``'3'``, 3.7,
    True) is told as a type error, not as out of range, so the message says what to change.
    """
    if class_idx is None:
        return None
    if not isinstance(class_idx, (int, np.integer)) and hasattr(class_idx, "__iter__") \
            and not isinstance(class_idx, (str, bytes)):
        classes = tuple(class_idx)
        if count is None:
            raise InputError("class_idx must be one class here, not a list", param="class_idx")
        if len(classes) != count:
            raise InputError(f"class_idx lists {len(classes)} classes for {count} seeds; give one per seed or a "
                             "single class for all", param="class_idx")
        return tuple(check_class(c, label_dim) for c in classes)
    if isinstance(class_idx, (bool, np.bool_)) or not isinstance(class_idx, (int, np.integer)):
        raise InputError(f"class_idx must be an integer class label, got {class_idx!r} ({type(class_idx).__name__})",
                         param="class_idx")
    if label_dim <= 0:
        raise InputError("this model is unconditional; class_idx cannot be given", param="class_idx")
    if not 0 <= class_idx < label_dim:
        raise InputError(f"class_idx {class_idx} is out of range: this model has classes 0..{label_dim - 1}",
                         param="class_idx")
    return int(class_idx)


def draw_latents_and_labels(
    rnd: StackedRandomGenerator, img_shape: Sequence[int], label_dim: int, class_idx: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Latents then labels from each seed's stream, in the reference order.

    A random label is always drawn for a conditional model, even when `class_idx` overrides it,
    so a seed's later noise does not depend on whether a class was forced.
    """
    class_idx = check_class(class_idx, label_dim, len(rnd))
    latents = rnd.randn(img_shape, dtype=np.float32)
    if label_dim <= 0:
        return latents, None
    labels = rnd.randint(label_dim)
    if class_idx is not None:
        labels[:] = class_idx
    return latents, one_hot(labels, label_dim)
