"""Seeds in, uint8 images out: the loop every front end (CLI, embedding API, demo) shares.

For each batch of seeds it draws latents and labels from the per-seed streams, runs the sampler
(Algorithm 2, or the ablation sampler when any of solver/discretization/schedule/scaling is
given, as the reference `generate.py` decides), checks for non-finite output naming the seeds,
and quantises exactly like the reference: uint8 = clip(x * 127.5 + 128, 0, 255) truncated, NHWC.

`sample_into` drives a writer (`runtime.writers.open_output`) and resumes: a batch with any
image missing is sampled again whole, so every image comes out of the same batch as in an
uninterrupted run, and `run_record` is the description of a run that guards resuming.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from edm_deploy.runtime.contract import as_denoiser
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
    callback: Optional[Callable] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Sample one batch: (uint8 NHWC images, int labels or None)."""
    den = as_denoiser(den)
    kwargs = clean_sampler_kwargs(dict(sampler_kwargs or {}))
    sampler = pick_sampler(kwargs)
    rnd = StackedRandomGenerator(seeds)
    img_shape = (den.img_channels, den.img_resolution, den.img_resolution)
    latents, labels = draw_latents_and_labels(rnd, img_shape, int(den.label_dim), class_idx)
    x = sampler(den, den.to_device(latents), labels, randn_like=rnd.randn_like, callback=callback, **kwargs)
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


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}", param="batch_size")
    return int(batch_size)


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
    den = as_denoiser(den)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("no seeds given")
    batch_size = check_batch_size(batch_size)
    out = []
    for start in range(0, len(seeds), batch_size):
        images, _ = sample_batch(den, seeds[start:start + batch_size], class_idx, sampler_kwargs)
        out.append(images)
    return np.concatenate(out)


def run_record(model_sha256: str, class_idx: Optional[int], sampler_kwargs: dict, *,
               batch_size: Optional[int] = None, fixed_batch: Optional[int] = None, **extra: Any) -> dict:
    """What made the images of a run: a rerun may add to an output only with an equal record.

    The model's hash, the class, every sampler setting, and what decides the last bits of an
    image: with a fixed evaluation batch (`fixed_batch`) only that; otherwise the batch size,
    which fixes how seeds are grouped into batches (`seeds.shard_batches`). `extra` holds
    anything else that changes the images (a guide and its weight).
    """
    record: dict[str, Any] = {
        "model_sha256": model_sha256,
        "class": class_idx,
        "sampler": {k: v for k, v in sorted(clean_sampler_kwargs(sampler_kwargs).items()) if v != float("inf")},
    }
    if fixed_batch is not None:
        record["fixed_batch"] = int(fixed_batch)
    else:
        record["batch"] = batch_size
    record.update({k: v for k, v in sorted(extra.items()) if v is not None})
    return record


def sample_into(
    den: Any,
    writer: Any,
    batches: Sequence[Sequence[int]],
    class_idx: Optional[int] = None,
    sampler_kwargs: Optional[dict] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> int:
    """Sample every batch with an image missing from `writer` and submit the missing images.

    A partly done batch is sampled again whole, so each image is computed in the same batch as
    in an uninterrupted run (bit for bit, whatever the backend's kernels do per batch shape).
    On failure the writer keeps what is complete and writes nothing partial. Returns the number
    of images written; `progress(n)` is called after each batch.
    """
    den = as_denoiser(den)
    written = 0
    try:
        for batch in batches:
            missing = [i for i, s in enumerate(batch) if not writer.is_done(s)]
            if not missing:
                continue
            images, labels = sample_batch(den, batch, class_idx, sampler_kwargs)
            writer.submit(images[missing], [batch[i] for i in missing], None if labels is None else labels[missing])
            written += len(missing)
            if progress is not None:
                progress(len(missing))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return written
