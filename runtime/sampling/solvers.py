"""Training-free ODE solvers for the EDM probability-flow ODE, each written once as a step program.

A solver is a *step program*: a generator that yields each evaluation it needs and receives
the network's answer back,

    denoised = yield x, sigma        # "evaluate D(x; sigma) for every row of x"

and returns the final state. Nothing in a program calls a network, so one definition runs
under every driver:

* `run_program(den, program, class_labels)`: one network call per request, the batch loop of
  the planner (`planner.SamplingPlan.run`) and of each solver's k-diffusion style function
  (`SolverSpec.fn`, ``fn(den, x, sigmas)``);
* the schedule search (`schedule_search`), which runs the programs for its teacher and its
  polish and costs single steps with the same update functions (`dpmpp_update`,
  `unipc_predict`, `ipndm_update`, ...) applied to linear forms of teacher trajectories
  (`StepView`, each solver's `SearchRule`);
* the serving engine (`engine`), which gathers the pending evaluations of many programs (other
  requests, solvers, NFEs, each at its own sigma) into one network call per tick.

The contract of a program ``<name>_program(x, sigmas, *, callback=None, round_sigma=None, **options)``:

* ``x`` is the float64 state already at noise level ``sigmas[0]`` (latents * sigmas[0]): a
  NumPy, CuPy or torch array. A program only combines states with each other and with Python
  floats, so the state stays on its device; every coefficient is computed on the host.
* ``sigmas`` are the host float64 time points, already rounded by the network's
  ``round_sigma``. A final 0 means "finish at sigma = 0": Euler and Heun take their Euler step
  into 0 (EDM Algorithms 1 and 2); every other solver ends with x = D(x; sigmas[-2]), which is
  diff-sampler's ``denoise_to_zero`` and exactly k-diffusion's DPM-Solver++ step into 0.
* the value sent back for ``(x, sigma)`` must be D(x; sigma) as a float64 array of x's shape
  (a float16 engine still drives a float64 trajectory).
* ``round_sigma`` is the network's rounding rule, for solvers that make a level of their own
  (Euler/Heun churn); ``callback(StepInfo)`` runs after every step.

Each solver reproduces a public reference implementation (named in its registry entry) operation
for operation, so on the same denoiser and sigmas the results agree to rounding. A solver is
its program and its `SolverSpec` in `SOLVER_REGISTRY` (built with keywords): the summary, the
reference, the NFE for N time points, whether sigma = 0 is appended, how the schedule search
costs it; its options and batch function are read from the program.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Generator, Mapping, Optional, Protocol

import numpy as np

from ..core.errors import check_int, param_error
from ..core.schedules import MAX_STEPS, check_sigma_list, symmetric_linspace, vp_betas_for_range
from ..core.xp import from_host, to_float64

# A step program: yields (x, sigma), receives D(x; sigma) as float64, returns the final x.
Program = Generator[tuple[Any, float], Any, Any]


@dataclass(frozen=True)
class StepInfo:
    """What a callback gets after step ``i`` of ``num_steps`` (= len(sigmas) - 1).

    ``x`` is the state at ``sigma_next`` after the step. ``denoised`` is the newest data
    prediction the step made or used (for UniPC the corrector's D at sigma_next; for the
    analytical first step the analytic one). ``sigma_hat`` is the churned level Euler/Heun
    evaluated at (``sigma`` when no churn).
    """

    i: int
    num_steps: int
    sigma: float
    sigma_hat: float
    sigma_next: float
    x: Any
    denoised: Any


Callback = Optional[Callable[[StepInfo], None]]


def default_randn_like(x: Any) -> np.ndarray:
    """Host standard normals shaped like x (the churn noise when no per-seed stream is given)."""
    return np.random.standard_normal(x.shape)


def evaluate(den: Any, x: Any, sigma: float, class_labels: Any) -> Any:
    """D(x; sigma) as float64, with sigma given per row as the denoiser contract asks."""
    return to_float64(den(x, np.full(x.shape[0], sigma, dtype=np.float64), class_labels))


def run_program(den: Any, program: Program, class_labels: Any = None) -> Any:
    """The batch driver: answer each evaluation a program asks for with one call of ``den``."""
    try:
        x, sigma = next(program)
        while True:
            x, sigma = program.send(evaluate(den, x, sigma, class_labels))
    except StopIteration as finished:
        return finished.value


def _report(callback: Callback, i, num_steps, sigma, sigma_hat, sigma_next, x, denoised) -> None:
    if callback is not None:
        callback(StepInfo(i, num_steps, float(sigma), float(sigma_hat), float(sigma_next), x, denoised))


# Host math on a step's coefficients: Python floats in a solver run, arrays (one entry per
# candidate step) in the schedule search; math's functions keep a solver run's bits.
def _log(v: Any) -> Any:
    return math.log(v) if isinstance(v, float) else np.log(v)


def _exp(v: Any) -> Any:
    return math.exp(v) if isinstance(v, float) else np.exp(v)


def _expm1(v: Any) -> Any:
    return math.expm1(v) if isinstance(v, float) else np.expm1(v)


def _edm_time_points(sigmas) -> list[float]:
    """Euler/Heun time points: non-increasing, positive but for a final 0.

    Equal neighbours are allowed because a table-rounded schedule (iDDPM) can repeat a level and
    the EDM reference then simply takes a zero-length step; the multistep solvers cannot (their
    coefficients divide by step sizes) and use `_multistep_time_points`.
    """
    arr = np.asarray(sigmas, dtype=np.float64)
    ok = (
        arr.ndim == 1 and arr.size >= 1 and bool(np.isfinite(arr).all())
        and bool((arr[:-1] > 0).all()) and arr[-1] >= 0 and bool((np.diff(arr) <= 0).all())
    )
    if not ok:
        arr = check_sigma_list(sigmas)  # the strict check names what is wrong
    if arr.size < 2:
        raise param_error("sigmas", f"sigmas needs at least two time points (one step), got {arr.tolist()}")
    return [float(v) for v in arr]


def _multistep_time_points(sigmas, min_points: int = 2) -> tuple[list[float], bool]:
    """(positive time points, whether a final 0 asks for the closing x = D(x; sigma_min))."""
    arr = check_sigma_list(sigmas)
    to_zero = bool(arr[-1] == 0)
    levels = [float(v) for v in (arr[:-1] if to_zero else arr)]
    if len(levels) < min_points:
        raise param_error("sigmas", f"sigmas needs at least {min_points} positive time points for this solver, got {len(levels)}")
    return levels, to_zero


def _check_max_order(max_order: int, highest: int) -> int:
    return check_int(max_order, "max_order", 1, highest)


def afs_derivative(x: Any, sigma: Any) -> Any:
    """diff-sampler's analytical first step (AFS): the slope taken as d = x / sqrt(1 + sigma^2).

    At sigma_max the data prediction is negligible next to x and the true slope (x - D)/sigma is
    nearly x / sigma, so the first network call can be skipped, saving one NFE.
    """
    return x / math.sqrt(1 + sigma * sigma) if isinstance(sigma, float) else x * (1.0 / np.sqrt(1 + sigma * sigma))


def _finish_at_zero(x, levels, callback, num_steps) -> Program:
    """diff-sampler's denoise_to_zero: x = D(x; sigma_min) as one last step to sigma = 0."""
    x = yield x, levels[-1]
    _report(callback, num_steps - 1, num_steps, levels[-1], levels[-1], 0.0, x, x)
    return x


# --------------------------------------------------------------------------------------------
# Step orders: warm-up and lower_order_final, shared by the programs and the schedule search


def warmup_order(i: int, max_order: int) -> int:
    """Order of step i of a multistep method that fills its history first: 1, 2, ... max_order."""
    return min(max_order, i + 1)


def lower_order_final(i: int, num_steps: int, max_order: int) -> int:
    """diff-sampler's lower_order_final: warm up, then drop the order over the last steps."""
    return i + 1 if i + 1 < max_order else min(max_order, num_steps - i)


def unipc_corrects(i: int, num_steps: int, max_order: int) -> bool:
    """UniPC runs its corrector on every step but the last; warm-up steps always correct."""
    return i + 1 < max_order or i != num_steps - 1


# --------------------------------------------------------------------------------------------
# Euler and Heun: EDM Algorithms 1 and 2 (with churn)


def check_churn(S_churn: float, S_min: float, S_max: float, S_noise: float) -> None:
    """EDM's stochasticity knobs: S_churn, S_noise >= 0 and a window S_min <= S_max."""
    if not (math.isfinite(S_churn) and S_churn >= 0):
        raise param_error("S_churn", f"S_churn must be a finite number >= 0, got {S_churn}")
    if not (math.isfinite(S_noise) and S_noise >= 0):
        raise param_error("S_noise", f"S_noise must be a finite number >= 0, got {S_noise}")
    if math.isnan(S_min) or math.isnan(S_max) or S_min < 0:
        raise param_error("S_min", f"S_min and S_max must be numbers >= 0, got {S_min} and {S_max}")
    if S_min > S_max:
        raise param_error("S_min", f"S_min ({S_min}) must not exceed S_max ({S_max})")


def _round_one(round_sigma: Optional[Callable], sigma: float) -> float:
    """One level through the network's round_sigma (iDDPM snaps a churned level to its table)."""
    if round_sigma is None:
        return sigma
    return float(np.asarray(round_sigma(np.array([sigma], dtype=np.float64))).reshape(-1)[0])


def _edm_program(x, sigmas, callback, second_order, S_churn, S_min, S_max, S_noise, randn_like, round_sigma) -> Program:
    """EDM's loop: churn inside [S_min, S_max], an Euler step, Heun's correction unless sigma_next = 0.

    The noise stream is drawn every step whenever any step churns (the reference's order, so an
    external per-seed stream reproduces it) and never in a deterministic run.
    """
    t = _edm_time_points(sigmas)
    check_churn(S_churn, S_min, S_max, S_noise)
    num_steps = len(t) - 1
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    gammas = [gamma_max if S_min <= s <= S_max else 0.0 for s in t[:-1]]
    stochastic = any(g > 0 for g in gammas)
    for i in range(num_steps):
        sigma, sigma_next, gamma = t[i], t[i + 1], gammas[i]
        sigma_hat = _round_one(round_sigma, sigma + gamma * sigma) if gamma > 0 else sigma
        x_hat = x
        if stochastic:
            eps = randn_like(x)
            if gamma > 0:
                noise_std = math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * S_noise
                if isinstance(eps, np.ndarray):
                    eps = from_host(eps, x)
                x_hat = x_hat + noise_std * eps
        h = sigma_next - sigma_hat
        denoised = yield x_hat, sigma_hat
        d = (x_hat - denoised) / sigma_hat
        if not second_order or sigma_next == 0:
            x = x_hat + h * d
        else:
            x = yield from heun_second_stage(x_hat, h, d, sigma_next)
        _report(callback, i, num_steps, sigma, sigma_hat, sigma_next, x, denoised)
    return x


def heun_update(x: Any, h: Any, d: Any, d_prime: Any) -> Any:
    """Heun's (trapezoidal) step from the slopes at both ends: x + h (d + d') / 2."""
    return x + h * (0.5 * d + 0.5 * d_prime)


def heun_second_stage(x: Any, h: Any, d: Any, sigma_next: float) -> Program:
    """Heun's correction of the Euler step x + h d: D at its end, then `heun_update`.

    A sub-program of the Heun program, and what the schedule search evaluates per pair of fine
    points (its end lies off the teacher's trajectory).
    """
    x_prime = x + h * d
    d_prime = (x_prime - (yield x_prime, sigma_next)) / sigma_next
    return heun_update(x, h, d, d_prime)


def euler_program(
    x: Any, sigmas, *, callback: Callback = None, round_sigma: Optional[Callable] = None,
    S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
    randn_like: Callable = default_randn_like,
) -> Program:
    """Euler steps in sigma on dx/dsigma = (x - D)/sigma (EDM Algorithm 1, churn of Algorithm 2)."""
    return _edm_program(x, sigmas, callback, False, S_churn, S_min, S_max, S_noise, randn_like, round_sigma)


def heun_program(
    x: Any, sigmas, *, callback: Callback = None, round_sigma: Optional[Callable] = None,
    S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
    randn_like: Callable = default_randn_like,
) -> Program:
    """EDM Algorithm 2: Heun's second-order steps; the step into sigma = 0 is Euler (NFE 2N - 1)."""
    return _edm_program(x, sigmas, callback, True, S_churn, S_min, S_max, S_noise, randn_like, round_sigma)


# --------------------------------------------------------------------------------------------
# DPM-Solver++ (data prediction, exponential integrator in lambda = -log sigma)


def dpmpp_2m_update(x: Any, denoised: Any, old_denoised: Any, sigma_prev: Any, sigma: Any, sigma_next: Any) -> Any:
    """One DPM-Solver++(2M) step exactly as k-diffusion's `sample_dpmpp_2m` (sigma_next > 0).

    With lambda = -log sigma, h = lambda' - lambda and r = h_prev / h, the data prediction is
    extrapolated linearly in lambda, D_d = (1 + 1/(2r)) D - 1/(2r) D_prev, and integrated
    exactly: x' = (sigma'/sigma) x - expm1(-h) D_d. The first step (``old_denoised`` None) uses D.
    """
    lam, lam_next = -_log(sigma), -_log(sigma_next)
    h = lam_next - lam
    ratio = _exp(-lam_next) / _exp(-lam)
    if old_denoised is None:
        return ratio * x - _expm1(-h) * denoised
    r = (lam - -_log(sigma_prev)) / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return ratio * x - _expm1(-h) * denoised_d


def dpmpp_2m_program(x: Any, sigmas, *, callback: Callback = None, round_sigma: Optional[Callable] = None) -> Program:
    """DPM-Solver++(2M) exactly as k-diffusion's `sample_dpmpp_2m`; the step into 0 is x = D."""
    levels, to_zero = _multistep_time_points(sigmas, min_points=1)
    t = levels + [0.0] if to_zero else levels
    num_steps = len(t) - 1
    if num_steps < 1:
        raise param_error("sigmas", f"sigmas needs at least two time points (one step), got {t}")
    old_denoised = None
    for i in range(num_steps):
        sigma, sigma_next = t[i], t[i + 1]
        denoised = yield x, sigma
        if sigma_next == 0:
            x = denoised  # (0 / sigma) x - expm1(-inf) D, the reference's first-order step into 0
        else:
            x = dpmpp_2m_update(x, denoised, old_denoised, t[i - 1] if i else None, sigma, sigma_next)
        old_denoised = denoised
        _report(callback, i, num_steps, sigma, sigma, sigma_next, x, denoised)
    return x


def dpmpp_update(x: Any, models: list, times: list, sigma_next: Any, order: int) -> Any:
    """diff-sampler's `dpm_pp_update` (data prediction, VE form) of order 1, 2 or 3.

    ``models`` / ``times`` hold the latest data predictions and their sigmas, newest last; the
    order-k update uses the last k of them (finite differences in lambda, phi functions of h).
    Note that the order-3 update, like the DPM-Solver code it comes from, weights
    D2 = h^2 [m0, m1, m2] by phi_3 where exact quadratic integration needs 2 phi_3, so its local
    error is O(h^3), as for order 2 (tests/test_solvers.py measures it); kept for exactness.
    """
    lam_t = -_log(sigma_next)
    lam_0 = -_log(times[-1])
    h = lam_t - lam_0
    phi_1 = _expm1(-h)
    m0 = models[-1]
    if order == 1:
        return (sigma_next / times[-1]) * x - phi_1 * m0
    lam_1 = -_log(times[-2])
    h_0 = lam_0 - lam_1
    r0 = h_0 / h
    D1_0 = (1.0 / r0) * (m0 - models[-2])
    if order == 2:
        return (sigma_next / times[-1]) * x - phi_1 * m0 - 0.5 * phi_1 * D1_0
    lam_2 = -_log(times[-3])
    h_1 = lam_1 - lam_2
    r1 = h_1 / h
    D1_1 = (1.0 / r1) * (models[-2] - models[-3])
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return (sigma_next / times[-1]) * x - phi_1 * m0 + phi_2 * D1 - phi_3 * D2


def dpmpp_3m_program(
    x: Any, sigmas, *, callback: Callback = None, round_sigma: Optional[Callable] = None,
    afs: bool = False, max_order: int = 3,
) -> Program:
    """Multistep DPM-Solver++(3M), diff-sampler's `dpm_pp_sampler(max_order=3, predict_x0=True, lower_order_final=True)`.

    Orders 1, 2 while the history fills, then 3, dropping to 2 and 1 on the last two steps
    (lower_order_final, which keeps few-step runs stable). One NFE per step.
    """
    max_order = _check_max_order(max_order, 3)
    levels, to_zero = _multistep_time_points(sigmas)
    n = len(levels)
    num_steps = n - 1 + to_zero
    models: list = []
    times: list = []
    for i in range(n - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        if afs and i == 0:
            denoised = x - sigma * afs_derivative(x, sigma)
        else:
            denoised = yield x, sigma
        models.append(denoised)
        times.append(sigma)
        x = dpmpp_update(x, models, times, sigma_next, lower_order_final(i, n - 1, max_order))
        models, times = models[-3:], times[-3:]
        _report(callback, i, num_steps, sigma, sigma, sigma_next, x, denoised)
    if to_zero:
        x = yield from _finish_at_zero(x, levels, callback, num_steps)
    return x


# --------------------------------------------------------------------------------------------
# UniPC (bh2, data prediction)


def _power(r: Any, k: int) -> Any:
    """r**k for k = 0, 1, 2 as the reference's tensor pow evaluates it (k = 2 is r * r)."""
    return 1.0 if k == 0 else r if k == 1 else r * r if k == 2 else r**k


def _linear_combination(coeffs, arrays):
    """sum_k c_k a_k, accumulated left to right."""
    out = coeffs[0] * arrays[0]
    for c, a in zip(coeffs[1:], arrays[1:]):
        out = out + c * a
    return out


def _vector(values: list) -> np.ndarray:
    """Floats or equal-shape arrays -> one float64 array, the list axis last."""
    return np.stack(np.broadcast_arrays(*[np.asarray(v, dtype=np.float64) for v in values]), axis=-1)


def _matrix(rows: list) -> np.ndarray:
    """Rows of floats or equal-shape arrays -> one float64 array [..., rows, columns]."""
    flat = _vector([v for row in rows for v in row])
    return flat.reshape(*flat.shape[:-1], len(rows), len(rows[0]))


def _solve(R: np.ndarray, b: np.ndarray) -> list:
    """The solution of R w = b (stacked systems alike) as a list of its entries."""
    w = np.linalg.solve(R, b[..., None])[..., 0]
    if w.ndim == 1:  # one system: Python floats, which combine with any array library's state
        return [float(v) for v in w]
    return [w[..., k] for k in range(w.shape[-1])]


@dataclass
class UniPCStep:
    """What the UniC corrector needs from the predictor of the same step."""

    x_base: Any        # (sigma'/sigma) x - h phi_1 m0, the first-order part
    m0: Any            # the newest data prediction
    D1s: list          # divided differences of the older predictions
    R: np.ndarray      # the bh2 system's matrix and right-hand side (stacked for the search)
    b: np.ndarray
    B_h: Any
    order: int


def unipc_predict(x: Any, models: list, times: list, sigma_next: Any, order: int) -> tuple[Any, UniPCStep]:
    """UniPC's predictor UniP-p (diff-sampler's `unipc_update`, variant bh2, data prediction).

    Uses the last ``order`` data predictions (newest last). Returns the predicted x at
    sigma_next and the step's coefficients for `unipc_correct`.
    """
    sigma_0 = times[-1]
    lam_0, lam_t = -_log(sigma_0), -_log(sigma_next)
    m0 = models[-1]
    h = lam_t - lam_0
    rks, D1s = [], []
    for k in range(1, order):
        rk = (-_log(times[-(k + 1)]) - lam_0) / h
        rks.append(rk)
        D1s.append((models[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1 = _expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = _expm1(hh)
    factorial = 1
    R, b = [], []
    for k in range(1, order + 1):
        R.append([_power(rk, k - 1) for rk in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R_arr, b_arr = _matrix(R), _vector(b)
    x_base = (sigma_next / sigma_0) * x - h_phi_1 * m0
    x_t = x_base
    if D1s:
        rhos_p = [0.5] if order == 2 else _solve(R_arr[..., :-1, :-1], b_arr[..., :-1])
        x_t = x_base - B_h * _linear_combination(rhos_p, D1s)
    return x_t, UniPCStep(x_base, m0, D1s, R_arr, b_arr, B_h, order)


def unipc_correct(step: UniPCStep, model_t: Any) -> Any:
    """UniPC's corrector UniC: re-solve the step with D at the predicted point, one order higher."""
    rhos_c = [0.5] if step.order == 1 else _solve(step.R, step.b)
    D1_t = model_t - step.m0
    if step.D1s:
        return step.x_base - step.B_h * (_linear_combination(rhos_c[:-1], step.D1s) + rhos_c[-1] * D1_t)
    return step.x_base - step.B_h * (rhos_c[-1] * D1_t)


def unipc_program(
    x: Any, sigmas, *, callback: Callback = None, round_sigma: Optional[Callable] = None,
    afs: bool = False, max_order: int = 3,
) -> Program:
    """UniPC, diff-sampler's `unipc_sampler(variant='bh2', max_order=3, lower_order_final=True)`.

    D at sigma_max first, then per step a predictor and a corrector whose evaluation is reused;
    the last step skips the corrector. The warm-up steps (order < max_order) always correct, so
    with 2 or 3 time points the NFE is N rather than N - 1.
    """
    max_order = _check_max_order(max_order, 3)
    levels, to_zero = _multistep_time_points(sigmas)
    n = len(levels)
    num_steps = n - 1 + to_zero
    if afs:
        denoised = x - levels[0] * afs_derivative(x, levels[0])
    else:
        denoised = yield x, levels[0]
    models, times = [denoised], [levels[0]]
    for i in range(n - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x, step = unipc_predict(x, models, times, sigma_next, lower_order_final(i, n - 1, max_order))
        if unipc_corrects(i, n - 1, max_order):
            model_out = yield x, sigma_next
            x = unipc_correct(step, model_out)
            models, times = (models + [model_out])[-max_order:], (times + [sigma_next])[-max_order:]
        _report(callback, i, num_steps, sigma, sigma, sigma_next, x, models[-1])
    if to_zero:
        x = yield from _finish_at_zero(x, levels, callback, num_steps)
    return x


# --------------------------------------------------------------------------------------------
# Adams-Bashforth on d = (x - D)/sigma: iPNDM, iPNDM-v, DEIS-tAB


def _adams_bashforth(x, sigmas, callback, afs, max_order, step) -> Program:
    """The shared program: slope at the current point, ``step`` combines it with the slope history."""
    levels, to_zero = _multistep_time_points(sigmas)
    n = len(levels)
    num_steps = n - 1 + to_zero
    history: list = []  # the last max_order - 1 slopes, newest last
    for i in range(n - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        if afs and i == 0:
            d = afs_derivative(x, sigma)
            denoised = x - sigma * d
        else:
            denoised = yield x, sigma
            d = (x - denoised) / sigma
        x = step(x, d, history, i, warmup_order(i, max_order), levels)
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
        _report(callback, i, num_steps, sigma, sigma, sigma_next, x, denoised)
    if to_zero:
        x = yield from _finish_at_zero(x, levels, callback, num_steps)
    return x


def ipndm_update(x: Any, h: Any, slope: Callable[[int], Any], order: int) -> Any:
    """x + h * (fixed Adams-Bashforth weights . slopes): (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24.

    ``slope(k)`` is the k-th newest slope (0: the current one). Written once for the solver and
    for the schedule search, which applies it to linear forms of the teacher's points.
    """
    if order == 1:
        return x + h * slope(0)
    if order == 2:
        return x + h * (3 * slope(0) - slope(1)) / 2
    if order == 3:
        return x + h * (23 * slope(0) - 16 * slope(1) + 5 * slope(2)) / 12
    return x + h * (55 * slope(0) - 59 * slope(1) + 37 * slope(2) - 9 * slope(3)) / 24


def _ipndm_step(x, d, hist, i, order, t):
    """Fixed Adams-Bashforth weights on the slopes (`ipndm_update`)."""
    return ipndm_update(x, t[i + 1] - t[i], lambda k: d if k == 0 else hist[-k], order)


def ipndm_program(
    x: Any, sigmas, *, callback: Callback = None, round_sigma: Optional[Callable] = None,
    afs: bool = False, max_order: int = 4,
) -> Program:
    """Improved PNDM, diff-sampler's `ipndm_sampler(max_order=4)`: constant-step AB4 in sigma.

    The weights assume equal steps, so on a non-uniform (rho) grid the method is only second
    order (measured in tests/test_solvers.py); it still leads diff-sampler's FID tables at
    5-10 NFE. Warm start with orders 1, 2, 3.
    """
    max_order = _check_max_order(max_order, 4)
    return (yield from _adams_bashforth(x, sigmas, callback, afs, max_order, _ipndm_step))


def ipndm_v_update(x: Any, h: Callable[[int], Any], slope: Callable[[int], Any], order: int) -> Any:
    """x + h_n * (variable-step Adams-Bashforth weights . slopes), diff-sampler's formulas.

    ``h(k)`` is the k-th newest step size in sigma (0: h_n, the step being taken), ``slope(k)``
    the k-th newest slope. Shared by the solver and the schedule search.
    """
    h_n = h(0)
    if order == 1:
        return x + h_n * slope(0)
    h_n_1 = h(1)
    if order == 2:
        c1 = (2 + (h_n / h_n_1)) / 2
        c2 = -(h_n / h_n_1) / 2
        return x + h_n * (c1 * slope(0) + c2 * slope(1))
    h_n_2 = h(2)
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        c1 = (2 + (h_n / h_n_1)) / 2 + temp1
        c2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1
        c3 = temp1 * h_n_1 / h_n_2
        return x + h_n * (c1 * slope(0) + c2 * slope(1) + c3 * slope(2))
    h_n_3 = h(3)
    ratio_2 = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    temp2 = (
        ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2)))
        * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
        / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
    )
    c1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
    c2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + ratio_2) * temp2
    c3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio_2 * (1 + h_n_2 / h_n_3)) * temp2
    c4 = -temp2 * ratio_2 * h_n_1 / h_n_2
    return x + h_n * (c1 * slope(0) + c2 * slope(1) + c3 * slope(2) + c4 * slope(3))


def _ipndm_v_step(x, d, hist, i, order, t):
    """Variable-step Adams-Bashforth weights from the actual step sizes in sigma (`ipndm_v_update`)."""
    return ipndm_v_update(x, lambda k: t[i + 1 - k] - t[i - k], lambda k: d if k == 0 else hist[-k], order)


def ipndm_v_program(
    x: Any, sigmas, *, callback: Callback = None, round_sigma: Optional[Callable] = None,
    afs: bool = False, max_order: int = 4,
) -> Program:
    """Variable-step Adams-Bashforth, diff-sampler's `ipndm_v_sampler(max_order=4)`.

    Orders 2 and 3 are the exact variable-step AB weights (on equal steps they reduce to
    iPNDM's). The reference's order-4 weights reduce to (57, -65, 43, -11)/24 on equal steps, not
    AB4's (55, -59, 37, -9)/24, and meet the order conditions only to 3: the method is third
    order (tests/test_solvers.py measures it); kept for exactness.
    """
    max_order = _check_max_order(max_order, 4)
    return (yield from _adams_bashforth(x, sigmas, callback, afs, max_order, _ipndm_v_step))


# The VP time DEIS integrates in: diff-sampler's `edm2t` fits it to (0.002, 80) whatever the range.
DEIS_VP_FIT = (0.002, 80.0, 1e-3)
DEIS_QUADRATURE_POINTS = 10000


def deis_tau(sigma: Any) -> Any:
    """The VP time tau of noise level sigma (diff-sampler's `edm2t` on `DEIS_VP_FIT`)."""
    beta_d, beta_min = vp_betas_for_range(*DEIS_VP_FIT)
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log(sigma**2 + 1)) - beta_min) / beta_d


def deis_slope_weight(tau: Any) -> Any:
    """dsigma/dtau of the VP map, written as the reference does: -0.5 (log alpha)' / sqrt(alpha (1 - alpha))."""
    beta_d, beta_min = vp_betas_for_range(*DEIS_VP_FIT)
    beta_0, beta_1 = beta_min, beta_d + beta_min
    alpha = np.exp(-0.5 * tau**2 * (beta_1 - beta_0) - tau * beta_0)
    dlog_alpha = -(tau * (beta_1 - beta_0) + beta_0)
    return -0.5 * dlog_alpha / np.sqrt(alpha * (1 - alpha))


def deis_weights(history: list, nodes: Any, weights: Any) -> list:
    """DEIS-tAB weights C_m = int L_m(tau) sigma'(tau) dtau over one step, by a quadrature rule.

    ``history`` are the VP times of the step's points, newest (the step's start) first; L_m is
    their Lagrange basis. The rule is given as ``nodes`` and ``weights`` along the last axis
    (broadcasting against entries of ``history``): C_m = sum_q w_q sigma'(tau_q) L_m(tau_q). The
    solver uses the reference's rule (`deis_tab_coefficients`), the schedule search a Gauss rule
    that agrees with it to about 1e-7 of a step at a fraction of the cost.
    """
    order = len(history)
    f = weights * deis_slope_weight(nodes)
    out = []
    for m in range(order):
        poly = 1.0
        for k in range(order):
            if k != m:
                poly = poly * ((nodes - history[k]) / (history[m] - history[k]))
        out.append(np.sum(f * poly, axis=-1))
    return out


def deis_tab_coefficients(sigmas, max_order: int = 4, num_points: int = DEIS_QUADRATURE_POINTS) -> list[list[float]]:
    """DEIS-tAB weights, diff-sampler's `get_deis_coeff_list(t_steps, max_order, deis_mode='tab')`.

    Step i integrates the slope d, interpolated by a Lagrange polynomial through the last
    ``order`` time points in VP time tau, against dsigma/dtau over [tau_i, tau_{i+1}]. The
    integral is the reference's rectangle sum over ``num_points`` evenly spaced points, both
    ends included, times (tau' - tau) / num_points; that rule is part of the method's
    definition (its bias is O(h^3 / num_points) per step). Order-1 steps get [] (plain Euler).
    """
    max_order = _check_max_order(max_order, 4)
    tau = deis_tau(np.asarray(sigmas, dtype=np.float64))
    coeffs: list[list[float]] = []
    for i in range(len(tau) - 1):
        order = warmup_order(i, max_order)
        if order == 1:
            coeffs.append([])
            continue
        nodes = symmetric_linspace(float(tau[i]), float(tau[i + 1]), num_points)
        dtau = (float(tau[i + 1]) - float(tau[i])) / num_points
        coeffs.append([float(c) for c in deis_weights([float(tau[i - k]) for k in range(order)], nodes, dtau)])
    return coeffs


@functools.lru_cache(maxsize=32)
def _deis_coefficients(levels: tuple, max_order: int) -> list[list[float]]:
    """`deis_tab_coefficients` once per schedule: a server runs one schedule for many requests."""
    return deis_tab_coefficients(levels, max_order)


def deis_update(x: Any, h: Any, coeffs: list, slope: Callable[[int], Any], order: int) -> Any:
    """x + sum_m C_m d_m (order 1: the Euler step x + h d)."""
    if order == 1:
        return x + h * slope(0)
    out = x + coeffs[0] * slope(0)
    for k in range(1, order):
        out = out + coeffs[k] * slope(k)
    return out


def deis_program(
    x: Any, sigmas, *, callback: Callback = None, round_sigma: Optional[Callable] = None,
    afs: bool = False, max_order: int = 4,
) -> Program:
    """DEIS-tAB (order 4), diff-sampler's `deis_sampler(max_order=4)` with tAB coefficients.

    x' = x + sum_j C_ij d_{i-j}: the coefficients (`deis_tab_coefficients`) integrate the
    polynomial extrapolation of d in the VP time, once per schedule, on the host.
    """
    max_order = _check_max_order(max_order, 4)
    levels, _ = _multistep_time_points(sigmas)
    coeffs = _deis_coefficients(tuple(levels), max_order)

    def step(x, d, hist, i, order, t):
        return deis_update(x, t[i + 1] - t[i], coeffs[i], lambda k: d if k == 0 else hist[-k], order)

    return (yield from _adams_bashforth(x, sigmas, callback, afs, max_order, step))


# --------------------------------------------------------------------------------------------
# Consistency models (ECT): one network evaluation per time point

# ECT's default intermediate time point for 2-step sampling (ct_train.py --mid_t, tuned on CIFAR-10).
CONSISTENCY_MID_SIGMA = 0.821


def consistency_time_points(nfe: int, sigma_max: float, last: float = CONSISTENCY_MID_SIGMA) -> np.ndarray:
    """The time points `--nfe K` gives the consistency solver: K points spaced log-uniformly from
    sigma_max down to ``last`` (ECT's 2-step point 0.821), so NFE 1 is [sigma_max] and NFE 2 is
    exactly ECT's two-step sampler [sigma_max, 0.821]."""
    if nfe == 1:
        return np.array([float(sigma_max)])
    return np.geomspace(float(sigma_max), float(last), int(nfe))


def consistency_program(
    x: Any, sigmas, *, callback: Callback = None, round_sigma: Optional[Callable] = None,
    randn_like: Callable = default_randn_like,
) -> Program:
    """Consistency-model sampling, ECT's `generator_fn`: x = D(x; sigma_0), then for every further
    time point s, x = D(x + s eps; s) with fresh noise eps from the image's own stream.

    Only a consistency-tuned network maps any noisy point straight to its clean end, so on a
    plain EDM denoiser this gives blurred images (a warning says so). NFE = the number of time
    points; a final 0 adds nothing (the last D is the image).
    """
    levels, to_zero = _multistep_time_points(sigmas, min_points=1)
    num_steps = len(levels)
    for i, sigma in enumerate(levels):
        if i:
            eps = randn_like(x)
            if isinstance(eps, np.ndarray):
                eps = from_host(eps, x)
            x = x + sigma * eps
        x = yield x, sigma
        _report(callback, i, num_steps, sigma, sigma, levels[i + 1] if i + 1 < num_steps else 0.0, x, x)
    return x


# --------------------------------------------------------------------------------------------
# What the schedule search needs: each solver's step on linear forms of teacher points


class StepView(Protocol):
    """One step as the schedule search (`schedule_search`) sees it, many candidate steps at once.

    Every value is a linear form of teacher data (or an array of sigmas, one per candidate), so a
    solver's own update function, which only adds and scales, gives the student's x at the
    step's end. ``k`` counts the path's points backwards: 0 is where the step starts.
    """

    x: Any              # the state where the step starts
    sigma_next: Any     # where the step ends
    denoised_next: Any  # the teacher's D at sigma_next (what UniPC's corrector evaluates)

    def sigma(self, k: int) -> Any: ...

    def slope(self, k: int) -> Any:
        """d = (x - D) / sigma at the k-th newest point (AFS's slope at the first one)."""

    def denoised(self, k: int) -> Any:
        """D at the k-th newest point (AFS's x - sigma d at the first one)."""


StepOrders = Callable[[int, int, int], tuple[int, bool]]


def first_order_steps(i: int, num_steps: int, max_order: int) -> tuple[int, bool]:
    """Euler and Heun: every step order 1 (Heun's second stage is no history)."""
    return 1, False


def _dpmpp_2m_steps(i: int, num_steps: int, max_order: int) -> tuple[int, bool]:
    return warmup_order(i, 2), False


def _warmup_steps(i: int, num_steps: int, max_order: int) -> tuple[int, bool]:
    return warmup_order(i, max_order), False


def _lower_order_final_steps(i: int, num_steps: int, max_order: int) -> tuple[int, bool]:
    return lower_order_final(i, num_steps, max_order), False


def _unipc_steps(i: int, num_steps: int, max_order: int) -> tuple[int, bool]:
    return lower_order_final(i, num_steps, max_order), unipc_corrects(i, num_steps, max_order)


def _history(v: StepView, order: int) -> tuple[list, list]:
    """The data predictions and sigmas of the step's last ``order`` points, newest last."""
    ks = range(order - 1, -1, -1)
    return [v.denoised(k) for k in ks], [v.sigma(k) for k in ks]


def _adams_bashforth_search_step(v: StepView, order: int, corrector: bool) -> Any:
    """Fixed Adams-Bashforth weights (`ipndm_update`); order 1 is Euler's step."""
    return ipndm_update(v.x, v.sigma_next - v.sigma(0), v.slope, order)


def _ipndm_v_search_step(v: StepView, order: int, corrector: bool) -> Any:
    return ipndm_v_update(v.x, lambda k: (v.sigma_next if k == 0 else v.sigma(k - 1)) - v.sigma(k), v.slope, order)


def _dpmpp_2m_search_step(v: StepView, order: int, corrector: bool) -> Any:
    if order == 1:
        return dpmpp_2m_update(v.x, v.denoised(0), None, None, v.sigma(0), v.sigma_next)
    return dpmpp_2m_update(v.x, v.denoised(0), v.denoised(1), v.sigma(1), v.sigma(0), v.sigma_next)


def _dpmpp_3m_search_step(v: StepView, order: int, corrector: bool) -> Any:
    models, times = _history(v, order)
    return dpmpp_update(v.x, models, times, v.sigma_next, order)


def _unipc_search_step(v: StepView, order: int, corrector: bool) -> Any:
    """The predictor, or with ``corrector`` the corrected step with the teacher's D at sigma_next."""
    models, times = _history(v, order)
    x_pred, step = unipc_predict(v.x, models, times, v.sigma_next, order)
    return unipc_correct(step, v.denoised_next) if corrector else x_pred


# Gauss-Legendre points for the search's DEIS weights, integrated in sigma where the integrand is smooth.
DEIS_SEARCH_GAUSS_POINTS = 16


def _deis_search_step(v: StepView, order: int, corrector: bool) -> Any:
    """DEIS-tAB with `deis_weights`, by a quadrature rule cheaper than the reference's.

    The reference (`deis_tab_coefficients`) sums the integrand at N = 10000 evenly spaced tau,
    both ends included, times (tau_j - tau_i) / N: that is (1 - 1/N) times the integral plus
    (tau_j - tau_i) (f(tau_i) + f(tau_j)) / (2N) up to the trapezoid rule's error. Here the
    integral is taken in sigma (sigma'(tau) dtau = dsigma: a smooth integrand, where sigma'(tau)
    is steep near sigma_min) by Gauss-Legendre, and the two end terms are added as two more
    nodes. The weights agree with the reference's to about 1e-7 of the step.
    """
    h = v.sigma_next - v.sigma(0)
    if order == 1:
        return deis_update(v.x, h, [], v.slope, 1)
    taus = [deis_tau(v.sigma(k))[:, None] for k in range(order)]
    s_i, s_j = v.sigma(0)[:, None], v.sigma_next[:, None]
    a, b = taus[0], deis_tau(s_j)
    xi, wi = np.polynomial.legendre.leggauss(DEIS_SEARCH_GAUSS_POINTS)
    tq = deis_tau(s_i + (s_j - s_i) * (xi[None, :] + 1) / 2)
    num = DEIS_QUADRATURE_POINTS
    gauss = (s_j - s_i) * wi[None, :] / 2 * (1 - 1 / num) / deis_slope_weight(tq)  # dsigma = sigma'(tau) dtau
    ends = np.broadcast_to((b - a) / (2 * num), a.shape)
    nodes = np.concatenate([tq, a, b], axis=1)
    weights = np.concatenate([gauss, ends, ends], axis=1)
    return deis_update(v.x, h, deis_weights(taus, nodes, weights), v.slope, order)


@dataclass(frozen=True)
class SearchRule:
    """What the schedule search needs to cost a solver's steps on teacher trajectories.

    ``orders(i, num_steps, max_order)`` is (order of step i, whether a corrector evaluates at its
    end), by the rules the program follows. ``step(view, order, corrector)`` is the solver's
    update on a `StepView`. A step that evaluates off the teacher's trajectory (Heun's second
    stage) cannot be a linear form: ``second_stage(x, h, d, sigma_next)`` is then that
    sub-program, which the search runs on the network for every pair of fine points.
    ``teacher``: the program's callback reports D at the point each step starts from, so it can
    integrate the search's teacher trajectories.
    """

    orders: StepOrders
    step: Optional[Callable[[StepView, int, bool], Any]] = None
    second_stage: Optional[Callable[..., Program]] = None
    teacher: bool = True


# --------------------------------------------------------------------------------------------
# The registry: the single description the CLI, --help, the NFE line, bench and the docs read


def _nfe_edm(second_order: bool):
    def count(n: int, to_zero: bool, afs: bool) -> int:
        return (2 if second_order else 1) * (n - 1) + (1 if to_zero else 0)
    return count


def _nfe_one_per_step(n: int, to_zero: bool, afs: bool) -> int:
    return n - 1 - (1 if afs else 0) + (1 if to_zero else 0)


def _nfe_per_point(n: int, to_zero: bool, afs: bool) -> int:
    return n


def _nfe_unipc(n: int, to_zero: bool, afs: bool) -> int:
    corrector_calls = n - 1 - (1 if n >= 4 else 0)  # every step but the last, warm-up steps always
    return 1 - (1 if afs else 0) + corrector_calls + (1 if to_zero else 0)


# A program's keyword parameters that every driver passes and that are no user option.
_DRIVER_PARAMETERS = ("callback", "round_sigma")


@dataclass(frozen=True)
class SolverSpec:
    """One solver: its step program and what the program alone does not say.

    ``count(n, to_zero, afs)`` is the exact number of network calls for ``n`` positive time
    points, with or without a final sigma = 0. ``appends_zero``: a named schedule always gets
    the final sigma = 0 (Euler/Heun/k-diffusion style) rather than stopping at sigma_min.
    ``nominal_order`` is the order the method is named for (the reference's max_order); what
    it converges at, warm start and reference formulas included, is measured in
    tests/test_solvers.py (e.g. 2 for dpmpp-3m and ipndm, 3 for ipndm-v, 4 for unipc and deis).
    ``search`` says how the schedule search costs its steps (None: not searchable).
    The options, the batch function and the highest order are read from the program itself.
    """

    name: str
    program: Callable[..., Program]
    description: str
    reference: str
    nominal_order: int
    nfe_formula: str
    count: Callable[[int, bool, bool], int]
    appends_zero: bool = False
    min_points: int = 2
    # The time points `nfe` means when no schedule is named (None: the EDM schedule's N points).
    time_points_for_nfe: Optional[Callable[[int, float], np.ndarray]] = None
    # Made for consistency-tuned networks (one evaluation maps noise to data), not for an ODE.
    for_consistency_models: bool = False
    search: Optional[SearchRule] = None

    @functools.cached_property
    def options(self) -> tuple[str, ...]:
        """Every keyword option of the program besides what the drivers pass."""
        return tuple(name for name, p in inspect.signature(self.program).parameters.items()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _DRIVER_PARAMETERS)

    @functools.cached_property
    def fn(self) -> Callable[..., Any]:
        """The k-diffusion style function ``fn(den, x, sigmas, class_labels=None, *, callback=None, **options)``:
        the program run by `run_program`, one call of ``den`` per evaluation."""
        program = self.program

        def solve(den: Any, x: Any, sigmas, class_labels: Any = None, *, callback: Callback = None,
                  **options: Any) -> Any:
            return run_program(den, program(x, sigmas, callback=callback, round_sigma=den.round_sigma, **options),
                               class_labels)

        solve.__name__ = solve.__qualname__ = program.__name__.removesuffix("_program")
        solve.__doc__ = f"{program.__doc__}\n\n    Runs `{program.__name__}` with one call of ``den`` per evaluation."
        return solve

    @property
    def max_order(self) -> Optional[int]:
        """The highest order a multistep solver takes (its program's max_order default), None for others."""
        if "max_order" not in self.options:
            return None
        return int(inspect.signature(self.program).parameters["max_order"].default)

    @property
    def takes_afs(self) -> bool:
        return "afs" in self.options

    @property
    def takes_churn(self) -> bool:
        return "S_churn" in self.options

    @property
    def draws_noise(self) -> bool:
        """Whether the program takes the per-seed noise stream (``randn_like``)."""
        return "randn_like" in self.options

    def nfe(self, num_points: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
        """Network evaluations per image for ``num_points`` time points (not counting a final 0)."""
        _check_flags(self, afs, denoise_to_zero)
        return self.count(int(num_points), self.appends_zero or denoise_to_zero, afs)

    def nfe_for_sigmas(self, sigmas, afs: bool = False) -> int:
        """Network evaluations of ``fn`` on exactly this sigma list (a final 0 included or not)."""
        arr = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        to_zero = bool(arr.size and arr[-1] == 0)
        return self.count(int(arr.size - to_zero), to_zero, afs)


_MULTISTEP_NFE = "N - 1 (AFS: -1, denoise_to_zero: +1)"

SOLVER_REGISTRY: dict[str, SolverSpec] = {
    s.name: s
    for s in (
        SolverSpec(
            name="euler", program=euler_program, description="Euler steps in sigma (EDM Algorithm 1), optional churn",
            reference="NVlabs/edm ablation_sampler(solver='euler')", nominal_order=1, nfe_formula="N",
            count=_nfe_edm(False), appends_zero=True, min_points=1,
            search=SearchRule(orders=first_order_steps, step=_adams_bashforth_search_step),
        ),
        SolverSpec(
            name="heun", program=heun_program,
            description="EDM Algorithm 2: Heun steps, Euler into sigma = 0, optional churn",
            reference="NVlabs/edm edm_sampler", nominal_order=2, nfe_formula="2N - 1 (always odd)",
            count=_nfe_edm(True), appends_zero=True, min_points=1,
            search=SearchRule(orders=first_order_steps, second_stage=heun_second_stage),
        ),
        SolverSpec(
            name="dpmpp-2m", program=dpmpp_2m_program,
            description="DPM-Solver++(2M): 2nd-order multistep exponential integrator on D",
            reference="crowsonkb/k-diffusion sample_dpmpp_2m", nominal_order=2, nfe_formula="N",
            count=_nfe_one_per_step, appends_zero=True, min_points=1,
            search=SearchRule(orders=_dpmpp_2m_steps, step=_dpmpp_2m_search_step),
        ),
        SolverSpec(
            name="dpmpp-3m", program=dpmpp_3m_program,
            description="DPM-Solver++(3M): multistep exponential integrator on D, updates of order 1-3",
            reference="zju-pi/diff-sampler dpm_pp_sampler(max_order=3, predict_x0=True, lower_order_final=True)",
            nominal_order=3, nfe_formula=_MULTISTEP_NFE, count=_nfe_one_per_step,
            search=SearchRule(orders=_lower_order_final_steps, step=_dpmpp_3m_search_step),
        ),
        SolverSpec(
            name="unipc", program=unipc_program,
            description="UniPC-3 (bh2): multistep predictor-corrector on D, corrector for free",
            reference="zju-pi/diff-sampler unipc_sampler(variant='bh2', max_order=3, lower_order_final=True)",
            nominal_order=3, nfe_formula="N - 1 for N >= 4, N for N = 2, 3 (AFS: -1, denoise_to_zero: +1)",
            count=_nfe_unipc,
            # Its callback reports the corrector's D at the step's end, not D where the step starts.
            search=SearchRule(orders=_unipc_steps, step=_unipc_search_step, teacher=False),
        ),
        SolverSpec(
            name="ipndm", program=ipndm_program,
            description="improved PNDM: 4-step Adams-Bashforth on the slope, fixed weights",
            reference="zju-pi/diff-sampler ipndm_sampler(max_order=4)", nominal_order=4, nfe_formula=_MULTISTEP_NFE,
            count=_nfe_one_per_step, search=SearchRule(orders=_warmup_steps, step=_adams_bashforth_search_step),
        ),
        SolverSpec(
            name="ipndm-v", program=ipndm_v_program, description="iPNDM with variable-step Adams-Bashforth weights",
            reference="zju-pi/diff-sampler ipndm_v_sampler(max_order=4)", nominal_order=4, nfe_formula=_MULTISTEP_NFE,
            count=_nfe_one_per_step, search=SearchRule(orders=_warmup_steps, step=_ipndm_v_search_step),
        ),
        SolverSpec(
            name="deis", program=deis_program, description="DEIS-tAB4: Adams-Bashforth with weights integrated in VP time",
            reference="zju-pi/diff-sampler deis_sampler(max_order=4), get_deis_coeff_list(deis_mode='tab')",
            nominal_order=4, nfe_formula=_MULTISTEP_NFE, count=_nfe_one_per_step,
            search=SearchRule(orders=_warmup_steps, step=_deis_search_step),
        ),
        SolverSpec(
            name="consistency", program=consistency_program,
            description="consistency-model sampling (ECT): x = D(x + s eps; s) at each time point, for "
                        "consistency-tuned models",
            reference="locuslab/ect generator_fn", nominal_order=0,
            nfe_formula="N (--nfe K: K points from sigma_max to 0.821)", count=_nfe_per_point, min_points=1,
            time_points_for_nfe=consistency_time_points, for_consistency_models=True,
        ),
    )
}

SOLVER_NAMES = tuple(SOLVER_REGISTRY)


def get_solver(name: str) -> SolverSpec:
    """The registry entry of ``name``, or one InputError listing the choices."""
    spec = SOLVER_REGISTRY.get(name)
    if spec is None:
        raise param_error("solver", f"unknown solver {name!r}; choose one of {', '.join(SOLVER_NAMES)}")
    return spec


def _check_flags(spec: SolverSpec, afs: bool, denoise_to_zero: bool, explicit_sigmas: bool = False) -> None:
    """AFS only where the first step is a slope; denoise_to_zero where the solver would not end at 0 itself
    (with an explicit list, which is used as given, every ODE solver may ask for the step into 0)."""
    if afs and not spec.takes_afs:
        users = ", ".join(s.name for s in SOLVER_REGISTRY.values() if s.takes_afs)
        raise param_error("afs", f"afs does not apply to the {spec.name} solver (it applies to {users})")
    if denoise_to_zero and spec.appends_zero and not explicit_sigmas:
        raise param_error("denoise_to_zero", f"denoise_to_zero does not apply to the {spec.name} solver: its last step already goes to sigma = 0")
    if denoise_to_zero and spec.for_consistency_models:
        raise param_error("denoise_to_zero", f"denoise_to_zero does not apply to the {spec.name} solver: every "
                                             "evaluation already predicts the clean image")


def check_solver_options(
    name: str, options: Optional[Mapping[str, Any]] = None, afs: bool = False, denoise_to_zero: bool = False,
    explicit_sigmas: bool = False,
) -> SolverSpec:
    """Refuse, with one InputError, any option that ``name`` would not use (nothing is silently ignored).

    ``options`` are the solver's keyword options as a caller collected them (only those it set);
    ``explicit_sigmas``: the time points are a list given as is, not a named schedule.
    """
    spec = get_solver(name)
    for key in options or {}:
        if key == "callback":
            continue
        if key not in spec.options:
            users = [s.name for s in SOLVER_REGISTRY.values() if key in s.options]
            where = f"it applies to {', '.join(users)}" if users else "no solver takes it"
            raise param_error(key, f"{key} does not apply to the {name} solver ({where})")
    _check_flags(spec, bool(afs) or bool((options or {}).get("afs")), denoise_to_zero, explicit_sigmas)
    return spec


def steps_for_nfe(solver: str, nfe: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
    """The number of time points N that makes ``solver`` spend exactly ``nfe`` network calls.

    Where two N cost the same (UniPC's warm-up), the larger N: more steps for the same budget.
    An impossible budget (Heun's NFE is always odd) is one InputError saying why.
    """
    spec = get_solver(solver)
    _check_flags(spec, afs, denoise_to_zero)
    nfe = check_int(nfe, "nfe", lo=1)
    points = range(spec.min_points, min(nfe + 4, MAX_STEPS + 1))  # a schedule has at most MAX_STEPS points
    fits = [n for n in points if spec.nfe(n, afs, denoise_to_zero) == nfe]
    if fits:
        return max(fits)
    costs = sorted(c for c in {spec.nfe(n, afs, denoise_to_zero) for n in points} if c <= MAX_STEPS)
    below = [c for c in costs if c < nfe]
    above = [c for c in costs if c > nfe]
    if not above and nfe > max(costs, default=0):
        raise param_error("nfe", f"{solver} cannot spend NFE {nfe}: its NFE is {spec.nfe_formula} for N time points, "
                                 f"and a schedule has at most {MAX_STEPS:,}; the most it spends is NFE {costs[-1]:,}")
    nearest = " or ".join(str(c) for c in (below[-1:] + above[:1]))
    raise param_error(
        "nfe",
        f"{solver} cannot spend exactly NFE {nfe}: its NFE is {spec.nfe_formula} for N time points; "
        f"nearest possible: {nearest}"
    )
