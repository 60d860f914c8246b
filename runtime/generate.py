"""Seeds in, uint8 images out: the loop every front end (CLI, embedding API, demo) shares.

For each batch of seeds it draws latents and labels from the per-seed streams, runs the sampler
(Algorithm 2, or the ablation sampler when any of solver/discretization/schedule/scaling is
given, as the reference `generate.py` decides), checks for non-finite output naming the seeds,
and quantises exactly like the reference: uint8 = clip(x * 127.5 + 128, 0, 255) truncated, NHWC.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from edm_deploy.runtime.contract import check_denoiser
from edm_deploy.runtime.errors import InputError, NumericalError
from edm_deploy.runtime.noise import StackedRandomGenerator, draw_latents_and_labels
from edm_deploy.runtime.sampling import ablation_sampler, edm_sampler
from edm_deploy.runtime.xp import all_finite_rows, to_host

ABLATION_KEYS = ("solver", "discretization", "schedule", "scaling")


def quantize_uint8(x: Any) -> np.ndarray:
    """[B, C, H, W] float in [-1, 1] -> [B, H, W, C] uint8, the reference's rounding."""
    x = to_host(x).astype(np.float64, copy=False)
    return np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def pick_sampler(sampler_kwargs: dict) -> Callable:
    """edm_sampler unless an ablation-only option is set (then ablation_sampler)."""
    if any(sampler_kwargs.get(k) is not None for k in ABLATION_KEYS + ("alpha",)):
        return ablation_sampler
    return edm_sampler


def clean_sampler_kwargs(sampler_kwargs: dict) -> dict:
    """Drop unset options so each sampler applies its own defaults."""
    return {k: v for k, v in sampler_kwargs.items() if v is not None}


def sample_batch(
    den: Any,
    seeds: Sequence[int],
    class_idx: Optional[int] = None,
    sampler_kwargs: Optional[dict] = None,
    callback: Optional[Callable[[int, int], None]] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Sample one batch: (uint8 NHWC images, int labels or None)."""
    kwargs = clean_sampler_kwargs(dict(sampler_kwargs or {}))
    sampler = pick_sampler(kwargs)
    rnd = StackedRandomGenerator(seeds)
    img_shape = (den.img_channels, den.img_resolution, den.img_resolution)
    latents, labels = draw_latents_and_labels(rnd, img_shape, int(den.label_dim), class_idx)
    to_device = getattr(den, "to_device", None)
    if to_device is not None:
        latents = to_device(latents)
    x = sampler(den, latents, labels, randn_like=rnd.randn_like, callback=callback, **kwargs)
    finite = all_finite_rows(x)
    if not finite.all():
        bad = [int(s) for s, ok in zip(seeds, finite) if not ok]
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise NumericalError(
            f"the denoiser produced NaN/Inf for {len(bad)} image(s), seeds {shown}; "
            "check the model (an fp16 export overflowing?) and the sampler settings"
        )
    int_labels = None if labels is None else labels.argmax(axis=1).astype(np.int64)
    return quantize_uint8(x), int_labels


def generate(
    den: Any,
    seeds: Iterable[int],
    class_idx: Optional[int] = None,
    batch_size: int = 64,
    **sampler_kwargs: Any,
) -> np.ndarray:
    """Images for `seeds` as uint8 [N, H, W, C]; the same seed always gives the same image.

    `sampler_kwargs` are the reference sampler options (num_steps, sigma_min, sigma_max, rho,
    S_churn, S_min, S_max, S_noise, solver, discretization, schedule, scaling, alpha, ...).
    """
    check_denoiser(den)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("no seeds given")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(seeds), batch_size):
        images, _ = sample_batch(den, seeds[start:start + batch_size], class_idx, sampler_kwargs)
        out.append(images)
    return np.concatenate(out)
