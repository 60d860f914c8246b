"""The EDM paper's samplers around any denoiser that follows the contract (`contract.py`).

* `edm_sampler`: Algorithm 2 of the paper. Deterministic Heun with the EDM time steps when
  S_churn = 0; with churn, noise is added inside [S_min, S_max] and scaled by S_noise. The last
  step to sigma = 0 is Euler, so NFE = 2N - 1.
* `ablation_sampler`: the generalised sampler of the paper's section 3 (Algorithm 1 + churn):
  Euler or Heun (or any alpha for the second-order point), any discretization, sigma(t)
  schedule and s(t) scaling of Table 1.

* `sample`: the front end of the flat solver family (`solvers.py`: Euler, Heun, DPM-Solver++,
  UniPC, iPNDM, DEIS): it turns a named schedule or an explicit sigma list into the time points
  the solver visits and calls it.

Whenever sigma(t) = t and s(t) = 1 (and alpha = 1) both samplers run the flat `solvers.heun` /
`solvers.euler`, so `ablation_sampler(solver='heun', discretization='edm', schedule='linear',
scaling='none')` returns exactly what `edm_sampler` returns, and both return bit for bit what
the earlier fused loop did. Other schedules and scalings keep the general loop (`_sample_loop`).
Names, defaults, clamping to the network's sigma range, `round_sigma` at every evaluated level
and the float64 state follow the reference implementation. The network is called with float64 x
and a float64 sigma per row; backends cast to what they run in. A callback receives a
`solvers.StepInfo` after every step.

Noise: `randn_like(x)` is called for every step whenever any step adds noise (the reference's
stream order, so an external noise stream reproduces exactly) and never for a fully deterministic
run, where it would be multiplied by zero anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from edm_deploy.runtime import schedules as sch
from edm_deploy.runtime import solvers as slv
from edm_deploy.runtime.contract import check_batch, check_denoiser
from edm_deploy.runtime.errors import InputError, param_error
from edm_deploy.runtime.solvers import StepInfo
from edm_deploy.runtime.xp import from_host, to_float64

SOLVERS = ("heun", "euler")

Callback = Optional[Callable[[StepInfo], None]]


def nfe(num_steps: int, solver: str = "heun") -> int:
    """Network evaluations per image: 2N - 1 for Heun (the last step is Euler), N for Euler."""
    return 2 * num_steps - 1 if solver == "heun" else num_steps


_default_randn_like = slv.default_randn_like


def _clamped_range(net, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    lo = max(float(sigma_min), float(net.sigma_min))
    hi = min(float(sigma_max), float(net.sigma_max))
    sch.check_sigma_range(lo, hi)
    return lo, hi


def edm_sampler(
    net: Any,
    latents: Any,
    class_labels: Any = None,
    randn_like: Callable = _default_randn_like,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    callback: Callback = None,
):
    """EDM Algorithm 2 (deterministic Heun when S_churn = 0). Returns the float64 end state."""
    check_denoiser(net)
    check_batch(net, latents, class_labels)
    num_steps = sch.check_num_steps(num_steps)
    lo, hi = _clamped_range(net, sigma_min, sigma_max)
    sigmas = sch.edm_sigma_steps(num_steps, lo, hi, rho)
    t_steps = np.append(np.asarray(net.round_sigma(sigmas), dtype=np.float64), 0.0)
    x = to_float64(latents) * float(t_steps[0])
    return slv.heun(net, x, t_steps, class_labels, callback=callback, S_churn=S_churn, S_min=S_min, S_max=S_max,
                    S_noise=S_noise, randn_like=randn_like)


@dataclass
class AblationSetup:
    """The paper's generalised sampler, resolved for one network: time steps t_i and the sigma(t), s(t) in use."""

    t_steps: np.ndarray                # the t_i, a final 0 appended
    sigma_fn: Any
    scale_fn: Any

    @property
    def is_edm_form(self) -> bool:
        """sigma(t) = t and s(t) = 1: the flat Euler/Heun programs apply."""
        return isinstance(self.sigma_fn, sch.LinearSchedule) and isinstance(self.scale_fn, sch.NoScaling)

    @property
    def sigmas(self) -> np.ndarray:
        """The noise levels the steps start from, sigma(t_i), and the final 0."""
        return np.append(np.asarray(self.sigma_fn.sigma(self.t_steps[:-1]), dtype=np.float64), 0.0)


def ablation_setup(
    net: Any, num_steps: int = 18, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
    rho: float = 7, discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
    epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
) -> AblationSetup:
    """The reference's time steps for ``net``: the discretization's sigmas in the (clamped) range,
    rounded by the network, mapped to t by the schedule's inverse; the VP schedule re-fitted to the range."""
    num_steps = sch.check_num_steps(num_steps)
    default_lo, default_hi = sch.default_sigma_range(discretization, epsilon_s)
    lo, hi = _clamped_range(net, default_lo if sigma_min is None else sigma_min,
                            default_hi if sigma_max is None else sigma_max)
    beta_d, beta_min = sch.vp_betas_for_range(lo, hi, epsilon_s)
    sigma_fn = sch.make_schedule(schedule, beta_d, beta_min)
    scale_fn = sch.make_scaling(scaling, sigma_fn)
    sigmas = sch.sigma_steps(discretization, num_steps, lo, hi, rho=rho, epsilon_s=epsilon_s, C_1=C_1, C_2=C_2, M=M)
    t_steps = np.asarray(sigma_fn.sigma_inv(np.asarray(net.round_sigma(sigmas), dtype=np.float64)), dtype=np.float64)
    return AblationSetup(np.append(t_steps, 0.0), sigma_fn, scale_fn)


def ablation_program(
    setup: AblationSetup, latents: Any, round_sigma: Callable, randn_like: Callable = _default_randn_like,
    solver: str = "heun", alpha: float = 1, S_churn: float = 0, S_min: float = 0, S_max: float = float("inf"),
    S_noise: float = 1, callback: Callback = None,
) -> slv.Program:
    """The generalised sampler as a step program: the flat Euler/Heun program in the EDM form
    (sigma(t) = t, s(t) = 1, alpha = 1), the general loop otherwise."""
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if not 0 < alpha <= 1:
        raise InputError(f"alpha must lie in (0, 1], got {alpha}")
    if setup.is_edm_form and alpha == 1:
        program = slv.heun_program if solver == "heun" else slv.euler_program
        x = to_float64(latents) * float(setup.t_steps[0])
        return program(x, setup.t_steps, callback=callback, round_sigma=round_sigma, S_churn=S_churn, S_min=S_min,
                       S_max=S_max, S_noise=S_noise, randn_like=randn_like)
    return _general_program(latents, randn_like, setup, round_sigma, solver, float(alpha), S_churn, S_min, S_max,
                            S_noise, callback)


def ablation_sampler(
    net: Any,
    latents: Any,
    class_labels: Any = None,
    randn_like: Callable = _default_randn_like,
    num_steps: int = 18,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7,
    solver: str = "heun",
    discretization: str = "edm",
    schedule: str = "linear",
    scaling: str = "none",
    epsilon_s: float = 1e-3,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
    alpha: float = 1,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    callback: Callback = None,
):
    """The paper's generalised sampler (solver, discretization, schedule, scaling, alpha)."""
    check_denoiser(net)
    check_batch(net, latents, class_labels)
    num_steps = sch.check_num_steps(num_steps)
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if not 0 < alpha <= 1:
        raise InputError(f"alpha must lie in (0, 1], got {alpha}")
    setup = ablation_setup(net, num_steps, sigma_min, sigma_max, rho, discretization, schedule, scaling, epsilon_s,
                           C_1, C_2, M)
    program = ablation_program(setup, latents, net.round_sigma, randn_like, solver, alpha, S_churn, S_min, S_max,
                               S_noise, callback)
    return slv.run_program(net, program, class_labels)


def _general_program(
    latents, randn_like, setup, round_sigma_fn, solver, alpha, S_churn, S_min, S_max, S_noise, callback,
) -> slv.Program:
    """The general loop (any sigma(t), s(t), alpha); linear/none with alpha != 1 takes the paper's simplified formulas.

    Each evaluation is asked for at the network's input x / s(t) and noise level sigma(t).
    """
    t_steps, sigma_fn, scale_fn = setup.t_steps, setup.sigma_fn, setup.scale_fn
    slv.check_churn(S_churn, S_min, S_max, S_noise)
    num_steps = len(t_steps) - 1
    edm_form = setup.is_edm_form
    unscaled = isinstance(scale_fn, sch.NoScaling)

    sigma = lambda t: float(sigma_fn.sigma(t))  # noqa: E731
    s = lambda t: 1.0 if unscaled else float(scale_fn.s(t))  # noqa: E731
    round_sigma = lambda v: float(np.asarray(round_sigma_fn(np.array([v], dtype=np.float64))).reshape(-1)[0])  # noqa: E731
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    gammas = [gamma_max if S_min <= sigma(t) <= S_max else 0.0 for t in t_steps[:-1]]
    stochastic = any(g > 0 for g in gammas)

    def derivative(x, denoised, t):
        if edm_form:
            return (x - denoised) / t
        sd = float(sigma_fn.sigma_deriv(t))
        sc_d = 0.0 if unscaled else float(scale_fn.s_deriv(t))
        return (sd / sigma(t) + sc_d / s(t)) * x - sd * s(t) / sigma(t) * denoised

    t_next = float(t_steps[0])
    x_next = to_float64(latents) * (sigma(t_next) * s(t_next))
    for i in range(num_steps):
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        x_cur = x_next

        # Temporarily raise the noise level (churn); the stream is consumed every step if any step churns.
        gamma = gammas[i]
        sigma_cur = sigma(t_cur)
        t_hat = float(sigma_fn.sigma_inv(round_sigma(sigma_cur + gamma * sigma_cur))) if gamma > 0 else t_cur
        x_hat = x_cur if unscaled else (s(t_hat) / s(t_cur)) * x_cur
        if stochastic:
            eps = randn_like(x_cur)
            if gamma > 0:
                noise_std = math.sqrt(max(sigma(t_hat) ** 2 - sigma_cur**2, 0.0)) * s(t_hat) * S_noise
                if isinstance(eps, np.ndarray):
                    eps = from_host(eps, x_cur)
                x_hat = x_hat + noise_std * eps

        # Euler step, then the second-order correction unless this is the last step.
        h = t_next - t_hat
        denoised = yield (x_hat if unscaled else x_hat / s(t_hat)), sigma(t_hat)
        d_cur = derivative(x_hat, denoised, t_hat)
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            t_prime = t_next if alpha == 1 else t_hat + alpha * h
            x_prime = x_hat + (h if alpha == 1 else alpha * h) * d_cur
            denoised_prime = yield (x_prime if unscaled else x_prime / s(t_prime)), sigma(t_prime)
            d_prime = derivative(x_prime, denoised_prime, t_prime)
            w = 1 / (2 * alpha)
            x_next = x_hat + h * ((1 - w) * d_cur + w * d_prime)
        if callback is not None:
            callback(StepInfo(i, num_steps, sigma_cur, sigma(t_hat), sigma(t_next), x_next, denoised))
    return x_next


# --------------------------------------------------------------------------------------------
# The front end of the flat solver family


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
    """The exact float64 time points `solver` will visit on `den` (what `sample` passes to it).

    Either an explicit list (``sigmas``, validated, inside the network's range) or a named
    schedule (``schedule``, default 'edm', ``num_steps`` time points, default 18) between
    sigma_min and sigma_max (the schedule's defaults, clamped to the network's range). Rounded
    with ``den.round_sigma``. An explicit list is used as given, for every solver: a final 0 in it
    (or ``denoise_to_zero``) asks for the last step into sigma = 0 (Euler/Heun: their Euler step;
    the others: x = D(x; sigma_min)), and without one the run ends at its last level. A named
    schedule gets the final 0 when the solver ends at sigma = 0 (``appends_zero``) or
    ``denoise_to_zero`` asks for it. The length minus the final 0 is the N of ``SolverSpec.nfe``.
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
        lo, hi = _clamped_range(den, default_lo if sigma_min is None else sigma_min,
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


def sample(
    den: Any,
    latents: Any,
    class_labels: Any = None,
    solver: str = "heun",
    sigmas: Any = None,
    num_steps: Optional[int] = None,
    schedule: Optional[str] = None,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: Optional[float] = None,
    afs: bool = False,
    denoise_to_zero: bool = False,
    randn_like: Callable = _default_randn_like,
    callback: Callback = None,
    schedule_params: Optional[dict] = None,
    **solver_options: Any,
):
    """Sample with any solver of the registry: schedule -> time points -> solver. Returns the float64 end state.

    ``solver`` is a name of `solvers.SOLVER_NAMES`; the time points come from `sampling_sigmas`
    (``rho`` and ``schedule_params`` are the schedule's parameters, e.g. epsilon_s or C_1, C_2,
    M; None means the schedule's default). ``afs`` (analytical first step) and
    ``solver_options`` (S_churn, S_min, S_max, S_noise for Euler/Heun; max_order for the
    multistep solvers) must apply to the solver, or this raises one InputError. ``randn_like``
    is the churn noise stream; solvers that add no noise never draw from it.
    """
    check_denoiser(den)
    check_batch(den, latents, class_labels)
    spec = slv.check_solver_options(solver, solver_options, afs=afs, denoise_to_zero=denoise_to_zero,
                                    explicit_sigmas=sigmas is not None)
    params = dict(schedule_params or {})
    if rho is not None:
        params["rho"] = rho
    t = sampling_sigmas(den, solver, sigmas, num_steps, schedule, sigma_min, sigma_max, denoise_to_zero, **params)
    options = dict(solver_options)
    if afs:
        options["afs"] = True
    if spec.draws_noise:
        options["randn_like"] = randn_like
    x = to_float64(latents) * float(t[0])
    return spec.fn(den, x, t, class_labels, callback=callback, **options)
