"""What every denoiser backend shares: the contract attributes, batch splitting, timing.

A backend subclass only implements `_run(x, sigma, class_labels)` for one batch that fits its
limit, in its own array library. This base class turns the manifest into the contract attributes
(`sigma_min`, `sigma_max`, `round_sigma`, shape, `label_dim`, `max_batch`), normalises inputs
(per-row sigma, zero labels for a conditional model called without labels, as the reference
preconditioners do), splits batches above `max_batch`, and accumulates the wall time spent inside
the network so the sampler overhead can be measured (`eval_seconds`, `calls`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np

from edm_deploy.runtime.errors import InputError
from edm_deploy.runtime.manifest import decode_limit, validate
from edm_deploy.runtime.rounding import round_sigma_from_rule
from edm_deploy.runtime.xp import library_of


class DenoiserBackend:
    """Base class of the onnxruntime, TensorRT and torch backends."""

    name = "base"

    def __init__(self, manifest: dict, max_batch: Optional[int] = None, source: str = "model"):
        self.manifest = validate(manifest, source)
        self.source = source
        self.img_resolution = int(manifest["img_resolution"])
        self.img_channels = int(manifest["img_channels"])
        self.label_dim = int(manifest["label_dim"])
        self.sigma_min = decode_limit(manifest["sigma_min"], 0.0)
        self.sigma_max = decode_limit(manifest["sigma_max"], math.inf)
        self.round_sigma = round_sigma_from_rule(manifest["sigma_rounding"])
        if max_batch is not None and max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.calls = 0
        self.eval_seconds = 0.0
        self.device = "cpu"

    # -- hooks for subclasses ----------------------------------------------------------------
    def _run(self, x: Any, sigma: np.ndarray, class_labels: Optional[np.ndarray]) -> Any:
        raise NotImplementedError

    def _concat(self, parts: list) -> Any:
        lib = library_of(parts[0])
        if lib == "torch":
            import torch

            return torch.cat(parts)
        if lib == "cupy":
            import cupy

            return cupy.concatenate(parts)
        return np.concatenate(parts)

    def to_device(self, host_array: np.ndarray) -> Any:
        """Where the sampler state should live for this backend (host NumPy by default)."""
        return host_array

    def synchronize(self) -> None:
        """Wait for queued device work (timing on GPUs); a no-op on the host."""

    # -- the contract ------------------------------------------------------------------------
    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        batch = int(x.shape[0])
        sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
        if sigma.size == 1 and batch != 1:
            sigma = np.full(batch, sigma.item())
        if sigma.size != batch:
            raise InputError(f"sigma must hold one value per image ({batch}), got {sigma.size}")
        if self.label_dim == 0:
            if class_labels is not None:
                raise InputError("this model is unconditional; class labels cannot be given")
        else:
            if class_labels is None:
                class_labels = np.zeros((batch, self.label_dim), dtype=np.float32)
            class_labels = np.asarray(class_labels, dtype=np.float32).reshape(batch, self.label_dim)
        start = time.perf_counter()
        limit = self.max_batch or batch
        if batch <= limit:
            out = self._run(x, sigma, class_labels)
        else:
            parts = []
            for lo in range(0, batch, limit):
                hi = min(lo + limit, batch)
                parts.append(self._run(x[lo:hi], sigma[lo:hi], None if class_labels is None else class_labels[lo:hi]))
            out = self._concat(parts)
        self.synchronize()
        self.eval_seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
