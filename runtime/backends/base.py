"""What every denoiser backend shares: the contract attributes from the manifest, input
normalisation, batch splitting and the lifecycle.

A backend subclass implements `_run(x, sigma, class_labels)` for one batch that fits its limit,
in its own array library, and `_release()` to free what it holds. This base class turns the
manifest into the contract attributes (`sigma_min`, `sigma_max`, `round_sigma`, shape,
`label_dim`, `max_batch`), normalises inputs (per-row sigma, zero labels for a conditional model
called without labels, as the reference preconditioners do), splits batches above `max_batch`
and counts calls. It never times or synchronises an evaluation: measuring is the job of
`runtime.core.timing.TimedDenoiser`, so unmeasured runs keep the device pipeline full.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ..core.contract import DenoiserBase
from ..core.errors import InputError
from ..core.manifest import (
    CONSISTENCY_KEY,
    SCHEDULES_KEY,
    consistency_record,
    decode_limit,
    schedules_record,
    validate,
)
from ..core.rounding import round_sigma_from_rule
from ..core.xp import concatenate


class DenoiserBackend(DenoiserBase):
    """Base class of the onnxruntime, TensorRT and torch backends (a Polygraphy-style runner)."""

    name = "base"

    def __init__(self, manifest: dict, max_batch: Optional[int] = None, source: str = "model"):
        self.manifest: dict = validate(manifest, source)
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
        init_kwargs = (manifest.get("network") or {}).get("init_kwargs")
        self.label_dropout = None if init_kwargs is None else float(init_kwargs.get("label_dropout") or 0.0)
        # How the model was consistency-tuned (method, teacher checkpoint and its sha256), or None.
        self.consistency: Optional[dict] = consistency_record(manifest.get(CONSISTENCY_KEY), source)
        self.consistency_tuned = self.consistency is not None
        # Time points searched for this model, by "solver@nfe" (the planner's default for that pair).
        self.schedules: dict[str, list[float]] = schedules_record(manifest.get(SCHEDULES_KEY), source)
        self.calls = 0
        self.device = "cpu"
        self._notes: list[str] = []
        self._closed = False

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp32"))

    @property
    def warnings(self) -> list[str]:
        return list(self._notes)

    # -- hooks for subclasses ----------------------------------------------------------------
    def _run(self, x: Any, sigma: np.ndarray, class_labels: Optional[np.ndarray]) -> Any:
        raise NotImplementedError

    def _release(self) -> None:
        """Free the backend's sessions, contexts and buffers (called once, by `close`)."""

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

    # -- the contract ------------------------------------------------------------------------
    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        if self._closed:
            raise InputError(f"{self.source}: this denoiser was closed; load the model again")
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
        self.calls += 1
        limit = self.max_batch or batch
        if batch <= limit:
            return self._run(x, sigma, class_labels)
        parts = []
        for lo in range(0, batch, limit):
            hi = min(lo + limit, batch)
            parts.append(self._run(x[lo:hi], sigma[lo:hi], None if class_labels is None else class_labels[lo:hi]))
        return concatenate(parts)

    def describe(self) -> str:
        return f"{self.name} on {self.device}"

    def numerics(self) -> str:
        return f"{self.name} {self.precision} {self.device.split(':')[0]}"
