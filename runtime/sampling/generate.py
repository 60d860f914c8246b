"""Seeds in, uint8 images out: the loop every front end (CLI, embedding API, demo) shares.

`sample_batch` draws a batch's latents and labels from the per-seed streams, runs the plan
(`planner.plan_sampling`), names the seeds of any non-finite image and quantises as the
reference does; `sample_into` feeds a writer and resumes a run batch by batch, so a resumed run
equals an uninterrupted one.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..core.contract import as_denoiser
from ..core.errors import NumericalError
from ..core.xp import all_finite_rows, to_host
from .noise import StackedRandomGenerator, check_class, draw_latents_and_labels
from .planner import SamplingPlan, plan_sampling
from .seeds import check_batch_size, check_seeds
from .settings import SamplerSettings


def quantize_uint8(x: Any) -> np.ndarray:
    """[B, C, H, W] float in [-1, 1] -> [B, H, W, C] uint8, the reference's rounding."""
    x = to_host(x).astype(np.float64, copy=False)
    return np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def sample_batch(
    den: Any,
    seeds: Sequence[int],
    class_idx: Optional[int] = None,
    sampler_kwargs: Optional[dict] = None,
    callback: Optional[Callable] = None,
    plan: Optional[SamplingPlan] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Sample one batch: (uint8 NHWC images, int labels or None)."""
    den = as_denoiser(den)
    plan = plan or plan_sampling(den, sampler_kwargs)
    rnd = StackedRandomGenerator(seeds)
    img_shape = (den.img_channels, den.img_resolution, den.img_resolution)
    latents, labels = draw_latents_and_labels(rnd, img_shape, int(den.label_dim), class_idx)
    x = plan.run(den, den.to_device(latents), labels, rnd.randn_like, callback)
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


def guided(den: Any, guide: Any = None, guidance: Optional[float] = None,
           guidance_interval: Optional[tuple[float, float]] = None) -> Any:
    """`den` itself without guidance; else the `GuidedDenoiser` of den and guide (None: classifier-free)."""
    from .guidance import GuidedDenoiser, check_guidance_args

    check_guidance_args(guide is not None, guidance, guidance_interval)
    if guidance is None:
        return as_denoiser(den)

    return GuidedDenoiser(den, guide, guidance, (0.0, float("inf")) if guidance_interval is None else guidance_interval)


def generate(
    den: Any,
    seeds: Iterable[int],
    class_idx: Any = None,
    batch_size: int = 64,
    guide: Any = None,
    guidance: Optional[float] = None,
    guidance_interval: Optional[tuple[float, float]] = None,
    **sampler_kwargs: Any,
) -> np.ndarray:
    """Images for `seeds` as uint8 [N, H, W, C]; the same seed always gives the same image.

    `seeds` are integers in [0, 2^32) (`seeds.check_seeds`); `class_idx` is None (random per
    seed), one class for all, or a list with one class per seed.

    `sampler_kwargs` are the fields of `SamplerSettings` (the CLI's --steps is ``num_steps``,
    --disc ``discretization``): the reference's (num_steps, sigma_min, sigma_max, rho, S_churn,
    S_min, S_max, S_noise, solver, discretization, schedule, scaling, alpha, ...) and the fast
    solvers' (solver from `solvers.SOLVER_NAMES`, nfe, sigmas, afs, denoise_to_zero,
    max_order); an unknown name is an InputError naming it. With `guidance` W the images are guided,
    D = D_g + W (D - D_g): by `guide` (autoguidance; another denoiser, e.g. an earlier snapshot)
    or, with no guide, by the model's own unconditional branch (classifier-free), only at noise
    levels inside `guidance_interval` (lo, hi] when given.
    """
    den = guided(den, guide, guidance, guidance_interval)
    seeds = check_seeds(seeds)
    class_idx = check_class(class_idx, int(den.label_dim), len(seeds))
    batch_size = check_batch_size(batch_size)
    plan = plan_sampling(den, SamplerSettings.from_options(**sampler_kwargs))
    for note in plan.warnings:
        warnings.warn(note, stacklevel=2)
    out = []
    for start in range(0, len(seeds), batch_size):
        part = slice(start, start + batch_size)
        images, _ = sample_batch(den, seeds[part], class_idx[part] if isinstance(class_idx, tuple) else class_idx,
                                 plan=plan)
        out.append(images)
    return np.concatenate(out)


def run_record(model_sha256: str, class_idx: Optional[int], settings: Any, *,
               batch_size: Optional[int] = None, fixed_batch: Optional[int] = None, **extra: Any) -> dict:
    """What made the images of a run: a rerun may add to an output only with an equal record.

    The model's hash, the class, every sampler setting given (`SamplerSettings.given`), and what
    decides the last bits of an image: with a fixed evaluation batch (`fixed_batch`) only that;
    otherwise the batch size, which fixes how seeds are grouped into batches
    (`seeds.shard_batches`). `extra` holds anything else that changes the images (a guide and
    its weight, the time points).
    """
    record: dict[str, Any] = {
        "model_sha256": model_sha256,
        "class": class_idx,
        "sampler": SamplerSettings.coerce(settings).given(),
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
    class_idx: Any = None,
    sampler_kwargs: Optional[dict] = None,
    progress: Optional[Callable[[int], None]] = None,
    plan: Optional[SamplingPlan] = None,
) -> int:
    """Sample every batch with an image missing from `writer` and submit the missing images.

    A partly done batch is sampled again whole, so each image is computed in the same batch as
    in an uninterrupted run (bit for bit, whatever the backend's kernels do per batch shape).
    On failure the writer keeps what is complete and writes nothing partial. `class_idx` is one
    class for all, or a mapping seed -> class. Returns the number of images written;
    `progress(n)` is called after each batch.
    """
    den = as_denoiser(den)
    plan = plan or plan_sampling(den, sampler_kwargs)
    written = 0
    try:
        for batch in batches:
            missing = [i for i, s in enumerate(batch) if not writer.is_done(s)]
            if not missing:
                continue
            classes = tuple(class_idx[s] for s in batch) if isinstance(class_idx, Mapping) else class_idx
            images, labels = sample_batch(den, batch, classes, plan=plan)
            writer.submit(images[missing], [batch[i] for i in missing], None if labels is None else labels[missing])
            written += len(missing)
            if progress is not None:
                progress(len(missing))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return written
