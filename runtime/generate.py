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

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from edm_deploy.runtime.contract import as_denoiser
from edm_deploy.runtime.errors import InputError, NumericalError
from edm_deploy.runtime.noise import StackedRandomGenerator, draw_latents_and_labels
from edm_deploy.runtime.sampling import ablation_sampler, edm_sampler
from edm_deploy.runtime.seeds import check_batch_size
from edm_deploy.runtime.xp import all_finite_rows, to_host

# The paper's ablation options (Table 1): only the reference samplers take them.
ABLATION_KEYS = ("schedule", "scaling", "alpha", "epsilon_s", "C_1", "C_2", "M")
REFERENCE_SOLVERS = ("heun", "euler")
CHURN_KEYS = ("S_churn", "S_min", "S_max", "S_noise")
# Options of the flat solver family that the reference samplers do not have.
FAST_KEYS = ("sigmas", "afs", "denoise_to_zero", "max_order")


def quantize_uint8(x: Any) -> np.ndarray:
    """[B, C, H, W] float in [-1, 1] -> [B, H, W, C] uint8, the reference's rounding."""
    x = to_host(x).astype(np.float64, copy=False)
    return np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def clean_sampler_kwargs(sampler_kwargs: dict) -> dict:
    """Drop unset options so each sampler applies its own defaults."""
    return {k: v for k, v in sampler_kwargs.items() if v is not None and v is not False}


@dataclass
class SamplingPlan:
    """How one run samples: the sampler call, its time points (when they are known up front), its NFE.

    Built once per run by `plan_sampling`, so every option is checked before any image is made.
    """

    run: Callable[..., Any]          # run(den, latents, class_labels, randn_like, callback) -> float64 x
    solver: str
    nfe: int
    sigmas: Optional[np.ndarray]     # the exact time points, or None for the general ablation sampler


def plan_sampling(den: Any, sampler_kwargs: Optional[dict] = None) -> SamplingPlan:
    """Route sampler options to the sampler that implements them, checking them all.

    * `solver` heun/euler with the paper's discretizations and nothing from the fast family:
      the reference samplers (`edm_sampler`, or `ablation_sampler` when any ablation option is
      set, as the reference `generate.py` decides), bit for bit as the reference;
    * anything else: the flat solver family (`sampling.sample`) on a named schedule
      (`discretization`), `num_steps` or `nfe` time points, or an explicit `sigmas` list.
    An option the chosen path would not use is one InputError naming it.
    """
    from edm_deploy.runtime import solvers as slv
    from edm_deploy.runtime.sampling import nfe as reference_nfe
    from edm_deploy.runtime.sampling import sample, sampling_sigmas
    from edm_deploy.runtime.schedules import DISCRETIZATIONS, param_error

    kw = clean_sampler_kwargs(dict(sampler_kwargs or {}))
    solver = kw.pop("solver", None) or "heun"
    spec = slv.get_solver(solver)
    disc = kw.pop("discretization", None)
    nfe_target = kw.pop("nfe", None)
    if nfe_target is not None:
        if "num_steps" in kw or "sigmas" in kw:
            raise InputError("give nfe or num_steps (or sigmas), not both", param=("nfe", "num_steps", "sigmas"))
        kw["num_steps"] = slv.steps_for_nfe(solver, nfe_target, afs=bool(kw.get("afs")),
                                            denoise_to_zero=bool(kw.get("denoise_to_zero")))
    ablation = {k: kw[k] for k in ABLATION_KEYS if k in kw}
    fast = [k for k in FAST_KEYS if k in kw]
    if solver in REFERENCE_SOLVERS and disc in (None, *DISCRETIZATIONS) and not fast:
        options = dict(kw)
        use_ablation = bool(ablation) or disc is not None or solver != "heun"
        if use_ablation:
            options.update(solver=solver, discretization=disc or "edm")
            sampler = ablation_sampler
        else:
            sampler = edm_sampler
        t = None
        if not ablation and disc in (None, "edm"):  # the EDM form: these are the time points the sampler visits
            t = sampling_sigmas(den, solver, None, options.get("num_steps"), "edm", options.get("sigma_min"),
                                options.get("sigma_max"), rho=options.get("rho"))

        def run(den, latents, class_labels, randn_like, callback=None):
            return sampler(den, latents, class_labels, randn_like=randn_like, callback=callback, **options)

        return SamplingPlan(run, solver, reference_nfe(options.get("num_steps", 18), solver), t)
    if ablation:
        key = next(iter(ablation))
        raise param_error(key, f"{key} (an ablation option of the paper) applies to the heun and euler solvers on the "
                               f"{', '.join(DISCRETIZATIONS)} discretizations without sigmas, afs or denoise_to_zero")
    churn = {k: kw.pop(k) for k in CHURN_KEYS if k in kw}
    slv.check_solver_options(solver, {**churn, **({"max_order": kw["max_order"]} if "max_order" in kw else {})},
                             afs=bool(kw.get("afs")), denoise_to_zero=bool(kw.get("denoise_to_zero")))
    schedule_args = dict(sigmas=kw.get("sigmas"), num_steps=kw.get("num_steps"), schedule=disc,
                         sigma_min=kw.get("sigma_min"), sigma_max=kw.get("sigma_max"),
                         denoise_to_zero=bool(kw.get("denoise_to_zero")))
    rho = kw.get("rho")
    t = sampling_sigmas(den, solver, **schedule_args, **({"rho": rho} if rho is not None else {}))
    extra = {k: kw[k] for k in ("max_order",) if k in kw}

    def run(den, latents, class_labels, randn_like, callback=None):
        return sample(den, latents, class_labels, solver=solver, sigmas=t, afs=bool(kw.get("afs")),
                      randn_like=randn_like, callback=callback, **churn, **extra)

    return SamplingPlan(run, solver, spec.nfe_for_sigmas(t, afs=bool(kw.get("afs"))), t)


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
    class_idx: Optional[int] = None,
    batch_size: int = 64,
    guide: Any = None,
    guidance: Optional[float] = None,
    guidance_interval: Optional[tuple[float, float]] = None,
    **sampler_kwargs: Any,
) -> np.ndarray:
    """Images for `seeds` as uint8 [N, H, W, C]; the same seed always gives the same image.

    `sampler_kwargs` are the sampler options: the reference's (num_steps, sigma_min, sigma_max,
    rho, S_churn, S_min, S_max, S_noise, solver, discretization, schedule, scaling, alpha, ...)
    and the fast solvers' (solver from `solvers.SOLVER_NAMES`, nfe, sigmas, afs,
    denoise_to_zero, max_order); see `plan_sampling`. With `guidance` W the images are guided,
    D = D_g + W (D - D_g): by `guide` (autoguidance; another denoiser, e.g. an earlier snapshot)
    or, with no guide, by the model's own unconditional branch (classifier-free), only at noise
    levels inside `guidance_interval` (lo, hi] when given.
    """
    den = guided(den, guide, guidance, guidance_interval)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("no seeds given")
    batch_size = check_batch_size(batch_size)
    plan = plan_sampling(den, sampler_kwargs)
    out = []
    for start in range(0, len(seeds), batch_size):
        images, _ = sample_batch(den, seeds[start:start + batch_size], class_idx, plan=plan)
        out.append(images)
    return np.concatenate(out)


def _is_inf(value: Any) -> bool:
    return isinstance(value, float) and value == float("inf")


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
        "sampler": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                    for k, v in sorted(clean_sampler_kwargs(sampler_kwargs).items()) if not _is_inf(v)},
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
    plan: Optional[SamplingPlan] = None,
) -> int:
    """Sample every batch with an image missing from `writer` and submit the missing images.

    A partly done batch is sampled again whole, so each image is computed in the same batch as
    in an uninterrupted run (bit for bit, whatever the backend's kernels do per batch shape).
    On failure the writer keeps what is complete and writes nothing partial. Returns the number
    of images written; `progress(n)` is called after each batch.
    """
    den = as_denoiser(den)
    plan = plan or plan_sampling(den, sampler_kwargs)
    written = 0
    try:
        for batch in batches:
            missing = [i for i, s in enumerate(batch) if not writer.is_done(s)]
            if not missing:
                continue
            images, labels = sample_batch(den, batch, class_idx, plan=plan)
            writer.submit(images[missing], [batch[i] for i in missing], None if labels is None else labels[missing])
            written += len(missing)
            if progress is not None:
                progress(len(missing))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return written
