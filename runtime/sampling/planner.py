"""Settings in, a solver run out: the one place where a run's `SamplerSettings` meet a model.

`plan_sampling` decides once, before any image is made, which program samples, at which exact
time points, for how many network calls, and what to warn about. The CLI, `generate`, the
serving engine, the benchmarks and `bench --solvers` all plan here, so a setting means the same
thing wherever it is given; `sample` is the one-call form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..core import schedules as sch
from ..core.contract import check_batch, check_denoiser
from ..core.errors import InputError, param_error
from ..core.manifest import schedule_key
from ..core.xp import to_float64
from . import solvers as slv
from .reference import ablation_program, ablation_setup, clamped_range
from .settings import SamplerSettings


@dataclass
class SamplingPlan:
    """How one run samples on one denoiser: its settings, solver, exact noise levels and NFE.

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
    from_manifest: bool = False  # the time points are the model's own searched ones (manifest `schedules`)

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


# How a plan starts its program for a batch, and the noise levels the steps start from.
_Start = tuple[Callable[..., slv.Program], np.ndarray]


def plan_sampling(den: Any, settings: Any = None) -> SamplingPlan:
    """Resolve a run's settings on ``den``: which program implements them, its time points, its NFE.

    ``settings`` is a `SamplerSettings` or a mapping of its options. heun/euler on the paper's
    discretizations with nothing from the fast family run the reference samplers' program (bit
    for bit `edm_sampler`, or `ablation_sampler` when an ablation option or a discretization is
    given, as the reference `generate.py` decides); anything else runs the solver's own program
    on a named schedule, ``num_steps`` or ``nfe`` time points, or an explicit ``sigmas`` list.
    """
    s = SamplerSettings.coerce(settings)
    spec = slv.get_solver(s.solver_name)
    num_steps = s.num_steps
    if s.nfe is not None:
        num_steps = slv.steps_for_nfe(spec.name, s.nfe, afs=s.afs, denoise_to_zero=s.denoise_to_zero)
    searched = None if s.uses_reference_sampler else model_schedule(den, s, spec)
    if searched is not None:
        s, num_steps = dataclasses.replace(s, nfe=None, sigmas=searched), None
    start, sigmas = (_reference_start if s.uses_reference_sampler else _solver_start)(den, s, spec, num_steps)
    return SamplingPlan(s, spec.name, spec.nfe_for_sigmas(sigmas, afs=s.afs), sigmas, start, model_mismatch(spec, den),
                        from_manifest=searched is not None)


def model_schedule(den: Any, s: SamplerSettings, spec: slv.SolverSpec) -> Optional[list[float]]:
    """The model's own time points for this solver and NFE (its manifest's `schedules`), when the run asks
    for nothing but the solver and the NFE; None otherwise."""
    table = getattr(den, "schedules", None) or {}
    if s.nfe is None or not table:
        return None
    plain = SamplerSettings.coerce({"solver": spec.name, "nfe": s.nfe})
    if s != plain:  # any other time-point or solver option: the run is not the one searched
        return None
    sigmas = table.get(schedule_key(spec.name, s.nfe))
    if sigmas is None:
        return None
    if spec.nfe_for_sigmas(np.asarray(sigmas)) != s.nfe:
        raise InputError(f"the model's manifest gives time points for {spec.name} at NFE {s.nfe} that spend "
                         f"{spec.nfe_for_sigmas(np.asarray(sigmas))} evaluations; re-export it with a correct "
                         f"--schedule file", param="nfe")
    return list(sigmas)


def _reference_start(den: Any, s: SamplerSettings, spec: slv.SolverSpec, num_steps: Optional[int]) -> _Start:
    """The paper's generalised sampler (`sampling.ablation_program`): its time steps t_i on ``den``."""
    given = {"num_steps": num_steps} if num_steps is not None else {}
    setup = ablation_setup(den, sigma_min=s.sigma_min, sigma_max=s.sigma_max, discretization=s.discretization or "edm",
                           schedule=s.schedule or "linear", scaling=s.scaling or "none", **given, **s.schedule_params)
    options = dict(solver=spec.name, alpha=1 if s.alpha is None else s.alpha, **s.solver_options)
    round_sigma = den.round_sigma

    def start(latents, randn_like, callback):
        return ablation_program(setup, latents, round_sigma, randn_like, callback=callback, **options)

    return start, setup.sigmas


def _solver_start(den: Any, s: SamplerSettings, spec: slv.SolverSpec, num_steps: Optional[int]) -> _Start:
    """The solver's own program on a named schedule, an explicit list, or its own time points for ``nfe``."""
    sigmas = None if s.sigmas is None else np.asarray(s.sigmas)
    sigma_max = s.sigma_max
    if s.nfe is not None and spec.time_points_for_nfe is not None and s.discretization is None:
        top = min(sch.schedule_default_range("edm")[1] if sigma_max is None else sigma_max, float(den.sigma_max))
        sigmas, num_steps, sigma_max = spec.time_points_for_nfe(s.nfe, top), None, None
    t = sampling_sigmas(den, spec.name, sigmas, num_steps, s.discretization, s.sigma_min, sigma_max, s.denoise_to_zero,
                        **s.schedule_params)
    options = s.solver_options
    round_sigma = den.round_sigma

    def start(latents, randn_like, callback):
        noise = {"randn_like": randn_like} if spec.draws_noise else {}
        return spec.program(to_float64(latents) * float(t[0]), t, callback=callback, round_sigma=round_sigma,
                            **options, **noise)

    return start, t


def _check_rounded(levels: np.ndarray, strict: bool) -> None:
    """Rounding onto a network's table (iDDPM) may merge neighbouring levels; say so before sampling."""
    for i in range(1, levels.size):
        if levels[i] > levels[i - 1] or (strict and levels[i] == levels[i - 1]):
            raise param_error(
                "num_steps",
                f"after rounding to the network's noise levels, sigma {levels[i]:g} (step {i}) does not fall below "
                f"{levels[i - 1]:g}; this solver needs distinct levels, so use fewer steps",
            )


def sampling_sigmas(
    den: Any,
    solver: str = "heun",
    sigmas: Any = None,
    num_steps: Optional[int] = None,
    schedule: Optional[str] = None,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    denoise_to_zero: bool = False,
    **schedule_params: Any,
) -> np.ndarray:
    """The exact float64 time points the solver's own program visits on `den`.

    Either an explicit list (``sigmas``, validated, inside the network's range) or a named
    schedule (``schedule``, a name of `schedules.SCHEDULE_NAMES`, default 'edm', ``num_steps``
    time points, default 18) between sigma_min and sigma_max (the schedule's defaults, clamped to
    the network's range). Rounded with ``den.round_sigma``. An explicit list is used as given,
    for every solver: a final 0 in it (or ``denoise_to_zero``) asks for the last step into
    sigma = 0 (Euler/Heun: their Euler step; the others: x = D(x; sigma_min)), and without one
    the run ends at its last level. A named schedule gets the final 0 when the solver ends at
    sigma = 0 (``appends_zero``) or ``denoise_to_zero`` asks for it. The length minus the final
    0 is the N of ``SolverSpec.nfe``.
    """
    spec = slv.check_solver_options(solver, denoise_to_zero=denoise_to_zero, explicit_sigmas=sigmas is not None)
    params = {k: v for k, v in schedule_params.items() if v is not None}
    if sigmas is not None:
        given = [k for k, v in (("num_steps", num_steps), ("schedule", schedule), ("sigma_min", sigma_min),
                                ("sigma_max", sigma_max)) if v is not None] + sorted(params)
        if given:
            raise param_error(given[0], f"{given[0]} does not apply when sigmas is given (the list is the schedule)")
        arr = sch.check_sigma_list(sigmas)
        to_zero = bool(arr[-1] == 0)
        levels = arr[:-1] if to_zero else arr
        lo, hi = float(den.sigma_min), float(den.sigma_max)
        if levels[0] > hi or levels[-1] < lo:
            raise param_error(
                "sigmas", f"sigmas must lie in the network's range [{lo:g}, {hi:g}], got {levels[0]:g} down to {levels[-1]:g}"
            )
    else:
        schedule = "edm" if schedule is None else schedule
        num_steps = 18 if num_steps is None else num_steps
        default_lo, default_hi = sch.schedule_default_range(schedule)
        lo, hi = clamped_range(den, default_lo if sigma_min is None else sigma_min,
                               default_hi if sigma_max is None else sigma_max)
        levels = sch.schedule_sigmas(schedule, num_steps, lo, hi, **params)
        to_zero = False
    levels = np.asarray(den.round_sigma(levels), dtype=np.float64).reshape(-1)
    _check_rounded(levels, strict=not spec.takes_churn)
    if levels.size < spec.min_points:
        raise param_error(
            "sigmas" if sigmas is not None else "num_steps",
            f"the {solver} solver needs at least {spec.min_points} time points, got {levels.size}",
        )
    if to_zero or denoise_to_zero or (spec.appends_zero and sigmas is None):
        levels = np.append(levels, 0.0)
    return levels


def sample(den: Any, latents: Any, class_labels: Any = None, *, randn_like: Callable = slv.default_randn_like,
           callback: Optional[Callable[[slv.StepInfo], None]] = None, **options: Any) -> Any:
    """Plan and run in one call: the float64 end state for ``latents`` (unit variance).

    ``options`` are `SamplerSettings` fields (``solver``, ``num_steps`` or ``nfe`` or ``sigmas``,
    ``discretization``, churn, ...); an option that does not apply is one InputError.
    ``randn_like`` is the noise stream of solvers that add noise; the others never draw from it.
    """
    check_denoiser(den)
    check_batch(den, latents, class_labels)
    return plan_sampling(den, options).run(den, latents, class_labels, randn_like, callback)
