"""Analytic denoisers: exact D(x; sigma) for data whose ideal denoiser has a closed form.

They follow the denoiser contract, so the samplers, the generate loop and the benchmarks can be
tested and demonstrated without any trained network:

* `GaussianDenoiser`: data N(mu, s^2 I). D = mu + s^2/(s^2 + sigma^2) (x - mu), and the
  probability-flow ODE has the closed-form solution
  x(sigma) - mu = (x(sigma0) - mu) sqrt((s^2 + sigma^2)/(s^2 + sigma0^2)).
* `FiniteSetDenoiser`: data = a finite point set {y_i} (EDM appendix B.3, eq. 57).
  D = sum_i w_i y_i with w = softmax(-||x - y_i||^2 / (2 sigma^2)); optionally class-conditional,
  restricting the mixture to the points of the requested class.

Both compute in float64 with row-wise operations only, so a row's result never depends on which
other rows share its batch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ..core.contract import DenoiserBase
from ..core.errors import InputError
from ..core.rounding import identity_round


class _AnalyticBase(DenoiserBase):
    sigma_min = 0.0
    sigma_max = math.inf
    max_batch: Optional[int] = None

    def __init__(self, img_channels: int, img_resolution: int, label_dim: int = 0):
        self.img_channels = int(img_channels)
        self.img_resolution = int(img_resolution)
        self.label_dim = int(label_dim)
        self.calls = 0  # number of evaluations, for NFE checks

    @staticmethod
    def round_sigma(sigma) -> np.ndarray:
        return identity_round(sigma)

    @staticmethod
    def _sigma_column(sigma, batch: int) -> np.ndarray:
        sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
        if sigma.size == 1:
            sigma = np.full(batch, sigma.item())
        if sigma.size != batch:
            raise InputError(f"sigma must have one value per batch row ({batch}), got {sigma.size}")
        return sigma.reshape(batch, 1, 1, 1)


class GaussianDenoiser(_AnalyticBase):
    """Ideal denoiser of N(mu, std^2 I) data of shape [C, R, R]."""

    def __init__(self, img_channels: int = 1, img_resolution: int = 8, mu: float | np.ndarray = 0.0, std: float = 0.5):
        super().__init__(img_channels, img_resolution)
        self.mu = np.broadcast_to(np.asarray(mu, dtype=np.float64), (img_channels, img_resolution, img_resolution))
        if not std > 0:
            raise InputError(f"std must be > 0, got {std}")
        self.std = float(std)

    def __call__(self, x, sigma, class_labels=None) -> np.ndarray:
        if class_labels is not None:
            raise InputError("GaussianDenoiser is unconditional")
        self.calls += 1
        x = np.asarray(x, dtype=np.float64)
        s2 = np.square(self._sigma_column(sigma, x.shape[0]))
        var = self.std**2
        return self.mu + (var / (var + s2)) * (x - self.mu)

    def ode_solution(self, x_start: np.ndarray, sigma_start: float, sigma_end: float) -> np.ndarray:
        """Exact probability-flow ODE transport of x from sigma_start to sigma_end."""
        var = self.std**2
        scale = math.sqrt((var + sigma_end**2) / (var + sigma_start**2))
        return self.mu + (np.asarray(x_start, dtype=np.float64) - self.mu) * scale


class FiniteSetDenoiser(_AnalyticBase):
    """Ideal denoiser of a finite dataset (EDM eq. 57), optionally class-conditional."""

    def __init__(self, points: np.ndarray, point_labels: Optional[Sequence[int]] = None, label_dim: int = 0):
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 4 or points.shape[2] != points.shape[3]:
            raise InputError(f"points must be [K, C, R, R], got {list(points.shape)}")
        if point_labels is not None:
            point_labels = np.asarray(point_labels, dtype=np.int64)
            label_dim = label_dim or int(point_labels.max()) + 1
            if point_labels.shape != (points.shape[0],):
                raise InputError("point_labels needs one label per point")
        super().__init__(points.shape[1], points.shape[2], label_dim)
        self.points = points
        self.flat = points.reshape(points.shape[0], -1)
        self.point_labels = point_labels

    def __call__(self, x, sigma, class_labels=None) -> np.ndarray:
        self.calls += 1
        x = np.asarray(x, dtype=np.float64)
        batch = x.shape[0]
        sig = self._sigma_column(sigma, batch).reshape(batch, 1)
        xf = x.reshape(batch, 1, -1)
        # Squared distances by elementwise ops and a last-axis sum: identical per row at any batch.
        d2 = np.square(xf - self.flat[None]).sum(axis=2)
        logits = -d2 / (2 * np.square(sig))
        if class_labels is not None:
            if self.point_labels is None:
                raise InputError("this FiniteSetDenoiser is unconditional")
            mask = np.asarray(class_labels, dtype=np.float64)[:, self.point_labels] > 0.5
            logits = np.where(mask, logits, -np.inf)
        logits = logits - logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(axis=1, keepdims=True)
        out = (w[:, :, None] * self.flat[None]).sum(axis=1)
        return out.reshape(x.shape)

    def nearest_distance(self, x: np.ndarray) -> np.ndarray:
        """Per-sample max-abs distance to the closest data point."""
        xf = np.asarray(x, dtype=np.float64).reshape(len(x), 1, -1)
        return np.abs(xf - self.flat[None]).max(axis=2).min(axis=1)
