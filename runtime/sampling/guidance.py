"""Guidance: one denoiser built from a model and a guide, D = D_g + w (D - D_g).

* Autoguidance (EDM2, Karras et al. 2024): the guide is a weaker version of the model (an
  earlier snapshot, a smaller network); `GuidedDenoiser(model, guide, w)`.
* Classifier-free guidance: the guide is the model's own unconditional branch, the zero label
  vector, for a model trained with label dropout; `GuidedDenoiser(model, None, w)`. Both
  branches run as one call of 2B rows when the model's batch limit allows (the same rows as two
  calls; only the launch is shared).
* Guidance interval (Kynkäänniemi et al. 2024): an evaluation at noise level sigma is guided
  iff lo < sigma <= hi; outside, only the model runs and the guide is never called.

The composition is itself a denoiser: it works with every sampler and solver and every backend
(host or device arrays), its sigma range is the intersection of both, its batch limit the
smaller one. It refuses a guide of another image shape, class count or sigma rounding with one
clear line. The mix is computed in float64 as ``D - (1 - w) (D - D_g)`` for w >= 1/2 (and
``D_g + w (D - D_g)`` below, torch's lerp rule), so w = 1 and a guide equal to the model give the
unguided result exactly; w = 1 skips the guide altogether.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ..core.contract import DelegatingDenoiser, as_denoiser
from ..core.errors import InputError, check_number, shown
from ..core.xp import concatenate, to_float64, where_rows

# The largest guidance weight |W|: D_g + W (D - D_g) far beyond it only amplifies float error into Inf.
MAX_GUIDANCE = 100.0
# Noise levels at which two rounding rules must agree for a guide to match its model.
_ROUNDING_PROBE = np.exp(np.linspace(np.log(0.002), np.log(80.0), 257))


def check_interval(interval: Any) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo < hi <= inf; guided iff lo < sigma <= hi."""
    try:
        lo, hi = (check_number(v, "guidance_interval", allow_inf=True) for v in interval)
    except (TypeError, ValueError, InputError):
        raise InputError(f"guidance_interval must be two numbers (lo, hi), got {shown(interval)}",
                         param="guidance_interval") from None
    if math.isnan(lo) or math.isnan(hi) or lo < 0 or not lo < hi:
        raise InputError(f"guidance_interval must satisfy 0 <= lo < hi, got ({lo:g}, {hi:g})", param="guidance_interval")
    return lo, hi


def check_guidance_args(guide_given: bool, guidance: Optional[float], interval: Any) -> None:
    """A guide or an interval means nothing without a weight: one error before any model loads."""
    if guidance is None and (guide_given or interval is not None):
        raise InputError("guidance (the weight W) is needed when a guide or a guidance interval is given",
                         param="guidance")


def check_weight(guidance: Any) -> float:
    """The guidance weight W: a number in [-MAX_GUIDANCE, MAX_GUIDANCE] (beyond it the mix overflows)."""
    w = check_number(guidance, "guidance")
    if not -MAX_GUIDANCE <= w <= MAX_GUIDANCE:
        raise InputError(f"guidance must lie in [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}] (1 is unguided; useful weights are "
                         f"about 1 to 10), got {shown(w)}", param="guidance")
    return w


def mix(denoised: Any, guided_by: Any, w: float) -> Any:
    """D_g + w (D - D_g) in float64, exact at w = 1 and when D_g equals D."""
    d, g = to_float64(denoised), to_float64(guided_by)
    if w >= 0.5:
        return d - (1.0 - w) * (d - g)
    return g + w * (d - g)


def guided_rows(sigma: Any, w: float, lo: float, hi: float) -> Any:
    """Which evaluations the guide changes: w != 1 and sigma inside the interval, lo < sigma <= hi.

    Elementwise for an array of per-row noise levels, a bool for one level.
    """
    s = np.asarray(sigma, dtype=np.float64)
    return (w != 1.0) & (s > lo) & (s <= hi)


def with_unconditional_twins(x: Any, sigma: np.ndarray, labels: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """The rows followed by their classifier-free twins (the zero label): both branches as one call of 2B rows."""
    return concatenate([x, x]), np.concatenate([sigma, sigma]), np.concatenate([labels, np.zeros_like(labels)])


class GuidedDenoiser(DelegatingDenoiser):
    """`den` guided by `guide` (or, with guide None, by its own unconditional branch)."""

    def __init__(self, den: Any, guide: Optional[Any] = None, guidance: float = 1.0,
                 interval: tuple[float, float] = (0.0, math.inf)):
        super().__init__(den)
        self.guide = None if guide is None else as_denoiser(guide)
        self.w = check_weight(guidance)
        self.lo, self.hi = check_interval(interval)
        if self.guide is None:
            if not self.label_dim:
                raise InputError("classifier-free guidance needs a class-conditional model; this one is unconditional",
                                 param="guidance")
            if self.den.label_dropout is not None and self.den.label_dropout <= 0:
                raise InputError("classifier-free guidance needs a model trained with label dropout (its unconditional "
                                 "branch is untrained otherwise); this one was trained without: give a guide model "
                                 "instead, or train with label dropout", param="guidance")
        else:
            self._check_guide()
            self.sigma_min = max(self.den.sigma_min, self.guide.sigma_min)
            self.sigma_max = min(self.den.sigma_max, self.guide.sigma_max)
            if not self.sigma_min < self.sigma_max:
                raise InputError(f"the guide's sigma range [{self.guide.sigma_min:g}, {self.guide.sigma_max:g}] does not "
                                 f"overlap the model's [{self.den.sigma_min:g}, {self.den.sigma_max:g}]", param="guide")
            limits = [m for m in (self.den.max_batch, self.guide.max_batch) if m is not None]
            self.max_batch = min(limits) if limits else None
        self.guide_calls = 0

    def _check_guide(self) -> None:
        d, g = self.den, self.guide
        if (g.img_channels, g.img_resolution) != (d.img_channels, d.img_resolution):
            raise InputError(f"the guide makes {g.img_channels}x{g.img_resolution}x{g.img_resolution} images, the model "
                             f"{d.img_channels}x{d.img_resolution}x{d.img_resolution}; a guide must match its model",
                             param="guide")
        if g.label_dim != d.label_dim:
            raise InputError(f"the guide has {g.label_dim} classes, the model {d.label_dim}; a guide must match its model",
                             param="guide")
        probe = _ROUNDING_PROBE
        if not np.array_equal(np.asarray(d.round_sigma(probe), np.float64), np.asarray(g.round_sigma(probe), np.float64)):
            raise InputError("the guide rounds noise levels differently from the model (another discrete sigma table, "
                             "e.g. iDDPM against EDM); a guide must evaluate at the model's noise levels", param="guide")

    @property
    def warnings(self) -> list[str]:
        return self.den.warnings + ([] if self.guide is None else self.guide.warnings + self._kind_mismatch())

    def _kind_mismatch(self) -> list[str]:
        """Autoguidance extrapolates D - D_g between two denoisers of one kind: a consistency-tuned
        model (which predicts the end of the trajectory) and a plain one (the posterior mean)
        differ by far more than the guide's weakness, and the mix gives poor images."""
        tuned = [bool(getattr(m, "consistency_tuned", False)) for m in (self.den, self.guide)]
        if tuned[0] == tuned[1]:
            return []
        which = ("the model is consistency-tuned and the guide is not" if tuned[0]
                 else "the guide is consistency-tuned and the model is not")
        return [f"{which}: they predict different things (a consistency model the trajectory's end, a plain EDM "
                "denoiser the mean of what the noise could hide), so D - D_g is not the guide's weakness and the "
                "guided images will be poor; guide a model with one of its own kind"]

    def numerics(self) -> str:
        return self.den.numerics() + ("" if self.guide is None else f"; guide {self.guide.numerics()}")

    def synchronize(self) -> None:
        self.den.synchronize()
        if self.guide is not None:
            self.guide.synchronize()

    def describe(self) -> str:
        how = "classifier-free" if self.guide is None else f"autoguided by {self.guide.describe()}"
        where = "" if (self.lo, self.hi) == (0.0, math.inf) else f", sigma in ({self.lo:g}, {self.hi:g}]"
        return f"{self.den.describe()}, {how}, w={self.w:g}{where}"

    def close(self) -> None:
        self.den.close()
        if self.guide is not None:
            self.guide.close()

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        batch = int(x.shape[0])
        sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
        if sigma.size == 1:
            sigma = np.full(batch, sigma.item())
        guided = guided_rows(sigma, self.w, self.lo, self.hi)
        if not guided.any():
            return self.den(x, sigma, class_labels)  # the guide's evaluation would not change the result
        denoised, by = self._both(x, sigma, class_labels)
        self.guide_calls += 1
        out = mix(denoised, by, self.w)
        return out if guided.all() else where_rows(guided, out, to_float64(denoised))

    def _both(self, x: Any, sigma: np.ndarray, class_labels: Any) -> tuple[Any, Any]:
        if self.guide is not None:
            return self.den(x, sigma, class_labels), self.guide(x, sigma, class_labels)
        batch = int(x.shape[0])
        labels = np.zeros((batch, self.label_dim), np.float32) if class_labels is None else np.asarray(class_labels, np.float32)
        if self.den.max_batch is None or 2 * batch <= self.den.max_batch:
            both = self.den(*with_unconditional_twins(x, sigma, labels))
            return both[:batch], both[batch:]
        return self.den(x, sigma, labels), self.den(x, sigma, np.zeros_like(labels))
