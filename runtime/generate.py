"""Seeds in, uint8 images out: the loop every front end (CLI, embedding API, demo) shares.

`plan_sampling` resolves a run's `SamplerSettings` on a denoiser once (sampler, time points,
NFE); `sample_batch` draws each batch's latents and labels from the per-seed streams, runs the
plan's step program, checks for non-finite output naming the seeds, and quantises exactly like
the reference: uint8 = clip(x * 127.5 + 128, 0, 255) truncated, NHWC.

`sample_into` drives a writer (`runtime.writers.open_output`) and resumes: a batch with any
image missing is sampled again whole, so every image comes out of the same batch as in an
uninterrupted run, and `run_record` is the description of a run that guards resuming.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from edm_deploy.runtime import solvers as slv
from edm_deploy.runtime.contract import as_denoiser
from edm_deploy.runtime.errors import NumericalError
from edm_deploy.runtime.noise import StackedRandomGenerator, check_class, draw_latents_and_labels
from edm_deploy.runtime.seeds import check_batch_size, check_seeds
from edm_deploy.runtime.settings import SamplerSettings
from edm_deploy.runtime.xp import all_finite_rows, to_float64, to_host


def quantize_uint8(x: Any) -> np.ndarray:
    """[B, C, H, W] float in [-1, 1] -> [B, H, W, C] uint8, the reference's rounding."""
    x = to_host(x).astype(np.float64, copy=False)
    return np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


@dataclass
class SamplingPlan:
    """How one run samples on one denoiser: its settings, solver, exact noise levels and NFE.

    Built once per run by `plan_sampling`, so every option is checked before any image is made.
    `program` starts the run's step program for a batch of latents (any driver runs it: `run`
    here, the serving engine); `sigmas` are the noise levels the steps start from, a final 0
    where the run ends at sigma = 0.
    """

    settings: SamplerSettings
    solver: str
    nfe: int
    sigmas: np.ndarray
    _start: Callable[..., slv.Program]
    warnings: list = field(default_factory=list)  # why these settings will give poor images on this model

    def program(self, latents: Any, randn_like: Callable, callback: Optional[Callable] = None) -> slv.Program:
        """The step program for ``latents`` (unit variance, the state is scaled here)."""
        return self._start(latents, randn_like, callback)

    def run(self, den: Any, latents: Any, class_labels: Any, randn_like: Callable,
            callback: Optional[Callable] = None) -> Any:
        """The float64 end state for one batch: the program driven by one call of ``den`` per evaluation."""
        return slv.run_program(den, self.program(latents, randn_like, callback), class_labels)


def model_mismatch(spec: slv.SolverSpec, den: Any) -> list[str]:
    """A solver made for the other kind of model: the images will be poor, and the user is told why."""
    tuned = bool(getattr(den, "consistency_tuned", False))
    if spec.for_consistency_models and not tuned:
        return [f"the {spec.name} solver expects a consistency-tuned model (edm-deploy train --consistency); this "
                "one is a plain EDM denoiser, whose one-step prediction D(x; sigma) is the blurred mean of all images "
                "that noise level could hide: use an ODE solver (heun, ipndm) instead"]
    if tuned and not spec.for_consistency_models:
        return [f"this model is consistency-tuned: it no longer predicts the denoiser an ODE solver integrates, so "
                f"the {spec.name} solver will give poor images; use --solver consistency (NFE 1 or 2)"]
    return []


def plan_sampling(den: Any, settings: Any = None) -> SamplingPlan:
    """Resolve a run's settings on ``den``: which sampler implements them, its time points, its NFE.

    ``settings`` is a `SamplerSettings` or a mapping of its options. heun/euler on the paper's
    discretizations with nothing from the fast family run the reference samplers' programs (bit
    for bit `edm_sampler`, or `ablation_sampler` when an ablation option or a discretization is
    given, as the reference `generate.py` decides); anything else the flat solver family on a
    named schedule, ``num_steps`` or ``nfe`` time points, or an explicit ``sigmas`` list.
    """
    from edm_deploy.runtime.sampling import ablation_program, ablation_setup, sampling_sigmas
    from edm_deploy.runtime.sampling import nfe as reference_nfe

    s = SamplerSettings.coerce(settings)
    solver = s.solver_name
    spec = slv.get_solver(solver)
    round_sigma = den.round_sigma
    num_steps = s.num_steps
    if s.nfe is not None:
        num_steps = slv.steps_for_nfe(solver, s.nfe, afs=s.afs, denoise_to_zero=s.denoise_to_zero)
    if s.uses_reference_sampler:
        params = {k: getattr(s, k) for k in ("rho", "epsilon_s", "C_1", "C_2", "M") if getattr(s, k) is not None}
        setup = ablation_setup(den, 18 if num_steps is None else num_steps, s.sigma_min, s.sigma_max,
                               discretization=s.discretization or "edm", schedule=s.schedule or "linear",
                               scaling=s.scaling or "none", **params)
        options = dict(solver=solver, alpha=1 if s.alpha is None else s.alpha, **s.churn)

        def start(latents, randn_like, callback):
            return ablation_program(setup, latents, round_sigma, randn_like, callback=callback, **options)

        return SamplingPlan(s, solver, reference_nfe(len(setup.t_steps) - 1, solver), setup.sigmas, start,
                            model_mismatch(spec, den))
    params = {k: getattr(s, k) for k in ("rho", "epsilon_s", "C_1", "C_2", "M") if getattr(s, k) is not None}
    sigmas, sigma_max = (None if s.sigmas is None else np.asarray(s.sigmas)), s.sigma_max
    if s.nfe is not None and spec.time_points_for_nfe is not None and s.discretization is None:
        top = min(80.0 if sigma_max is None else sigma_max, float(den.sigma_max))
        sigmas, num_steps, sigma_max = spec.time_points_for_nfe(s.nfe, top), None, None  # the solver's own points
    t = sampling_sigmas(den, solver, sigmas, num_steps, s.discretization, s.sigma_min, sigma_max, s.denoise_to_zero,
                        **params)
    options: dict[str, Any] = dict(s.churn)
    if s.afs:
        options["afs"] = True
    if s.max_order is not None:
        options["max_order"] = s.max_order
    takes_noise = spec.draws_noise

    def start(latents, randn_like, callback):
        extra = {"randn_like": randn_like} if takes_noise else {}
        return spec.program(to_float64(latents) * float(t[0]), t, callback=callback, round_sigma=round_sigma,
                            **options, **extra)

    return SamplingPlan(s, solver, spec.nfe_for_sigmas(t, afs=s.afs), t, start, model_mismatch(spec, den))


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
    from edm_deploy.runtime.guidance import GuidedDenoiser, check_guidance_args

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
